"""Two HAT tasks on a small ResNet-18, for ``tests/test_distributed.py``.

Launched by ``torchrun`` (``python -m torch.distributed.run --nproc_per_node=2 distributed_worker.py OUT``),
every rank trains on its half of each batch with synchronised norms and DDP, and writes what it ends
with to ``OUT/<norm>.rank<r>.pt``; then every rank runs :func:`hatnorm.training.train_sequence` and
writes its results and final model to ``OUT/trainer.rank<r>.pt`` (rank 0 alone writes the trainer's
files, to ``OUT/trainer``). Imported, :func:`run` and :func:`run_trainer` train the same models in one
process on the whole batches.

The model runs in float64. HAT's embedding-gradient compensation multiplies a saturated gate's
gradient by up to ~1e4, and in float32 that gradient (σ(1 − σ) with σ ≈ 1) carries a relative rounding
error of ~1e-3: two float32 runs that only sum in a different order part after a few steps. In
float64 that noise stays far below the tolerance, so the comparison sees the synchronisation alone.
"""

from __future__ import annotations

import io
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor, nn
from toys import toy_tasks

import hatnorm
from hatnorm.distributed import shard, wrap
from hatnorm.policies import FGAdaHATPolicy
from hatnorm.training import HATMethod, TrainConfig, train_sequence

# every registered norm that normalises with batch statistics but the shared baseline: built-in and plug-in
NORMS = tuple(n for n in hatnorm.list_norms("batch") if hatnorm.get_norm(n).batch_statistics and n != "shared_bn")
TASKS = 2
STEPS = 3
BATCH = 8  # the global batch; each of 2 ranks takes 4
SIZE = 16


def batches(task: int) -> list[tuple[Tensor, Tensor]]:
    """The global batches of ``task``, the same in every process; task 1's inputs are shifted."""
    g = torch.Generator().manual_seed(100 + task)
    return [(torch.randn(BATCH, 3, SIZE, SIZE, generator=g, dtype=torch.float64) + task,
             torch.randint(0, 3, (BATCH,), generator=g)) for _ in range(STEPS)]


def fg_adahat() -> FGAdaHATPolicy:
    """FG-AdaHAT with an importance read from activations, which each rank sees only its share of."""
    return FGAdaHATPolicy(importance="input_weight_abs_sum_x_activation_abs")


def run(norm: str, policy: str | hatnorm.GradientPolicy = "hat") -> dict[str, Tensor]:
    """Train tasks 0 and 1; returns the final state and task 0's evaluation outputs after each task (and a
    step policy's summed importance)."""
    torch.manual_seed(0)
    model = hatnorm.build("resnet18", num_tasks=TASKS, norm=norm, num_classes=3, base_width=4).double()
    net = wrap(model)  # DDP with synchronised norms under torchrun, the model itself in one process
    hat = hatnorm.HAT(net, policy=policy)
    probe = torch.randn(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    result: dict[str, Tensor] = {}
    for task in range(TASKS):
        # momentum and weight decay move frozen entries unless HAT.step restores them
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5, weight_decay=1e-3)
        hat.begin_task(task)
        model.train()
        for b, (x, y) in enumerate(batches(task)):
            s = hat.scale(b, STEPS)
            loss = hat.loss(F.cross_entropy(net(shard(x), task=task, s=s), shard(y)), s)
            optimizer.zero_grad()
            loss.backward()
            hat.protect(s)
            hat.step(optimizer)
        hat.end_task()
        model.eval()
        with torch.no_grad():
            result[f"task0_after_task{task}"] = model(probe, task=0)
    summed = {f"summed.{k}": v for k, v in enumerate(getattr(hat.policy, "summed", []))}
    return result | summed | {f"state.{k}": v.detach().clone() for k, v in model.state_dict().items()}


def run_trainer(out_dir: Path) -> dict[str, Any]:
    """``train_sequence`` with HAT and masked BN; returns its results and the final model state."""
    models: list[nn.Module] = []

    def build() -> nn.Module:
        models.append(hatnorm.build("mlp", num_tasks=TASKS, norm="masked_bn", num_classes=2, in_features=16,
                                    hidden=(32, 32)).double())
        return models[-1]

    config = TrainConfig(epochs=3, batch_size=32, lr=0.1, momentum=0.5)
    result = train_sequence(build, toy_tasks(TASKS, dtype=torch.float64), HATMethod(), config, out_dir=out_dir,
                            console=Console(file=io.StringIO()))
    return {"result": asdict(result) | {"seconds": None}, "state": models[0].state_dict()}


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    try:
        for norm in NORMS:
            torch.save(run(norm), out / f"{norm}.rank{dist.get_rank()}.pt")
        torch.save(run("masked_bn", fg_adahat()), out / f"fg_adahat.rank{dist.get_rank()}.pt")
        torch.save(run_trainer(out / "trainer"), out / f"trainer.rank{dist.get_rank()}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
