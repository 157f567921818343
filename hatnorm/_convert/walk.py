"""The walk and rewrite phases of :func:`hatnorm.convert`.

**Walk**: every node of the traced graph in order, its units found by the handler the op table
(:data:`~.table.OPS`) gives its op, after the rules that hold for every op by what its inputs are: a read of a
shape is bookkeeping, an op on raw data only gives raw data, an op on values derived from parameters gives values
derived from them, a part of a split is that part, and attention scores pass only ops that keep them scores.
Handlers rewrite the graph around the nodes they convert. **Rewrite**: what the walk took over is dropped, a
parameter read in a way no gate protects is refused, dead code goes and the graph module is recompiled.

Every failure is a :class:`ConversionError` that names the module and source line of the op it stopped at: an
error of a handler's own (a model the rule did not foresee) is reported as one too.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor, fx, nn

from hatnorm._convert.error import ConversionError
from hatnorm._convert.ops_attention import pass_scores
from hatnorm._convert.ops_layers import output
from hatnorm._convert.ops_shapes import MOVES
from hatnorm._convert.source import model_frames, source_line
from hatnorm._convert.source import where as where_of
from hatnorm._convert.state import WalkState, attribute
from hatnorm._convert.table import OPS, Handler
from hatnorm._convert.tracing import eliminate_dead_code, is_in_place, setitem_
from hatnorm._convert.units import Units
from hatnorm._convert.values import Derived, Scores, Ungated, parameters_of, tensor_args
from hatnorm._hat import Layer

#: functions that make a new tensor from numbers (data, for the walk)
FACTORIES = {torch.zeros, torch.ones, torch.full, torch.arange, torch.empty, torch.tensor, torch.rand, torch.randn,
             torch.linspace, torch.eye}
#: reads of a tensor that give a shape, a rank or a type, not data
SHAPE_METHODS = {"size", "dim", "ndimension", "numel", "get_device", "nelement"}
SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad"}
#: the named parts of a tuple an op returns (``torch.return_types.max``: values and indices) → their position
RETURNED_FIELDS = {"values": 0, "indices": 1}


def walk(state: WalkState) -> list[Layer]:
    """The walk phase: the task and scale become inputs of the graph, every node is visited in order (see the
    module's docstring), and the wiring is returned."""
    graph = state.gm.graph
    for extra in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        if _only_checks(extra):  # an argument traced at its default (see trace), checked to be that default
            _erase_with_users(extra)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ConversionError(f"module: the traced forward must take one input tensor, got "
                              f"{[p.target for p in placeholders]}")
    placeholders[0].args = ()  # the input is required (a forward may give it a default, as transformers' do)
    with graph.inserting_after(placeholders[0]):
        state.task = graph.placeholder("task")
    with graph.inserting_after(state.task):
        state.s = graph.placeholder("s", default_value=None)
    state.units[placeholders[0]] = None
    _check_single_calls(state)
    for node in list(graph.nodes):
        if node in (state.task, state.s) or node.op == "placeholder" or node.graph is not graph or node._erased:
            continue  # an erased node: a handler replaced it (a later read of a buffer it took into a BufferUse)
        try:
            _visit(state, node)
        except ConversionError as error:
            message = _with_call_site(str(error), node)
            if message == str(error):
                raise
            raise ConversionError(message) from error.__cause__
        except Exception as error:  # a handler meeting a model it did not foresee: still the op's failure
            raise ConversionError(_with_call_site(
                f"{_where(state, node)}: convert cannot follow this operation ({type(error).__name__}: {error}); "
                "declare how it passes units with hatnorm.register_conversion_rule if it is your own", node)) \
                from error
    return state.layers


def _visit(state: WalkState, node: fx.Node) -> None:
    if node.op == "output":
        output(state, node)
    elif node.op == "call_module":
        _call_module(state, node)
    elif node.op in ("call_function", "call_method"):
        _call(state, node)
    elif node.op == "get_attr":
        _get_attr(state, node)
    if node.op in ("call_module", "call_function", "call_method") and is_in_place(node, state.gm):
        _in_place(state, node)


def _where(state: WalkState, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r} ({type(state.module(node)).__name__})"
    return where_of(node)


def _with_call_site(message: str, node: fx.Node) -> str:
    """``message``, with the source line of ``node`` added when it names none (a module's call)."""
    frames = model_frames(node)
    line = source_line(frames[-1]).lstrip(", ") if frames else ""
    if not line or line in message:
        return message
    return f"{message} (at {line})"


def _call_module(state: WalkState, node: fx.Node) -> None:
    module = state.module(node)
    where = _where(state, node)
    handler = OPS.lookup(module)
    if handler is None:
        raise ConversionError(f"{where}: {type(module).__name__} is not supported (allowed: the torch norms, "
                              "Linear, Conv1d/2d/3d and ConvTranspose1d/2d/3d, unit-wise activations, dropout and "
                              "pooling, Unfold and Fold, or a module with a rule from "
                              "hatnorm.register_conversion_rule)")
    if handler.scores != "takes" and any(isinstance(state.units.get(a), Scores) for a in tensor_args(node)):
        pass_scores(state, node, where, handler)
        return
    handler.apply(state, node, where)


def _call(state: WalkState, node: fx.Node) -> None:
    """A function or a tensor method: the rules by value kind, then the op's handler."""
    where = where_of(node)
    target = node.target  # a function, or a method's name: the table names both
    tensors = [a for a in tensor_args(node) if a in state.units or a in state.pending]
    if _reads_metadata(node):
        return
    if not tensors:  # bookkeeping on shapes and numbers (an assertion, a size from a shape), or a new tensor
        if state.shape(node) is not None or target in FACTORIES:
            state.units[node] = None
        return
    handler = OPS.lookup(target)
    if handler is not None and handler.first:
        handler.apply(state, node, where)
        return
    if all(t not in state.pending and state.units[t] is None for t in tensors):
        state.units[node] = None  # an op on raw data or buffers only: still data
        return
    kinds = [state.units.get(t) for t in tensors]
    if any(isinstance(k, Derived) for k in kinds) and all(
            k is None or isinstance(k, Derived) or (isinstance(k, Ungated) and k.units is None) for k in kinds):
        state.units[node] = Derived(parameters_of(kinds))  # still computed from parameters (and data)
        return
    if target is operator.getitem and isinstance(state.units.get(node.args[0]), tuple):
        state.units[node] = state.units[node.args[0]][node.args[1]]  # one part of a split
        return
    if target is getattr and isinstance(state.units.get(node.args[0]), tuple) and node.args[1] in RETURNED_FIELDS:
        state.units[node] = state.units[node.args[0]][RETURNED_FIELDS[node.args[1]]]  # max(dim).values
        return
    if handler is None and any(isinstance(k, Ungated) for k in kinds) and all(
            k is None or (isinstance(k, Ungated) and k.units is None) for k in kinds):
        # an op on parameters alone (Swin v2's clamp(logit_scale).exp()): values derived from them, which may only
        # bias or scale attention scores and then become one copy per task
        state.units[node] = Derived(parameters_of(kinds))
        return
    if any(isinstance(k, Scores) for k in kinds) and (handler is None or handler.scores != "takes"):
        pass_scores(state, node, where, handler)
        return
    if handler is None:
        raise ConversionError(f"{where}: this operation is not supported; see the hatnorm docs for what converts, "
                              "or declare it with hatnorm.register_conversion_rule")
    handler.apply(state, node, where)


def _check_single_calls(state: WalkState) -> None:
    """Refuse a module with parameters that the forward calls more than once (one layer in two places)."""
    calls: dict[str, list[fx.Node]] = {}
    for node in state.gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    for target, nodes in calls.items():
        module = state.gm.get_submodule(target)
        parameters = sum(p.numel() for p in module.parameters())
        if len(nodes) < 2 or not parameters:
            continue
        lines = [source_line(model_frames(n)[-1]).lstrip(", ") for n in nodes if model_frames(n)]
        raise ConversionError(
            f"module {target!r} ({type(module).__name__}, {parameters:,} parameters) is used {len(nodes)} times "
            f"in one forward{' (' + '; '.join(lines) + ')' if lines else ''}: HAT gives each layer its own gate "
            "and protects its weights by the units of that one place, so a module cannot serve two places; give "
            "each call a module of its own (copy.deepcopy(module) for the second, to start from the same "
            "weights)")


def _in_place(state: WalkState, node: fx.Node) -> None:
    """An in-place operation: its node stands for the tensor from there on (see
    :func:`~.tracing.follow_in_place`), which is sound unless it changes the units of a tensor that
    shares its memory with another (a view, or one a view reads): that other tensor would change unseen."""
    written = node.args[0]
    before, after = state.units.get(written), state.units.get(node)
    if before is after or (isinstance(before, Units) and isinstance(after, Units) and before.source is after.source
                           and torch.equal(*torch.broadcast_tensors(before.index, after.index))):
        return
    views = [u for u in written.users if u is not node and _is_view(u, state.gm)]
    order = {n: i for i, n in enumerate(state.gm.graph.nodes)} if views else {}
    if _is_view(written, state.gm) or any(_read_after(u, node, order, state.gm) for u in views):
        raise ConversionError(f"{where_of(node)}: an in-place operation that changes which units a tensor holds "
                              "(it adds to it, or makes closed units nonzero) on a tensor that shares its memory "
                              "with a view, which would change unseen; write it out of place (h = h + b)")


def _read_after(view: fx.Node, node: fx.Node, order: dict[fx.Node, int], gm: fx.GraphModule) -> bool:
    """Whether ``view`` (a view of the tensor ``node`` writes into), or a view of it, is read after ``node``: a view
    read only before the write (MViTv2's ``attn[:, :, 1:, 1:] = attn[:, :, 1:, 1:] + bias``) sees no change."""
    return any(order[u] > order[node] or (_is_view(u, gm) and _read_after(u, node, order, gm)) for u in view.users)


def _item_assignment(state: WalkState, node: fx.Node, where: str) -> None:
    raise ConversionError(f"{where}: an item assignment (x[i] = v) is converted into data or attention scores only "
                          "(a part of the scores replaced by scores biased as they may be); write it out of place "
                          "(torch.cat, torch.where)")


#: ``x[i] = v`` as the example trace records it (:func:`~.tracing.setitem_`): into data it gives data (the walk's
#: rule by value kind), into attention scores a value that keeps them scores gives scores; into gated units refused
ITEM_ASSIGNMENT = Handler("item assignment", _item_assignment, scores="keeps")
OPS.register(setitem_, ITEM_ASSIGNMENT)


def _get_attr(state: WalkState, node: fx.Node) -> None:
    value = attribute(state.gm, node.target)
    if isinstance(value, nn.Parameter) and value.requires_grad:
        state.units[node] = Ungated(None, ((node.target, torch.arange(value.numel()).view(value.shape)),))
    elif isinstance(value, Tensor):
        state.units[node] = None  # a buffer: a constant, like data


def rewrite(state: WalkState) -> None:
    """Drop what functional norms took over, refuse parameters read in ways that cannot be protected."""
    graph = state.gm.graph
    for node in reversed(list(graph.nodes)):
        if node.op == "get_attr" and node.target in state.consumed:
            _erase_with_users(node)
    for node in graph.nodes:
        reads_data = [u for u in node.users if not _reads_metadata(u)]  # a dtype read is not a use
        if node.op == "get_attr" and reads_data and isinstance(attribute(state.gm, node.target), nn.Parameter) \
                and attribute(state.gm, node.target).requires_grad:
            raise ConversionError(f"{where_of(next(iter(node.users)))}: a direct use of parameter {node.target!r} "
                                  "that cannot be protected")
    for target in sorted(state.consumed):
        owner, _, name = target.rpartition(".")
        module = state.gm.get_submodule(owner)
        module._parameters.pop(name, None)
        module._buffers.pop(name, None)
    eliminate_dead_code(graph, state.gm)
    state.gm.delete_all_unused_submodules()
    # a branch whose result nothing reads (MetaCLIP 2's pooled output beside the mean its classifier reads) went
    # with its layers: their wiring goes too
    live = {id(m) for m in state.gm.modules()}
    state.layers[:] = [layer for layer in state.layers if id(layer.module) in live]
    state.gm.recompile()


def _is_view(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` may give a view of its first argument (an op that only moves values)."""
    if node.op == "call_module":
        return OPS.lookup(gm.get_submodule(node.target)) is MOVES
    return node.op in ("call_method", "call_function") and OPS.lookup(node.target) is MOVES


def _reads_metadata(node: fx.Node) -> bool:
    """Whether ``node`` reads only a tensor's shape, rank, dtype or device."""
    return (node.op == "call_function" and node.target is getattr and node.args[1] in SHAPE_ATTRIBUTES) or \
        (node.op == "call_method" and node.target in SHAPE_METHODS)


def _only_checks(node: fx.Node) -> bool:
    """Whether every use of ``node`` is a comparison or assertion that fx's tracer adds for a concrete argument."""
    return all(user.op == "call_function" and (user.target in (operator.eq, operator.ne, operator.is_,
                                                                operator.not_)
                                               or getattr(user.target, "__name__", "").startswith("_assert"))
               and _only_checks(user) for user in node.users)


def _erase_with_users(node: fx.Node) -> None:
    for user in list(node.users):
        _erase_with_users(user)
    node.graph.erase_node(node)
