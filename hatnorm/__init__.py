"""hatnorm: task-aware normalization for Hard Attention to the Task (HAT) continual learning.

``import hatnorm`` loads the core (torch and einops). The trainer, data, statistics and checkpoint
modules, which need more (some of them extras), load when imported or first used as attributes
(``hatnorm.training``).
"""

import importlib
from types import ModuleType

from hatnorm._arch_registry import (
    ArchitectureSpec,
    build,
    get_architecture,
    list_architectures,
    register_architecture,
)
from hatnorm._attribution import ATTRIBUTIONS as ATTRIBUTION_TYPES
from hatnorm._convert import ConversionError, ConvertedModel, ParameterUse, TaskParameter, convert, open_gates
from hatnorm._export import TaskModel, export
from hatnorm._exported import ExportedBatchNorm, ExportedGate, ExportedGroupNorm, ExportedLayerNorm, ExportedRMSNorm
from hatnorm._gate import GATE_FLOOR, HATGate, anneal_scale, compensate, compensation_factor, hat_gate
from hatnorm._hat import HAT, HATModule, Layer
from hatnorm._heads import TaskHeads
from hatnorm._importance import TYPES as IMPORTANCE_TYPES
from hatnorm._masks import Concat, Flatten, MaskSource, MaskState, Residual, Select
from hatnorm._norm_registry import NormSpec, get_norm, list_norms, register_norm
from hatnorm._norms import (
    MaskedBatchNorm,
    MaskedBatchNorm1d,
    MaskedBatchNorm2d,
    MaskedChannelLayerNorm,
    MaskedGroupNorm,
    MaskedLayerNorm,
    MaskedNorm,
    MaskedRMSNorm,
    NoNorm,
    PostGateBatchNorm,
    PostGateBatchNorm1d,
    PostGateBatchNorm2d,
    SharedBatchNorm,
    SharedBatchNorm1d,
    SharedBatchNorm2d,
    SharedLayerNorm,
    TaskBatchNorm,
    TaskBatchNorm1d,
    TaskBatchNorm2d,
    TaskLayerNorm,
    masked_batch_norm,
    masked_group_norm,
    masked_layer_norm,
    masked_moments,
    masked_rms_norm,
    selective_batch_norm,
    sync_batch_norm,
)
from hatnorm._policies import AdaHATPolicy, GradientPolicy, HATPolicy, get_policy, list_policies, register_policy
from hatnorm._protected import Protected
from hatnorm._recalibration import recalibrate_norms
from hatnorm._soft_policies import ADAHAT_MODES, SCHEDULERS, SUMMING_STRATEGIES, AdaHATReferencePolicy, FGAdaHATPolicy
from hatnorm._step_policy import SoftRatePolicy, StepPolicy, Wiring
from hatnorm._transformer import (
    GatedAttention,
    GatedFeedForward,
    TokenEmbedding,
    blocks_wiring,
    gated_linear,
    run_blocks,
)
from hatnorm._units import register_conversion_rule
from hatnorm.distributed import convert_sync

__version__ = "0.1.0"

#: the public submodules that ``import hatnorm`` does not load: each loads on first use as an attribute
_SUBMODULES = ("checkpoint", "checks", "data", "distributed", "fused", "integrations", "metrics", "stats", "training")


def __getattr__(name: str) -> ModuleType:
    """``hatnorm.training`` and the other public submodules without importing them first."""
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES})

__all__ = [
    "ADAHAT_MODES",
    "ATTRIBUTION_TYPES",
    "GATE_FLOOR",
    "HAT",
    "IMPORTANCE_TYPES",
    "SCHEDULERS",
    "SUMMING_STRATEGIES",
    "AdaHATPolicy",
    "AdaHATReferencePolicy",
    "ArchitectureSpec",
    "Concat",
    "ConversionError",
    "ConvertedModel",
    "ExportedBatchNorm",
    "ExportedGate",
    "ExportedGroupNorm",
    "ExportedLayerNorm",
    "ExportedRMSNorm",
    "FGAdaHATPolicy",
    "Flatten",
    "GatedAttention",
    "GatedFeedForward",
    "GradientPolicy",
    "HATGate",
    "HATModule",
    "HATPolicy",
    "Layer",
    "MaskSource",
    "MaskState",
    "MaskedBatchNorm",
    "MaskedBatchNorm1d",
    "MaskedBatchNorm2d",
    "MaskedChannelLayerNorm",
    "MaskedGroupNorm",
    "MaskedLayerNorm",
    "MaskedNorm",
    "MaskedRMSNorm",
    "NoNorm",
    "NormSpec",
    "ParameterUse",
    "PostGateBatchNorm",
    "PostGateBatchNorm1d",
    "PostGateBatchNorm2d",
    "Protected",
    "Residual",
    "Select",
    "SharedBatchNorm",
    "SharedBatchNorm1d",
    "SharedBatchNorm2d",
    "SharedLayerNorm",
    "SoftRatePolicy",
    "StepPolicy",
    "TaskBatchNorm",
    "TaskBatchNorm1d",
    "TaskBatchNorm2d",
    "TaskHeads",
    "TaskLayerNorm",
    "TaskModel",
    "TaskParameter",
    "TokenEmbedding",
    "Wiring",
    "anneal_scale",
    "blocks_wiring",
    "build",
    "compensate",
    "compensation_factor",
    "convert",
    "convert_sync",
    "export",
    "gated_linear",
    "get_architecture",
    "get_norm",
    "get_policy",
    "hat_gate",
    "list_architectures",
    "list_norms",
    "list_policies",
    "masked_batch_norm",
    "masked_group_norm",
    "masked_layer_norm",
    "masked_moments",
    "masked_rms_norm",
    "open_gates",
    "recalibrate_norms",
    "register_architecture",
    "register_conversion_rule",
    "register_norm",
    "register_policy",
    "run_blocks",
    "selective_batch_norm",
    "sync_batch_norm",
]
