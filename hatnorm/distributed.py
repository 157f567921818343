"""Multi-process training under ``torchrun``: batch statistics synchronised across ranks, and DDP or FSDP2 set up
for HAT.

Each rank runs the same script on its share of every batch::

    dist.init_process_group("gloo")                 # "nccl" on GPUs; torchrun sets rank and world size
    model = hatnorm.build("resnet18", num_tasks=5, norm="masked_bn", num_classes=2)
    ddp = hatnorm.distributed.wrap(model)           # convert_sync + DistributedDataParallel
    hat = hatnorm.HAT(ddp)                          # HAT unwraps DDP and works on the inner model
    ...
    out = ddp(hatnorm.distributed.shard(x), task=task, s=s)

DDP averages the gradients during ``backward``; :meth:`hatnorm.HAT.protect` then compensates and
multiplies the averaged gradients and :meth:`hatnorm.HAT.step` restores frozen entries, identically on
every rank, so the ranks stay in step without further communication. Loops that cannot use DDP call
:func:`average_gradients` after ``backward`` instead (as :mod:`hatnorm.training` does). Everything here
does nothing in a single process.

Sharded data parallelism (PyTorch FSDP2) instead of DDP: :func:`fully_shard` in place of :func:`wrap`, the rest
of the loop unchanged::

    model = hatnorm.distributed.fully_shard(model)  # convert_sync + torch.distributed.fsdp.fully_shard
    hat = hatnorm.HAT(model)                        # multipliers cut to each rank's shards
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ...
    out = model(hatnorm.distributed.shard(x), task=task, s=s)

Each rank then holds a slice of every parameter (dim 0, as ``torch.chunk`` cuts it) and of its gradient,
which FSDP2 averages over the ranks during ``backward``. :class:`hatnorm.HAT` computes its multipliers over
whole parameters from masks every rank holds whole, keeps the slice of its rank, and multiplies, restores
and clamps the local shards alone: HAT adds no communication to a step. :func:`save_sharded` and
:func:`load_sharded` checkpoint such a run with ``torch.distributed.checkpoint``, HAT's state included.
"""

from __future__ import annotations

import inspect
import io
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from hatnorm._hat import HAT
from hatnorm._norm_protocol import MaskedNorm
from hatnorm._shards import is_sharded

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

# No buffer broadcast before every forward: synchronised norms keep their statistics equal on every rank.
# torch ≥ 2.15 calls this forward_sync_buffers=False (buffers are still made equal once, at wrapping);
# older versions broadcast_buffers=False.
_NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def _group(process_group: object) -> ProcessGroup | None:
    """The group to synchronise over, or ``None`` when there is nothing to synchronise."""
    if not dist.is_available():
        if process_group is not None:
            raise TypeError(f"process_group must be None when torch.distributed is unavailable, got {process_group!r}")
        return None
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be None (every rank) or a torch.distributed.ProcessGroup, "
                        f"got {process_group!r} of type {type(process_group).__name__}")
    if not dist.is_initialized():
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    if dist.get_rank(group) < 0:
        raise ValueError(f"process_group must contain this process (global rank {dist.get_rank()}), "
                         "got a group it is not a member of")
    return group if dist.get_world_size(group) > 1 else None


def convert_sync(model: nn.Module, process_group: ProcessGroup | None = None) -> nn.Module:
    """Make every batch-statistics norm of ``model`` normalise over the batches of all ranks together.

    The hatnorm counterpart of :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`: every norm's
    :meth:`~hatnorm.MaskedNorm.sync` is given the group. Masked, per-task, shared and post-gate BatchNorms
    then compute their training statistics (per-channel count, mean and
    variance) over every rank of ``process_group`` through an autograd-aware all-reduce, so outputs,
    gradients (after DDP's averaging) and running statistics are those of the concatenated batch. Each
    norm moves exactly what it moves in one process: masked BN the task's selected units, per-task BN
    the task's slot. Evaluation and layer norms need no communication and are unchanged.

    The norms are converted in place. Nothing happens when ``torch.distributed`` is unavailable or not
    initialised, or the group has a single rank. Plain ``torch.nn`` BatchNorm layers are left alone
    (convert them with :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`).

    Args:
        model: the model, or a ``DistributedDataParallel`` wrapping it.
        process_group: the ranks to synchronise over; ``None`` for every rank (the default group).

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``process_group`` is not ``None`` or a
            ``torch.distributed.ProcessGroup``.
        ValueError: this process is not a member of ``process_group``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    group = _group(process_group)
    if group is not None:
        for norm in model.modules():
            if isinstance(norm, MaskedNorm):
                norm.sync(group)
    return model


def is_distributed(process_group: ProcessGroup | None = None) -> bool:
    """Whether ``torch.distributed`` is initialised with more than one rank in ``process_group`` (``None``: all)."""
    return _group(process_group) is not None


def wrap(model: nn.Module, process_group: ProcessGroup | None = None, **ddp_options: Any) -> nn.Module:
    """:func:`convert_sync` the model and wrap it in ``DistributedDataParallel`` with HAT's settings.

    ``find_unused_parameters=True``: the heads of other tasks take no part in a step (a static graph
    does not fit either, since the head changes with the task). No buffer broadcast before each forward
    (``forward_sync_buffers=False``, ``broadcast_buffers=False`` before torch 2.15): the synchronised
    norms keep their running statistics equal on every rank, and the gates' masks follow from
    parameters DDP keeps equal. Both can be overridden through ``ddp_options``. A single process gets
    ``model`` back unwrapped.

    Args:
        model: the HAT model, already on its device.
        process_group: the ranks to train over; ``None`` for every rank.
        **ddp_options: further ``DistributedDataParallel`` arguments (``device_ids`` on GPUs, ...).

    Returns:
        The ``DistributedDataParallel`` wrapper, or ``model`` in a single process.
    """
    convert_sync(model, process_group)
    if not is_distributed(process_group):
        return model
    options = {"find_unused_parameters": True, **_NO_FORWARD_BUFFER_SYNC} | ddp_options
    return DistributedDataParallel(model, process_group=process_group, **options)


def fully_shard(model: nn.Module, mesh: DeviceMesh | None = None, *, units: Sequence[nn.Module] = (),
                **fsdp_options: Any) -> nn.Module:
    """:func:`convert_sync` the model and shard it with PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``).

    Every parameter of ``model`` becomes a ``DTensor`` of which each rank holds one slice; gradients are
    averaged over the ranks during ``backward``, as DDP does. Each module of ``units`` is sharded on its own
    first (its parameters are gathered only around its forward: transformer blocks, say); ``model`` takes
    every other parameter, the gates' embeddings included unless a unit holds them. Every module, the
    root included, gives its gathered parameters back after its forward (``reshard_after_forward=True``; FSDP2
    keeps the root's gathered by default), so outside a forward the model's parameters are always the
    sharded ones: build :class:`hatnorm.HAT` and the optimizer after this call, at any time.
    ``torch.distributed.fsdp`` is imported here, on first use. A single process gets ``model`` back unchanged.

    Args:
        model: the HAT model, already on its device; sharded in place.
        mesh: the 1-D device mesh to shard over; ``None``: every rank, on the device type of ``model``'s
            parameters (``init_device_mesh("cpu", (world,))`` on the CPU, with gloo).
        units: submodules of ``model`` to shard on their own, innermost first.
        **fsdp_options: further ``fully_shard`` arguments (``reshard_after_forward``, ``mp_policy``, ...).

    Returns:
        ``model``, now also a ``torch.distributed.fsdp.FSDPModule``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``units`` is not a sequence of its submodules.
        ValueError: ``mesh`` is not 1-D.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(units, Sequence) or not all(isinstance(u, nn.Module) for u in units):
        raise TypeError(f"units must be a sequence of submodules of model, got {units!r}")
    if any(not any(u is m for m in model.modules()) or u is model for u in units):
        raise TypeError("units must be a sequence of submodules of model (model itself excluded), got a module "
                        "that is not one")
    if mesh is not None and mesh.ndim != 1:
        raise ValueError(f"mesh must be a 1-D device mesh, got one of shape {tuple(mesh.shape)}")
    group = None if mesh is None else mesh.get_group()
    if not is_distributed(group):
        return model
    # seconds to import: on first use
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard as shard_module

    convert_sync(model, group)
    if mesh is None:
        device = next(model.parameters()).device
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # the root too gives its parameters back after every forward (FSDP2 keeps a root's gathered by default): the
    # model's parameters outside a forward are then always the sharded ones, which the optimizer must step
    options = {"reshard_after_forward": True} | fsdp_options
    for unit in units:
        shard_module(unit, mesh=mesh, **options)
    shard_module(model, mesh=mesh, **options)
    return model


def save_sharded(directory: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 hat: HAT | None = None) -> None:
    """Checkpoint a run with ``torch.distributed.checkpoint``: each rank writes its shards, once, in parallel.

    Every rank calls it. The folder receives the model's state (parameters, the gates' masks, the norms'
    statistics), the optimizer's (its moments, sharded as the parameters are) and ``hat.state_dict()`` (the
    learned tasks, the active task, a step policy's per-unit state). :func:`load_sharded` reads it back,
    on the same number of ranks or another (torch.distributed.checkpoint reshards on load). A model
    nobody sharded is saved the same way, by one process.

    Args:
        directory: the checkpoint folder (created if missing; a checkpoint already there is overwritten).
        model: the model, sharded by :func:`fully_shard` or not.
        optimizer: the optimizer of ``model``'s parameters, or ``None``.
        hat: the :class:`hatnorm.HAT` training ``model``, or ``None``.
    """
    import torch.distributed.checkpoint as dcp  # seconds to import: on first use

    with _single_process_quietly():
        dcp.save(_checkpoint_state(model, optimizer, hat), checkpoint_id=os.fspath(directory), no_dist=_one_process())


def load_sharded(directory: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 hat: HAT | None = None) -> None:
    """Resume what :func:`save_sharded` wrote: the model's state, then the optimizer's, then HAT's.

    Every rank calls it, with the model sharded as it will train (:func:`fully_shard`), the optimizer
    built over its parameters, and ``hat`` built over it: training then goes on as if never interrupted
    (an active task is begun again from the loaded masks, see :meth:`hatnorm.HAT.load_state_dict`).

    Args:
        directory: the folder :func:`save_sharded` wrote.
        model: the model to load into, sharded as when saved or otherwise.
        optimizer: the optimizer to load into; ``None`` when none was saved or none is wanted.
        hat: the :class:`hatnorm.HAT` to load into; ``None`` when none was saved or none is wanted.

    Raises:
        FileNotFoundError: ``directory`` holds no checkpoint.
    """
    import torch.distributed.checkpoint as dcp  # seconds to import: on first use
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if not (Path(directory) / ".metadata").is_file():
        raise FileNotFoundError(f"directory must be a folder save_sharded wrote, got {os.fspath(directory)!r}, "
                                "which holds no .metadata")
    state = _checkpoint_state(model, optimizer, hat)
    optimizer_state = state.pop("optimizer", None)
    with _single_process_quietly():
        dcp.load(state, checkpoint_id=os.fspath(directory), no_dist=_one_process())
        set_model_state_dict(model, state["model"])
        if optimizer is not None:
            # an optimizer keeps no state for a parameter it never stepped (another task's head): the fresh
            # optimizer's template holds every parameter, the checkpoint those it had stepped
            dcp.load({"optimizer": optimizer_state}, checkpoint_id=os.fspath(directory), no_dist=_one_process(),
                     planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
            set_optimizer_state_dict(model, optimizer, optimizer_state)
    if hat is not None:
        hat.load_state_dict(torch.load(io.BytesIO(state["hat"]), weights_only=True))


@contextmanager
def _single_process_quietly() -> Iterator[None]:
    """torch.distributed.checkpoint warns that it works in one process when no process group is initialised,
    which :func:`save_sharded` and :func:`load_sharded` mean to do then; its other warnings stay."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _one_process() -> bool:
    """Whether torch.distributed.checkpoint works in this process alone: no process group is initialised."""
    return not (dist.is_available() and dist.is_initialized())


def _checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, hat: HAT | None) -> dict[str, Any]:
    """What :func:`save_sharded` writes and :func:`load_sharded` fills in: HAT's state as the bytes of one
    ``torch.save`` (its lists grow with the tasks learned, so they cannot serve as the template of a load)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    if hat is not None:
        buffer = io.BytesIO()
        torch.save(hat.state_dict(), buffer)
        state["hat"] = buffer.getvalue()
    return state


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper, or ``model`` itself."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return model.module if isinstance(model, DistributedDataParallel) else model


def world_size(process_group: ProcessGroup | None = None) -> int:
    """How many ranks ``process_group`` (``None``: every rank) has; 1 in a single process."""
    group = _group(process_group)
    return 1 if group is None else dist.get_world_size(group)


def shard(batch: Tensor, process_group: ProcessGroup | None = None) -> Tensor:
    """This rank's contiguous share of a global ``batch`` (split along dim 0); the whole batch in one process.

    Ranks get equal shares when the batch size is a multiple of the world size; otherwise the first
    ``len(batch) % world`` ranks get one sample more. The average of the ranks' mean losses is the mean
    loss of the whole batch only with equal shares: weight each rank's mean loss by
    :func:`share_weight` to make it so for any batch.

    Raises:
        ValueError: the batch has fewer samples than the group has ranks.
    """
    if not isinstance(batch, Tensor) or batch.dim() == 0:
        what = "a 0-D tensor" if isinstance(batch, Tensor) else type(batch).__name__
        raise TypeError(f"batch must be a tensor whose dim 0 is the batch, got {what}")
    group = _group(process_group)
    if group is None:
        return batch
    world = dist.get_world_size(group)
    if len(batch) < world:
        raise ValueError(f"batch must hold at least one sample per rank ({world}), got {len(batch)}")
    return batch.tensor_split(world)[dist.get_rank(group)]


def share_weight(batch_size: int, process_group: ProcessGroup | None = None) -> float:
    """The weight of this rank's mean loss over its :func:`shard` of a batch of ``batch_size`` samples.

    ``len(share) × world / batch_size``: with it, the gradients averaged over the ranks (by DDP or
    :func:`average_gradients`) are those of the whole batch's mean loss, also when the shares are
    unequal (a last batch of 5 split 3 / 2). Exactly 1 with equal shares and in one process.

    Raises:
        ValueError: ``batch_size`` is not an int ≥ the group's number of ranks.
    """
    world = world_size(process_group)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < world:
        raise ValueError(f"batch_size must be an int ≥ the number of ranks ({world}), got {batch_size!r}")
    if world == 1:
        return 1.0
    rank = dist.get_rank(_group(process_group))
    share = batch_size // world + (rank < batch_size % world)
    return share * world / batch_size


def average_gradients(model: nn.Module, process_group: ProcessGroup | None = None) -> None:
    """Average the gradients of ``model``'s parameters over the ranks, as DDP does during ``backward``.

    For loops that do not wrap the model in ``DistributedDataParallel`` (such as
    :func:`hatnorm.training.train_sequence`, whose joint training runs several forwards per step). Call
    it after ``backward`` and before :meth:`hatnorm.HAT.protect`. Parameters without a gradient, and those
    :func:`fully_shard` sharded (whose gradients FSDP2 averaged during ``backward``), are left
    alone; every rank must have gradients for the same parameters, as ranks running the same task do.
    Nothing happens in a single process.
    """
    group = _group(process_group)
    if group is None:
        return
    grads = [p.grad for p in unwrap(model).parameters() if p.grad is not None and not is_sharded(p.grad)]
    for work in [dist.all_reduce(g, group=group, async_op=True) for g in grads]:
        work.wait()
    if grads:
        torch._foreach_div_(grads, dist.get_world_size(group))


def is_main_process() -> bool:
    """Whether this process writes files and logs: rank 0 of a distributed run, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
