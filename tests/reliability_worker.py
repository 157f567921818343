"""Uneven last batches under torchrun, for ``tests/test_reliability_training.py``.

Launched by ``torchrun`` (``python -m torch.distributed.run --nproc_per_node=2 reliability_worker.py OUT``),
every rank runs :func:`hatnorm.training.train_sequence` on toy tasks for each case of :data:`SAMPLES` and
writes its results and final model to ``OUT/<case>.rank<r>.pt``. Imported, :func:`run` trains the same in
one process.

The training splits end in a last batch of :data:`BATCH` plus 5 (``"uneven"``: shared 3 / 2 by two ranks)
or 3 (``"small"``: one rank would get a single sample). The model runs in float64, so that two runs that
only sum in a different order stay far below the comparison's tolerance (see ``distributed_worker.py``).
"""

from __future__ import annotations

import io
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from torch import nn
from toys import toy_tasks

import hatnorm
from hatnorm.training import HATMethod, TrainConfig, train_sequence

BATCH = 8
#: samples per task: 5 go to validation, leaving training splits of 45 (last batch 5) and 43 (last batch 3)
SAMPLES = {"uneven": 50, "small": 48}


def run(case: str) -> dict[str, Any]:
    """``train_sequence`` with HAT and masked BN on two tasks; returns its results and final model state."""
    models: list[nn.Module] = []

    def build() -> nn.Module:
        models.append(hatnorm.build("mlp", num_tasks=2, norm="masked_bn", num_classes=2, in_features=16,
                                    hidden=(32, 32)).double())
        return models[-1]

    config = TrainConfig(epochs=2, batch_size=BATCH, lr=0.1, momentum=0.5)
    tasks = toy_tasks(2, samples=SAMPLES[case], dtype=torch.float64)
    result = train_sequence(build, tasks, HATMethod(), config, console=Console(file=io.StringIO()))
    return {"result": asdict(result) | {"seconds": None}, "state": models[0].state_dict()}


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    try:
        for case in SAMPLES:
            torch.save(run(case), out / f"{case}.rank{dist.get_rank()}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
