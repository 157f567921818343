"""The functional forms: the gate, the task-aware norms and the gated linear map as functions of tensors.

Every function validates its arguments; the modules of :mod:`hatnorm.norms` and :class:`hatnorm.HATGate`
call them.
"""

from hatnorm._gate import GATE_FLOOR, anneal_scale, compensate, compensation_factor, hat_gate
from hatnorm._norm_functional import (
    masked_batch_norm,
    masked_group_norm,
    masked_layer_norm,
    masked_moments,
    masked_rms_norm,
    selective_batch_norm,
    sync_batch_norm,
)
from hatnorm._transformer import gated_linear

__all__ = [
    "GATE_FLOOR",
    "anneal_scale",
    "compensate",
    "compensation_factor",
    "gated_linear",
    "hat_gate",
    "masked_batch_norm",
    "masked_group_norm",
    "masked_layer_norm",
    "masked_moments",
    "masked_rms_norm",
    "selective_batch_norm",
    "sync_batch_norm",
]
