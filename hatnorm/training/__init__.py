"""Continual training of a task sequence with any registered architecture, norm and method.

The reference schedule (Serrà et al.): SGD with lr 0.05 and batch 64, gradient-norm clipping at 10000,
the learning rate divided by 3 after 5 epochs without validation improvement (the optimizer
re-created and the best weights restored), stop when the learning rate drops below 1e-4, keep the
best-validation weights, at most 200 epochs. AdamW with a linear warmup and a cosine decay is the
other schedule (:class:`TrainConfig`). Validation sees normalization statistics re-estimated for the
current weights (precise BN). Methods: HAT (per-batch scale annealing, the capacity regulariser,
gradient protection), SGD fine-tuning, EWC, and joint multitask training.

The parts, one job each: ``_config`` (the settings), ``_methods`` (how a task is learned), ``_evaluation``
(testing, and statistics re-estimated for validation by the core's ``recalibrate_norms``), ``_fit`` (one
task's epoch loop and schedule), ``_display`` (progress), ``_sequence`` (whole sequences, their files and
checkpoints).
"""

from hatnorm.training._config import OPTIMIZERS, SCHEDULES, SHARDINGS, TrainConfig
from hatnorm.training._evaluation import evaluate, precise_statistics, recalibrate_norms
from hatnorm.training._fit import split_validation
from hatnorm.training._methods import EWC, METHODS, FineTune, HATMethod, Method
from hatnorm.training._sequence import SequenceResult, train_joint, train_sequence

__all__ = [
    "EWC",
    "METHODS",
    "OPTIMIZERS",
    "SCHEDULES",
    "SHARDINGS",
    "FineTune",
    "HATMethod",
    "Method",
    "SequenceResult",
    "TrainConfig",
    "evaluate",
    "precise_statistics",
    "recalibrate_norms",
    "split_validation",
    "train_joint",
    "train_sequence",
]
