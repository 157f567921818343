"""Parameters sharded by PyTorch FSDP2 (``fully_shard``): their local shards, and HAT's per-entry tensors cut alike.

FSDP2 keeps every parameter as a ``DTensor`` whose rank holds one shard (a slice along dim 0 by default, as
``torch.chunk`` cuts it). HAT's multipliers and restore masks are computed over the whole parameter from masks
every rank holds whole (the gates' buffers), then cut here into the slice this rank holds, so gradients and
parameters are changed on the local shard alone, without communication.

``torch.distributed.tensor`` and ``torch.distributed.fsdp`` take seconds to import: they are looked up in
``sys.modules``, never imported here. A ``DTensor`` or an FSDP module can exist only once its module is loaded,
so a model nobody sharded never pays for them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn


def _loaded(module: str, name: str) -> type | None:
    """The class ``name`` of ``module`` when the module is loaded, else ``None``."""
    found = sys.modules.get(module)
    return None if found is None else getattr(found, name, None)


def is_sharded(tensor: object) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter or gradient sharded by FSDP2)."""
    dtensor = _loaded("torch.distributed.tensor", "DTensor")
    return dtensor is not None and isinstance(tensor, dtensor)


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor`` (a view: writing to it writes the parameter), or ``tensor`` itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def whole(tensor: Tensor) -> Tensor:
    """The whole value of a ``DTensor``, gathered from every rank (differentiable), or ``tensor`` itself.

    A collective: every rank of the parameter's mesh must call it, in the same order.
    """
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local_part(values: Tensor, param: Tensor) -> Tensor:
    """The entries of ``values`` at the positions ``param``'s local shard holds; ``values`` itself if unsharded.

    Args:
        values: a tensor of ``param``'s global shape, or broadcastable to it.
        param: a parameter, plain or a ``DTensor``.
    """
    if not is_sharded(param):
        return values
    distribute = sys.modules["torch.distributed.tensor"].distribute_tensor
    # src_data_rank=None: every rank cuts its own copy, which every rank holds whole; no communication
    spread = distribute(values.expand(param.shape).contiguous(), param.device_mesh, param.placements,
                        src_data_rank=None)
    return spread.to_local()


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The submodules of ``model`` (itself included) that ``fully_shard`` was applied to."""
    fsdp = _loaded("torch.distributed.fsdp", "FSDPModule")
    return [] if fsdp is None else [m for m in model.modules() if isinstance(m, fsdp)]


def reshard(model: nn.Module) -> None:
    """Register the sharded parameters on every FSDP module of ``model`` (FSDP2 leaves the root's parameters
    gathered after a forward): the parameters the optimizer steps and HAT protects are then the modules'."""
    for module in fsdp_modules(model):
        module.reshard()


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Within the block, every FSDP module of ``model`` holds its whole parameters (read-only use: writes to
    them are lost when they are sharded again at the block's end). A collective on every rank."""
    modules = fsdp_modules(model)
    for module in modules:
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.reshard()


def whole_state(value: Any) -> Any:
    """``value`` (nested dicts and lists: a state dict, an optimizer's) with every ``DTensor`` gathered whole.

    A collective when it holds any: every rank calls it, with the same structure.
    """
    if isinstance(value, Tensor):
        return whole(value)
    if isinstance(value, Mapping):
        return {k: whole_state(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(whole_state(v) for v in value)
    return value


def shard_state(state: Mapping[str, Any], like: Mapping[str, Any]) -> dict[str, Any]:
    """A state dict of whole tensors (:func:`whole_state`) cut as the ``DTensor`` entries of ``like`` are: what
    ``load_state_dict`` of a sharded model takes. Entries ``like`` holds whole, or lacks, stay as they are."""
    return {k: _cut(v, like.get(k)) for k, v in state.items()}


def shard_optimizer_state(state: Mapping[str, Any], params: Sequence[Tensor]) -> dict[str, Any]:
    """An optimizer state dict of whole tensors cut as ``params`` (the optimizer's, in its order) are: an entry of
    a parameter's shape (a moment) takes the parameter's shards, a scalar (the step count) stays whole."""
    per_param = {i: {k: _cut(v, params[i]) if isinstance(v, Tensor) and v.shape == params[i].shape else v
                     for k, v in entry.items()} for i, entry in state["state"].items()}
    return dict(state) | {"state": per_param}


def _cut(value: Any, like: Any) -> Any:
    if not (isinstance(value, Tensor) and is_sharded(like)) or is_sharded(value):
        return value
    distribute = sys.modules["torch.distributed.tensor"].distribute_tensor
    return distribute(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
