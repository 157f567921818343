"""The training settings: the reference schedule by default, AdamW with warmup + cosine on request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from hatnorm._checks import check_non_negative, check_positive, check_positive_int

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("plateau", "cosine", "constant")
#: how the ranks of a run under torchrun share the model
SHARDINGS = ("ddp", "fsdp")


def check_device(device: object) -> torch.device:
    """``device`` as a torch device, refused when torch does not know it or this machine lacks it."""
    if not isinstance(device, str):
        raise ValueError(f"device must be a device name such as 'cpu' or 'cuda', got {device!r}")
    try:
        where = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be a device name torch knows ('cpu', 'cuda', 'cuda:0', 'mps', ...), got "
                         f"{device!r}") from None
    if where.type == "cuda":
        count = torch.cuda.device_count()
        if not torch.cuda.is_available() or (where.index is not None and where.index >= count):
            raise ValueError(f"device={device!r}: this machine has {count} CUDA device(s) torch can use"
                             f"{'' if count else ' (torch.cuda.is_available() is False)'}; use 'cpu'")
    elif where.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r}: MPS is not available on this machine; use 'cpu'")
    return where


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; the defaults are the reference schedule (Serrà et al.).

    Three schedules drive the learning rate within a task. ``"plateau"`` (the reference): the rate is divided
    by ``lr_factor`` after ``patience`` epochs without validation improvement, the optimizer re-created and
    the best weights restored, and training stops when it falls below ``lr_min`` or after ``epochs``.
    ``"cosine"`` (what transformer users run): a linear warmup over ``warmup_epochs`` epochs, then a cosine
    decay to 0 at the end of ``epochs``, stepped every batch (torch's ``LinearLR``, ``CosineAnnealingLR``
    and ``SequentialLR``). ``"constant"`` (the FG-AdaHAT paper's Adam): ``lr`` for exactly ``epochs`` epochs.
    All three keep the best-validation weights.

    Attributes:
        epochs: most epochs per task (``"cosine"``, ``"constant"``: exactly this many).
        lr: initial (``"cosine"``: peak) learning rate.
        lr_min: ``"plateau"``: training of a task stops when the learning rate falls below it.
        lr_factor: ``"plateau"``: the learning rate is divided by it on a plateau.
        patience: ``"plateau"``: epochs without validation improvement before the learning rate drops.
        batch_size: training batch size (≥ 2: batch statistics).
        clip: gradient-norm clipping threshold.
        momentum: SGD momentum (``optimizer="sgd"`` only).
        weight_decay: weight decay (L2 for SGD, decoupled for AdamW).
        optimizer: ``"sgd"`` (the reference) or ``"adamw"``.
        schedule: ``"plateau"`` (the reference), ``"cosine"`` or ``"constant"``.
        warmup_epochs: ``"cosine"``: epochs of linear warmup before the decay (< ``epochs``).
        validation_fraction: share of every task's training set held out for validation.
        seed: seeds the model, the validation split and the batch order.
        recalibrate: precise batch-norm statistics. Before every validation, the running statistics of the
            norms that keep them are re-estimated for the current weights with one pass over the task's
            training data in inference mode (gates binarized, dropout off), as the exact mean of the batch
            statistics; the validation, the best-weights choice and the plateau schedule see them, the
            kept weights carry them, and training goes on from the statistics it had. Without it a short
            run validates on momentum averages that lag weights moving fast (near chance while the task
            is fitted), and dropout before a norm shifts the variance it sees.
        nonfinite: what a batch whose inputs hold NaN or inf does, in training, validation, test and
            recalibration alike: ``"raise"`` a ValueError naming the task, epoch and batch, or ``"skip"``
            it (a training batch takes no forward and no step, and is counted in
            :attr:`SequenceResult.skipped` and the log lines; validation and test leave out the samples
            with NaN or inf inputs). A NaN or inf loss on finite inputs (a
            diverged run) always raises a FloatingPointError naming the task and epoch.
        sharding: under ``torchrun``, how the ranks share the model: ``"ddp"``, every rank holds all of it and
            the gradients are averaged after ``backward`` (:func:`hatnorm.distributed.average_gradients`), or
            ``"fsdp"``, every rank holds a slice of every parameter, of its gradient and of the optimizer's
            moments (PyTorch FSDP2, :func:`hatnorm.distributed.fully_shard`); checkpoints hold the whole state
            either way. The same run up to the order of a sum; nothing changes in one process.
        device: where the model trains: ``None`` (where the model's builder put it) or a device torch names
            (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``); the model is moved there when built, and every batch
            goes to the model's device as it is read. Under ``torchrun`` a ``"cuda"`` without an index is each
            rank's own GPU (``LOCAL_RANK``).
    """

    epochs: int = 200
    lr: float = 0.05
    lr_min: float = 1e-4
    lr_factor: float = 3.0
    patience: int = 5
    batch_size: int = 64
    clip: float = 10000.0
    momentum: float = 0.0
    weight_decay: float = 0.0
    optimizer: Literal["sgd", "adamw"] = "sgd"
    schedule: Literal["plateau", "cosine", "constant"] = "plateau"
    warmup_epochs: int = 0
    validation_fraction: float = 0.1
    seed: int = 0
    recalibrate: bool = True
    nonfinite: Literal["raise", "skip"] = "raise"
    sharding: Literal["ddp", "fsdp"] = "ddp"
    device: str | None = None

    def __post_init__(self) -> None:
        check_positive_int(self.epochs, "epochs")
        check_positive(self.lr, "lr")
        check_positive(self.lr_min, "lr_min")
        check_positive_int(self.patience, "patience")
        check_positive(self.clip, "clip")
        check_non_negative(self.momentum, "momentum")
        check_non_negative(self.weight_decay, "weight_decay")
        if check_positive(self.lr_factor, "lr_factor") <= 1:
            raise ValueError(f"lr_factor must be > 1, got {self.lr_factor!r}")
        if check_positive_int(self.batch_size, "batch_size") < 2:
            raise ValueError(f"batch_size must be ≥ 2 (batch statistics), got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {self.schedule!r}")
        if self.optimizer == "adamw" and self.momentum:
            raise ValueError(f"momentum applies to optimizer='sgd' only (AdamW has betas), got momentum="
                             f"{self.momentum!r} with optimizer='adamw'")
        if isinstance(self.warmup_epochs, bool) or not isinstance(self.warmup_epochs, int) or self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an int ≥ 0, got {self.warmup_epochs!r}")
        if self.warmup_epochs and self.schedule != "cosine":
            raise ValueError(f"warmup_epochs applies to schedule='cosine' only, got warmup_epochs="
                             f"{self.warmup_epochs} with schedule={self.schedule!r}")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs must be < epochs ({self.epochs}), got {self.warmup_epochs}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {self.nonfinite!r}")
        if self.device is not None:
            check_device(self.device)
        if self.sharding not in SHARDINGS:
            raise ValueError(f"sharding must be one of {', '.join(map(repr, SHARDINGS))}, got {self.sharding!r}")
