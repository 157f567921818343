"""What a model's forward does differently in training, kept by :func:`hatnorm.convert`.

A traced graph fixes every ``self.training`` it reads. Two things a forward does only in training would be
lost converting an evaluation-mode trace, and ``convert`` traces the training forward too to find them:

- **a number or flag read from the mode**: a functional dropout's ``training=self.training`` (timm's heads
  with ``drop_rate``), attention's ``dropout_p=p if self.training else 0.0`` (transformers' models). Where
  the same call differs between the two traces only in such an argument, the graph reads it from a module
  that gives the value of the mode it runs in (:class:`ModeValue`);
- **branches that run only in training**: GoogLeNet's and Inception v3's auxiliary classifiers. When the
  training forward runs modules the evaluation forward does not, the training graph is the one converted,
  provided its path to the logits is the evaluation graph exactly (compared node by node). The converted
  model runs the whole graph in training, returning what the original returns there (a
  ``GoogLeNetOutputs`` of per-task logits: every auxiliary classifier becomes one head per task too), and
  in evaluation only the nodes that compute the logits (:func:`evaluation_graph`).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from hatnorm._convert.error import ConversionError
from hatnorm._convert.source import call_site, module_path
from hatnorm._convert.tracing import eliminate_dead_code, trace


@dataclass
class TrainingGraph:
    """The training-mode trace of a model whose training forward runs more than its evaluation forward.

    Attributes:
        graph: the training-mode trace.
        logits: the node of its output that the evaluation forward returns.
        only_in_training: the paths of the modules only the training forward runs.
    """

    graph: fx.GraphModule
    logits: fx.Node
    only_in_training: list[str]


def used_modules(gm: fx.GraphModule) -> set[str]:
    """The paths of the modules a traced forward runs (called as leaves, or inlined into its nodes)."""
    used = set()
    for node in gm.graph.nodes:
        used.update(module_path(key) for key in node.meta.get("nn_module_stack") or {})
        if node.op == "call_module":
            used.add(node.target)
    return used


#: functions whose mode flag the task-aware norms replacing them take over
_MODE_AWARE = (F.batch_norm, F.instance_norm)
_SCALARS = (bool, int, float, type(None))


class ModeValue(nn.Module):
    """A value the traced forward read from ``self.training`` (a functional dropout's ``training`` flag, the
    ``dropout_p`` of attention), as a module that gives the value of the mode it runs in (a traced graph would
    fix it).

    Args:
        training: the value in training.
        evaluation: the value in evaluation.
    """

    def __init__(self, training: Any, evaluation: Any) -> None:
        super().__init__()
        self.when_training, self.when_evaluating = training, evaluation

    def forward(self) -> Any:
        return self.when_training if self.training else self.when_evaluating

    def extra_repr(self) -> str:
        return f"training={self.when_training!r}, evaluation={self.when_evaluating!r}"


def training_graph(module: nn.Module, evaluation: fx.GraphModule, example: Tensor | None = None
                   ) -> TrainingGraph | None:
    """Reconcile ``evaluation``, the evaluation-mode trace of ``module`` (in evaluation mode), with its training
    forward (traced alongside ``example`` when torch.fx cannot trace it alone, which leaves the buffers as they were):
    arguments that follow the mode are read from :class:`ModeValue` modules (in both, in place), and the
    training-mode trace is returned when it runs modules ``evaluation`` does not; ``None`` when it runs
    nothing more or does not trace.

    Raises:
        ConversionError: the training forward's path to the logits differs from the evaluation forward, so the
            training-only modules (named, with the line that calls them) cannot be kept.
    """
    module.train()
    try:
        try:
            training = trace(module)
        except Exception:  # torch.fx raises many types for untraceable code
            if example is None:
                return None
            training = trace(module, example)  # restores the buffers the example pass moved
    except Exception:  # a training forward that does not trace: nothing to compare
        return None
    finally:
        module.eval()
    _follow_mode(evaluation, training)
    only = used_modules(training) - used_modules(evaluation)
    lost = sorted(name for name in only if not any(name.startswith(other + ".") for other in only))
    if not lost:
        return None
    for logits in _output_tensors(training.graph):
        if _same_graph(evaluation_graph(training, logits), evaluation.graph):
            return TrainingGraph(training, logits, lost)
    described = [f"{name!r} ({type(module.get_submodule(name)).__name__}, "
                 f"{sum(p.numel() for p in module.get_submodule(name).parameters()):,} parameters)"
                 f"{call_site(training, name)}" for name in lost[:3]]
    raise ConversionError(f"module {', '.join(described)}{' and more' if len(lost) > 3 else ''}: runs only in "
                          "training, and the training forward's path to the logits is not the evaluation "
                          "forward's (a mode fixed when traced differs), so it cannot be kept; remove it from the "
                          "model (e.g. aux_logits=False) to convert without it")


def _follow_mode(evaluation: fx.GraphModule, training: fx.GraphModule) -> None:
    """Where the same call (the same function, module, source line and occurrence) takes a different number or
    flag in the two traces, and nothing else differs (``F.dropout(x, p, training=self.training)``, attention's
    ``dropout_p=p if self.training else 0.0``), read it from a :class:`ModeValue` of the same name in both."""
    def calls(gm: fx.GraphModule) -> dict[tuple[Any, ...], fx.Node]:
        seen: Counter[tuple[Any, ...]] = Counter()
        found = {}
        for node in gm.graph.nodes:
            if node.op in ("call_function", "call_method") and node.target not in _MODE_AWARE:
                site = (node.op, node.target, node.stack_trace, tuple(node.meta.get("nn_module_stack") or ()))
                found[(*site, seen[site])] = node
                seen[site] += 1
        return found

    in_training = calls(training)
    changed = False
    for number, (site, node) in enumerate(calls(evaluation).items()):
        other = in_training.get(site)
        differing = [] if other is None else _scalar_differences(node, other)
        for i, (key, when_evaluating, when_training) in enumerate(differing or []):
            name = f"mode_value_{number}_{i}"
            for gm, call in ((evaluation, node), (training, other)):
                gm.add_submodule(name, ModeValue(when_training, when_evaluating))
                with gm.graph.inserting_before(call):
                    value = gm.graph.call_module(name, ())
                if isinstance(key, int):
                    call.update_arg(key, value)
                else:
                    call.update_kwarg(key, value)
            changed = True
    if changed:
        for gm in (evaluation, training):
            gm.recompile()


def _scalar_differences(a: fx.Node, b: fx.Node) -> list[tuple[int | str, Any, Any]] | None:
    """The arguments (position or keyword, value in ``a``, value in ``b``) where two calls take different numbers
    or flags; ``None`` when they differ otherwise."""
    if len(a.args) != len(b.args) or a.kwargs.keys() != b.kwargs.keys():
        return None
    found: list[tuple[int | str, Any, Any]] = []
    pairs = [*zip(range(len(a.args)), a.args, b.args, strict=True), *((k, a.kwargs[k], b.kwargs[k]) for k in a.kwargs)]
    for key, x, y in pairs:
        if isinstance(x, fx.Node) or isinstance(y, fx.Node):
            if not (isinstance(x, fx.Node) and isinstance(y, fx.Node)):
                return None
        elif _equal(x, y):
            continue
        elif isinstance(x, _SCALARS) and isinstance(y, _SCALARS):
            found.append((key, x, y))
        else:
            return None
    return found


def evaluation_graph(gm: fx.GraphModule, logits: fx.Node) -> fx.Graph:
    """A copy of ``gm``'s graph that returns ``logits`` and computes only what they need."""
    graph = fx.Graph(owning_module=gm)
    values: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(gm.graph, values)
    graph.output(values[logits])
    eliminate_dead_code(graph, gm)
    return graph


def _output_tensors(graph: fx.Graph) -> list[fx.Node]:
    """The nodes a traced forward returns: inside a tuple, a mapping or a named tuple built in the graph."""
    result = next(n for n in graph.nodes if n.op == "output").args[0]
    if isinstance(result, fx.Node) and is_structure(result):
        result = (*result.args, *result.kwargs.values())
    found: list[fx.Node] = []
    fx.node.map_arg(result, found.append)
    return found


def is_structure(node: fx.Node) -> bool:
    """Whether ``node`` builds a named tuple of outputs (GoogLeNet's ``GoogLeNetOutputs``)."""
    target = node.target
    return node.op == "call_function" and isinstance(target, type) and issubclass(target, tuple) and \
        hasattr(target, "_fields")


def _same_graph(a: fx.Graph, b: fx.Graph) -> bool:
    """Whether two graphs compute the same: the same operations on the same arguments, node by node."""
    nodes_a, nodes_b = list(a.nodes), list(b.nodes)
    if len(nodes_a) != len(nodes_b):
        return False
    position_a = {n: i for i, n in enumerate(nodes_a)}
    position_b = {n: i for i, n in enumerate(nodes_b)}
    for x, y in zip(nodes_a, nodes_b, strict=True):
        if x.op != y.op or (x.target != y.target and not _same_constant(a, x, b, y)):
            return False
        args_x = fx.node.map_arg((x.args, x.kwargs), lambda n: _Position(position_a[n]))
        args_y = fx.node.map_arg((y.args, y.kwargs), lambda n: _Position(position_b[n]))
        if not _equal(args_x, args_y):
            return False
    return True


def _same_constant(a: fx.Graph, x: fx.Node, b: fx.Graph, y: fx.Node) -> bool:
    """Whether ``x`` and ``y`` read equal tensor constants that tracing named differently."""
    if x.op != "get_attr" or a.owning_module is None or b.owning_module is None:
        return False
    value_x, value_y = getattr(a.owning_module, x.target, None), getattr(b.owning_module, y.target, None)
    return isinstance(value_x, torch.Tensor) and isinstance(value_y, torch.Tensor) and \
        value_x.shape == value_y.shape and value_x.dtype == value_y.dtype and torch.equal(value_x, value_y)


@dataclass(frozen=True)
class _Position:
    index: int


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(type(a) is type(b) and a == b)
    except Exception:  # values without a plain equality (tensors): not provably the same
        return False


class EvaluationForward:
    """The evaluation-mode forward of a converted graph that also holds training-only branches: the code of
    :func:`evaluation_graph`, run on the graph module itself (so it always reads its current submodules).

    Args:
        graph: the evaluation graph.
    """

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        self._forward: Any = None

    def __call__(self, body: fx.GraphModule, *args: Any) -> Any:
        if self._forward is None:
            code = self.graph.python_code(root_module="self")
            namespace = dict(code.globals)
            exec(compile(code.src, "<hatnorm evaluation forward>", "exec"), namespace)
            self._forward = namespace["forward"]
        return self._forward(body, *args)

    def __getstate__(self) -> dict[str, Any]:
        return {"graph": self.graph, "_forward": None}  # the compiled code is made again where it is loaded

    def __deepcopy__(self, memo: dict[int, Any]) -> EvaluationForward:
        return EvaluationForward(copy.deepcopy(self.graph, memo))
