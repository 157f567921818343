"""The built-in rules, registered in the op table (:data:`~.table.OPS`) through :meth:`~.table.OpTable.register`,
as a user's rules are: importing this module fills the table, before any user registers a rule."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from hatnorm._convert.norms import norm_modules
from hatnorm._convert.ops_attention import (
    ATTENTION_FUNCTION,
    ATTENTION_MODULE,
    EINSUM,
    MATMUL,
    SCORES_ONLY,
    SOFTMAX,
    WINDOW_ATTENTION,
)
from hatnorm._convert.ops_elementwise import (
    ACTIVATION,
    ADD,
    ADDCMUL,
    DIVIDE,
    NORMALIZE,
    OF_SCALE,
    PASSES,
    POOL,
    POWER,
    PRODUCT,
    SCALE,
    UNITWISE,
)
from hatnorm._convert.ops_layers import (
    EMBEDDING,
    FUNCTIONAL_LAYER,
    FUNCTIONAL_LAYERS,
    FUNCTIONAL_NORMS,
    NORM,
    WEIGHTED,
)
from hatnorm._convert.ops_norms import FUNCTIONAL_NORM_FORMS
from hatnorm._convert.ops_patches import FOLD, UNFOLD
from hatnorm._convert.ops_shapes import CAT, COPYING_PADS, MOVES, PAD, REDUCE, REDUCTIONS, STACK
from hatnorm._convert.state import WalkState
from hatnorm._convert.table import OPS, Handler, OpTable
from hatnorm._convert.tracing import is_drop_path, is_transformers_activation
from hatnorm._convert.train_graph import ModeValue
from hatnorm._convert.windows import is_patch_merging_pad, is_window_attention


def _nothing(state: WalkState, node: fx.Node, where: str) -> None:
    """A number or flag of the training mode (:class:`~.train_graph.ModeValue`), not a tensor."""


#: activations with f(0) = 0, negation (rotary embeddings' rotate_half) and drop-path
_UNITWISE = [
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Hardswish, nn.Hardtanh,
    nn.Tanh, nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, F.mish, F.leaky_relu, F.elu, F.selu, F.celu,
    F.hardswish, F.hardtanh, torch.tanh, F.tanh, F.softsign, F.dropout1d, F.dropout2d, F.dropout3d, torch.clone,
    "relu", "relu_", "tanh", "tanh_", operator.neg, torch.neg, "neg",
]
_POOLS = [
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    # resampling (nearest, linear, cubic...) over dims the units do not vary in: 0 stays 0, like a pool
    nn.Upsample, F.interpolate, F.upsample,
]
#: dropouts, identities, copies and casts (a tensor holding a parameter's values still holds them)
_PASSES = [nn.Dropout, nn.Identity, F.dropout, "contiguous", "clone", "to", "float", "double", "half", "bfloat16",
           "type_as"]
_MOVES = [
    nn.Flatten, nn.Unflatten, torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.swapaxes,
    torch.movedim, torch.squeeze, torch.unsqueeze, torch.roll, torch.narrow, torch.chunk, torch.split, torch.unbind,
    torch.select, torch.tensor_split, operator.getitem, "view", "reshape", "flatten", "unflatten", "permute",
    "transpose", "swapaxes", "movedim", "squeeze", "unsqueeze", "chunk", "split", "unbind", "narrow", "roll", "expand",
    "repeat", "select", "tensor_split", torch.repeat_interleave, "repeat_interleave", torch.tile, "tile", "unfold",
    "reshape_as", "view_as", "expand_as",
]
_SCALES = [nn.Sigmoid, nn.Hardsigmoid, torch.sigmoid, F.sigmoid, F.hardsigmoid, "sigmoid", "sigmoid_"]
_ADDS = [operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub, "add", "add_", "sub", "sub_"]
_PRODUCTS = [operator.mul, operator.imul, torch.mul, "mul", "mul_"]
_DIVISIONS = [operator.truediv, operator.itruediv, torch.div, "div", "div_"]
#: zero padding, functional or a module (ZeroPad2d, ConstantPad2d with value 0), and padding that copies values
_PADS = [F.pad, nn.modules.padding._ConstantPadNd, *COPYING_PADS]
_CATS = [torch.cat, torch.concat, torch.concatenate]
_MATMULS = [operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"]
_SOFTMAXES = [nn.Softmax, F.softmax, torch.softmax, "softmax"]


def _is_stochastic_depth(target: object) -> bool:
    """torchvision's ``stochastic_depth`` (drop-path): each sample's units scaled alike, a zero unit stays 0."""
    return getattr(target, "__name__", None) == "stochastic_depth" and \
        str(getattr(target, "__module__", "")).startswith("torchvision.ops")


def _is_norm(op: object) -> bool:
    """A torch norm module, or one a registered norm replaces."""
    return isinstance(op, nn.Module) and isinstance(op, norm_modules())


def register_builtins(table: OpTable) -> None:
    """Register every built-in rule in ``table``."""
    by_handler: list[tuple[Handler, list[object]]] = [
        (UNITWISE, _UNITWISE), (POOL, _POOLS), (PASSES, _PASSES), (MOVES, _MOVES), (SCALE, _SCALES), (ADD, _ADDS),
        (PRODUCT, _PRODUCTS), (DIVIDE, _DIVISIONS), (ADDCMUL, [torch.addcmul, "addcmul"]), (CAT, _CATS),
        (STACK, [torch.stack]), (REDUCE, list(REDUCTIONS)),
        (MATMUL, _MATMULS), (SOFTMAX, _SOFTMAXES), (SCORES_ONLY, [torch.masked_fill, "masked_fill"]), (PAD, _PADS),
        (EINSUM, [torch.einsum]), (NORMALIZE, [F.normalize]), (POWER, [torch.pow, operator.pow, "pow"]),
        (OF_SCALE, [torch.rsqrt, "rsqrt", torch.reciprocal, "reciprocal"]),
        (ATTENTION_FUNCTION, [F.scaled_dot_product_attention]), (ATTENTION_MODULE, [nn.MultiheadAttention]),
        (WEIGHTED, [nn.Linear, nn.modules.conv._ConvNd]), (FUNCTIONAL_NORM_FORMS, list(FUNCTIONAL_NORMS)),
        (FUNCTIONAL_LAYER, list(FUNCTIONAL_LAYERS)), (EMBEDDING, [nn.Embedding, F.embedding]),
        (UNFOLD, [nn.Unfold, F.unfold]), (FOLD, [nn.Fold, F.fold]),
        (Handler("mode value", _nothing, scores="takes"), [ModeValue]),
    ]
    for handler, targets in by_handler:
        for target in targets:
            table.register(target, handler)
    table.register_test(_is_norm, NORM)
    table.register_test(lambda op: isinstance(op, nn.Module) and is_drop_path(op), UNITWISE)
    table.register_test(lambda op: isinstance(op, nn.Module) and is_window_attention(op), WINDOW_ATTENTION)
    table.register_test(lambda op: isinstance(op, nn.Module) and is_transformers_activation(op), ACTIVATION)
    table.register_test(_is_stochastic_depth, UNITWISE)
    table.register_test(is_patch_merging_pad, MOVES)


register_builtins(OPS)
