"""A short real demo: HAT with a task-aware norm on embedded Split-MNIST, printing the accuracy matrix.

    python -m ablations.demo --norm masked_bn --tasks 2 --epochs 3
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hatnorm
from hatnorm.data import split_mnist


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, task: int) -> float:
    """Top-1 accuracy of ``model`` on ``data`` for ``task``, in evaluation mode."""
    model.eval()
    x, y = data.tensors
    return (model(x, task=task).argmax(1) == y).float().mean().item()


def run(*, norm: str, num_tasks: int, epochs: int, seed: int, lr: float, batch_size: int,
        console: Console) -> list[list[float]]:
    """Train HAT on the first ``num_tasks`` Split-MNIST tasks; return the accuracy matrix A[t][τ]."""
    torch.manual_seed(seed)
    tasks = split_mnist(num_tasks=num_tasks)
    model = hatnorm.build("mlp", num_tasks=num_tasks, norm=norm, num_classes=[t.num_classes for t in tasks])
    hat = hatnorm.HAT(model)
    matrix = []
    with Progress(console=console, transient=True) as progress:
        for t, task in enumerate(tasks):
            loader = DataLoader(task.train, batch_size=batch_size, shuffle=True,
                                generator=torch.Generator().manual_seed(seed + t))
            optimizer = torch.optim.SGD(model.parameters(), lr=lr)
            bar = progress.add_task(f"task {t} ({task.name})", total=epochs * len(loader))
            hat.begin_task(t)
            model.train()
            for _ in range(epochs):
                for b, (x, y) in enumerate(loader):
                    s = hat.scale(b, len(loader))
                    loss = hat.loss(F.cross_entropy(model(x, task=t, s=s), y), s)
                    optimizer.zero_grad()
                    loss.backward()
                    hat.protect(s)
                    hat.step(optimizer)
                    progress.update(bar, advance=1, description=f"task {t} ({task.name}) loss {loss.item():.3f}")
            hat.end_task()
            matrix.append([accuracy(model, tasks[tau].test, tau) for tau in range(num_tasks)])
    return matrix


def show(matrix: Sequence[Sequence[float]], norm: str, console: Console) -> None:
    """Print A[t][τ] (rows: after training task t; columns: tested on τ) and the backward transfer."""
    table = Table(title=f"HAT + {norm}: test accuracy after each task")
    table.add_column("after task")
    for tau in range(len(matrix)):
        table.add_column(f"task {tau}", justify="right")
    for t, row in enumerate(matrix):
        table.add_row(str(t), *(f"{a:.4f}" if tau <= t else "-" for tau, a in enumerate(row)))
    console.print(table)
    last = len(matrix) - 1
    if last > 0:
        bwt = sum(matrix[last][tau] - matrix[tau][tau] for tau in range(last)) / last
        console.print(f"backward transfer (BWT): {bwt:+.4f}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ablations.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--norm", default="masked_bn", choices=hatnorm.list_norms(), help="task-aware norm")
    parser.add_argument("--tasks", type=int, default=2, choices=range(1, 6), help="Split-MNIST tasks (1-5)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per task (≥ 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (> 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (≥ 2)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be ≥ 1, got {args.epochs}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if args.batch_size < 2:
        parser.error(f"--batch-size must be ≥ 2 (batch statistics), got {args.batch_size}")
    console = Console()
    matrix = run(norm=args.norm, num_tasks=args.tasks, epochs=args.epochs, seed=args.seed, lr=args.lr,
                 batch_size=args.batch_size, console=console)
    show(matrix, args.norm, console)


if __name__ == "__main__":
    main()
