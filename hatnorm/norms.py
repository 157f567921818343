"""The task-aware norms, as modules: each a :class:`hatnorm.MaskedNorm` registered under a name
(:func:`hatnorm.list_norms`; ``hatnorm.get_norm("masked_bn").norm_class`` is :class:`MaskedBatchNorm`).

:class:`NoNorm` stands where a model takes no norm; the ``Task*``, ``Shared*`` and ``PostGate*`` norms are the
baselines the masked norms are compared with.
"""

from hatnorm._norm_batch import (
    MaskedBatchNorm,
    MaskedBatchNorm1d,
    MaskedBatchNorm2d,
    MaskedChannelLayerNorm,
    MaskedGroupNorm,
    PostGateBatchNorm,
    PostGateBatchNorm1d,
    PostGateBatchNorm2d,
    SharedBatchNorm,
    SharedBatchNorm1d,
    SharedBatchNorm2d,
    SharedChannelLayerNorm,
    SharedGroupNorm,
    TaskBatchNorm,
    TaskBatchNorm1d,
    TaskBatchNorm2d,
    TaskChannelLayerNorm,
    TaskGroupNorm,
)
from hatnorm._norm_layer import (
    MaskedLayerNorm,
    MaskedRMSNorm,
    SharedLayerNorm,
    SharedRMSNorm,
    TaskLayerNorm,
    TaskRMSNorm,
)
from hatnorm._norm_protocol import NoNorm

__all__ = [
    "MaskedBatchNorm",
    "MaskedBatchNorm1d",
    "MaskedBatchNorm2d",
    "MaskedChannelLayerNorm",
    "MaskedGroupNorm",
    "MaskedLayerNorm",
    "MaskedRMSNorm",
    "NoNorm",
    "PostGateBatchNorm",
    "PostGateBatchNorm1d",
    "PostGateBatchNorm2d",
    "SharedBatchNorm",
    "SharedBatchNorm1d",
    "SharedBatchNorm2d",
    "SharedChannelLayerNorm",
    "SharedGroupNorm",
    "SharedLayerNorm",
    "SharedRMSNorm",
    "TaskBatchNorm",
    "TaskBatchNorm1d",
    "TaskBatchNorm2d",
    "TaskChannelLayerNorm",
    "TaskGroupNorm",
    "TaskLayerNorm",
    "TaskRMSNorm",
]
