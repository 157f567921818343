"""The ablations' command line: the options every ablation takes, its task sequence and training settings."""

from __future__ import annotations

import argparse
import hashlib
import math
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch.utils.data import TensorDataset

from hatnorm.data import Task, cifar_sequence, permuted_mnist, rotated_mnist, split_mnist
from hatnorm.training import OPTIMIZERS, SCHEDULES, SHARDINGS, TrainConfig

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


class _Parser(argparse.ArgumentParser):
    """An argument parser that keeps the command it parsed in ``command`` (what the results files record)."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        argv = sys.argv[1:] if args is None else list(args)
        parsed, rest = super().parse_known_args(argv, namespace)
        parsed.command = " ".join([self.prog, *map(shlex.quote, argv)])
        return parsed, rest


def parser(prog: str, description: str, *, budget: Budget, out: str, data: str | None = "split_mnist"
           ) -> argparse.ArgumentParser:
    """The options every ablation takes; ``budget`` gives its presets and default optimizer, ``data`` its
    default image sequence (``None``: an ablation with its own data, which takes no image-data options)."""
    p = _Parser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.set_defaults(budget=budget)
    if data is not None:
        _image_data_options(p, data)
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
                   help="learning-rate schedule (default: plateau for sgd, cosine for adamw; constant: a fixed rate)")
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
    p.add_argument("--sharding", choices=SHARDINGS, default="ddp",
                   help="under torchrun: ddp (every rank holds the whole model) or fsdp (PyTorch FSDP2: every rank "
                        "holds a slice of every parameter); no effect in one process")
    p.add_argument("--device", default=None,
                   help="where the models train: cpu, cuda, cuda:1, mps (default: cpu); a run may resume on another")
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
    p.add_argument("--no-joint", dest="joint", action="store_false",
                   help="train no joint baseline (on T tasks it trains T(T+1)/2 task-models, the costliest part of "
                        "a long sequence): the forgetting ratio ρ, which needs it, is not measured (NaN)")
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
        # Split-MNIST's split is fixed; the others, and a subset of the training images, follow the seed
        key = 0 if args.data == "split_mnist" and getattr(args, "train_images", None) is None else seed
        if key not in cache:
            tasks, channels, size = _tasks(args, parser_, seed)
            if getattr(args, "train_images", None) is not None:
                try:
                    tasks = [fewer_training_images(task, args.train_images, seed * 1000 + t)
                             for t, task in enumerate(tasks)]
                except ValueError as error:
                    parser_.error(f"--train-images: {error}")
            cache[key] = tasks, channels, size
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


def fewer_training_images(task: Task, images: int, seed: int) -> Task:
    """``task`` with ``images`` of its training images, a seeded random subset in which every class keeps its share
    (largest remainders), and its whole test set.

    Raises:
        ValueError: ``images`` is below the task's class count or above its training images (names the task).
    """
    labels = task.train.tensors[-1]
    if not task.num_classes <= images <= len(labels):
        raise ValueError(f"task {task.name!r} has {len(labels)} training images in {task.num_classes} classes; the "
                         f"subset must keep between {task.num_classes} and {len(labels)}, got {images}")
    generator = torch.Generator().manual_seed(seed)
    members = [(labels == c).nonzero().flatten() for c in range(task.num_classes)]
    shares = [images * len(m) / len(labels) for m in members]
    counts = [int(share) for share in shares]
    for c in sorted(range(len(members)), key=lambda c: counts[c] - shares[c])[:images - sum(counts)]:
        counts[c] += 1
    kept = torch.cat([m[torch.randperm(len(m), generator=generator)[:n]] for m, n in zip(members, counts, strict=True)])
    kept = kept.sort().values
    return Task(task.name, task.classes, TensorDataset(*(t[kept] for t in task.train.tensors)), task.test)


def data_text(args: argparse.Namespace) -> str:
    """The task sequence's name for a table's title, with the training images kept per task where that is set."""
    images = getattr(args, "train_images", None)
    return args.data if images is None else f"{args.data}, {images} training images per task"


def check_cnn_width(parser_: argparse.ArgumentParser, arch: str, width: float) -> None:
    """Refuse a ``--width`` the architecture cannot take (AlexNet's width multiplier is at most 16)."""
    if arch == "alexnet" and width > 16:
        parser_.error(f"--width must be ≤ 16 for alexnet (a width multiplier), got {width}")


def cnn_options(arch: str, width: float, channels: int, size: int) -> dict[str, Any]:
    """Options of ``alexnet`` (width multiplier) or ``resnet18`` (base width, rounded) for the data."""
    if arch == "alexnet":
        return {"width": width, "in_channels": channels, "size": size}
    return {"base_width": max(1, round(width)), "in_channels": channels}


def _image_data_options(p: argparse.ArgumentParser, data: str) -> None:
    """The options of the image task sequences: which one, the CIFAR folder, the task count."""
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
    p.add_argument("--train-images", type=positive_int, default=None, metavar="N",
                   help="keep N training images per task (a random subset drawn by the seed, every class keeping its "
                        "share; the test sets stay whole): a low-data target (default: all)")


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
                           seed=args.seeds[0], sharding=args.sharding, device=args.device,
                           **settings)
    except ValueError as error:
        if parser_ is None:
            raise
        parser_.error(str(error))


#: options that change no number of a run: where its files go, how it is driven, which seeds it covers (a merge
#: joins seeds), the CIFAR folder, whose files are verified against the published checksums (with
#: ``--unverified-data`` the folder is recorded too), and how ranks share the model under torchrun (DDP or
#: FSDP2: the same run up to the order of a sum, as the number of ranks, which is not recorded either), and the
#: device (a run may resume on another; float results then differ in their last digits, as between two machines)
UNRECORDED = frozenset({"out", "resume", "checkpoint_every", "seeds", "command", "budget", "data_root", "sharding",
                        "device"})


def recorded_options(args: argparse.Namespace) -> dict[str, Any]:
    """Every option of ``args`` that can change a number of the run, as JSON values, by option name.

    What ``results.json`` stores under ``"options"`` and what ``report --merge`` compares: the common
    options and the ablation's own (widths, ``--c``, ``--alpha``, ``--dim``, ``--depth``, ``--num-heads``,
    ``--stem``, ``--patch-size``, ``--source-tasks``, ...), as they were after the ablation resolved its
    defaults. A file (``--weights``, ``--hf-weights``) is recorded by its SHA-256, so the same weights
    under another path agree and other weights under the same path do not.
    """
    skipped = UNRECORDED - ({"data_root"} if getattr(args, "unverified_data", False) else set())
    return {key: _recorded(value) for key, value in sorted(vars(args).items()) if key not in skipped}


def _recorded(value: Any) -> Any:
    if isinstance(value, Path):
        if value.is_file():
            return {"sha256": hashlib.sha256(value.read_bytes()).hexdigest()}
        return str(value)
    if isinstance(value, list | tuple):
        return [_recorded(v) for v in value]
    return value


def option_differences(mine: dict[str, Any], theirs: dict[str, Any], other: str) -> list[str]:
    """The options (recorded by :func:`recorded_options`) in which a run differs from the run ``other``, each
    as ``--name value differs from other's value``."""
    keys = dict.fromkeys([*theirs, *mine])
    return [f"--{key.replace('_', '-')} {_shown(mine.get(key))} differs from {other}'s {_shown(theirs.get(key))}"
            for key in keys if mine.get(key) != theirs.get(key)]


def _shown(value: Any) -> str:
    if isinstance(value, dict) and set(value) == {"sha256"}:
        return f"(file sha256 {value['sha256'][:16]}…)"
    return "(not given)" if value is None else " ".join(map(str, value)) if isinstance(value, list) else str(value)


def console() -> Console:
    """A console wide enough for the tables when output goes to a file or a pipe."""
    plain = Console()
    return plain if plain.is_terminal else Console(width=160)


def seeds_text(seeds: Sequence[int]) -> str:
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"
