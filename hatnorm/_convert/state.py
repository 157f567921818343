"""The walk's state: what the walk over a traced graph knows of every node so far, and the graph edits every
handler shares (placing a gate, protecting a parameter, reading a layer's input units)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx, nn

from hatnorm._convert.error import ConversionError
from hatnorm._convert.norms import Norms
from hatnorm._convert.params import BufferUse, ParameterUse, TaskParameter
from hatnorm._convert.runtime import GatedLinear, GatedNorm
from hatnorm._convert.units import Recorder, Units
from hatnorm._convert.values import Derived, Flat, Scale, Scores, Statistic, Ungated, tensor_args
from hatnorm._gate import HATGate
from hatnorm._hat import Layer
from hatnorm._masks import Flatten, MaskSource
from hatnorm._norm_protocol import NoNorm


class WalkState:
    """One walk over a traced graph, which it rewrites in place, collecting the wiring.

    ``units`` holds, for every tensor-valued node, how its values relate to the gates: ``None`` (raw input
    data or a buffer), :class:`~.units.Units`, a flattened map awaiting its reader (:class:`~.values.Flat`), a
    scale (:class:`~.values.Scale`), a tensor with parameter values (:class:`~.values.Ungated`), attention scores
    (:class:`~.values.Scores`), values derived from parameters (:class:`~.values.Derived`), or a tuple of those (a
    split). Nodes with no entry are not tensors (shape reads).

    Attributes:
        gm: the graph module being rewritten.
        traced: the module that was traced: its submodules keep their classes (``gm``'s are plain).
        norms: the task-aware norm for each torch norm.
        num_tasks: number of tasks.
        num_classes: each task's class count, or ``None`` to copy the model's own head.
        s_max: the gates' largest scale.
        recorder: every node's shape or value for the example input, when there is one.
        logits: the output node evaluation gives, when the graph also returns auxiliary logits.
        task: the ``task`` placeholder of the rewritten graph; ``s`` the scale's.
        layers: the wiring collected so far.
        pending: weighted layers awaiting a gate (no norm followed them yet), with their input units.
        head_units: the units the heads read.
        consumed: parameters and buffers a functional norm took over.
        used_parameters: parameters moved into a protected use, by graph target.
        used_buffers: buffers a gated tensor is multiplied by, entry by unit.
    """

    def __init__(self, gm: fx.GraphModule, traced: nn.Module, norms: Norms, num_tasks: int,
                 num_classes: list[int] | None, s_max: float, recorder: Recorder | None,
                 logits: fx.Node | None = None) -> None:
        self.gm, self.norms, self.num_tasks, self.num_classes, self.s_max = gm, norms, num_tasks, num_classes, s_max
        self.logits = logits  # the output node evaluation gives, when the graph also returns auxiliary logits
        self.traced = traced  # the module that was traced: its submodules keep their classes (gm's are plain)
        self.recorder = recorder
        self.units: dict[fx.Node, Any] = {}
        self.layers: list[Layer] = []
        self.pending: dict[fx.Node, tuple[nn.Module, MaskSource | None]] = {}  # weighted layers awaiting a gate
        self.head_units: MaskSource | None = None
        self.consumed: set[str] = set()  # parameters and buffers a functional norm took over
        self.used_parameters: dict[str, fx.Node] = {}
        self.used_buffers: dict[str, BufferUse] = {}  # buffers a gated tensor is multiplied by, entry by unit
        self.task: fx.Node | None = None  # the placeholders the walk adds
        self.s: fx.Node | None = None

    # ----------------------------------------------------------------------------- shapes and values
    def shape(self, node: fx.Node) -> torch.Size | None:
        """The tensor shape of ``node`` for the example input, when there is one."""
        if self.recorder is None:
            return None
        shape = self.recorder.shapes.get(node)
        return shape if isinstance(shape, torch.Size) else None

    def rank(self, node: fx.Node) -> int | None:
        shape = self.shape(node)
        if shape is not None:
            return len(shape)
        if node in self.pending:  # a weighted layer's output: a convolution's rank, or a Linear's input's
            module = self.pending[node][0]
            return module.weight.dim() if not isinstance(module, nn.Linear) else self.rank(node.args[0])
        units = self.units.get(node)
        if isinstance(units, Units):
            return units.rank
        if isinstance(units, Flat):
            return 2
        return None

    def value(self, node: fx.Node, where: str) -> Any:
        """The value of a non-tensor node (a shape read, a size computed from one) for the example input."""
        if self.recorder is None or node not in self.recorder.values:
            raise ConversionError(f"{where}: its arguments are read from tensor shapes; pass "
                                  "example_input=<a batch the model takes> so convert can follow how it moves units")
        return self.recorder.values[node]

    # ----------------------------------------------------------------------------- gates
    def new_gate(self, num_features: int) -> HATGate:
        return HATGate(num_features, num_tasks=self.num_tasks, s_max=self.s_max)

    def add_gate_after(self, node: fx.Node, num_features: int, channel_dim: int, name: str) -> tuple[fx.Node, HATGate]:
        """Insert ``NoNorm`` with a new gate after ``node`` (over ``channel_dim``); every other user reads it."""
        gate = self.new_gate(num_features)
        gated = GatedNorm(NoNorm(num_features, num_tasks=self.num_tasks, channel_dim=channel_dim), gate)
        name = free_name(self.gm, name)
        self.gm.add_submodule(name, gated)
        with self.gm.graph.inserting_after(node):
            new = self.gm.graph.call_module(name, (node, self.task, self.s))
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        self.same_shape(new, node)
        self.layers.append(Layer(gated.norm, out=gate))
        return new, gate

    def same_shape(self, new: fx.Node, old: fx.Node) -> None:
        """A node inserted for ``old`` (its gate, its norm) has ``old``'s shape for the example input."""
        if self.recorder is not None and old in self.recorder.shapes:
            self.recorder.shapes[new] = self.recorder.shapes[old]

    def gate_weighted(self, node: fx.Node) -> Units:
        """Insert a gate after a weighted layer that no norm follows; a ``Linear``'s gate is folded into its
        weights (:class:`GatedLinear`)."""
        rank = self.rank(node)
        module, inp = self.pending.pop(node)
        if node.op == "call_module" and type(module).forward is nn.Linear.forward:
            gate = self.new_gate(module.out_features)
            self.gm.delete_submodule(node.target)
            self.gm.add_submodule(node.target, GatedLinear(module, gate))
            node.args, node.kwargs = (node.args[0], self.task, self.s), {}
            self.layers.append(Layer(module, out=gate, inp=inp))
            self.units[node] = Units.of_gate(gate, rank, -1)
            return self.units[node]
        dim = -1 if isinstance(module, nn.Linear) else 1
        new, gate = self.add_gate_after(node, module.weight.shape[0], dim, f"{node.target}_gate".replace(".", "_"))
        self.layers.insert(len(self.layers) - 1, Layer(module, out=gate, inp=inp))
        units = Units.of_gate(gate, rank, dim)
        self.units[new] = units
        return units

    def regate(self, node: fx.Node, ungated: Ungated, where: str) -> Units:
        """Gate a tensor that holds parameter values; the parameters are protected by the new gate's units."""
        shape = self.shape(node)
        if shape is None:
            raise ConversionError(f"{where}: reads a tensor that holds a parameter's values; pass example_input so "
                                  "convert can place the gate that must follow it")
        dim = ungated.units.unit_dim() if ungated.units is not None else len(shape) - 1
        if dim is None or dim not in (1, len(shape) - 1):
            raise ConversionError(f"{where}: a parameter is added to a tensor whose units are not in dim 1 or the "
                                  "last dim; a gate cannot follow it")
        new, gate = self.add_gate_after(node, shape[dim], 1 if dim == 1 else -1, f"{node.name}_gate")
        position = torch.arange(shape[dim]).view([-1 if d == dim else 1 for d in range(len(shape))])
        for target, elements in ungated.params:
            self.protect(target, elements, position.expand(shape), gate, where)
        units = Units.of_gate(gate, len(shape), dim)
        self.units[new] = units
        return units

    def protect(self, target: str, elements: Tensor, units: Tensor, source: MaskSource, where: str) -> None:
        """Move parameter ``target`` into a :class:`ParameterUse` protected by the units of ``source`` its
        entries meet (``elements`` and ``units`` index them at every position of the tensor); a parameter whose
        entries meet several units, or none, becomes one copy per task (:class:`TaskParameter`)."""
        if target in self.used_parameters:
            raise ConversionError(f"{where}: parameter {target!r} is used in more than one place; each use would "
                                  "need its own protection")
        parameter = self.gm.get_parameter(target)
        elements, units = torch.broadcast_tensors(elements, units)
        there = (elements >= 0) & (units >= 0)
        high = torch.full((parameter.numel(),), -1).scatter_reduce(0, elements[there], units[there], "amax")
        low = torch.full((parameter.numel(),), parameter.numel() + source.num_features).scatter_reduce(
            0, elements[there], units[there], "amin")
        if bool((high < 0).any()) or bool((high != low).any()):
            # shared across units (a scalar scale, a kernel over channels): no gate protects it, so every task
            # gets a copy of its own, which only that task trains
            self.per_task((target,), source)
            return
        owner, _, name = target.rpartition(".")
        use = ParameterUse(self.gm.get_submodule(owner)._parameters.pop(name), high)
        module_name = free_name(self.gm, f"{target}_use".replace(".", "_"))
        self.gm.add_submodule(module_name, use)
        node = next(n for n in self.gm.graph.nodes if n.op == "get_attr" and n.target == target)
        with self.gm.graph.inserting_after(node):
            new = self.gm.graph.call_module(module_name)
        node.replace_all_uses_with(new)
        self.same_shape(new, node)
        self.gm.graph.erase_node(node)
        self.used_parameters[target] = new
        self.layers.append(Layer(use, out=source))

    # ----------------------------------------------------------------------------- reading units
    def resolve(self, node: fx.Node, where: str, *, ungated: bool = False) -> None:
        """Gate the tensor inputs of ``node`` that need it first: a weighted layer's pending output, and (unless
        ``ungated``) a tensor holding parameter values."""
        for arg in tensor_args(node):
            if arg in self.pending:
                self.gate_weighted(arg)
        if not ungated:
            for arg in tensor_args(node):
                if isinstance(self.units.get(arg), Ungated):
                    self.regate(arg, self.units[arg], where)

    def gated(self, node: fx.Node, reader: str) -> Units | None:
        """The units of ``node``, which must be gated units or raw data."""
        units = self.units.get(node)
        if isinstance(units, Flat):
            raise ConversionError(f"{reader}: a flattened tensor can only feed a Linear layer")
        if isinstance(units, Statistic):
            raise ConversionError(f"{reader}: reads a statistic over several units ({units.why}), which may only "
                                  "multiply or divide a gated tensor")
        if isinstance(units, Scale):
            raise ConversionError(f"{reader}: the output of a sigmoid-like activation (f(0) ≠ 0{units.origin}) can "
                                  "only scale a gated tensor (squeeze-excitation: x * scale)")
        if isinstance(units, tuple):
            raise ConversionError(f"{reader}: reads a tuple of tensors")
        if isinstance(units, Scores):
            raise ConversionError(f"{reader}: reads attention scores (q @ kᵀ), which mix tokens: they may only weigh "
                                  "the values (scores @ v)")
        if isinstance(units, Derived):
            raise ConversionError(f"{reader}: reads values computed from parameters that every unit shares (a "
                                  "position bias gathered by an index), which may only bias attention scores")
        return units

    def read(self, node: fx.Node, dim: int, size: int, reader: str) -> MaskSource | None:
        """The input units a layer reads along ``dim`` (``size`` features)."""
        units = self.units.get(node)
        if isinstance(units, Flat):
            if dim != -1:
                raise ConversionError(f"{reader}: a flattened tensor can only feed a Linear layer")
            if units.channels is None:
                return None
            try:
                channels = units.channels.read(1, units.channels.index.shape[1], reader)
            except ValueError as error:
                raise ConversionError(str(error)) from None
            if size % channels.num_features:
                raise ConversionError(f"{reader}: reads a flattened map of {channels.num_features} channels but its "
                                      "input size is not a multiple of it")
            return Flatten(channels, size // channels.num_features)
        units = self.gated(node, reader)
        if units is None:
            return None
        try:
            return units.read(dim, size, reader)
        except ValueError as error:
            raise ConversionError(str(error)) from None

    def per_task(self, targets: tuple[str, ...], source: MaskSource) -> None:
        """Give every task its own copy of parameters no gate can protect, those that bias attention and those shared
        across units (see :class:`TaskParameter`)."""
        for target in targets:
            if target in self.used_parameters:
                continue
            owner, _, name = target.rpartition(".")
            copies = TaskParameter(self.gm.get_submodule(owner)._parameters.pop(name), self.num_tasks)
            module_name = free_name(self.gm, f"{target}_per_task".replace(".", "_"))
            self.gm.add_submodule(module_name, copies)
            for node in [n for n in self.gm.graph.nodes if n.op == "get_attr" and n.target == target]:
                with self.gm.graph.inserting_after(node):
                    new = self.gm.graph.call_module(module_name, (self.task,))
                node.replace_all_uses_with(new)
                self.gm.graph.erase_node(node)
                self.used_parameters[target] = new
            self.layers.append(Layer(copies, out=source))

    def module(self, node: fx.Node) -> nn.Module:
        """The module a ``call_module`` node calls."""
        return self.gm.get_submodule(node.target)


def attribute(gm: fx.GraphModule, target: str) -> Any:
    """The parameter, buffer or constant at ``target`` of ``gm``."""
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name)


def free_name(gm: fx.GraphModule, name: str) -> str:
    """``name``, or ``name_2``, ``name_3``… if the graph module already has a submodule or attribute so named."""
    candidate, k = name, 2
    while hasattr(gm, candidate):
        candidate, k = f"{name}_{k}", k + 1
    return candidate


def ancestors(node: fx.Node) -> list[fx.Node]:
    """``node`` and every node it is computed from."""
    found, stack = {}, [node]
    while stack:
        current = stack.pop()
        if current not in found:
            found[current] = None
            stack.extend(current.all_input_nodes)
    return list(found)
