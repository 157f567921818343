"""Tracing a model for :func:`hatnorm.convert`: ``torch.fx``'s symbolic trace, and, for code it cannot trace
symbolically (a shape unpacked into names, a check on a size), the same trace run alongside an example batch.
Either way, every use of a tensor after an in-place operation on it reads that operation (:func:`follow_in_place`).

The plain trace keeps the module classes users declared a rule for, and drop-path modules, as single
calls, and traces forward arguments after the first at their defaults. The example trace also evaluates
every traced operation on the example's real values as it records it, so a proxy of a shape can be
iterated (``b, c, h, w = x.shape``) and a condition on shapes and numbers is taken as it holds for the
example, as ``torch.export`` does. A condition on data (a tensor) stays an error: a model that branches
on its input's values cannot be converted into one graph.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx import _symbolic_trace
from torch.fx.proxy import Attribute

from hatnorm._convert.table import OPS
from hatnorm._convert.windows import is_window_attention


def is_reparameterised_conv(module: nn.Module) -> bool:
    """A convolution subclass (not torch's) whose forward computes the weight it convolves by from its parameters
    (weight standardisation: BiT's ``StdConv2d``, NFNet's ``ScaledStdConv2d``): kept as one call, its rows checked
    when it is converted."""
    kind = type(module)
    if not isinstance(module, nn.modules.conv._ConvNd) or isinstance(module, nn.modules.conv._ConvTransposeNd) or \
            kind.__module__.startswith("torch."):
        return False
    base = next(c for c in kind.__mro__ if c.__module__ == "torch.nn.modules.conv")
    if kind.forward is base.forward:
        return False
    try:
        graph = fx.symbolic_trace(module).graph
    except Exception:  # a forward fx cannot trace alone: traced into with the model, as before
        return False
    convs = [n for n in graph.nodes if n.op == "call_function" and n.target in _CONVS]
    if len(convs) != 1:
        return False
    weight = convs[0].args[1] if len(convs[0].args) > 1 else convs[0].kwargs.get("weight")
    return not (isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target == "weight")


_CONVS = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)


def is_drop_path(module: nn.Module) -> bool:
    """torchvision's ``StochasticDepth``, timm's ``DropPath`` and transformers' per-model drop-paths
    (``SwinDropPath``, ``BeitDropPath``, ``ConvNextDropPath``…, every ``*DropPath`` class of a transformers model):
    each sample's units scaled alike (a zero unit stays 0); kept as calls, so they drop paths in training and pass
    them in evaluation as the original does."""
    kind = type(module)
    return (kind.__name__ == "StochasticDepth" and kind.__module__.startswith("torchvision.ops")) or \
        (kind.__name__ == "DropPath" and kind.__module__.startswith("timm.")) or \
        (kind.__name__.endswith("DropPath") and kind.__module__.startswith("transformers.models."))


def is_transformers_activation(module: nn.Module) -> bool:
    """An activation module of ``transformers.activations`` (``ACT2FN``'s own classes): kept as a call, and judged by
    what it does on a probe (:func:`hatnorm._convert.probes.unitwise_failure`)."""
    return type(module).__module__ == "transformers.activations"


def is_in_place(node: fx.Node, root: nn.Module) -> bool:
    """Whether ``node`` writes into its first argument and returns it: a tensor method or torch function named with a
    trailing underscore (``h.relu_()``, ``h.mul_(gamma)``, ``self.calls.add_(1)``), a function called with
    ``inplace=True`` (``F.relu(h, inplace=True)``) or a module built with it (``nn.ReLU(inplace=True)``)."""
    if node.op == "call_module":
        return getattr(root.get_submodule(node.target), "inplace", False) is True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op not in ("call_method", "call_function") or not isinstance(name, str):
        return False
    if name.endswith("_") and not name.startswith("_"):
        return True
    if node.op == "call_function" and callable(node.target) and node.kwargs.get("inplace") is None:
        try:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
        except (TypeError, ValueError):  # a builtin without a signature, or arguments it does not take
            return False
        return bound.arguments.get("inplace") is True
    return node.kwargs.get("inplace") is True


def follow_in_place(gm: fx.GraphModule) -> None:
    """Make every use of a tensor after an in-place operation on it read that operation's node (which returns the
    tensor itself), so the graph says what the forward does: the operation has users and is walked like its
    out-of-place form (a statement ``h.relu_()`` would otherwise be a node nobody reads, dropped as dead code)."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        written = node.args[0] if node.args else None
        if not isinstance(written, fx.Node) or not is_in_place(node, gm):
            continue
        for user in list(written.users):
            if order[user] > order[node]:
                user.replace_input_with(written, node)
    gm.recompile()


#: operations whose result may share memory with their first argument (a write into it reaches that argument)
_ALIASING_METHODS = {"view", "view_as", "reshape", "flatten", "unflatten", "permute", "transpose", "swapaxes",
                     "movedim", "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "select", "split", "chunk",
                     "unbind", "t", "diagonal", "as_strided", "contiguous", "to", "type_as", "float", "detach"}
_ALIASING_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.swapaxes,
                       torch.movedim, torch.squeeze, torch.unsqueeze, torch.narrow, torch.select, torch.split,
                       torch.chunk, torch.unbind, torch.detach}


def writes_state(node: fx.Node, root: nn.Module) -> bool:
    """Whether ``node`` is an in-place operation whose write outlives its own result: into a buffer or the input
    (a call counter's ``self.calls.add_(1)``), or into a view of another tensor (``h[:, :2].relu_()``)."""
    if not is_in_place(node, root) or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    written = node.args[0]
    return written.op in ("get_attr", "placeholder") or \
        (written.op == "call_method" and written.target in _ALIASING_METHODS) or \
        (written.op == "call_function" and written.target in _ALIASING_FUNCTIONS)


def eliminate_dead_code(graph: fx.Graph, root: nn.Module) -> None:
    """fx's dead-code elimination, keeping in-place operations whose write outlives their result
    (:func:`writes_state`); an in-place operation on a tensor nothing reads afterwards is dead like any other."""
    graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or writes_state(n, root))


class _Tracer(fx.Tracer):
    """fx's tracer, keeping the module classes users declared a rule for, drop-path modules, transformers'
    activations, torchvision's Swin window attention and convolutions that compute their own weight as calls, and
    recording the operations on the buffers
    ``recorded`` (fx runs an operation on a buffer once while tracing, leaving it out of the graph)."""

    def __init__(self, recorded: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.recorded = recorded
        self.reparameterised: frozenset[int] = frozenset()  # ids of the convolutions computing their own weight
        self.parameter_names: dict[int, str] = {}  # the root's parameters and buffers by identity → their names
        self.buffer_names: dict[int, str] = {}

    def trace(self, root: nn.Module | Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        if isinstance(root, nn.Module):  # found before fx patches nn.Module (each is traced alone to tell)
            self.reparameterised = frozenset(id(m) for m in root.modules() if is_reparameterised_conv(m))
            self.parameter_names = {id(p): n for n, p in root.named_parameters()}
            self.buffer_names = {id(b): n for n, b in root.named_buffers()}
        return super().trace(root, concrete_args)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        """A parameter or buffer read by a module: its ``get_attr`` proxy (one per name), as fx's own ``getattr``
        gives it, found by identity in a table made when the trace began rather than by a search of every
        parameter at every read (quadratic in a model's size); a recorded buffer is a proxy too."""
        if isinstance(attr_val, Tensor):
            parameter = isinstance(attr_val, nn.Parameter)
            name = (self.parameter_names if parameter else self.buffer_names).get(id(attr_val))
            if name is not None and self._holds(name, attr_val) and \
                    (parameter or self.proxy_buffer_attributes or name in self.recorded) and \
                    not self.param_shapes_constant:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _holds(self, name: str, value: Tensor) -> bool:
        """Whether the root still holds ``value`` at ``name`` (a forward may have replaced it since the table)."""
        owner, _, last = name.rpartition(".")
        module = self.root.get_submodule(owner)
        return module._parameters.get(last) is value or module._buffers.get(last) is value

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A module call: fx's, but a module without parameters or buffers made inside the forward (ImageGPT's
        ``nn.Softmax(dim=-1)(attn_weights)``), which is none of the root's submodules, is traced into."""
        if next(m.parameters(), None) is None and next(m.buffers(), None) is None:
            try:
                self.path_of_module(m)
            except NameError:
                return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, OPS.module_classes()) or is_drop_path(m) or is_transformers_activation(m) or \
            is_window_attention(m) or id(m) in self.reparameterised or super().is_leaf_module(m, module_qualified_name)


class _ExampleProxy(fx.Proxy):
    """A proxy that knows its value for the example batch: shapes and numbers can be iterated and tested."""

    tracer: _ExampleTracer

    def _value(self) -> Any:
        return self.tracer.values[self.node]

    def __getattr__(self, name: str) -> Any:
        """``proxy.name`` as a proxy, but a device's type as the example's (a ``str``: ``torch.autocast(device_type=
        x.device.type)`` in EfficientViT's attention takes no proxy; autocast itself is not recorded in the graph)."""
        if name == "type" and isinstance(self, Attribute) and self.attr == "device" and \
                isinstance(self._value(), torch.device):
            return self._value().type
        return _ExampleAttribute(self, name)

    def __iter__(self) -> Iterator[fx.Proxy]:
        value = self._value()
        if isinstance(value, Tensor):
            return super().__iter__()  # iterating data: fx's own error
        return iter([self[i] for i in range(len(value))])

    def __len__(self) -> int:
        value = self._value()
        if isinstance(value, Tensor):
            raise RuntimeError("len() of a traced tensor is not supported; use x.shape[0]")
        return len(value)

    def __bool__(self) -> bool:
        value = self._value()
        if isinstance(value, Tensor):
            return super().__bool__()  # a condition on data: fx's own error
        return bool(value)

    def __int__(self) -> int:
        return int(self._number("int"))

    def __index__(self) -> int:
        return operator.index(self._number("an index from"))

    def __float__(self) -> float:
        return float(self._number("float"))

    def __setitem__(self, index: Any, value: Any) -> None:
        """``x[index] = value`` (ConViT's position indices filled column by column): recorded as :func:`setitem_`,
        an in-place operation on ``x`` that later reads of ``x`` read (:func:`follow_in_place`)."""
        self.tracer.create_proxy("call_function", setitem_, (self, index, value), {})

    def _number(self, use: str) -> Any:
        """The example's value of a number computed from shapes (ConViT's ``int(N ** .5)``), made a constant of the
        graph, which checks at every call that the number is still that value (a batch of other sizes fails
        there instead of being computed with the example's sizes)."""
        value = self._value()
        if isinstance(value, Tensor) or not isinstance(value, int | float):
            raise TypeError(f"{use} a traced value that is not a number computed from shapes: {type(value).__name__}")
        self.tracer.create_proxy("call_function", torch._assert, (
            self == value, f"hatnorm.convert traced this model at its example_input's sizes, where this number is "
                           f"{value}; give it inputs of those sizes, or convert it with an example of the new ones"),
            {})
        return value


def setitem_(tensor: Tensor, index: Any, value: Any) -> Tensor:
    """``tensor[index] = value``, returning ``tensor``: an item assignment as a traced graph records it (an in-place
    operation, named as one)."""
    tensor[index] = value
    return tensor


class _ExampleAttribute(_ExampleProxy, Attribute):
    """``proxy.attr`` (a method about to be called, or an attribute such as ``shape``), with its value."""

    def __init__(self, root: fx.Proxy, attr: str) -> None:
        Attribute.__init__(self, root, attr)


class _ExampleTracer(_Tracer):
    """Records each operation and evaluates it on the example's values (evaluation mode, no gradients)."""

    def __init__(self, example: Tensor, recorded: frozenset[str] = frozenset()) -> None:
        super().__init__(recorded)
        self.example = example
        self.values: dict[fx.Node, Any] = {}
        self.placeholders = 0

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ExampleProxy(node, self)

    def create_node(self, kind: str, target: Any, args: Any, kwargs: Any, name: str | None = None,
                    type_expr: Any | None = None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "output":
            return node
        values_args, values_kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: self.values[n])
        with _untraced():
            self.values[node] = self.evaluate(node, kind, target, args, values_args, values_kwargs)
        return node

    def evaluate(self, node: fx.Node, kind: str, target: Any, args: Any, values_args: Any, values_kwargs: Any) -> Any:
        """The value of one recorded operation for the example."""
        if kind == "placeholder":
            self.placeholders += 1
            value = self.example if self.placeholders == 1 else (args[0] if args else None)
        elif kind == "get_attr":
            value = self.root
            for part in str(target).split("."):
                value = getattr(value, part)
        elif kind == "call_module":
            value = self.root.get_submodule(target)(*values_args, **values_kwargs)
        elif kind == "call_method":
            value = getattr(values_args[0], target)(*values_args[1:], **values_kwargs)
        else:
            value = target(*values_args, **values_kwargs)
        return value


@contextmanager
def _attributes_kept(module: nn.Module) -> Iterator[None]:
    """Every submodule's attributes as they were before the trace: a forward that stores a traced value on itself
    (transformers' Swin sets ``self.window_size`` from the input's size) would leave a proxy of a finished graph
    there, and the next trace of the module would read it; so would a buffer it replaces (ConViT's
    ``self.rel_indices = self.get_rel_indices(N)``), restored into the module's buffers."""
    saved = {m: dict(vars(m)) for m in module.modules()}
    buffers = {m: dict(m._buffers) for m in module.modules()}
    try:
        yield
    finally:
        for m, attributes in saved.items():
            for name in [n for n, v in vars(m).items() if n not in attributes and isinstance(v, fx.Proxy)]:
                delattr(m, name)
            for name, value in attributes.items():
                if vars(m).get(name, value) is not value:
                    setattr(m, name, value)
            m._buffers.update(buffers[m])


#: torch's factories and a tensor's methods taking sizes as separate arguments, which a traced size cannot reach by
#: ``__torch_function__`` (``torch.ones(b, n)`` or ``buffer.expand(b, -1, 1)`` with ``b`` a proxy fails in torch's
#: argument parser, with fx's own tracer too)
_FACTORIES = ("ones", "zeros", "empty", "full", "rand", "randn")
_SIZED_METHODS = ("expand", "view", "reshape", "repeat", "new_ones", "new_zeros", "new_empty", "new_full")


def _first_proxy(arguments: Any) -> fx.Proxy | None:
    found: list[fx.Proxy] = []
    torch.utils._pytree.tree_map(lambda a: found.append(a) if isinstance(a, fx.Proxy) else None, arguments)
    return found[0] if found else None


@contextmanager
def _sizes_traced() -> Iterator[None]:
    """The :data:`_FACTORIES` and, on a tensor that is not traced (a buffer fx read as a constant), the
    :data:`_SIZED_METHODS` recorded as calls when a size (or another argument) is traced (Gemma 4's
    ``torch.ones(batch_size, pH * pW, dtype=torch.bool)`` and ``self.inv_freq[None, :, None].expand(b, -1, 1)``);
    called as they are otherwise. ``torch.finfo`` and ``torch.iinfo`` of a traced dtype read the example's."""
    originals = [(torch, name, getattr(torch, name)) for name in _FACTORIES] + \
        [(Tensor, name, getattr(Tensor, name)) for name in _SIZED_METHODS]

    def recorded(owner: Any, name: str, original: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            proxy = _first_proxy((args, kwargs))
            if proxy is None:
                return original(*args, **kwargs)
            kind, target = ("call_function", original) if owner is torch else ("call_method", name)
            return proxy.tracer.create_proxy(kind, target, args, kwargs)

        return call

    def example_type(original: Any) -> Any:
        def call(*args: Any) -> Any:
            return original(*(a._value() if isinstance(a, _ExampleProxy) else a for a in args))

        return call

    patched = [(owner, name, recorded(owner, name, original)) for owner, name, original in originals]
    # ImageGPT's torch.finfo(attn_weights.dtype).min: the example's dtype, as eager code reads it
    infos = [(torch, name, getattr(torch, name)) for name in ("finfo", "iinfo")]
    originals += infos
    patched += [(owner, name, example_type(original)) for owner, name, original in infos]
    for owner, name, replacement in patched:
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


@contextmanager
def _untraced() -> Iterator[None]:
    """Modules called and read as in eager mode while the tracer has patched ``nn.Module``."""
    patched_call, patched_getattr = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__, nn.Module.__getattr__ = _symbolic_trace._orig_module_call, _symbolic_trace._orig_module_getattr
    try:
        yield
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = patched_call, patched_getattr


def _trace_keeping_state(module: nn.Module, example: Tensor | None, concrete: dict[str, Any],
                         recorded: frozenset[str]) -> tuple[fx.Graph, list[str]]:
    """One trace of ``module`` (alongside ``example`` when given, without gradients) recording the operations on
    the buffers ``recorded``, and the other buffers the forward wrote into while traced; ``module``'s buffers,
    modes and attributes are left as they were."""
    tracer = _Tracer(recorded) if example is None else _ExampleTracer(example, recorded)
    tracer.record_stack_traces = True
    buffers = dict(module.named_buffers())
    saved = {name: value.clone() for name, value in buffers.items()}
    versions = {name: value._version for name, value in buffers.items()}
    modes = {m: m.training for m in module.modules()}
    try:
        with torch.no_grad(), _attributes_kept(module), _sizes_traced():
            traced = tracer.trace(module, concrete_args=concrete or None)
    finally:
        written = [name for name, value in buffers.items() if value._version != versions[name]]
        with torch.no_grad():
            for name, value in buffers.items():
                value.copy_(saved[name])
        for m, training in modes.items():
            m.training = training
    return traced, [name for name in written if name not in recorded]


def trace(module: nn.Module, example: Tensor | None = None) -> fx.GraphModule:
    """``torch.fx`` trace of ``module`` that records each operation's source line; forward arguments after
    the first that have defaults (timm's ``attn_mask=None``) are traced at those defaults. The forward of
    ``module``'s mode is traced. With ``example``, the trace runs alongside that batch (see the module
    docstring), without gradients; ``module``'s state (buffers, modes, attributes its forward sets) is left as it
    was."""
    forward = type(module).forward
    keywords = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(forward).parameters.values())
    if hasattr(forward, "__wrapped__") or (example is not None and keywords):
        # a decorated forward (transformers' ``(*args, **kwargs)`` wrappers): fx reads the placeholders from the
        # root's code, so the root is traced through a forward of the input alone, every other argument at its
        # default; so is a forward passing its ``**kwargs`` on (TimmWrapper's ``self.timm_model(pixel_values,
        # **kwargs)``) when traced alongside the example, whose placeholder for them would be no mapping
        inner = inspect.unwrap(forward)

        def forward_input(self: nn.Module, x: Tensor) -> Any:
            return inner(self, x)

        module.__class__ = type(type(module).__name__, (type(module),), {"forward": forward_input})
    parameters = list(inspect.signature(module.forward).parameters.values())[1:]
    concrete = {p.name: p.default for p in parameters
                if p.default is not inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_KEYWORD}
    graph, written = _trace_keeping_state(module, example, concrete, frozenset())
    if written:  # run once while tracing instead of recorded: trace again, recording those buffers' operations
        graph, _ = _trace_keeping_state(module, example, concrete, frozenset(written))
    gm = fx.GraphModule(module, graph, type(module).__name__)
    follow_in_place(gm)
    return gm
