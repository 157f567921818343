"""A small real training run for the checkpoint tests, killed and resumed by ``tests/test_checkpoint.py``.

    python tests/checkpoint_worker.py OUT [--resume]

HAT with masked BN on three Split-MNIST tasks (a gated MLP with dropout, SGD with momentum and a
one-epoch patience, so the schedule restores best weights), checkpointing every epoch into
``OUT/checkpoint``. On completion it writes the accuracy matrix to ``OUT/result.json`` and the final
model state to ``OUT/model.safetensors``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import save_file

import hatnorm
from hatnorm.data import split_mnist
from hatnorm.training import HATMethod, TrainConfig, train_sequence

# lr 0.2 and patience 1: the second task hits a plateau after epoch 2 (lr ÷ 3, best weights restored)
CONFIG = TrainConfig(epochs=3, batch_size=32, lr=0.2, momentum=0.5, patience=1, seed=3)


def main(out: Path, resume: bool) -> None:
    torch.set_num_threads(1)  # the same arithmetic in every run, and two runs fit two cores
    tasks = split_mnist(num_tasks=3)
    models = []

    def build() -> torch.nn.Module:
        models.append(hatnorm.build("mlp", num_tasks=3, norm="masked_bn", num_classes=[2, 2, 2],
                                    hidden=(128, 128), dropout=0.2))
        return models[-1]

    result = train_sequence(build, tasks, HATMethod(), CONFIG, console=Console(width=200), title="worker",
                            info={"arch": "mlp", "norm": "masked_bn"}, checkpoint_dir=out / "checkpoint",
                            checkpoint_every=1, resume=resume)
    save_file(models[0].state_dict(), out / "model.safetensors")
    (out / "result.json").write_text(json.dumps({"accuracy": result.accuracy, "epochs": result.epochs}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--resume" in sys.argv[2:])
