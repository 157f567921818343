"""What every ablation shares: data and options, running variants over seeds, the tables, the files, the plots."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import hatnorm
from hatnorm import metrics
from hatnorm.checkpoint import CheckpointError
from hatnorm.data import Task, cifar_sequence, permuted_mnist, rotated_mnist, split_mnist
from hatnorm.stats import Summary, paired_difference, summarize
from hatnorm.training import OPTIMIZERS, SCHEDULES, HATMethod, Method, TrainConfig, train_joint, train_sequence

DATASETS = ("split_mnist", "permuted_mnist", "rotated_mnist", "cifar")
PRESETS = ("smoke", "converged")
#: what a user of each optimizer would pick: the reference SGD schedule, and AdamW with warmup + cosine
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.05, "schedule": "plateau", "weight_decay": 0.0, "warmup_epochs": 0},
    "adamw": {"lr": 1e-3, "schedule": "cosine", "weight_decay": 0.05, "warmup_epochs": 1},
}
#: the plateau schedule of ``--preset converged``: each lr lasts until 3 epochs bring no improvement, and the
#: task ends after the 5th drop (0.05 → 2e-4 < 5e-4), or at the epoch cap
CONVERGED_PLATEAU = {"patience": 3, "lr_min": 5e-4}
#: the metrics every table, file and contrast reports
METRICS = {"average_accuracy": "avg acc", "bwt": "BWT", "rho_final": "ρ^{≤T}"}
#: where the converged numbers of every ablation are written up
RESULTS_DOC = "docs/ablations.md"


@dataclass(frozen=True)
class Variant:
    """One line of an ablation: an architecture, a norm and a method.

    Attributes:
        label: the name in the table and the plots.
        arch: a registered architecture.
        norm: a registered norm.
        method: makes the method for a run.
        options: architecture options.
        prepare: called with the built model and the seed before training (pretrained weights, ...).
        make: builds the model instead of ``hatnorm.build(arch, ...)`` (a converted model of another library,
            ``arch`` then only names it), called with the task count, the norm, the class counts and the seed;
            ``--weights`` does not apply to it.
    """

    label: str
    arch: str
    norm: str
    method: Callable[[], Method]
    options: dict[str, Any] = field(default_factory=dict)
    prepare: Callable[[nn.Module, int], None] | None = None
    make: Callable[[int, str, list[int], int], nn.Module] | None = None


@dataclass(frozen=True)
class Budget:
    """An ablation's epochs per task in each preset, and the optimizer its architecture's users pick.

    Attributes:
        smoke: epochs per task of the quick default run.
        converged: the epoch cap of ``--preset converged`` (the plateau schedule usually ends first; the
            cosine schedule runs exactly this many).
        optimizer: the default optimizer (``"sgd"`` for CNNs, ``"adamw"`` for transformers).
        lr: the default (peak) learning rate with that optimizer; ``None``: the optimizer's default.
    """

    smoke: int
    converged: int
    optimizer: str = "sgd"
    lr: float | None = None


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int ≥ 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int ≥ 0, got {text}")
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


def parser(prog: str, description: str, *, budget: Budget, out: str, data: str = "split_mnist"
           ) -> argparse.ArgumentParser:
    """The options every ablation takes; ``budget`` gives its presets and default optimizer, ``data`` its
    default task sequence."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.set_defaults(budget=budget)
    p.add_argument("--data", choices=DATASETS, default=data,
                   help="task sequence: the embedded Split-/Permuted-/Rotated-MNIST, or Serrà's CIFAR-10/100 sequence")
    p.add_argument("--data-root", type=Path, default=None,
                   help="folder holding cifar-10-batches-py and cifar-100-python (needed for --data cifar)")
    p.add_argument("--unverified-data", action="store_true",
                   help="read CIFAR files that are not byte for byte the published ones (stand-ins in the same "
                        "format); they are read by an unpickler that builds only plain data and arrays")
    p.add_argument("--tasks", type=positive_int, default=None,
                   help="number of tasks (Split-MNIST ≤ 5, CIFAR ≤ 10, Permuted- and Rotated-MNIST any; default: 5, "
                        "10 for Permuted-/Rotated-MNIST and CIFAR)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="random seeds, one run of every variant each (model, split, batch order, permutations, "
                        "rotation angles, CIFAR task order); tables give the mean and a 95%% confidence interval "
                        "over them")
    p.add_argument("--preset", choices=PRESETS, default="smoke",
                   help=f"smoke: {budget.smoke} epochs per task, a quick look at the mechanics; converged: "
                        f"train each task until the plateau schedule ends (patience "
                        f"{CONVERGED_PLATEAU['patience']}, lr floor {CONVERGED_PLATEAU['lr_min']:g}) or "
                        f"{budget.converged} epochs, the budget of the documented numbers")
    p.add_argument("--epochs", type=positive_int, default=argparse.SUPPRESS,
                   help="most epochs per task (overrides the preset; the reference is 200)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=budget.optimizer,
                   help="sgd (with the plateau schedule) or adamw (with warmup + cosine)")
    p.add_argument("--schedule", choices=SCHEDULES, default=argparse.SUPPRESS,
                   help="learning-rate schedule (default: plateau for sgd, cosine for adamw)")
    p.add_argument("--lr", type=positive_float, default=argparse.SUPPRESS,
                   help="initial (cosine: peak) learning rate (default: "
                        + (f"{budget.lr:g} for {budget.optimizer}; otherwise " if budget.lr is not None else "")
                        + "0.05 for sgd, 1e-3 for adamw)")
    p.add_argument("--momentum", type=non_negative_float, default=0.0, help="SGD momentum")
    p.add_argument("--weight-decay", type=non_negative_float, default=argparse.SUPPRESS,
                   help="weight decay (default: 0 for sgd, 0.05 for adamw)")
    p.add_argument("--warmup-epochs", type=non_negative_int, default=argparse.SUPPRESS,
                   help="cosine schedule: epochs of linear warmup (default: 1 for the cosine schedule)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="batch size (≥ 2)")
    p.add_argument("--reference", action="store_true",
                   help="HAT as Serrà et al.'s code runs it rather than the paper: soft cumulative masks, the scale "
                        "annealed over the sample index, every task's embeddings clamped (docs/concepts.md)")
    p.add_argument("--patience", type=positive_int, default=argparse.SUPPRESS,
                   help="plateau schedule: epochs without improvement before lr ÷ 3 (default: 5; 3 with "
                        "--preset converged)")
    p.add_argument("--weights", type=Path, default=None, metavar="PATH",
                   help="start every model from this state dict (torch.save of a state_dict, e.g. a torchvision or "
                        "timm checkpoint of the same architecture and width): matching tensors are loaded, plain "
                        "BatchNorm state into every task slot; the rest (gates, heads, a classifier) is reported")
    p.add_argument("--out", type=Path, default=Path(out),
                   help="folder for results.json, results.csv and plots (one sub-folder per seed)")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run in the same --out folder from the checkpoints in its checkpoints/ "
                        "folders: finished runs are read back, the interrupted one continues where it stopped")
    p.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="N",
                   help="also checkpoint every N epochs within a task (a checkpoint is always written after "
                        "every task)")
    return p


def load_tasks(args: argparse.Namespace, parser_: argparse.ArgumentParser
               ) -> tuple[Callable[[int], list[Task]], int, int]:
    """The task sequence of every seed the options ask for, its input channels and image side.

    The options are checked now (the first seed's tasks are loaded, ``--out`` must be writable), not after
    the first task's training. Returns a function from a seed to its tasks.
    """
    if len(set(args.seeds)) != len(args.seeds):
        parser_.error(f"--seeds must not repeat a seed, got {' '.join(map(str, args.seeds))}")
    cache: dict[int, tuple[list[Task], int, int]] = {}

    def loaded(seed: int) -> tuple[list[Task], int, int]:
        key = 0 if args.data == "split_mnist" else seed  # Split-MNIST's split is fixed; the others follow the seed
        if key not in cache:
            cache[key] = _tasks(args, parser_, seed)
        return cache[key]

    def tasks_of(seed: int) -> list[Task]:
        return loaded(seed)[0]

    _, channels, size = loaded(args.seeds[0])
    try:  # now, not after the first task's training
        args.out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=args.out):
            pass
    except OSError as error:
        parser_.error(f"--out: {args.out} is not a folder this run can write to ({error.strerror})")
    return tasks_of, channels, size


def _tasks(args: argparse.Namespace, parser_: argparse.ArgumentParser, seed: int) -> tuple[list[Task], int, int]:
    if args.batch_size < 2:
        parser_.error(f"--batch-size must be ≥ 2 (batch statistics), got {args.batch_size}")
    if args.data == "cifar":
        num_tasks = args.tasks or 10
        if args.data_root is None:
            parser_.error("--data cifar needs --data-root, the folder holding the CIFAR-10 and CIFAR-100 python "
                          "batches")
        if num_tasks > 10:
            parser_.error(f"--tasks must be ≤ 10 for the CIFAR sequence, got {num_tasks}")
        try:
            return cifar_sequence(args.data_root, seed=seed, num_tasks=num_tasks,
                                  verify_checksums=not args.unverified_data), 3, 32
        except (FileNotFoundError, ValueError) as error:
            parser_.error(str(error))
    if args.data == "permuted_mnist":
        return permuted_mnist(num_tasks=args.tasks or 10, seed=seed), 1, 32
    if args.data == "rotated_mnist":
        return rotated_mnist(num_tasks=args.tasks or 10, seed=seed), 1, 32
    num_tasks = args.tasks or 5
    if num_tasks > 5:
        parser_.error(f"--tasks must be ≤ 5 for split_mnist, got {num_tasks}")
    return split_mnist(num_tasks=num_tasks), 1, 32


def check_cnn_width(parser_: argparse.ArgumentParser, arch: str, width: float) -> None:
    """Refuse a ``--width`` the architecture cannot take (AlexNet's width multiplier is at most 16)."""
    if arch == "alexnet" and width > 16:
        parser_.error(f"--width must be ≤ 16 for alexnet (a width multiplier), got {width}")


def cnn_options(arch: str, width: float, channels: int, size: int) -> dict[str, Any]:
    """Options of ``alexnet`` (width multiplier) or ``resnet18`` (base width, rounded) for the data."""
    if arch == "alexnet":
        return {"width": width, "in_channels": channels, "size": size}
    return {"base_width": max(1, round(width)), "in_channels": channels}


def config(args: argparse.Namespace, parser_: argparse.ArgumentParser | None = None) -> TrainConfig:
    """The training settings of the options: the optimizer's defaults, then the preset, then what was given."""
    budget: Budget = args.budget
    settings = dict(OPTIMIZER_DEFAULTS[args.optimizer])
    if budget.lr is not None and args.optimizer == budget.optimizer:
        settings["lr"] = budget.lr
    settings["epochs"] = budget.converged if args.preset == "converged" else budget.smoke
    if args.preset == "converged" and settings["schedule"] == "plateau":
        settings |= CONVERGED_PLATEAU
    given = {k: getattr(args, k) for k in ("epochs", "schedule", "lr", "weight_decay", "warmup_epochs", "patience")
             if hasattr(args, k)}
    settings |= given
    if "warmup_epochs" not in given:  # the default warmup fits the schedule and the epochs it is given
        cosine = settings["schedule"] == "cosine"
        settings["warmup_epochs"] = min(settings["warmup_epochs"], settings["epochs"] - 1) if cosine else 0
    try:
        return TrainConfig(batch_size=args.batch_size, momentum=args.momentum, optimizer=args.optimizer,
                           seed=args.seeds[0], **settings)
    except ValueError as error:
        if parser_ is None:
            raise
        parser_.error(str(error))


def as_reference(variant: Variant) -> Variant:
    """The variant as Serrà et al.'s code runs it: its model built with soft masks, HAT in reference mode."""

    def method(factory: Callable[[], Method] = variant.method) -> Method:
        made = factory()
        if isinstance(made, HATMethod):
            made.reference = True
        return made

    return replace(variant, method=method, options=variant.options | {"reference": True})


def read_weights(path: Path, option: str = "--weights") -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (a ``torch.save`` of a ``state_dict``, or of ``{"state_dict": ...}`` as
    training scripts often write), read without running any code it might hold; errors name ``option``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as error:  # missing, unreadable or not a tensor file
        raise ValueError(f"{option}: {path} is not a state dict torch can read ({error})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{option}: {path} must hold a state dict (names to tensors), got {type(state).__name__}")
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load the tensors of ``state`` the model has (plain BatchNorm state into every task slot); returns the
    names it left out (not in the model: a classifier replaced by per-task heads, a step counter).

    Raises:
        ValueError: no tensor of ``state`` is named like one of the model's, or a shape differs (another
            width or input channels), naming the tensor.
    """
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own}
    if not usable:
        raise ValueError(f"--weights: {source} holds no tensor named like the model's (it holds "
                         f"{sorted(state)[:4]}, the model {sorted(own)[:4]}); is it this architecture?")
    # a per-unit tensor [C] fits a per-task one [T, C]: plain BatchNorm state goes into every task slot
    misfits = [k for k, v in usable.items() if v.shape not in (own[k].shape, own[k].shape[1:])]
    if misfits:
        first = misfits[0]
        raise ValueError(f"--weights: {source} does not fit the model (another width, stem or input channels?): "
                         f"{first} is {list(usable[first].shape)} there and {list(own[first].shape)} in the model"
                         + (f", and {len(misfits) - 1} more tensors differ" if len(misfits) > 1 else ""))
    model.load_state_dict(usable, strict=False)
    return sorted(set(state) - set(usable))


def describe_left_out(names: Sequence[str]) -> str:
    """The tensors a checkpoint had and the model has not, BatchNorm's step counters counted, not listed."""
    counters = [n for n in names if n.endswith("num_batches_tracked")]
    listed = [n for n in names if n not in counters]
    parts = [", ".join(listed)] if listed else []
    if counters:
        parts.append(f"{len(counters)} BatchNorm step counters")
    return "; ".join(parts) or "none"


def _random_accuracies(tasks: Sequence[Task]) -> list[float]:
    return [metrics.random_stratified_accuracy(t.train.tensors[1], t.test.tensors[1]) for t in tasks]


def run(variants: Sequence[Variant], tasks: Sequence[Task], cfg: TrainConfig, out: Path, console: Console,
        *, joint_norm: dict[str, str], title: str, resume: bool = False,
        checkpoint_every: int | None = None, weights: tuple[str, dict[str, torch.Tensor]] | None = None
        ) -> dict[str, Any]:
    """Train every variant, joint training per architecture, and compute the metrics, for one seed.

    Returns the results by variant label; also writes them (``results.json``, ``results.csv``) with
    each run's own folder under ``out``. Every run checkpoints into its folder under ``out/checkpoints``
    after every task (and every ``checkpoint_every`` epochs); ``resume`` continues from there.
    ``weights`` (a name and a state dict) starts every model, joint training's included, from them.
    """
    out.mkdir(parents=True, exist_ok=True)
    counts = [t.num_classes for t in tasks]

    def build(variant: Variant, norm: str, prepared: bool) -> nn.Module:
        if variant.make is not None:
            return variant.make(len(tasks), norm, counts, cfg.seed)
        model = hatnorm.build(variant.arch, num_tasks=len(tasks), norm=norm, num_classes=counts, **variant.options)
        if weights is not None:
            load_weights(model, weights[1], weights[0])
        if prepared and variant.prepare is not None:
            variant.prepare(model, cfg.seed)
        return model

    random = _random_accuracies(tasks)
    joint: dict[str, tuple[list[list[float]], float]] = {}
    results: dict[str, Any] = {}
    for variant in variants:
        # joint training has every gate open, so the gates' s_max does not change it
        key = json.dumps([variant.arch, {k: v for k, v in variant.options.items() if k != "s_max"}], sort_keys=True)
        if key not in joint:
            console.print(f"[bold]{variant.arch}[/bold]: joint training on tasks 0..t for every t (A_J), "
                          f"seed {cfg.seed}")
            same_arch = sum(json.loads(k)[0] == variant.arch for k in joint)
            folder = f"joint_{_slug(variant.arch)}" + (f"_{same_arch + 1}" if same_arch else "")
            started = time.perf_counter()
            matrix = train_joint(lambda v=variant: build(v, joint_norm[v.arch], prepared=False), tasks, cfg,
                                 console=console, title=f"{variant.arch} joint s{cfg.seed}",
                                 checkpoint_dir=out / "checkpoints" / folder, checkpoint_every=checkpoint_every,
                                 resume=resume)
            joint[key] = matrix, time.perf_counter() - started
        console.print(f"[bold]{variant.label}[/bold], seed {cfg.seed}")
        result = train_sequence(
            lambda v=variant: build(v, v.norm, prepared=True), tasks, variant.method(), cfg,
            out_dir=out / _slug(variant.label), console=console, title=f"{variant.label} s{cfg.seed}",
            info={"arch": variant.arch, "norm": variant.norm, "options": variant.options,
                  "weights": None if weights is None else weights[0]},
            checkpoint_dir=out / "checkpoints" / _slug(variant.label), checkpoint_every=checkpoint_every,
            resume=resume)
        rho = metrics.mean_forgetting_ratio(result.accuracy, random, joint[key][0])
        results[variant.label] = {
            "arch": variant.arch, "norm": variant.norm, "method": variant.method().name,
            "accuracy": result.accuracy, "joint": joint[key][0], "joint_seconds": joint[key][1], "random": random,
            "average_accuracy": metrics.average_accuracy(result.accuracy),
            "bwt": metrics.backward_transfer(result.accuracy),
            "rho": rho.tolist(), "rho_final": float(rho[-1]), "epochs": result.epochs, "seconds": sum(result.seconds),
        }
    write_seed(results, out, {"title": title, "config": asdict(cfg), "tasks": [t.name for t in tasks]})
    return results


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_").lower()


def write_seed(results: dict[str, Any], out: Path, info: dict[str, Any]) -> None:
    """One seed's ``results.json`` and ``results.csv`` (one row per variant)."""
    (out / "results.json").write_text(json.dumps(info | {"variants": results}, indent=2))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "arch", "norm", "method", "average_accuracy", "bwt", "rho_final", "seconds"])
        for label, r in results.items():
            writer.writerow([label, r["arch"], r["norm"], r["method"], f"{r['average_accuracy']:.6f}",
                             f"{r['bwt']:.6f}", f"{r['rho_final']:.6f}", f"{r['seconds']:.1f}"])


def _summary(values: Sequence[float]) -> Summary:
    """The summary of one metric over seeds; NaN throughout where a seed's value is undefined (ρ at chance)."""
    if any(math.isnan(v) for v in values):
        return Summary(math.nan, math.nan, math.nan, math.nan, len(values), 0.95)
    return summarize(values)


def aggregate(by_seed: dict[int, dict[str, Any]], contrasts: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Every variant's metrics over seeds (mean, std, 95% CI) and the paired contrasts between variants."""
    seeds = list(by_seed)
    labels = list(by_seed[seeds[0]])
    variants: dict[str, Any] = {}
    for label in labels:
        runs = [by_seed[seed][label] for seed in seeds]
        first = runs[0]
        rho = np.array([r["rho"] for r in runs], dtype=float)  # [seeds, T]
        curve = [_summary(rho[:, t].tolist()) for t in range(rho.shape[1])]
        variants[label] = {
            "arch": first["arch"], "norm": first["norm"], "method": first["method"], "seeds": seeds,
            "summary": {m: _summary([r[m] for r in runs]).to_dict() for m in METRICS},
            "rho_curve": {k: [getattr(c, k) for c in curve] for k in ("mean", "low", "high")},
            "accuracy_mean": np.mean([r["accuracy"] for r in runs], axis=0).tolist(),
            "epochs_mean": float(np.mean([np.mean(r["epochs"]) for r in runs])),
            "seconds": float(np.sum([r["seconds"] for r in runs])),
            "runs": {str(seed): r for seed, r in zip(seeds, runs, strict=True)},
        }
    paired = []
    for a, b in contrasts:
        if a not in variants or b not in variants:
            continue
        for m in METRICS:
            values = [[by_seed[seed][label][m] for seed in seeds] for label in (a, b)]
            if any(math.isnan(v) for side in values for v in side):
                continue
            d = paired_difference(*values)
            paired.append({"a": a, "b": b, "metric": m, "difference": d.to_dict(),
                           "established": len(seeds) > 1 and d.excludes_zero})
    return {"seeds": seeds, "variants": variants, "contrasts": paired}


def write(summary: dict[str, Any], out: Path, info: dict[str, Any]) -> None:
    """The run's ``results.json`` (everything, every seed), ``results.csv`` (one row per variant, mean, std and
    95% CI of every metric) and ``contrasts.csv`` (the paired contrasts)."""
    (out / "results.json").write_text(json.dumps(info | summary, indent=2))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "arch", "norm", "method", "seeds",
                         *(f"{m}_{k}" for m in METRICS for k in ("mean", "std", "ci_low", "ci_high")),
                         "epochs_per_task", "seconds"])
        for label, r in summary["variants"].items():
            cells = [f"{r['summary'][m][k]:.6f}" for m in METRICS for k in ("mean", "std", "low", "high")]
            writer.writerow([label, r["arch"], r["norm"], r["method"], len(r["seeds"]), *cells,
                             f"{r['epochs_mean']:.2f}", f"{r['seconds']:.1f}"])
    with (out / "contrasts.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["a", "b", "metric", "difference_mean", "ci_low", "ci_high", "seeds", "established"])
        for c in summary["contrasts"]:
            d = c["difference"]
            writer.writerow([c["a"], c["b"], c["metric"], f"{d['mean']:.6f}", f"{d['low']:.6f}", f"{d['high']:.6f}",
                             d["n"], c["established"]])


def cell(s: dict[str, Any], metric: str) -> str:
    """A metric's summary as the tables print it: mean ± 95% CI half-width (the mean alone for one seed)."""
    if math.isnan(s["mean"]):
        return "n/a"
    mean = f"{s['mean']:.4f}" if metric == "average_accuracy" else f"{s['mean']:+.4f}"
    return mean if s["n"] == 1 else f"{mean} ± {(s['high'] - s['low']) / 2:.4f}"


def table(summary: dict[str, Any], title: str) -> Table:
    """The ablation's table: one row per variant, each metric as mean ± 95% CI half-width over the seeds."""
    n = len(summary["seeds"])
    t = Table(title=title, caption=f"mean ± 95% CI half-width over {n} seeds" if n > 1 else "one seed: no interval")
    for column in ("variant", *METRICS.values(), "epochs/task", "time (s)"):
        t.add_column(column, justify="left" if column == "variant" else "right")
    for label, r in summary["variants"].items():
        t.add_row(label, *(cell(r["summary"][m], m) for m in METRICS), f"{r['epochs_mean']:.1f}",
                  f"{r['seconds']:.0f}")
    return t


def contrast_table(summary: dict[str, Any]) -> Table:
    """The paired contrasts: the mean difference over seeds, its 95% CI and whether it is established."""
    t = Table(title="Paired contrasts over seeds (a − b)")
    for column in ("a − b", "metric", "mean Δ", "95% CI", "finding"):
        t.add_column(column, justify="left" if column in ("a − b", "metric") else "right")
    for c in summary["contrasts"]:
        d = c["difference"]
        interval = "n/a" if d["n"] == 1 else f"[{d['low']:+.4f}, {d['high']:+.4f}]"
        finding = "1 seed" if d["n"] == 1 else ("yes" if c["established"] else "no: CI holds 0")
        t.add_row(f"{c['a']} − {c['b']}", METRICS[c["metric"]], f"{d['mean']:+.4f}", interval, finding)
    return t


def plot(summary: dict[str, Any], out: Path, title: str) -> list[Path]:
    """ρ^{≤t} over t for every variant with its 95% band over seeds (one panel per architecture), and the
    seed-mean accuracy matrices as heatmaps."""
    results = summary["variants"]
    archs = list(dict.fromkeys(r["arch"] for r in results.values()))
    fig, axes = plt.subplots(1, len(archs), figsize=(max(7.0, 5.5 * len(archs)), 4.5), squeeze=False,
                             layout="constrained")
    for ax, arch in zip(axes[0], archs, strict=True):
        for label, r in results.items():
            if r["arch"] != arch:
                continue
            curve = {k: np.array(v, dtype=float) for k, v in r["rho_curve"].items()}
            steps = np.arange(1, len(curve["mean"]) + 1)
            line, = ax.plot(steps, curve["mean"], marker="o", label=label)
            if len(r["seeds"]) > 1:
                ax.fill_between(steps, curve["low"], curve["high"], color=line.get_color(), alpha=0.15, lw=0)
        ax.axhline(0, color="gray", lw=0.8, ls="--")
        ax.set(title=f"{arch}", xlabel="tasks learned $t$", ylabel=r"forgetting ratio $\rho^{\leq t}$")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)
    n = len(summary["seeds"])
    fig.suptitle(title + (f"\nmean and 95% band over {n} seeds" if n > 1 else ""), fontsize=10)
    rho_path = out / "forgetting_ratio.png"
    fig.savefig(rho_path, dpi=120)
    plt.close(fig)

    count = len(results)
    cols = min(count, 4)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 1, 3.0 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[count:]:
        ax.axis("off")
    for ax, (label, r) in zip(axes.flat, results.items(), strict=False):
        a = np.array(r["accuracy_mean"])
        a[np.triu_indices_from(a, 1)] = np.nan
        image = ax.imshow(a, vmin=0, vmax=1, cmap="viridis")
        if len(a) <= 10:
            for (t, tau), value in np.ndenumerate(a):
                if not np.isnan(value):
                    ax.text(tau, t, f"{value:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if value < 0.6 else "black")
        ax.set(title=label, xlabel="tested on task", ylabel="after task")
        ax.title.set_fontsize(8)
    fig.colorbar(image, ax=axes, shrink=0.6, label="test accuracy" + (f" (mean of {n} seeds)" if n > 1 else ""))
    heat_path = out / "accuracy_matrices.png"
    fig.savefig(heat_path, dpi=120)
    plt.close(fig)
    return [rho_path, heat_path]


def console() -> Console:
    """A console wide enough for the tables when output goes to a file or a pipe."""
    plain = Console()
    return plain if plain.is_terminal else Console(width=160)


def seeds_text(seeds: Sequence[int]) -> str:
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"


def run_and_report(variants: Sequence[Variant], tasks_of: Callable[[int], list[Task]], args: argparse.Namespace,
                   console: Console, *, joint_norm: dict[str, str], title: str,
                   contrasts: Sequence[tuple[str, str]] = (),
                   parser_: argparse.ArgumentParser | None = None) -> dict[str, Any]:
    """:func:`run` for every seed of the options, then the tables, the files and the plots.

    Each seed's runs go to ``<--out>/seed_<seed>/``; ``<--out>`` gets the summary over seeds.
    """
    cfg = config(args, parser_)
    if args.reference:
        variants = [as_reference(v) for v in variants]
    weights = None
    if args.weights is not None:
        try:
            digest = hashlib.sha256(args.weights.read_bytes()).hexdigest()[:16] if args.weights.is_file() else ""
            weights = (f"{args.weights} (sha256 {digest}…)", read_weights(args.weights))
            left_out = load_weights(hatnorm.build(variants[0].arch, num_tasks=len(tasks_of(args.seeds[0])),
                                                  norm=variants[0].norm,
                                                  num_classes=[t.num_classes for t in tasks_of(args.seeds[0])],
                                                  **variants[0].options), weights[1], str(args.weights))
        except ValueError as error:
            if parser_ is None:
                raise
            parser_.error(str(error))
        console.print(f"--weights: every model starts from {args.weights} ({len(weights[1]) - len(left_out)} "
                      f"tensors; left out, not in the model: {describe_left_out(left_out)})", highlight=False,
                      soft_wrap=True)
    started = time.perf_counter()
    by_seed = {}
    try:
        for seed in args.seeds:
            by_seed[seed] = run(variants, tasks_of(seed), replace(cfg, seed=seed), args.out / f"seed_{seed}",
                                console, joint_norm=joint_norm, title=title, resume=args.resume,
                                checkpoint_every=args.checkpoint_every, weights=weights)
    except CheckpointError as error:  # --resume with other options than the killed run's
        sys.exit(f"--resume: {error}")
    summary = aggregate(by_seed, contrasts)
    config_info = {k: v for k, v in asdict(cfg).items() if k != "seed"}
    write(summary, args.out, {"title": title, "preset": args.preset, "reference": args.reference,
                              "weights": None if args.weights is None else str(args.weights), "config": config_info,
                              "tasks": [t.name for t in tasks_of(args.seeds[0])],
                              "wall_seconds": time.perf_counter() - started})
    finish(summary, args.out, title, console)
    if args.preset == "smoke":
        console.print(f"This is a smoke-size run (--preset smoke, {cfg.epochs} epochs per task, "
                      f"{seeds_text(args.seeds)}): it checks the mechanics, its numbers are not converged. "
                      f"The converged numbers over several seeds, with their commands, are in {RESULTS_DOC} "
                      "(--preset converged --seeds 0 1 2).", highlight=False)
    return summary


def finish(summary: dict[str, Any], out: Path, title: str, console: Console) -> None:
    console.print(table(summary, title))
    if summary["contrasts"]:
        console.print(contrast_table(summary))
    for path in plot(summary, out, title):
        console.print(f"wrote {path}")
    console.print(f"wrote {out / 'results.json'}, {out / 'results.csv'} and {out / 'contrasts.csv'}")
