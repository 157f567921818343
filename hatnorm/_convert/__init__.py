"""Conversion: :func:`convert` turns a model the user already has into a HAT model, keeping its weights.

The model is traced with ``torch.fx``. Every BatchNorm/LayerNorm/GroupNorm/RMSNorm (a module, or a functional
``F.batch_norm``/``F.layer_norm``/… call on a module's parameters, as in timm's ``BatchNormAct2d`` and
torchvision's ``LayerNorm2d``) becomes the chosen task-aware norm with its γ, β and running statistics copied into
every task slot, followed by a new gate; weighted layers with no norm after them get a gate of their own; the
classifier becomes one head per task.

The package, by phase:

- **trace** (:mod:`.tracing`, :mod:`.train_graph`): the graph, alongside an example batch when given, the
  training-only branches kept, and every node's shape for the example (:mod:`.units`);
- **walk** (:mod:`.walk`): every node in order, its units (where each gate's units sit in the tensor,
  :mod:`.units`) found by the handler the one op table (:mod:`.table`) gives its op. The built-in handlers
  (:mod:`.ops_elementwise`, :mod:`.ops_shapes`, :mod:`.ops_attention`, :mod:`.ops_layers`) are registered by
  :mod:`.builtin` through the same :meth:`~.table.OpTable.register` that :func:`register_conversion_rule`
  (:mod:`.rules`) uses; each receives the walk's state (:mod:`.state`);
- **rewrite** (:mod:`.walk`): what the walk took over goes, unprotected parameter uses are refused;
- **wrap** (:mod:`.api`, :mod:`.model`): the graph becomes a :class:`ConvertedModel`.

The modules a converted graph runs (:mod:`.runtime`, :mod:`.params`, :mod:`.windows`) know nothing of the walk.
transformers models whose attention a walk cannot follow (ViT, the language models) are converted by their
structure (:mod:`.structural` names a converter per class: :mod:`.vit`, :mod:`.text_bert`, :mod:`.text_gpt2`,
:mod:`.text_llama`).

What cannot be converted raises :class:`ConversionError` naming the module, source line and op.

The package is private (``hatnorm._convert``) because its public face is the function ``hatnorm.convert``: a
public package of that name would be shadowed by the function (``import hatnorm.convert`` would give either,
depending on import order). Its public names are re-exported by ``hatnorm``.
"""

from hatnorm._convert import builtin
from hatnorm._convert.api import convert, open_gates
from hatnorm._convert.error import ConversionError
from hatnorm._convert.model import ConvertedModel
from hatnorm._convert.params import BufferUse, ParameterUse, TaskModule, TaskParameter
from hatnorm._convert.rules import RULES, register_conversion_rule
from hatnorm._convert.runtime import GatedLinear, GatedMultiheadAttention, GatedNorm, Heads
from hatnorm._convert.table import OPS, Handler, OpTable

__all__ = [
    "OPS",
    "RULES",
    "BufferUse",
    "ConversionError",
    "ConvertedModel",
    "GatedLinear",
    "GatedMultiheadAttention",
    "GatedNorm",
    "Handler",
    "Heads",
    "OpTable",
    "ParameterUse",
    "TaskModule",
    "TaskParameter",
    "builtin",
    "convert",
    "open_gates",
    "register_conversion_rule",
]
