"""What every ablation shares: data and options, running variants, the table, the files and the plots."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from rich.console import Console
from rich.table import Table

import hatnorm
from hatnorm import metrics
from hatnorm.checkpoint import CheckpointError
from hatnorm.data import Task, cifar_sequence, permuted_mnist, split_mnist
from hatnorm.training import Method, TrainConfig, train_joint, train_sequence

DATASETS = ("split_mnist", "permuted_mnist", "cifar")


@dataclass(frozen=True)
class Variant:
    """One line of an ablation: an architecture, a norm and a method.

    Attributes:
        label: the name in the table and the plots.
        arch: a registered architecture.
        norm: a registered norm.
        method: makes the method for a run.
        options: architecture options.
    """

    label: str
    arch: str
    norm: str
    method: Callable[[], Method]
    options: dict[str, Any] = field(default_factory=dict)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int ≥ 1, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number ≥ 0, got {text}")
    return value


def parser(prog: str, description: str, *, epochs: int, out: str) -> argparse.ArgumentParser:
    """The options every ablation takes."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", choices=DATASETS, default="split_mnist",
                   help="task sequence: the embedded Split-/Permuted-MNIST, or Serrà's CIFAR-10/100 sequence")
    p.add_argument("--data-root", type=Path, default=None,
                   help="folder holding cifar-10-batches-py and cifar-100-python (needed for --data cifar)")
    p.add_argument("--tasks", type=positive_int, default=5, help="number of tasks (≤ 5 for MNIST, ≤ 10 for CIFAR)")
    p.add_argument("--epochs", type=positive_int, default=epochs, help="most epochs per task (the reference is 200)")
    p.add_argument("--lr", type=positive_float, default=0.05, help="initial SGD learning rate")
    p.add_argument("--batch-size", type=positive_int, default=64, help="batch size (≥ 2)")
    p.add_argument("--patience", type=positive_int, default=5, help="epochs without improvement before lr ÷ 3")
    p.add_argument("--seed", type=int, default=0, help="random seed (model, split, batch order, CIFAR task order)")
    p.add_argument("--out", type=Path, default=Path(out), help="folder for results.json, results.csv and plots")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run in the same --out folder from the checkpoints in its checkpoints/ "
                        "folder: finished runs are read back, the interrupted one continues where it stopped")
    p.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="N",
                   help="also checkpoint every N epochs within a task (a checkpoint is always written after "
                        "every task)")
    return p


def load_tasks(args: argparse.Namespace, parser_: argparse.ArgumentParser) -> tuple[list[Task], int, int]:
    """The task sequence the options ask for, its input channels and image side; ``--out`` checked writable."""
    loaded = _tasks(args, parser_)
    try:  # now, not after the first task's training
        args.out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=args.out):
            pass
    except OSError as error:
        parser_.error(f"--out: {args.out} is not a folder this run can write to ({error.strerror})")
    return loaded


def _tasks(args: argparse.Namespace, parser_: argparse.ArgumentParser) -> tuple[list[Task], int, int]:
    if args.batch_size < 2:
        parser_.error(f"--batch-size must be ≥ 2 (batch statistics), got {args.batch_size}")
    if args.data == "cifar":
        if args.data_root is None:
            parser_.error("--data cifar needs --data-root, the folder holding the CIFAR-10 and CIFAR-100 python "
                          "batches")
        if args.tasks > 10:
            parser_.error(f"--tasks must be ≤ 10 for the CIFAR sequence, got {args.tasks}")
        try:
            return cifar_sequence(args.data_root, seed=args.seed, num_tasks=args.tasks), 3, 32
        except FileNotFoundError as error:
            parser_.error(str(error))
    if args.tasks > 5:
        parser_.error(f"--tasks must be ≤ 5 for {args.data}, got {args.tasks}")
    make = split_mnist if args.data == "split_mnist" else permuted_mnist
    return make(num_tasks=args.tasks), 1, 32


def check_cnn_width(parser_: argparse.ArgumentParser, arch: str, width: float) -> None:
    """Refuse a ``--width`` the architecture cannot take (AlexNet's width multiplier is at most 16)."""
    if arch == "alexnet" and width > 16:
        parser_.error(f"--width must be ≤ 16 for alexnet (a width multiplier), got {width}")


def cnn_options(arch: str, width: float, channels: int, size: int) -> dict[str, Any]:
    """Options of ``alexnet`` (width multiplier) or ``resnet18`` (base width, rounded) for the data."""
    if arch == "alexnet":
        return {"width": width, "in_channels": channels, "size": size}
    return {"base_width": max(1, round(width)), "in_channels": channels}


def config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, patience=args.patience,
                       seed=args.seed)


def _random_accuracies(tasks: Sequence[Task]) -> list[float]:
    return [metrics.random_stratified_accuracy(t.train.tensors[1], t.test.tensors[1]) for t in tasks]


def run(variants: Sequence[Variant], tasks: Sequence[Task], cfg: TrainConfig, out: Path, console: Console,
        *, joint_norm: dict[str, str], title: str, resume: bool = False,
        checkpoint_every: int | None = None) -> dict[str, Any]:
    """Train every variant, joint training per architecture, and compute the metrics.

    Returns the results by variant label; also writes them (``results.json``, ``results.csv``) with
    each run's own folder under ``out``. Every run checkpoints into its folder under ``out/checkpoints``
    after every task (and every ``checkpoint_every`` epochs); ``resume`` continues from there.
    """
    out.mkdir(parents=True, exist_ok=True)
    counts = [t.num_classes for t in tasks]
    random = _random_accuracies(tasks)
    joint: dict[str, list[list[float]]] = {}
    results: dict[str, Any] = {}
    for variant in variants:
        # joint training has every gate open, so the gates' s_max does not change it
        key = json.dumps([variant.arch, {k: v for k, v in variant.options.items() if k != "s_max"}], sort_keys=True)
        if key not in joint:
            console.print(f"[bold]{variant.arch}[/bold]: joint training on tasks 0..t for every t (A_J)")
            same_arch = sum(json.loads(k)[0] == variant.arch for k in joint)
            folder = f"joint_{_slug(variant.arch)}" + (f"_{same_arch + 1}" if same_arch else "")
            joint[key] = train_joint(lambda v=variant: hatnorm.build(v.arch, num_tasks=len(tasks),
                                                                     norm=joint_norm[v.arch], num_classes=counts,
                                                                     **v.options),
                                     tasks, cfg, console=console, title=f"{variant.arch} joint",
                                     checkpoint_dir=out / "checkpoints" / folder, checkpoint_every=checkpoint_every,
                                     resume=resume)
        console.print(f"[bold]{variant.label}[/bold]")
        result = train_sequence(
            lambda v=variant: hatnorm.build(v.arch, num_tasks=len(tasks), norm=v.norm, num_classes=counts,
                                            **v.options),
            tasks, variant.method(), cfg, out_dir=out / _slug(variant.label), console=console, title=variant.label,
            info={"arch": variant.arch, "norm": variant.norm, "options": variant.options},
            checkpoint_dir=out / "checkpoints" / _slug(variant.label), checkpoint_every=checkpoint_every,
            resume=resume)
        rho = metrics.mean_forgetting_ratio(result.accuracy, random, joint[key])
        results[variant.label] = {
            "arch": variant.arch, "norm": variant.norm, "method": variant.method().name,
            "accuracy": result.accuracy, "joint": joint[key], "random": random,
            "average_accuracy": metrics.average_accuracy(result.accuracy),
            "bwt": metrics.backward_transfer(result.accuracy),
            "rho": rho.tolist(), "epochs": result.epochs, "seconds": sum(result.seconds),
        }
    write(results, out, {"title": title, "config": asdict(cfg), "tasks": [t.name for t in tasks]})
    return results


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_").lower()


def write(results: dict[str, Any], out: Path, info: dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps(info | {"variants": results}, indent=2))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "arch", "norm", "method", "average_accuracy", "bwt", "rho_final", "seconds"])
        for label, r in results.items():
            writer.writerow([label, r["arch"], r["norm"], r["method"], f"{r['average_accuracy']:.6f}",
                             f"{r['bwt']:.6f}", f"{r['rho'][-1]:.6f}", f"{r['seconds']:.1f}"])


def table(results: dict[str, Any], title: str) -> Table:
    """The ablation's table: one row per variant."""
    t = Table(title=title)
    for column in ("variant", "avg acc", "BWT", "ρ^{≤T} (last)", "min ρ^{≤t}", "time (s)"):
        t.add_column(column, justify="left" if column == "variant" else "right")
    for label, r in results.items():
        rho = np.array(r["rho"], dtype=float)
        lowest = np.nan if np.isnan(rho).all() else float(np.nanmin(rho))
        t.add_row(label, f"{r['average_accuracy']:.4f}", f"{r['bwt']:+.4f}", _signed(rho[-1]), _signed(lowest),
                  f"{r['seconds']:.0f}")
    return t


def _signed(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:+.4f}"


def plot(results: dict[str, Any], out: Path, title: str) -> list[Path]:
    """ρ^{≤t} over t for every variant (one panel per architecture) and the accuracy matrices as heatmaps."""
    archs = list(dict.fromkeys(r["arch"] for r in results.values()))
    fig, axes = plt.subplots(1, len(archs), figsize=(5.5 * len(archs), 4), squeeze=False, layout="constrained")
    for ax, arch in zip(axes[0], archs, strict=True):
        for label, r in results.items():
            if r["arch"] == arch:
                ax.plot(range(1, len(r["rho"]) + 1), r["rho"], marker="o", label=label)
        ax.axhline(0, color="gray", lw=0.8, ls="--")
        ax.set(title=f"{arch}", xlabel="tasks learned $t$", ylabel=r"forgetting ratio $\rho^{\leq t}$")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    rho_path = out / "forgetting_ratio.png"
    fig.savefig(rho_path, dpi=120)
    plt.close(fig)

    n = len(results)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 1, 3.0 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (label, r) in zip(axes.flat, results.items(), strict=False):
        a = np.array(r["accuracy"])
        a[np.triu_indices_from(a, 1)] = np.nan
        image = ax.imshow(a, vmin=0, vmax=1, cmap="viridis")
        for (t, tau), value in np.ndenumerate(a):
            if not np.isnan(value):
                ax.text(tau, t, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if value < 0.6 else "black")
        ax.set(title=label, xlabel="tested on task", ylabel="after task")
        ax.title.set_fontsize(8)
    fig.colorbar(image, ax=axes, shrink=0.6, label="test accuracy")
    heat_path = out / "accuracy_matrices.png"
    fig.savefig(heat_path, dpi=120)
    plt.close(fig)
    return [rho_path, heat_path]


def console() -> Console:
    """A console wide enough for the tables when output goes to a file or a pipe."""
    plain = Console()
    return plain if plain.is_terminal else Console(width=140)


def run_and_report(variants: Sequence[Variant], tasks: Sequence[Task], args: argparse.Namespace,
                   console: Console, *, joint_norm: dict[str, str], title: str) -> dict[str, Any]:
    """:func:`run` with the options' settings, then the table, the files and the plots."""
    try:
        results = run(variants, tasks, config(args), args.out, console, joint_norm=joint_norm, title=title,
                      resume=args.resume, checkpoint_every=args.checkpoint_every)
    except CheckpointError as error:  # --resume with other options than the killed run's
        sys.exit(f"--resume: {error}")
    finish(results, args.out, title, console)
    return results


def finish(results: dict[str, Any], out: Path, title: str, console: Console) -> None:
    console.print(table(results, title))
    for path in plot(results, out, title):
        console.print(f"wrote {path}")
    console.print(f"wrote {out / 'results.json'} and {out / 'results.csv'}")
