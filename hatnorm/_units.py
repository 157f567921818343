"""Where a gate's units sit in a tensor, followed through the operations of a traced graph.

A gated tensor is described by its mask source and an *index*: an integer tensor that broadcasts to the
tensor and says, for every position, which unit of the source it holds (−1: a position that is always 0,
such as zero padding). The index has size 1 along every dim it does not vary in, so a convolution's output
``[N, C, H, W]`` is ``arange(C).view(1, C, 1, 1)``. An operation that only moves values (permute, reshape,
a channel split, a shuffle, a roll, padding) moves the index the same way: it is applied to the index
itself, at the shapes of an example input when the op needs them. A layer reads its input units along
the dim it contracts, which is valid only where the units do not vary along any other dim.

:func:`register_conversion_rule` declares how a user's own operation passes units.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, fx, nn
from torch.fx import _symbolic_trace

from hatnorm._masks import MaskSource, Select

#: how an operation passes the units of its (first) tensor input
Rule = Literal["unitwise", "moves", "bookkeeping", "scale"]
RULES: tuple[str, ...] = ("unitwise", "moves", "bookkeeping", "scale")

#: the rules users registered: a function, a tensor method's name or a module class → rule
_USER_RULES: dict[object, str] = {}


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
    _USER_RULES[target] = rule


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


def rule_failure(op: Callable[[Tensor], Any], rule: str, shape: tuple[int, ...] = (2, 3, 4, 4), *,
                 lone: bool = False) -> str | None:
    """Why ``op`` does not do what ``rule`` claims, on a probe tensor of ``shape``; ``None`` when it does or the claim
    cannot be checked (``lone``: ``op`` may need more arguments than the tensor, so a call that raises is not held
    against it)."""
    if rule == "unitwise":
        failure = unitwise_failure(op, shape)
    elif rule == "moves":
        probe = (torch.randperm(math.prod(shape), generator=torch.Generator().manual_seed(0)) + 1.0).view(shape)
        try:
            with torch.no_grad():
                out = op(probe)
        except Exception as error:  # whatever the op raises for a plain tensor
            failure = f"cannot be checked: calling it on a tensor of shape {list(shape)} raised {error}"
        else:
            moved = [out] if isinstance(out, Tensor) else list(out) if isinstance(out, tuple | list) else []
            values = torch.cat([probe.reshape(-1), probe.new_zeros(1)])
            failure = None if moved and all(isinstance(m, Tensor) and bool(torch.isin(m, values).all())
                                            for m in moved) else \
                "gives values its input does not hold (it does more than move values)"
    elif rule == "bookkeeping":
        try:
            with torch.no_grad():
                out = op(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
        except Exception as error:  # whatever the op raises for a plain tensor
            failure = f"cannot be checked: calling it on a tensor of shape {list(shape)} raised {error}"
        else:
            failure = "gives a floating-point tensor (data, not bookkeeping)" if \
                isinstance(out, Tensor) and out.dtype.is_floating_point else None
    else:
        failure = None
    if failure is None or (lone and failure.startswith("cannot be checked")):
        return None
    return failure


def unitwise_failure(op: Callable[[Tensor], Any], shape: tuple[int, ...] = (2, 3, 4, 4), *,
                     zero: bool = True) -> str | None:
    """Why ``op`` is not unit-wise with f(0) = 0, judged on a probe tensor of ``shape`` (a third of its values 0,
    the rest spread over ±9): ``None`` when its output has the probe's shape, is exactly 0 wherever the probe is
    0 (checked only with ``zero``), and is the same function of every value alone (a permutation of the probe's
    values permutes the output alike); else the reason, for an error message."""
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(shape, generator=generator) * 3
    probe.view(-1)[::3] = 0.0
    order = torch.randperm(probe.numel(), generator=generator)
    try:
        with torch.no_grad():
            out, shuffled = op(probe.clone()), op(probe.reshape(-1)[order].reshape(shape))
    except Exception as error:  # whatever the op raises for a plain tensor
        return (f"cannot be checked: calling it on a tensor of shape {list(shape)} raised "
                f"{type(error).__name__}: {error}")
    if not isinstance(out, Tensor) or out.shape != probe.shape or not isinstance(shuffled, Tensor) or \
            shuffled.shape != probe.shape:
        return f"does not give a tensor of its input's shape {list(shape)}"
    at_zero = out[probe == 0]
    if zero and bool((at_zero != 0).any()):
        return f"maps 0 to {at_zero[at_zero != 0][0].item():.4g}, not 0, so a closed unit would not stay closed"
    if not torch.allclose(out.reshape(-1)[order], shuffled.reshape(-1), rtol=1e-4, atol=1e-6, equal_nan=True):
        return "does not act on every value alone (its output at one position depends on other positions)"
    return None


def user_rule(target: object) -> str | None:
    """The rule a user registered for ``target`` (a function, method name or module class), if any."""
    if isinstance(target, nn.Module):
        return next((r for t, r in _USER_RULES.items() if isinstance(t, type) and isinstance(target, t)), None)
    try:
        return _USER_RULES.get(target)
    except TypeError:  # an unhashable target
        return None


def user_module_classes() -> tuple[type[nn.Module], ...]:
    """The module classes users registered a rule for: the tracer keeps them as leaves."""
    return tuple(t for t in _USER_RULES if isinstance(t, type))


class Units:
    """A gated tensor's units: position p holds unit ``index[p]`` of ``source`` (−1: always 0).

    ``index`` broadcasts to the tensor; when the tensor's rank is unknown (a layer reading raw data of
    unknown shape) it is 1-D and describes the last dim.
    """

    __slots__ = ("index", "source")

    def __init__(self, source: MaskSource, index: Tensor) -> None:
        self.source = source
        self.index = compress(index)

    @classmethod
    def of_gate(cls, source: MaskSource, rank: int | None, dim: int) -> Units:
        """The units of a fresh gate over ``dim`` of a tensor of ``rank`` dims (``None``: unknown, last dim)."""
        index = torch.arange(source.num_features)
        if rank is None:
            return cls(source, index)
        shape = [1] * rank
        shape[dim] = source.num_features
        return cls(source, index.view(shape))

    @property
    def rank(self) -> int | None:
        return self.index.dim() if self.index.dim() > 1 else None

    def read(self, dim: int, size: int, reader: str) -> MaskSource:
        """The mask source of the ``size`` features a layer contracts along ``dim`` (a position that is always 0,
        such as padding, does not count).

        Raises:
            ValueError: the units vary along another dim (the layer would mix units), or their count differs.
        """
        index = self.index
        if index.dim() == 1 and dim != -1:
            raise ValueError(f"{reader} reads dim {dim} of a tensor whose rank is unknown; pass example_input")
        moved = index.movedim(dim, -1)
        flat = moved.reshape(-1, moved.shape[-1])
        valid = flat >= 0
        high = flat.masked_fill(~valid, -1).amax(0)
        low = flat.masked_fill(~valid, self.source.num_features).amin(0)
        if bool(((high != low) & valid.any(0)).any()):
            raise ValueError(f"{reader} reads dim {dim}, but its input's units also vary along other dims: the "
                             "layer would mix units")
        row = high
        if row.numel() == 1 and size > 1:
            row = row.expand(size)
        if row.numel() != size:
            raise ValueError(f"{reader} reads {size} features, but its input holds {row.numel()} units there")
        if size == self.source.num_features and bool((row == torch.arange(size)).all()):
            return self.source
        return Select(self.source, row.clone())

    def unit_dim(self) -> int | None:
        """The one dim the units vary along, positions that are always 0 aside (``None``: several, or none)."""
        index = self.index
        valid = index >= 0
        varying = []
        for d in range(index.dim()):
            high = index.masked_fill(~valid, -1).amax(d, keepdim=True)
            if bool(((index != high) & valid).any()):
                varying.append(d)
        return varying[0] if len(varying) == 1 else None


def compress(index: Tensor) -> Tensor:
    """``index`` with every dim it does not vary along reduced to size 1."""
    for d in range(index.dim()):
        if index.shape[d] > 1:
            first = index.narrow(d, 0, 1)
            if bool((index == first).all()):
                index = first
    return index.contiguous()


def expand(index: Tensor, shape: torch.Size | None) -> Tensor:
    """``index`` at the tensor's own ``shape`` (when known), so a shape-changing op can be replayed on it."""
    if shape is None:
        return index
    return index.expand(shape).contiguous()


class Recorder(fx.Interpreter):
    """Runs an example input through a traced graph and keeps what the conversion needs of every node: a
    tensor's shape, or the value of a non-tensor (a shape read, a size computed from it)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, Any] = {}
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, Tensor):
            self.shapes[n] = result.shape
        elif isinstance(result, tuple | list) and result and all(isinstance(r, Tensor) for r in result):
            self.shapes[n] = tuple(r.shape for r in result)
        else:
            self.values[n] = result
        return result


def record(gm: fx.GraphModule, example: Tensor) -> Recorder:
    """Every node's shape or value for ``example``, from one pass that leaves the graph's state as it was."""
    buffers = {k: v.clone() for k, v in gm.named_buffers()}  # a no-grad pass can move buffers, not parameters
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    recorder = Recorder(gm)
    try:
        with torch.no_grad():
            recorder.run(example)
    finally:
        for name, value in gm.named_buffers():
            value.copy_(buffers[name])
        for m, training in modes.items():
            m.training = training
    return recorder
