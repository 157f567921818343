"""The modules of an exported model (:func:`hatnorm.export`, a :class:`hatnorm.TaskModel`): one task's gates and
norms frozen into plain inference modules."""

from hatnorm._exported import ExportedBatchNorm, ExportedGate, ExportedGroupNorm, ExportedLayerNorm, ExportedRMSNorm

__all__ = ["ExportedBatchNorm", "ExportedGate", "ExportedGroupNorm", "ExportedLayerNorm", "ExportedRMSNorm"]
