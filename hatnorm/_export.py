"""Per-task export: one task of a HAT model as a plain inference module.

``export(model, task)`` copies the model and, for that task,

* folds every gate into what reads it: a norm's affine becomes γ·a, β·a with the task's statistics (the
  norm's own evaluation formula, so outputs are unchanged), and a gate becomes a constant;
* removes the units the task does not use: a unit is kept when the task selects it (a^t > 0.5) on any
  gate of the residual stream it lives in (units joined by a residual add are kept or removed
  together), and every weighted layer loses the rows and columns of removed units;
* keeps only the task's head and drops every gate embedding, every other task's norm slot and head.

Units stay whole where removing them would change the layout: q, k and v of attention (heads need
their full width), units read by index (a :class:`~hatnorm.blocks.Select`: rotated q/k pairs, a kv head's
values read by a group of query heads, a channel split or shuffle), grouped convolutions, modules
:func:`export` does not know, non-binarized gates, and every unit when the model does not say which units its
heads read (``HATModule.head_units``). Token embedding tables (and position and token-type tables) lose the
columns of removed stream units, and a shared language-model head the same columns; a head tied to the token
table stays tied.

The exported model takes what the HAT model takes besides ``task`` and ``s``: ``exported(x)`` for an image model,
``exported(input_ids=..., attention_mask=...)`` for a converted language model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hatnorm._checks import check_task
from hatnorm._gate import HATGate
from hatnorm._hat import HATModule, Layer
from hatnorm._heads import TaskHeads
from hatnorm._masks import Concat, Flatten, MaskSource, Residual, Select
from hatnorm._norm_protocol import MaskedNorm
from hatnorm._transformer import GatedAttention, SharedLMHead, StreamEmbedding, TokenEmbedding


class ExportedMask(nn.Module):
    """A gate folded for one task: ``forward(task, s)`` returns the task's fixed mask over the kept units."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, task: object = None, s: object = None, **unused_options: object) -> Tensor:
        return self.mask


class ExportedHead(nn.Module):
    """The head of the exported task, called like :class:`~hatnorm.TaskHeads` (the task argument is ignored).

    Attributes:
        linear: the pruned head: an ``nn.Linear``, or the convolution of convolutional heads.
    """

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: Tensor, *unused: object, **unused_options: object) -> Tensor:
        return self.linear(x)


class RemovedByExport(nn.Module):
    """What stands where :func:`hatnorm.export` removed a module only the training forward runs (an auxiliary
    classifier): the exported model is for inference, so running it in training mode is refused here."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, *args: object, **kwargs: object) -> Tensor:
        raise RuntimeError(f"module {self.path!r} runs only in training and was removed by hatnorm.export; the "
                           "exported model is for inference: call it in evaluation mode")

    def extra_repr(self) -> str:
        return repr(self.path)


class TaskModel(nn.Module):
    """One task of a HAT model for inference: called with what the HAT model takes besides ``task`` and ``s``
    (``model(x)``; ``model(input_ids=..., attention_mask=...)`` for a converted language model), it gives that
    task's logits.

    Attributes:
        body: the pruned copy of the HAT model.
        task: the exported task.
        parameters_before: the parameter count of the HAT model.
        parameters_saved: how many parameters the export removed.
    """

    def __init__(self, body: nn.Module, task: int, parameters_before: int) -> None:
        super().__init__()
        self.body = body
        self.task = task
        self.parameters_before = parameters_before
        self.parameters_saved = parameters_before - _count(self)
        self.eval()

    def forward(self, *inputs: Any, **named: Any) -> Any:
        """The exported task's logits for ``inputs`` and ``named`` inputs, passed on to the HAT model as given.

        Raises:
            TypeError: ``named`` holds ``task`` or ``s``: the exported model is one task's, in evaluation.
        """
        given = sorted(set(named) & {"task", "s"})
        if given:
            raise TypeError(f"an exported model takes the inputs of task {self.task} alone, without task or s; got "
                            f"{', '.join(f'{k}={named[k]!r}' for k in given)}")
        return self.body(*inputs, **named, task=self.task)

    def extra_repr(self) -> str:
        return f"task={self.task}, parameters_saved={self.parameters_saved}"


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class _Units:
    """Which units of every gate the export keeps: gates joined by residual adds share one set (the union of
    their selections)."""

    def __init__(self, gates: Sequence[HATGate], task: int) -> None:
        self.task = task
        self.parent = {id(g): id(g) for g in gates}
        self.gates = {id(g): g for g in gates}
        self.whole: set[int] = set()
        self.prune = True

    def root(self, gate: HATGate) -> int:
        key = id(gate)
        while self.parent[key] != key:
            key = self.parent[key]
        return key

    def gates_of(self, source: MaskSource) -> list[HATGate]:
        """The gates whose units ``source`` is (a gate, or a residual add of gates); joins them."""
        if isinstance(source, HATGate):
            return [source]
        if isinstance(source, Residual):
            gates = [g for path in source.paths for g in self.gates_of(path)]
            for g in gates[1:]:
                self.parent[self.root(g)] = self.root(gates[0])
            return gates
        if isinstance(source, Select):  # units read by index, in a layout of their own: kept whole
            gates = [g for part in self.sources(source.source) for g in self.gates_of(part)]
            self.whole.update(id(g) for g in gates)
            return gates
        self.prune = False  # a source export cannot see through: keep every unit
        return []

    def sources(self, source: MaskSource | None) -> Iterable[MaskSource]:
        if isinstance(source, Flatten):
            yield source.channels
        elif isinstance(source, Concat):
            yield from source.parts
        elif source is not None:
            yield source

    def join(self, source: MaskSource | None) -> None:
        for part in self.sources(source):
            self.gates_of(part)

    def keep_whole(self, source: MaskSource | None) -> None:
        for part in self.sources(source):
            self.whole.update(id(g) for g in self.gates_of(part))

    def finish(self) -> None:
        groups: dict[int, list[HATGate]] = {}
        for gate in self.gates.values():
            groups.setdefault(self.root(gate), []).append(gate)
        self.kept: dict[int, Tensor] = {}
        for root, members in groups.items():
            n = members[0].num_features
            keep = torch.ones(n, dtype=torch.bool, device=members[0].embedding.device)
            whole = not self.prune or any(id(g) in self.whole or not g.binarize for g in members)
            if not whole:
                keep = torch.stack([g.selection(self.task) for g in members]).any(0)
                # a layer the task does not use keeps one unit, whose gate is 0: shapes stay valid
                keep[0] |= not bool(keep.any())
            self.kept[root] = keep.nonzero().flatten()

    def index(self, source: MaskSource | None, size: int) -> Tensor | None:
        """The kept indices of ``source``'s units; ``None`` for data inputs (all ``size`` kept)."""
        if source is None:
            return None
        if isinstance(source, Flatten):
            channels = self.index(source.channels, source.channels.num_features)
            positions = torch.arange(source.positions, device=channels.device)
            # flatten of [C, H, W] puts channel c at c·HW … (c+1)·HW − 1
            return (channels[:, None] * source.positions + positions).flatten()
        if isinstance(source, Concat):
            parts, offset = [], 0
            for part in source.parts:
                parts.append(self.index(part, part.num_features) + offset)
                offset += part.num_features
            return torch.cat(parts)
        gates = self.gates_of(source)
        if isinstance(source, Select):  # every unit behind it is kept
            return torch.arange(size, device=gates[0].embedding.device if gates else None)
        if not gates:
            return torch.arange(size)
        return self.kept[self.root(gates[0])]

    def mask(self, gate: HATGate) -> Tensor:
        """The gate's evaluation mask for the task, over the kept units."""
        return gate.final_mask(self.task)[self.index(gate, gate.num_features)]


def _prune_weighted(module: nn.Module, rows: Tensor, cols: Tensor | None) -> nn.Module:
    weight = module.weight.detach()[rows]
    if cols is not None:
        weight = weight[:, cols]
    bias = None if module.bias is None else module.bias.detach()[rows]
    if isinstance(module, nn.Linear):
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        new = type(module)(weight.shape[1], weight.shape[0], module.kernel_size, stride=module.stride,
                           padding=module.padding, dilation=module.dilation, bias=bias is not None,
                           padding_mode=module.padding_mode)
    new = new.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def _prune_columns(module: nn.Module, names: Sequence[str], columns: Tensor | None,
                   pruned: dict[int, tuple[nn.Parameter, nn.Parameter]]) -> None:
    """Keep the ``columns`` (stream units) of ``module``'s tables ``names`` (those it has), each pruned once
    however many modules hold it; ``pruned`` maps every pruned parameter's id to it (kept alive, so its id is not
    reused) and its copy."""
    for name in names:
        table = getattr(module, name)
        if table is None:
            continue
        if id(table) not in pruned:
            kept = table.detach() if columns is None else table.detach()[:, columns]
            pruned[id(table)] = table, nn.Parameter(kept.clone(), requires_grad=table.requires_grad)
        setattr(module, name, pruned[id(table)][1])


def _replace(root: nn.Module, names: dict[int, str], old: nn.Module, new: nn.Module) -> None:
    parent, _, child = names[id(old)].rpartition(".")
    setattr(root.get_submodule(parent), child, new)


@torch.no_grad()
def export(model: nn.Module, task: int, *, layers: Sequence[Layer] | None = None,
           head_units: MaskSource | None = None) -> TaskModel:
    """Export one task of a HAT model as a plain inference module with its masks folded in and its unused
    units removed (see the module docstring). ``model`` itself is not changed.

    Args:
        model: the HAT model; a :class:`HATModule` knows its wiring and head units.
        task: the task to export.
        layers: the wiring, when ``model`` is not a :class:`HATModule` (as for :class:`HAT`).
        head_units: the units the task heads read, when ``model`` is not a :class:`HATModule`; without it
            no unit is removed.

    Returns:
        a :class:`TaskModel` in evaluation mode: ``exported(x)`` equals ``model(x, task=task)`` in evaluation
        mode; ``exported.parameters_saved`` is the number of parameters removed.

    Raises:
        TypeError: ``model`` is not a module, or holds a part export does not know how to fold
            (the norm after the gate, whose output is not gated).
        ValueError: ``task`` out of range, or ``model`` has no gate.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not any(isinstance(m, HATGate) for m in model.modules()):
        raise ValueError("model must contain at least one HATGate, found none")
    if layers is None and not isinstance(model, HATModule):
        raise ValueError(f"layers must be given unless model is a HATModule, got layers=None for a "
                         f"{type(model).__name__}")
    num_tasks = next(m for m in model.modules() if isinstance(m, HATGate)).num_tasks
    task = check_task(task, num_tasks)
    before = _count(model)
    # map the caller's wiring onto the copy by identity
    originals = dict(model.named_modules())
    body = copy.deepcopy(model).eval()
    copies = dict(body.named_modules())
    to_copy = {id(m): copies[n] for n, m in originals.items()}
    if layers is None:
        layers = body.hat_layers()
        head_units = body.head_units()
    else:
        layers = [Layer(to_copy[id(layer.module)], _remap(layer.out, to_copy), _remap(layer.inp, to_copy))
                  for layer in layers]
        head_units = _remap(head_units, to_copy)
    names = {id(m): n for n, m in body.named_modules()}
    gates = [m for m in body.modules() if isinstance(m, HATGate)]
    units = _Units(gates, task)
    for layer in layers:
        units.join(layer.out)
        units.join(layer.inp)
        if not _foldable(layer.module):
            units.keep_whole(layer.out)
            units.keep_whole(layer.inp)
    for attention in (m for m in body.modules() if isinstance(m, GatedAttention)):
        units.keep_whole(attention.gate_units())
    if head_units is None:
        units.prune = False
    else:
        units.join(head_units)
    units.finish()

    pruned: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id → a table and its pruned copy (tied tables)
    for layer in layers:
        module = layer.module
        out_features = layer.out.num_features
        rows = units.index(layer.out, out_features)
        if isinstance(module, MaskedNorm):
            # the norm's own declaration: its evaluation formula for the task, the gate folded in
            _replace(body, names, module, module.export(task, _mask_of(units, layer.out), rows))
        elif isinstance(module, TokenEmbedding):
            module.cls_token = nn.Parameter(module.cls_token.detach()[..., rows].clone())
            module.pos_embedding = nn.Parameter(module.pos_embedding.detach()[..., rows].clone())
        elif isinstance(module, StreamEmbedding):
            _prune_columns(module, ("token", "position", "token_type"), rows, pruned)
        elif isinstance(module, SharedLMHead):
            _prune_columns(module, ("weight",), rows, pruned)
        elif _foldable(module):
            cols = units.index(layer.inp, module.weight.shape[1]) if layer.inp is not None else None
            _replace(body, names, module, _prune_weighted(module, rows, cols))
    training_only = body.only_in_training() if isinstance(body, HATModule) else []
    for task_heads in [m for m in body.modules() if isinstance(m, TaskHeads)
                  and not any(names[id(m)] == p or names[id(m)].startswith(p + ".") for p in training_only)]:
        head = task_heads.heads[task]
        cols = None if head_units is None else units.index(head_units, task_heads.in_features)
        classes = torch.arange(task_heads.num_classes[task])
        _replace(body, names, task_heads, ExportedHead(_prune_weighted(head, classes, cols)))
    for head in [m for m in body.modules() if isinstance(m, SharedLMHead)]:  # tied to a table: not in the wiring
        if id(head.weight) in pruned:
            head.weight = pruned[id(head.weight)][1]
    for gate in gates:
        _replace(body, names, gate, ExportedMask(units.mask(gate)))
    for path in training_only:  # auxiliary classifiers: inference never runs them
        parent, _, child = path.rpartition(".")
        setattr(body.get_submodule(parent), child, RemovedByExport(path))
    return TaskModel(body, task, before)


def _foldable(module: nn.Module) -> bool:
    """Whether export knows how to fold and prune ``module``; the units of any other module are kept whole."""
    if isinstance(module, MaskedNorm) and not module.prunable:
        return False  # its statistics read every unit, the removed ones too
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.groups == 1 and not isinstance(module, nn.modules.conv._ConvTransposeNd)
    return isinstance(module, MaskedNorm | TokenEmbedding | StreamEmbedding | SharedLMHead | nn.Linear)


def _mask_of(units: _Units, source: MaskSource) -> Tensor:
    if not isinstance(source, HATGate):
        raise TypeError(f"layers: a norm's out must be its gate (a HATGate), got {type(source).__name__}")
    return units.mask(source)


def _remap(source: MaskSource | None, to_copy: dict[int, nn.Module]) -> MaskSource | None:
    """``source`` rebuilt over the copied gates."""
    if source is None:
        return None
    if isinstance(source, HATGate):
        return to_copy[id(source)]
    if isinstance(source, Residual):
        return Residual(*(_remap(p, to_copy) for p in source.paths))
    if isinstance(source, Flatten):
        return Flatten(_remap(source.channels, to_copy), source.positions)
    if isinstance(source, Concat):
        return Concat(*(_remap(p, to_copy) for p in source.parts))
    raise TypeError(f"layers: unsupported mask source {type(source).__name__}; allowed: HATGate, Residual, "
                    "Flatten, Concat")
