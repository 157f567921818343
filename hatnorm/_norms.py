"""The task-aware norms in one place to import from; each is defined in the file of its job:

- :mod:`hatnorm._norm_functional`: the norms as functions (selective, synchronised and masked batch norm,
  masked layer, group and RMS norm);
- :mod:`hatnorm._norm_protocol`: the :class:`MaskedNorm` protocol, the layouts, and :class:`NoNorm`;
- :mod:`hatnorm._norm_batch`: the channels-first norms (BatchNorm variants, GroupNorm, channel LayerNorm);
- :mod:`hatnorm._norm_layer`: the channels-last norms (LayerNorm variants, RMSNorm);
- :mod:`hatnorm._norm_contract`: a class's declarations checked on a probe at its first build;
- :mod:`hatnorm._norm_registry`: names → classes.

Adding a norm is one :class:`MaskedNorm` subclass, registered with :func:`hatnorm.register_norm`.
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
    TaskBatchNorm,
    TaskBatchNorm1d,
    TaskBatchNorm2d,
)
from hatnorm._norm_functional import (
    masked_batch_norm,
    masked_group_norm,
    masked_layer_norm,
    masked_moments,
    masked_rms_norm,
    per_channel,
    selective_batch_norm,
    sync_batch_norm,
)
from hatnorm._norm_layer import MaskedLayerNorm, MaskedRMSNorm, SharedLayerNorm, TaskLayerNorm
from hatnorm._norm_protocol import FAMILY_OF, Family, Layout, MaskedNorm, NoNorm

__all__ = [
    "FAMILY_OF",
    "Family",
    "Layout",
    "MaskedBatchNorm",
    "MaskedBatchNorm1d",
    "MaskedBatchNorm2d",
    "MaskedChannelLayerNorm",
    "MaskedGroupNorm",
    "MaskedLayerNorm",
    "MaskedNorm",
    "MaskedRMSNorm",
    "NoNorm",
    "PostGateBatchNorm",
    "PostGateBatchNorm1d",
    "PostGateBatchNorm2d",
    "SharedBatchNorm",
    "SharedBatchNorm1d",
    "SharedBatchNorm2d",
    "SharedLayerNorm",
    "TaskBatchNorm",
    "TaskBatchNorm1d",
    "TaskBatchNorm2d",
    "TaskLayerNorm",
    "masked_batch_norm",
    "masked_group_norm",
    "masked_layer_norm",
    "masked_moments",
    "masked_rms_norm",
    "per_channel",
    "selective_batch_norm",
    "sync_batch_norm",
]
