"""The op table: for every operation of a traced forward, the handler that passes units through it.

One table holds every rule. An operation is found by its target: a function the forward calls (``torch.cat``,
``operator.add``), the name of a tensor method (``"view"``), or a module class, found along the class's MRO so a
subclass takes its base's handler unless it has one of its own; then by the tests registered for kinds that no
single target names (every ``*DropPath`` class of a library, every norm a registered norm replaces). A later
registration for a target replaces the earlier one: the built-in rules are registered first, through
:meth:`OpTable.register` like every other, so a user's :func:`~hatnorm.register_conversion_rule` for an op a
built-in covers takes its place.

A handler is called as ``handler.apply(state, node, where)``: the walk's state (:class:`~.state.WalkState`), the
graph node, and where the node comes from (module and source line) for messages. It records the units of the
node's output in ``state.units`` and may rewrite the graph around the node (a norm becomes a task-aware norm and
its gate).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import fx, nn

from hatnorm._convert.state import WalkState

#: a handler's function: it passes units through ``node`` (and may rewrite the graph around it)
Apply = Callable[[WalkState, fx.Node, str], None]


@dataclass(frozen=True)
class Handler:
    """How the walk passes units through one kind of operation.

    Attributes:
        name: what the handler does, for messages (``"unitwise"``, ``"norm"``).
        apply: the function, called as ``apply(state, node, where)``.
        first: it reads raw data and parameters itself (a functional layer or norm), so it runs before the walk's
            rules by value kind (an op on raw data only gives raw data; an op on parameters gives values derived
            from them).
        scores: what it does with attention scores (``q @ kᵀ``) among its inputs: ``"refuses"`` them, ``"keeps"``
            them scores (scaling, masking, softmax, dropout, moves), or ``"takes"`` them itself (the products
            that make and use scores).
    """

    name: str
    apply: Apply
    first: bool = False
    scores: Literal["refuses", "keeps", "takes"] = "refuses"


class OpTable:
    """Operations → handlers: exact targets (functions, tensor method names, module classes) and tests."""

    def __init__(self) -> None:
        self._targets: dict[object, Handler] = {}
        self._tests: list[tuple[Callable[[object], bool], Handler]] = []

    def register(self, target: object, handler: Handler) -> None:
        """Pass units through ``target`` (a function, a tensor method's name or a module class) by ``handler``,
        replacing any handler registered for it before."""
        self._targets[target] = handler

    def register_test(self, test: Callable[[object], bool], handler: Handler) -> None:
        """Pass units by ``handler`` through every op (a function, a method name, a module instance) that ``test``
        accepts and no exact target names."""
        self._tests.append((test, handler))

    def lookup(self, op: object) -> Handler | None:
        """The handler of ``op``: a function, a tensor method's name, or a module instance (by its class's MRO)."""
        if isinstance(op, nn.Module):
            found = next((self._targets[kind] for kind in type(op).__mro__ if kind in self._targets), None)
        else:
            try:
                found = self._targets.get(op)
            except TypeError:  # an unhashable target
                found = None
        if found is not None:
            return found
        return next((handler for test, handler in self._tests if test(op)), None)

    def module_classes(self) -> tuple[type[nn.Module], ...]:
        """The module classes the table names beyond torch's own (which ``torch.fx`` keeps as single calls anyway):
        the tracer keeps their instances as single calls, not traced into."""
        return tuple(t for t in self._targets if isinstance(t, type) and issubclass(t, nn.Module)
                     and not t.__module__.startswith("torch."))


#: the one table of :func:`hatnorm.convert`
OPS = OpTable()
