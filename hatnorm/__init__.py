"""hatnorm: task-aware normalization for Hard Attention to the Task (HAT) continual learning."""

from hatnorm._arch_registry import (
    ArchitectureSpec,
    build,
    get_architecture,
    list_architectures,
    register_architecture,
)
from hatnorm._convert import ConversionError, ConvertedModel, convert, open_gates
from hatnorm._export import TaskModel, export
from hatnorm._exported import ExportedBatchNorm, ExportedGate, ExportedLayerNorm
from hatnorm._gate import GATE_FLOOR, HATGate, anneal_scale, compensate, compensation_factor, hat_gate
from hatnorm._hat import HAT, HATModule, Layer
from hatnorm._heads import TaskHeads
from hatnorm._masks import Concat, Flatten, MaskSource, MaskState, Residual
from hatnorm._norm_registry import NormSpec, get_norm, list_norms, register_norm
from hatnorm._norms import (
    MaskedBatchNorm,
    MaskedBatchNorm1d,
    MaskedBatchNorm2d,
    MaskedLayerNorm,
    MaskedNorm,
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
    masked_layer_norm,
    masked_moments,
    selective_batch_norm,
    sync_batch_norm,
)
from hatnorm._policies import AdaHATPolicy, GradientPolicy, HATPolicy, get_policy, list_policies, register_policy
from hatnorm._protected import Protected
from hatnorm._transformer import (
    GatedAttention,
    GatedFeedForward,
    TokenEmbedding,
    blocks_wiring,
    gated_linear,
    run_blocks,
)
from hatnorm.distributed import convert_sync
from hatnorm.training._evaluation import recalibrate_norms

__version__ = "0.1.0"

__all__ = [
    "GATE_FLOOR",
    "HAT",
    "AdaHATPolicy",
    "ArchitectureSpec",
    "Concat",
    "ConversionError",
    "ConvertedModel",
    "ExportedBatchNorm",
    "ExportedGate",
    "ExportedLayerNorm",
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
    "MaskedLayerNorm",
    "MaskedNorm",
    "NoNorm",
    "NormSpec",
    "PostGateBatchNorm",
    "PostGateBatchNorm1d",
    "PostGateBatchNorm2d",
    "Protected",
    "Residual",
    "SharedBatchNorm",
    "SharedBatchNorm1d",
    "SharedBatchNorm2d",
    "SharedLayerNorm",
    "TaskBatchNorm",
    "TaskBatchNorm1d",
    "TaskBatchNorm2d",
    "TaskHeads",
    "TaskLayerNorm",
    "TaskModel",
    "TokenEmbedding",
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
    "masked_layer_norm",
    "masked_moments",
    "open_gates",
    "recalibrate_norms",
    "register_architecture",
    "register_norm",
    "register_policy",
    "run_blocks",
    "selective_batch_norm",
    "sync_batch_norm",
]
