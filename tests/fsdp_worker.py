"""Two HAT tasks on a small ResNet-18 sharded with PyTorch FSDP2, for ``tests/test_fsdp.py``.

Launched by ``torchrun`` (``python -m torch.distributed.run --nproc_per_node=2 fsdp_worker.py OUT``), every
rank shards the model with :func:`hatnorm.distributed.fully_shard` on a CPU device mesh (gloo), trains on
its half of each batch and writes what it ends with to ``OUT/<run>.rank<r>.pt``: once for each optimizer
(AdamW, SGD with momentum and weight decay), sharding plan (the whole model as one unit, or every
residual block its own unit as well) and gradient policy (HAT, FG-AdaHAT), and once interrupted in task 1,
checkpointed with :func:`hatnorm.distributed.save_sharded` and resumed into a fresh model, optimizer and HAT.
Then :func:`hatnorm.training.train_sequence` with ``sharding="fsdp"`` runs (``OUT/trainer.rank<r>.pt``;
rank 0 writes its files to ``OUT/trainer``), and runs again, interrupted in the middle of task 1 and resumed
from its last checkpoint (``OUT/trainer-resumed.rank<r>.pt``). Imported, :func:`run` and :func:`run_trainer`
train the same models in one process on the whole batches.

The model runs in float64, as in ``distributed_worker.py``: the ranks' gradients are averaged in another
order than one process sums them, and in float64 that rounding stays far below the tolerance.
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
from hatnorm._shards import local, whole_state
from hatnorm.distributed import fully_shard, load_sharded, save_sharded, shard
from hatnorm.training import HATMethod, TrainConfig, train_sequence

TASKS = 2
STEPS = 4
BATCH = 8  # the global batch; each of 2 ranks takes 4
SIZE = 16
#: the runs the worker makes: (optimizer, sharding plan, gradient policy)
RUNS = (("adamw", "model", "hat"), ("sgd", "model", "hat"), ("adamw", "stages", "hat"), ("sgd", "model", "fg_adahat"))


def batches(task: int) -> list[tuple[Tensor, Tensor]]:
    """The global batches of ``task``, the same in every process; task 1's inputs are shifted."""
    g = torch.Generator().manual_seed(100 + task)
    return [(torch.randn(BATCH, 3, SIZE, SIZE, generator=g, dtype=torch.float64) + task,
             torch.randint(0, 3, (BATCH,), generator=g)) for _ in range(STEPS)]


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW, or SGD whose momentum and weight decay move frozen entries unless HAT.step restores them."""
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5, weight_decay=1e-3)


def build(plan: str, policy: str = "hat") -> tuple[nn.Module, hatnorm.HAT]:
    """The model (sharded under torchrun, by ``plan``) and its HAT with ``policy``."""
    torch.manual_seed(0)
    model = hatnorm.build("resnet18", num_tasks=TASKS, norm="masked_bn", num_classes=3, base_width=4).double()
    stages = [m for name, m in model.named_children() if name.startswith("layer")] if plan == "stages" else []
    units = [block for stage in stages for block in stage]  # the residual blocks, each with its gates
    return fully_shard(model, units=units), hatnorm.HAT(model, policy=policy)


def probe(model: nn.Module) -> Tensor:
    """Task 0's evaluation outputs on fixed inputs."""
    x = torch.randn(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        return model(x, task=0)


def train(model: nn.Module, hat: hatnorm.HAT, optimizer: torch.optim.Optimizer, task: int, steps: range) -> None:
    """The steps ``steps`` of ``task``, each on this rank's share of the global batch."""
    model.train()
    data = batches(task)
    for b in steps:
        x, y = data[b]
        s = hat.scale(b, STEPS)
        loss = hat.loss(F.cross_entropy(model(shard(x), task=task, s=s), shard(y)), s)
        optimizer.zero_grad()
        loss.backward()
        hat.protect(s)
        hat.step(optimizer)


def run(optimizer_name: str, plan: str = "model", policy: str = "hat") -> dict[str, Tensor]:
    """Train tasks 0 and 1; returns the final state, task 0's evaluation outputs after each task, and how many
    parameter entries this rank holds."""
    model, hat = build(plan, policy)
    result: dict[str, Tensor] = {"held": torch.tensor(sum(local(p).numel() for p in model.parameters()))}
    for task in range(TASKS):
        optimizer = make_optimizer(optimizer_name, model)
        hat.begin_task(task)
        train(model, hat, optimizer, task, range(STEPS))
        hat.end_task()
        result[f"task0_after_task{task}"] = probe(model)
    return result | {f"state.{k}": v for k, v in whole_state(model.state_dict()).items()}


def run_resumed(folder: Path, optimizer_name: str = "adamw", stop: int = 2) -> dict[str, Tensor]:
    """:func:`run`, checkpointed after ``stop`` steps of task 1 and finished by a fresh model, optimizer and HAT."""
    model, hat = build("model")
    optimizer = make_optimizer(optimizer_name, model)
    hat.begin_task(0)
    train(model, hat, optimizer, 0, range(STEPS))
    hat.end_task()
    optimizer = make_optimizer(optimizer_name, model)
    hat.begin_task(1)
    train(model, hat, optimizer, 1, range(stop))
    save_sharded(folder, model, optimizer, hat)
    del model, hat, optimizer
    model, hat = build("model")
    optimizer = make_optimizer(optimizer_name, model)
    load_sharded(folder, model, optimizer, hat)
    assert hat.task == 1 and hat.learned_tasks == [0]
    train(model, hat, optimizer, 1, range(stop, STEPS))
    hat.end_task()
    return {f"state.{k}": v for k, v in whole_state(model.state_dict()).items()}


#: the training forward an interrupted trainer run stops at: task 1's epoch 2 (9 steps an epoch, 3 epochs a task)
STOP_AT = 3 * 9 + 9 + 4


class Interrupted(Exception):
    """Raised by every rank at the same training forward, standing in for a killed run."""


def run_trainer(out_dir: Path, *, resume: bool = False, stop_at: int | None = None) -> dict[str, Any]:
    """``train_sequence`` with HAT, masked BN and ``sharding="fsdp"``, checkpointing every epoch into
    ``out_dir/checkpoints``; returns its results and the final model state, whole. With ``stop_at``, every rank
    raises :class:`Interrupted` at that training forward, before the forward's first collective."""
    models: list[nn.Module] = []
    forwards = 0

    def interrupt(module: nn.Module, args: tuple[Any, ...]) -> None:
        nonlocal forwards
        if module.training and torch.is_grad_enabled():
            forwards += 1
            if forwards == stop_at:
                raise Interrupted

    def build_mlp() -> nn.Module:
        models.append(hatnorm.build("mlp", num_tasks=TASKS, norm="masked_bn", num_classes=2, in_features=16,
                                    hidden=(32, 32)).double())
        models[-1].register_forward_pre_hook(interrupt)  # before fully_shard's hooks: no rank has begun a collective
        return models[-1]

    config = TrainConfig(epochs=3, batch_size=32, lr=0.1, momentum=0.5, sharding="fsdp")
    result = train_sequence(build_mlp, toy_tasks(TASKS, dtype=torch.float64), HATMethod(), config, out_dir=out_dir,
                            checkpoint_dir=out_dir / "checkpoints", checkpoint_every=1, resume=resume,
                            console=Console(file=io.StringIO()))
    return {"result": asdict(result) | {"seconds": None}, "state": whole_state(models[0].state_dict())}


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    try:
        for optimizer_name, plan, policy in RUNS:
            torch.save(run(optimizer_name, plan, policy), out / f"{optimizer_name}-{plan}-{policy}.rank{rank}.pt")
        torch.save(run_resumed(out / "checkpoint"), out / f"resumed.rank{rank}.pt")
        torch.save(run_trainer(out / "trainer"), out / f"trainer.rank{rank}.pt")
        try:
            run_trainer(out / "trainer-cut", stop_at=STOP_AT)
        except Interrupted:
            torch.save(run_trainer(out / "trainer-cut", resume=True), out / f"trainer-resumed.rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
