"""``register_conversion_rule``: how a user declares the way units pass through an op of their own. The rule becomes
a handler in the one op table (:data:`~.table.OPS`), registered exactly as the built-in rules are; it checks its
claim on a probe of the op before it applies the built-in handler of the same name."""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, fx, nn
from torch.fx import _symbolic_trace

from hatnorm._convert.error import ConversionError
from hatnorm._convert.ops_elementwise import SCALE, UNITWISE
from hatnorm._convert.ops_shapes import MOVES
from hatnorm._convert.probes import rule_failure
from hatnorm._convert.state import WalkState
from hatnorm._convert.table import OPS, Handler
from hatnorm._convert.values import tensor_args

#: how an operation passes the units of its (first) tensor input
Rule = Literal["unitwise", "moves", "bookkeeping", "scale"]
RULES: tuple[str, ...] = ("unitwise", "moves", "bookkeeping", "scale")


def register_conversion_rule(target: Callable[..., Any] | str | type[nn.Module], rule: Rule) -> None:
    """Declare how :func:`hatnorm.convert` passes units through your own operation.

    The rule's claim is checked on a probe tensor where it can be: at registration for a function or a tensor
    method that takes a tensor alone, at conversion (at the example's shape) for a module class's instances and
    for a function that needs more arguments. ``"unitwise"`` must map 0 to exactly 0 and act on every value
    alone; ``"moves"`` must give only values of its input (or 0); ``"bookkeeping"`` must not give a floating-point
    tensor.

    Args:
        target: a function the forward calls (``my_ops.swish``; one that ``torch.fx`` records as a call: a torch
            function, a builtin, or a function wrapped with ``torch.fx.wrap``), the name of a tensor method
            (``"my_method"``), or a module class (its instances are kept as single calls, not traced into).
        rule: ``"unitwise"``: the op acts on every value alone and maps 0 to 0 (an activation, a dropout, a
            pool), so its output holds its input's units; ``"moves"``: the op only moves, copies or drops
            values (a permute, a shuffle, a slice), so the units move the same way (``convert`` replays it
            on an index tensor; it needs ``example_input`` when the op's arguments are read from shapes);
            ``"scale"``: like a sigmoid, f(0) ≠ 0, so its output may only multiply a gated tensor;
            ``"bookkeeping"``: the op's result is not a tensor of the data (a shape read, an assertion).

    Raises:
        TypeError: ``target`` is none of these.
        ValueError: ``rule`` is not one of the four; ``target`` is a plain Python function, which ``torch.fx``
            traces into (the rule could never apply); or the rule's claim is false on a probe (softplus declared
            ``"unitwise"``: softplus(0) ≠ 0).
    """
    if not (callable(target) or isinstance(target, str)) or (isinstance(target, type)
                                                              and not issubclass(target, nn.Module)):
        raise TypeError(f"target must be a function, a tensor method's name or an nn.Module class, got {target!r}")
    if isinstance(target, str) and not target.isidentifier():
        raise TypeError(f"target: a tensor method's name must be an identifier, got {target!r}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {list(RULES)}, got {rule!r}")
    name = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
    if not isinstance(target, str | type) and not _recorded_by_fx(target):
        raise ValueError(f"target: {name} is a plain Python function, which torch.fx traces into (it records the "
                         f"operations inside it, never a call to {name}), so a rule for it could never apply; wrap it "
                         "with torch.fx.wrap at the top level of its module, or register the nn.Module class that "
                         "calls it")
    if not isinstance(target, type) and (not isinstance(target, str) or hasattr(Tensor, target)):
        op = target if not isinstance(target, str) else (lambda t: getattr(t, target)())
        failure = rule_failure(op, rule, lone=True)
        if failure is not None:
            raise ValueError(f"rule: {rule!r} is false for {name!r}: on a probe tensor it {failure}")
    OPS.register(target, RULE_HANDLERS[rule])


@functools.cache
def _torch_functions() -> frozenset[Callable[..., Any]]:
    """The Python functions of torch that dispatch through ``__torch_function__``, so fx records them as calls."""
    return frozenset(f for functions in torch.overrides.get_overridable_functions().values() for f in functions)


def _recorded_by_fx(target: Callable[..., Any]) -> bool:
    """Whether ``torch.fx`` records a call to ``target`` as one node: a builtin, a torch function, a function
    wrapped with ``torch.fx.wrap``, or one of ``math``'s (fx wraps them); a plain Python function is traced into."""
    if not inspect.isfunction(target):
        return inspect.isbuiltin(target) or isinstance(target, types.BuiltinMethodType | types.MethodWrapperType) or \
            _in(target, _torch_functions())
    wrapped = (id(target.__globals__), target.__name__) in _symbolic_trace._wrapped_fns_to_patch
    return wrapped or target.__module__ == "math" or _in(target, _torch_functions())


def _in(target: object, found: frozenset[Callable[..., Any]]) -> bool:
    try:
        return target in found
    except TypeError:  # an unhashable callable
        return False

def check_claim(state: WalkState, node: fx.Node, rule: str, where: str, module: nn.Module | None) -> None:
    """Check a registered rule's claim on a probe of the input's shape, called as ``node`` calls the op (a module
    is checked here, a function that takes a tensor alone was at registration)."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return
    shape = state.shape(node.args[0])
    known = state.recorder.values if state.recorder is not None else {}
    if any(a not in known for a in tensor_args(node)[1:]):
        return  # another tensor, or a value of unknown size, among its arguments: nothing to probe with
    args, kwargs = fx.node.map_arg((node.args[1:], node.kwargs), lambda a: known[a])
    target = node.target
    if module is not None:
        def op(t: Tensor) -> Any:
            return module(t, *args, **kwargs)
    elif node.op == "call_method":
        def op(t: Tensor) -> Any:
            return getattr(t, target)(*args, **kwargs)
    else:
        def op(t: Tensor) -> Any:
            return target(t, *args, **kwargs)
    failure = rule_failure(op, rule, tuple(shape) if shape is not None else (2, 3, 4, 4), lone=shape is None)
    if failure is not None:
        raise ConversionError(f"{where}: the rule {rule!r} registered for it is false: on a probe tensor it "
                              f"{failure}")


def _checked(rule: str, then: Handler | None) -> Handler:
    """The handler of a registered ``rule``: its claim checked on a probe, then the built-in handler ``then``."""

    def apply(state: WalkState, node: fx.Node, where: str) -> None:
        check_claim(state, node, rule, where, state.module(node) if node.op == "call_module" else None)
        if then is not None:
            then.apply(state, node, where)

    return Handler(rule, apply, scores="keeps" if then in (UNITWISE, MOVES) else "takes" if then is None else
                   "refuses")


#: the handler each rule name registers
RULE_HANDLERS: dict[str, Handler] = {"unitwise": _checked("unitwise", UNITWISE), "moves": _checked("moves", MOVES),
                                     "scale": _checked("scale", SCALE), "bookkeeping": _checked("bookkeeping", None)}
