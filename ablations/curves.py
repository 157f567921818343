"""Learning curves: which ViT configuration learns one task of a sequence, before any continual learning.

A continual-learning comparison means little when the network does not learn a single task: its forgetting
ratio then mixes under-training into every row. This command trains the ViT of the layernorm ablation on
one task of the sequence for every token embedding (``--stems``: ViT's patchify layer or a convolutional
stem) × patch size, over seeds, and shows the validation accuracy after every epoch (mean and 95% band)
and the test accuracy (mean ± 95% CI). ``--method plain`` trains the ungated ViT with shared LN, as joint
training does; ``--method hat`` trains it under HAT with masked LN.

    python -m ablations.curves
    python -m ablations.curves --seeds 0 1 2 --stems patch conv --patch-sizes 4 8
    python -m ablations.curves --data permuted_mnist --method hat
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from rich.table import Table

import hatnorm
from ablations import _cli
from hatnorm.data import Task
from hatnorm.stats import summarize
from hatnorm.training import OPTIMIZERS, FineTune, HATMethod, TrainConfig, train_sequence

STEMS = ("patch", "conv")
METHODS = ("plain", "hat")


def label(stem: str, patch_size: int) -> str:
    return f"{stem} stem, patch {patch_size}"


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ablations.curves", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", choices=("split_mnist", "permuted_mnist", "rotated_mnist"), default="rotated_mnist",
                   help="the sequence the task is taken from")
    p.add_argument("--task", type=_cli.non_negative_int, default=0, help="which task of the sequence (0-based)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="random seeds (model, validation split, batch order, the sequence's angles or permutations)")
    p.add_argument("--stems", nargs="+", choices=STEMS, default=list(STEMS), help="token embeddings to try")
    p.add_argument("--patch-sizes", type=_cli.positive_int, nargs="+", default=[4, 8],
                   help="patch sides to try (divide 32; powers of 2 for the conv stem)")
    p.add_argument("--method", choices=METHODS, default="plain",
                   help="plain: the ungated ViT with shared LN (joint training's model); hat: HAT with masked LN")
    p.add_argument("--dim", type=_cli.positive_int, default=64, help="width of the residual stream")
    p.add_argument("--depth", type=_cli.positive_int, default=2, help="number of blocks")
    p.add_argument("--num-heads", type=_cli.positive_int, default=4, help="attention heads")
    p.add_argument("--epochs", type=_cli.positive_int, default=20, help="epochs (the cosine schedule's length)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="optimizer")
    p.add_argument("--lr", type=_cli.positive_float, default=2e-3, help="peak learning rate")
    p.add_argument("--weight-decay", type=_cli.non_negative_float, default=0.05, help="weight decay")
    p.add_argument("--warmup-epochs", type=_cli.non_negative_int, default=1, help="epochs of linear warmup")
    p.add_argument("--batch-size", type=_cli.positive_int, default=64, help="batch size (≥ 2)")
    p.add_argument("--c", type=_cli.non_negative_float, default=0.75, help="HAT's regulariser (--method hat)")
    p.add_argument("--out", type=Path, default=Path("runs/curves"), help="folder for results.json and curves.png")
    args = p.parse_args(argv)
    for size in args.patch_sizes:
        if 32 % size:
            p.error(f"--patch-sizes must divide the image side 32, got {size}")
        if "conv" in args.stems and (size < 2 or size & (size - 1)):
            p.error(f"--stems conv needs patch sizes that are powers of 2 ≥ 2, got {size}")
    if args.dim % args.num_heads:
        p.error(f"--dim must be a multiple of --num-heads, got {args.dim} and {args.num_heads}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds must not repeat a seed, got {' '.join(map(str, args.seeds))}")
    if args.batch_size < 2:
        p.error(f"--batch-size must be ≥ 2 (batch statistics), got {args.batch_size}")
    if args.data == "split_mnist" and args.task >= 5:
        p.error(f"--task must be < 5 for split_mnist, got {args.task}")
    try:
        args.config = TrainConfig(epochs=args.epochs, optimizer=args.optimizer, schedule="cosine", lr=args.lr,
                                  weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                                  batch_size=args.batch_size)
    except ValueError as error:
        p.error(str(error))
    # what the ablations' task loader reads
    args.tasks, args.data_root = (None if args.data == "split_mnist" else args.task + 1), None
    args.parser = p
    return args


def plot(results: dict[str, Any], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7.0, 4.5), layout="constrained")
    for name, r in results.items():
        curves = np.array([run["curve"] for run in r["runs"].values()])
        epochs = np.arange(1, curves.shape[1] + 1)
        mean = curves.mean(axis=0)
        line, = ax.plot(epochs, mean, marker="o", ms=3, label=f"{name} (test {r['test']['mean']:.3f})")
        if len(curves) > 1:
            bands = [summarize(column.tolist()) for column in curves.T]
            # an accuracy lies in [0, 1]: the t-interval of 3 seeds can reach past it
            ax.fill_between(epochs, np.clip([b.low for b in bands], 0, 1), np.clip([b.high for b in bands], 0, 1),
                            color=line.get_color(), alpha=0.15, lw=0)
    ax.set(xlabel="epoch", ylabel="validation accuracy", title=title)
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    console = _cli.console()
    tasks_of, channels, size = _cli.load_tasks(args, args.parser)
    norm = "shared_ln" if args.method == "plain" else "masked_ln"
    results: dict[str, Any] = {}
    started = time.perf_counter()
    for stem in args.stems:
        for patch_size in args.patch_sizes:
            name = label(stem, patch_size)
            options = {"in_channels": channels, "image_size": size, "patch_size": patch_size, "dim": args.dim,
                       "depth": args.depth, "num_heads": args.num_heads, "mlp_dim": 2 * args.dim, "stem": stem}
            runs = {}
            for seed in args.seeds:
                task = tasks_of(seed)[args.task]

                def build(options: dict[str, Any] = options, task: Task = task) -> hatnorm.HATModule:
                    return hatnorm.build("vit", num_tasks=1, norm=norm, num_classes=task.num_classes, **options)

                method = FineTune() if args.method == "plain" else HATMethod(c=args.c)
                result = train_sequence(build, [task], method, replace(args.config, seed=seed),
                                        console=console, title=f"{name} s{seed}")
                runs[str(seed)] = {"task": task.name, "curve": result.validation[0], "test": result.accuracy[0][0],
                                   "seconds": result.seconds[0]}
            results[name] = {"options": options, "runs": runs,
                             "test": summarize([r["test"] for r in runs.values()]).to_dict(),
                             "final_validation": summarize([r["curve"][-1] for r in runs.values()]).to_dict(),
                             "seconds": summarize([r["seconds"] for r in runs.values()]).to_dict()}
    title = (f"{args.method} ViT (dim {args.dim}, depth {args.depth}) on task {args.task} of {_cli.data_text(args)}, "
             f"{_cli.seeds_text(args.seeds)}")
    table = Table(title=title + (" (mean ± 95% CI)" if len(args.seeds) > 1 else ""))
    for column in ("configuration", "test accuracy", "validation, last epoch", "seconds per run"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for name, r in results.items():
        table.add_row(name, cell(r["test"]), cell(r["final_validation"]), f"{r['seconds']['mean']:.0f}")
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    info = {"title": title, "data": args.data, "task": args.task, "method": args.method,
            "seeds": args.seeds, "config": asdict(args.config), "wall_seconds": time.perf_counter() - started}
    (args.out / "results.json").write_text(json.dumps(info | {"configurations": results}, indent=2))
    plot(results, args.out / "curves.png", title)
    console.print(f"wrote {args.out / 'results.json'} and {args.out / 'curves.png'}", highlight=False)
    return results


def cell(s: dict[str, Any]) -> str:
    return f"{s['mean']:.4f}" if s["n"] == 1 else f"{s['mean']:.4f} ± {(s['high'] - s['low']) / 2:.4f}"


if __name__ == "__main__":
    main()
