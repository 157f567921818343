"""Handlers of attention: ``nn.MultiheadAttention`` and torchvision's shifted-window attention (replaced by gated
modules), ``F.scaled_dot_product_attention``, and attention written out (``q @ kᵀ`` gives scores that mix tokens,
not features; scaled, masked, softmaxed and dropped out they stay scores; ``scores @ v`` has v's units)."""

from __future__ import annotations

from torch import fx

from hatnorm._convert.error import ConversionError
from hatnorm._convert.ops_shapes import collapsed
from hatnorm._convert.runtime import GatedMultiheadAttention, GatedNorm
from hatnorm._convert.state import WalkState, free_name
from hatnorm._convert.table import Handler
from hatnorm._convert.units import Units
from hatnorm._convert.values import Derived, Scale, Scores, Statistic, Ungated, tensor_args
from hatnorm._convert.windows import GatedShiftedWindowAttention
from hatnorm._hat import Layer
from hatnorm._norm_protocol import NoNorm


def _attention(state: WalkState, node: fx.Node, where: str) -> None:
    """Self-attention becomes :class:`GatedMultiheadAttention`, its output units those of a new gate."""
    module = state.module(node)
    state.resolve(node, where)
    inputs = list(node.args[:3]) + [node.kwargs[k] for k in ("query", "key", "value") if k in node.kwargs]
    masks = [k for k in ("key_padding_mask", "attn_mask") if node.kwargs.get(k) is not None]
    if len(inputs) != 3 or len(set(inputs)) != 1 or masks or len(node.args) > 3:
        raise ConversionError(f"{where}: only self-attention without masks (query, key and value one tensor) "
                              "is supported")
    if module.bias_k is not None or module.add_zero_attn or not module._qkv_same_embed_dim:
        raise ConversionError(f"{where}: attention with extra key/value biases, zero attention or other key and "
                              "value sizes is not supported")
    x = inputs[0]
    inp = state.read(x, -1, module.embed_dim, where)
    rank = state.rank(x)
    gated = GatedMultiheadAttention(module, num_tasks=state.num_tasks, s_max=state.s_max)
    state.gm.delete_submodule(node.target)
    state.gm.add_submodule(node.target, gated)
    node.args, node.kwargs = (x, x, x, state.task, state.s), {}
    state.layers += gated.wiring(inp)
    state.units[node] = (Units.of_gate(gated.gate_out, rank, -1), None)


def _window_attention(state: WalkState, node: fx.Node, where: str) -> None:
    """torchvision's Swin window attention becomes :class:`GatedShiftedWindowAttention`."""
    module = state.module(node)
    state.resolve(node, where)
    x = node.args[0]
    inp = state.read(x, -1, module.qkv.in_features, where)
    rank = state.rank(x)
    gated = GatedShiftedWindowAttention(module, num_tasks=state.num_tasks, s_max=state.s_max)
    state.gm.delete_submodule(node.target)
    state.gm.add_submodule(node.target, gated)
    node.args, node.kwargs = (x, state.task, state.s), {}
    state.layers += gated.wiring(inp)
    state.units[node] = Units.of_gate(gated.gate_out, rank, -1)


def _attention_function(state: WalkState, node: fx.Node, where: str) -> None:
    """``F.scaled_dot_product_attention(q, k, v)``: mixes tokens only, so the output has v's units (a closed q or
    k feature is 0 in every score, a closed v feature 0 in every output)."""
    state.resolve(node, where)
    if len(node.args) >= 3:
        gate_scale(state, node, node.args[2], where)
    q, k, v = (state.gated(a, where) for a in node.args[:3])
    if v is None or q is None or k is None:
        raise ConversionError(f"{where}: attention over raw data")
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    bias = state.units.get(mask) if isinstance(mask, fx.Node) else None
    if isinstance(bias, Derived | Scores):  # a position bias, or relative position logits (SAM's q · R)
        state.per_task(bias.params, v.source)
    elif bias is not None:
        raise ConversionError(f"{where}: an attention mask computed from gated units")
    state.units[node] = Units(v.source, v.index)


def _matmul(state: WalkState, node: fx.Node, where: str) -> None:
    """``q @ kᵀ`` gives scores (tokens × tokens); ``scores @ v`` has v's units, and so has ``v @ scoresᵀ`` with v's
    tokens in its last dim (EfficientViT-MSRA's and SHViT's ``v @ attn.transpose(-2, -1)``, channels × tokens): each
    output value is a weighted sum over the tokens of one feature of v, 0 where that feature's unit is closed.
    ``q @ Pᵀ`` for a parameter P (HaloNet's and BoTNet's relative position logits, ``q @ rel_k.transpose(-1, -2)``)
    gives scores too: each entry P[r, d] meets q's unit d only, and is protected by it; with one column (SwiftFormer's
    ``query @ w_g``) it is a statistic. A scale (a softmax of a
    layer's output: VOLO's outlook attention weights) times gated units contracting a dim they do not vary in is a
    sum of products of a scale and one unit's values, so it keeps those units, like ``x * scale``; and so does gated
    units a times gated values b, contracting a dim a's units do not vary in (EfficientViM's hidden state
    ``h = x @ (a * b)ᵀ`` over the tokens, then ``h @ c`` over the state, b and c gated by the units of the state's
    projection): each value a sum of products of one unit of a with values of b, which in a task's forward hold that
    task's units only (closed ones 0), 0 where a's unit is closed."""
    state.resolve(node, where, ungated=True)
    a, b = (state.units.get(x) for x in node.args[:2])
    if isinstance(a, Units) and isinstance(b, Ungated) and b.units is None and not _varies(a, -2) and \
            a.index.dim() >= 2 and len(b.params) == 1 and b.params[0][1].dim() == 2:
        _position_logits(state, a, b, where)
        # one column: one value per token computed across q's features (SwiftFormer's additive attention,
        # query @ w_g), no keys to be scores over: a statistic, which may only scale a gated tensor
        state.units[node] = Scores() if b.params[0][1].shape[1] > 1 else Statistic(
            None, why=f"{where}: one value per token computed across the features")
        return
    state.resolve(node, where)
    a, b = (state.units.get(x) for x in node.args[:2])
    if isinstance(a, Scores) != isinstance(b, Scores):  # the values, a sigmoid's output (iFormer's): gated first
        gate_scale(state, node, node.args[1] if isinstance(a, Scores) else node.args[0], where)
        a, b = (state.units.get(x) for x in node.args[:2])
    if isinstance(a, Units) and isinstance(b, Units) and not _varies(a, -2) and not _varies(b, -1):
        state.units[node] = Scores()
    elif isinstance(a, Scores) and isinstance(b, Units) and not _varies(b, -2):
        state.per_task(a.params, b.source)
        state.units[node] = _over_tokens(b, -2)
    elif isinstance(a, Units) and isinstance(b, Scores) and not _varies(a, -1):
        state.per_task(b.params, a.source)
        state.units[node] = _over_tokens(a, -1)
    elif isinstance(a, Scale) and isinstance(b, Units) and b.index.dim() >= 2 and not _varies(b, -2):
        state.units[node] = _over_tokens(b, -2)  # weights made from gated units (VOLO's outlook attention)
    elif isinstance(a, Units) and isinstance(b, Scale) and a.index.dim() >= 2 and not _varies(a, -1):
        state.units[node] = _over_tokens(a, -1)
    elif isinstance(a, Units) and isinstance(b, Units) and a.index.dim() >= 2 and not _varies(a, -1):
        state.units[node] = _over_tokens(a, -1)  # gated units weighed by gated values (EfficientViM's x @ (a * b)ᵀ)
    else:
        raise ConversionError(f"{where}: a matrix product is supported as attention over tokens (q @ kᵀ contracting "
                              "the features, then scores @ v contracting the tokens); attention over the channels "
                              "(XCiT's and EdgeNeXt's cross-covariance attention) mixes units")


def gate_scale(state: WalkState, reader: fx.Node, arg: fx.Node, where: str) -> None:
    """Where ``reader`` needs gated units (the values of attention) and ``arg`` is a scale (a sigmoid of gated units,
    f(0) ≠ 0: iFormer's ``v, gate = sigmoid(v_gate(x)).chunk(2)``, v the values of its attention), put a gate between
    them, over the dim the scale's units vary in, read by ``reader`` alone. A scale is computed without parameters
    from gated units, so in a task's forward its values depend only on that task's units (a closed unit gives a
    constant, sigmoid(0)); the new gate makes its closed units 0, so what reads them holds the new gate's units and
    its weights are protected by them. A scale of unknown units or a statistic over several units (a mean over the
    channels) is left as it is, for the reader to refuse."""
    scale = state.units.get(arg)
    shape = state.shape(arg)
    if type(scale) is not Scale or scale.units is None or shape is None:
        return
    dim = scale.units.unit_dim()
    if dim not in (1, len(shape) - 1):
        return
    gate = state.new_gate(shape[dim])
    gated = GatedNorm(NoNorm(shape[dim], num_tasks=state.num_tasks, channel_dim=1 if dim == 1 else -1), gate)
    name = free_name(state.gm, f"{arg.name}_gate")
    state.gm.add_submodule(name, gated)
    with state.gm.graph.inserting_before(reader):
        new = state.gm.graph.call_module(name, (arg, state.task, state.s))
    reader.replace_input_with(arg, new)
    state.same_shape(new, arg)
    state.layers.append(Layer(gated.norm, out=gate))
    state.units[new] = Units.of_gate(gate, len(shape), dim)


def _position_logits(state: WalkState, q: Units, key: Ungated, where: str) -> None:
    """Protect the parameter P of ``q @ Pᵀ`` (``[features, positions]``) by the units of q each entry P[d, r] meets
    (q's units at feature d, at every token: one unit per entry, or, where heads are folded into the batch, one copy
    per task)."""
    target, elements = key.params[0]
    if q.index.shape[-1] not in (1, elements.shape[0]):
        raise ConversionError(f"{where}: q @ Pᵀ contracts {q.index.shape[-1]} units with {elements.shape[0]} rows "
                              "of P")
    # output position [..., i, r] sums q[..., i, d] · P[d, r] over d: the pairs (P[d, r], unit of q[..., i, d])
    state.protect(target, elements.transpose(0, 1), q.index.unsqueeze(-2), q.source, where)


def _over_tokens(units: Units, dim: int) -> Units:
    """The units of a weighted sum of v over its tokens (along ``dim``): v's, its always-0 positions along ``dim``
    (zero-padded keys) dropped."""
    if units.index.dim() < 2:
        return units
    return Units(units.source, collapsed(units.index, [units.index.dim() + dim], units.source.num_features))


def _varies(units: Units, dim: int) -> bool:
    """Whether the units vary along ``dim`` (one of the last two: the tokens of q, v or kᵀ), as they do in attention
    over the channels; positions that are always 0 (HaloNet's zero-padded keys: index −1) vary with no unit."""
    index = units.index
    if index.dim() < 2 or index.shape[dim] == 1:
        return False
    valid = index >= 0
    high = index.masked_fill(~valid, -1).amax(dim, keepdim=True)
    return bool(((index != high) & valid).any())


def _einsum(state: WalkState, node: fx.Node, where: str) -> None:
    """An einsum that is attention's ``q @ kᵀ`` (``…id,…jd->…ij``: scores) or ``scores @ v`` (``…ij,…jd->…id``:
    v's units), as MaxViT writes them; or relative position logits, q times values gathered from a parameter summed
    over q's features (SAM's ``einsum("bhwc,hkc->bhwk", q, R)``): scores too, each a sum of products of one unit of
    q with entries every unit meets, which each task gets its own copy of once the scores weigh the values."""
    state.resolve(node, where)
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], list | tuple):
        operands = list(operands[0])
    form = _attention_einsum(equation) if isinstance(equation, str) and len(operands) == 2 else None
    a, b = (state.units.get(x) for x in operands) if len(operands) == 2 else (None, None)
    if form == "scores" and isinstance(a, Units) and isinstance(b, Units):
        state.units[node] = Scores()
    elif form == "values" and isinstance(a, Scores) and isinstance(b, Units) and (
            b.index.dim() < 2 or b.index.shape[-2] == 1):
        state.per_task(a.params, b.source)
        state.units[node] = Units(b.source, b.index)
    elif isinstance(a, Units) and isinstance(b, Derived) and _contracts_last(equation):
        state.units[node] = Scores(b.params)  # relative position logits, q · R for R gathered from a parameter
    else:
        raise ConversionError(f"{where}: an einsum is supported as attention ('...id,...jd->...ij' on q and k, "
                              f"then '...ij,...jd->...id' on the scores and v), got {equation!r}")


def _contracts_last(equation: object) -> bool:
    """Whether an einsum of two operands sums over the first one's last index and nothing else of it
    (``"bhwc,hkc->bhwk"``: SAM's relative position logits ``q · R`` over the features of q)."""
    if not isinstance(equation, str):
        return False
    operands, arrow, out = equation.replace(" ", "").partition("->")
    parts = operands.split(",")
    if not arrow or len(parts) != 2 or "." in equation or not parts[0]:
        return False
    summed = set(parts[0]) - set(out)
    return summed == {parts[0][-1]} and parts[0][-1] in parts[1]


def _attention_einsum(equation: str) -> str | None:
    """``"scores"`` for an einsum equation that is ``q @ kᵀ`` over shared leading dims, ``"values"`` for
    ``scores @ v``, else ``None``."""
    operands, arrow, out = equation.replace(" ", "").partition("->")
    parts = operands.split(",")
    if not arrow or len(parts) != 2 or "." in equation or len({len(parts[0]), len(parts[1]), len(out)}) != 1 or \
            len(out) < 2 or len(set(out)) != len(out):
        return None
    a, b = parts
    if not a[:-2] == b[:-2] == out[:-2]:
        return None
    if a[-1] == b[-1] and a[-2] != b[-2] and out[-2:] == a[-2] + b[-2] and a[-1] not in out:
        return "scores"
    if a[-1] == b[-2] and out[-2] == a[-2] and out[-1] == b[-1] and a[-1] not in out and a[-2] != b[-1]:
        return "values"
    return None



def pass_scores(state: WalkState, node: fx.Node, where: str, handler: Handler | None) -> None:
    """Attention scores through an op whose handler keeps them scores (scaling, a mask or a bias of raw data or a
    position bias, softmax, dropout, moves): still scores, biased by the parameters of any position bias."""
    state.resolve(node, where)
    tensors = [a for a in tensor_args(node) if a in state.units or a in state.pending]
    others = [state.units.get(t) for t in tensors if not isinstance(state.units.get(t), Scores)]
    if handler is None or handler.scores != "keeps" or any(o is not None and not isinstance(o, Derived)
                                                           for o in others):
        raise ConversionError(f"{where}: attention scores may only be scaled, masked, biased by data or a "
                              "position bias, softmaxed or dropped out before they weigh the values")
    params = [p for t in tensors if isinstance(state.units.get(t), Scores | Derived) for p in state.units[t].params]
    state.units[node] = Scores(tuple(dict.fromkeys(params)))


def _softmax(state: WalkState, node: fx.Node, where: str) -> None:
    """A softmax of gated units (a selective kernel's weights over its paths): it mixes the units along its dim and
    gives f(0) ≠ 0, so, like a sigmoid, its output may only scale a gated tensor; of a scale or a statistic
    (transformers' SwiftFormer weights over the tokens) it is one of the same kind; of a parameter, values derived from
    it (EfficientViM's weights of its heads, ``self.weights.softmax(-1)``)."""
    units = state.units.get(node.args[0])
    if isinstance(units, Ungated) and units.units is None:
        state.units[node] = Derived(tuple(target for target, _ in units.params))
        return
    state.resolve(node, where)
    units = state.units.get(node.args[0])
    state.units[node] = units if isinstance(units, Scale) else Scale(state.gated(node.args[0], where))


def _scores_only(state: WalkState, node: fx.Node, where: str) -> None:
    raise ConversionError(f"{where}: a masked fill is supported on attention scores (q @ kᵀ) only")


ATTENTION_MODULE = Handler("multi-head attention", _attention)
WINDOW_ATTENTION = Handler("shifted-window attention", _window_attention)
ATTENTION_FUNCTION = Handler("scaled dot-product attention", _attention_function, scores="takes")
#: ``q @ kᵀ`` and ``scores @ v``, as products or einsums
MATMUL = Handler("matmul", _matmul, scores="takes")
EINSUM = Handler("einsum", _einsum, scores="takes")
#: a softmax: attention scores stay scores; of gated units, a scale
SOFTMAX = Handler("softmax", _softmax, scores="keeps")
#: a masked fill: on attention scores only
SCORES_ONLY = Handler("masked fill", _scores_only, scores="keeps")
