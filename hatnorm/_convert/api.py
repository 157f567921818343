"""``convert``: turn a model the user already has into a HAT model, keeping its weights, in four phases:
:func:`trace_phase`, then the walk and rewrite (:mod:`.walk`), then wrapping the graph in a
:class:`~.model.ConvertedModel`."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, fx, nn

from hatnorm._checks import check_num_tasks, check_positive
from hatnorm._convert.error import ConversionError
from hatnorm._convert.model import ConvertedModel
from hatnorm._convert.norms import Norms
from hatnorm._convert.source import raised_at
from hatnorm._convert.state import WalkState
from hatnorm._convert.structural import structural_converter
from hatnorm._convert.tracing import is_in_place, trace
from hatnorm._convert.train_graph import EvaluationForward, evaluation_graph, training_graph
from hatnorm._convert.units import Recorder, record
from hatnorm._convert.walk import rewrite, walk
from hatnorm._gate import HATGate
from hatnorm._heads import class_counts
from hatnorm._norm_registry import NormSpec


def convert(
    module: nn.Module,
    *,
    num_tasks: int,
    norm: str | NormSpec | Mapping[str, str | NormSpec] = "masked_bn",
    num_classes: int | Sequence[int] | None = None,
    s_max: float = 400.0,
    example_input: Tensor | None = None,
) -> ConvertedModel:
    """Turn an existing model into a HAT model, keeping its weights.

    Norm layers become ``norm`` (their γ, β and running statistics copied into every task slot), a
    gate follows every norm (and every weighted layer with no norm after it), each weighted layer's
    input and output units are found from the traced graph, and the final ``nn.Linear`` becomes one
    head per task. ``module`` itself is not changed.

    The conversion runs in four phases: **trace** (``torch.fx``, alongside ``example_input`` when given),
    **walk** (every op's handler from the op table passes units and rewrites the graph around it),
    **rewrite** (what the walk took over goes, unprotected parameter uses are refused) and **wrap** (the
    :class:`ConvertedModel`). transformers models whose attention a graph walk cannot follow
    (``ViTForImageClassification``, the language models) are converted by their structure instead
    (:mod:`~.structural`).

    Args:
        module: the model; its forward takes one input tensor and ends in an ``nn.Linear``.
        num_tasks: number of tasks.
        norm: the task-aware norm replacing every torch norm (a registered name; it must replace each of
            the model's norms), or one per kind for models that mix them: a mapping from ``"batch"``
            (BatchNorm1d/2d), ``"layer"`` (LayerNorm), ``"group"`` (GroupNorm), ``"rms"`` (RMSNorm) to a
            norm, e.g. ``{"batch": "masked_bn", "layer": "masked_ln"}``.
        num_classes: ``None`` to start every task's head as a copy of the model's own head (so open
            gates reproduce the original outputs), or the class count of every task / of each task.
        s_max: the gates' largest scale.
        example_input: a batch the model takes (e.g. ``torch.randn(2, 3, 224, 224)``), run once in
            evaluation mode without gradients (no statistic moves). Needed for models whose forward moves
            units by shapes it reads (``x.view(b, g, c // g, h, w)``, a split, a window partition) or adds
            a parameter to a gated tensor (a position embedding); models of layers, norms, activations,
            pools, residual adds, concatenations and a flatten before the classifier convert without it.

    Returns:
        a :class:`ConvertedModel`, called as ``model(x, task=t, s=s)``; ``hatnorm.HAT(model)`` reads its wiring.

    Raises:
        ConversionError: for a part that cannot be converted, naming it.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    num_tasks = check_num_tasks(num_tasks)
    norms = Norms(norm)
    counts = None if num_classes is None else class_counts(num_classes, num_tasks)
    s_max = check_positive(s_max, "s_max")
    converter = structural_converter(module)
    if converter is not None:
        return converter(module, num_tasks=num_tasks, norms=norms, num_classes=counts, s_max=s_max)
    traced = copy.deepcopy(module).eval()
    gm, logits, recorder = trace_phase(traced, example_input)
    state = WalkState(gm, traced, norms, num_tasks, counts, s_max, recorder, logits)
    layers = walk(state)
    rewrite(state)
    evaluation = None if logits is None else EvaluationForward(evaluation_graph(gm, logits))
    return ConvertedModel(gm, layers, state.head_units, evaluation).train(module.training)


def trace_phase(traced: nn.Module, example_input: Tensor | None) -> tuple[fx.GraphModule, fx.Node | None,
                                                                           Recorder | None]:
    """The trace phase: the graph of ``traced`` (its training graph when training runs more, with the node of the
    logits evaluation gives), without what the output does not read (SigLIP's attention-pooling head beside the mean
    its classifier reads: nothing of it reaches the logits, so nothing of it is converted), and every node's shape or
    value for ``example_input`` when given."""
    try:
        gm = trace(traced)
    except Exception as error:  # torch.fx raises many types for untraceable code
        if example_input is None:
            raise ConversionError(f"module: torch.fx cannot trace {type(traced).__name__}: {error}; with "
                                  "example_input, convert traces it alongside that batch (shape reads iterated, "
                                  f"conditions on shapes taken as they hold for it){raised_at(error)}") from error
        try:
            gm = trace(traced, example_input)
        except Exception as again:  # still untraceable: data-dependent control flow
            raise ConversionError(f"module: torch.fx cannot trace {type(traced).__name__}, even alongside "
                                  f"example_input: {again}{raised_at(again)}") from again
    kept = training_graph(traced, gm, example_input if isinstance(example_input, Tensor) else None)
    logits = None
    if kept is not None:  # auxiliary heads: convert the training graph, whose evaluation part is gm
        gm, logits = kept.graph, kept.logits
    _drop_unread(gm)
    recorder = None
    if example_input is not None:
        if not isinstance(example_input, Tensor) or example_input.dim() < 1 or example_input.numel() == 0:
            raise TypeError(f"example_input must be a non-empty batch tensor [N, ...], got {example_input!r:.80}")
        try:
            recorder = record(gm, example_input)
        except Exception as error:  # whatever the model raises for an input it cannot take
            raise ValueError(f"example_input: the model cannot take a batch of shape {list(example_input.shape)}: "
                             f"{error}") from error
    return gm, logits, recorder


def _drop_unread(gm: fx.GraphModule) -> None:
    """Remove from ``gm`` the operations the output does not read, and the parameters only they read (a probe read by
    a get_attr alone, of a module the graph does not call). Every in-place operation stays, for the walk to judge: its
    write may reach the output through a view (``h.add_(b)`` where a permuted view of h is read)."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or is_in_place(n, gm))
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    for target in read - {n.target for n in gm.graph.nodes if n.op == "get_attr"}:
        owner, _, name = target.rpartition(".")
        if not any(owner == c or owner.startswith(f"{c}.") for c in called):
            gm.get_submodule(owner)._parameters.pop(name, None)


def open_gates(model: nn.Module, value: float = 6.0) -> None:
    """Set every gate's embedding to ``value`` > 0 for every task, so all gates are open (a = 1 at s_max).

    Used to check that a converted model reproduces the original (SPEC invariant 7).

    Args:
        model: a converted (or any HAT) model.
        value: the embedding value, > 0.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    value = check_positive(value, "value")
    with torch.no_grad():
        for gate in (m for m in model.modules() if isinstance(m, HATGate)):
            gate.embedding.fill_(value)
