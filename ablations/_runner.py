"""The ablations' runner: the variants of an ablation trained on every seed, joint training per architecture,
starting weights, and the run's files and report."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pickle
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn

import hatnorm
from ablations._cli import config, recorded_options, seeds_text
from ablations._protocol import Contrast, expand
from ablations._report import SETTING, finish
from ablations._results import aggregate, table_metrics, write, write_seed
from hatnorm import metrics, text_tasks
from hatnorm.checkpoint import CheckpointError
from hatnorm.data import NamedTensorDataset, Task
from hatnorm.training import HATMethod, Method, TrainConfig, train_joint, train_sequence

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
    training scripts often write), read without running any code it might hold; errors name ``option``.

    Raises:
        ValueError: the file is missing or unreadable, holds something other than a state dict, or is a
            pickle that names objects beyond tensors and containers (which could run code as they load):
            refused without running them.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error)
        if "Weights only load failed" not in text:  # not a pickle at all
            raise ValueError(f"{option}: {path} is not a state dict torch can read ({text})") from None
        detail = text.rsplit("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0]
        raise ValueError(f"{option}: {path} is not a plain state dict: loading it would call objects it names beyond "
                         f"tensors and containers ({detail}), which can run code; refused without running it") from None
    except (OSError, RuntimeError, ValueError, EOFError) as error:  # missing, unreadable or not a tensor file
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


def _check_weights(variants: Sequence[Variant], joint_norm: dict[str, str], tasks: Sequence[Task],
                   state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load ``state`` into a model of every variant (those it applies to: not built by ``make``) and of joint
    training (``joint_norm``'s norm per architecture); returns what the first left out.

    Raises:
        ValueError: ``state`` does not fit one of them, naming the file and the variant.
    """
    counts = [t.num_classes for t in tasks]
    models = {}
    for variant in variants:
        if variant.make is None:
            for label, norm in ((variant.label, variant.norm), (f"{variant.arch} joint training",
                                                               joint_norm.get(variant.arch))):
                if norm is not None:
                    models.setdefault(json.dumps([variant.arch, norm, variant.options], sort_keys=True, default=str),
                                      (label, variant.arch, norm, variant.options))
    left_out: list[str] | None = None
    for label, arch, norm, options in models.values():
        model = hatnorm.build(arch, num_tasks=len(tasks), norm=norm, num_classes=counts, **options)
        try:
            left = load_weights(model, state, source)
        except ValueError as error:
            raise ValueError(f"{error} (the model of {label})") from None
        left_out = left if left_out is None else left_out
    return left_out or []


def reusable(path: Path, source: dict[str, Any], console: Console, what: str) -> bool:
    """Whether the network saved at ``path`` was pretrained from ``source``, as the record beside it says.

    ``source`` holds what the pretraining depended on (JSON values, ``"source_tasks"`` among them). A saved
    network of another source, or without a record, is not reused, and the console says why; the caller
    pretrains again and calls :func:`record_source`.
    """
    if not path.exists():
        return False
    record = path.with_suffix(".json")
    made = json.loads(record.read_text()) if record.is_file() else None
    wanted = json.loads(json.dumps(source))
    if made == wanted:
        console.print(f"{what}: reusing {path}")
        return True
    if made is None:
        console.print(f"{what}: {path} has no record of what it was pretrained on ({record.name}): pretraining again")
        return False
    n = made.get("source_tasks")
    differences = "; ".join(f"{key}: {made.get(key)!r} there, {wanted.get(key)!r} now"
                            for key in dict.fromkeys([*made, *wanted]) if made.get(key) != wanted.get(key))
    console.print(f"{what}: {path} was pretrained on {n} source task{'s' * (n != 1)} with other settings than this "
                  f"run's ({differences}): pretraining again", highlight=False, soft_wrap=True)
    return False


def record_source(path: Path, source: dict[str, Any]) -> None:
    """Write the record :func:`reusable` reads beside the network just saved at ``path``."""
    path.with_suffix(".json").write_text(json.dumps(source, indent=1))


def recorded_config(cfg: TrainConfig) -> dict[str, Any]:
    """The training settings a result records: all but the device (a run may resume on another, and runs on two
    devices merge, as runs on two machines do)."""
    return {k: v for k, v in asdict(cfg).items() if k != "device"}


def _random_accuracies(tasks: Sequence[Task]) -> list[float]:
    """A_R of every task: the random stratified classifier over its classes, or over whole answers for the text
    tasks (:func:`hatnorm.text_tasks.chance_accuracy`: exact match of a generated answer)."""
    return [text_tasks.chance_accuracy(t) if isinstance(t.train, NamedTensorDataset)
            else metrics.random_stratified_accuracy(t.train.tensors[1], t.test.tensors[1]) for t in tasks]


def run(variants: Sequence[Variant], tasks: Sequence[Task], cfg: TrainConfig, out: Path, console: Console,
        *, joint_norm: dict[str, str], title: str, resume: bool = False,
        checkpoint_every: int | None = None, weights: tuple[str, dict[str, torch.Tensor]] | None = None,
        with_joint: bool = True) -> dict[str, Any]:
    """Train every variant, joint training per architecture, and compute the metrics, for one seed.

    Returns the results by variant label; also writes them (``results.json``, ``results.csv``) with
    each run's own folder under ``out``. Every run checkpoints into its folder under ``out/checkpoints``
    after every task (and every ``checkpoint_every`` epochs); ``resume`` continues from there.
    ``weights`` (a name and a state dict) starts every model, joint training's included, from them.
    Without ``with_joint`` no joint model trains (T(T+1)/2 task trainings: the costliest part of a long
    sequence) and ρ, which needs it, is NaN (not measured).
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
        if not with_joint:
            joint[key] = [[math.nan] * len(tasks) for _ in tasks], 0.0
        elif key not in joint:
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
        rho = (metrics.mean_forgetting_ratio(result.accuracy, random, joint[key][0]) if with_joint
               else np.full(len(tasks), math.nan))
        results[variant.label] = {
            "arch": variant.arch, "norm": variant.norm, "method": variant.method().name,
            "parameters": sum(p.numel() for p in build(variant, variant.norm, prepared=False).parameters()),
            "accuracy": result.accuracy, "joint": joint[key][0] if with_joint else None,
            "joint_seconds": joint[key][1], "random": random,
            "average_accuracy": metrics.average_accuracy(result.accuracy),
            "bwt": metrics.backward_transfer(result.accuracy),
            "rho": rho.tolist(), "rho_final": float(rho[-1]), "epochs": result.epochs, "seconds": sum(result.seconds),
        }
    write_seed(results, out, {"title": title, "config": recorded_config(cfg), "tasks": [t.name for t in tasks]})
    return results


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_").lower()


def commit() -> str:
    """The commit of the code that ran (``git rev-parse``), marked when tracked files differ from it; "unknown"
    outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=root).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, check=True, cwd=root).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (with uncommitted changes)" if changed else "")


def machine() -> str:
    """The CPU model (Linux's /proc/cpuinfo, else what the platform says), its cores, torch's threads and version."""
    cpuinfo = Path("/proc/cpuinfo")
    found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M) if cpuinfo.exists() else None
    name = found.group(1).strip() if found else platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def run_and_report(variants: Sequence[Variant], tasks_of: Callable[[int], list[Task]], args: argparse.Namespace,
                   console: Console, *, joint_norm: dict[str, str], title: str,
                   contrasts: Sequence[Contrast | tuple[str, str]] = (),
                   parser_: argparse.ArgumentParser | None = None, weights_start_every_model: bool = True,
                   setting: str = SETTING) -> dict[str, Any]:
    """:func:`run` for every seed of the options, then the tables, the files and the plots.

    Each seed's runs go to ``<--out>/seed_<seed>/``; ``<--out>`` gets the summary over seeds, with the setting,
    the command, the commit, the machine, the wall time and every option that changes a number
    (:func:`ablations._cli.recorded_options`). ``contrasts`` is the ablation's declaration
    (:class:`ablations._protocol.Contrast`), checked against the variants before anything trains.
    ``--weights`` is checked against the model of every variant (and of joint training) before anything
    trains; it starts every model unless ``weights_start_every_model`` is false (the variants load it
    themselves, as the pretrained ablation's do). ``setting`` says how the models are tested (the report's
    setting line): by default one head per task with the task id given.
    """
    labels = [v.label for v in variants]
    pairs = dict.fromkeys(f"{c.a} − {c.b}" for c in expand(contrasts, table_metrics(contrasts))
                          if c.a not in labels or c.b not in labels)
    unknown = list(pairs)
    if unknown:
        raise ValueError(f"contrasts must pair variants of the table {labels}, got {unknown}")
    cfg = config(args, parser_)
    if args.reference:
        variants = [as_reference(v) for v in variants]
    weights = None
    if args.weights is not None:
        try:
            digest = hashlib.sha256(args.weights.read_bytes()).hexdigest()[:16] if args.weights.is_file() else ""
            weights = (f"{args.weights} (sha256 {digest}…)", read_weights(args.weights))
            joint = joint_norm if weights_start_every_model else {}
            left_out = _check_weights(variants, joint, tasks_of(args.seeds[0]), weights[1], str(args.weights))
        except ValueError as error:
            if parser_ is None:
                raise
            parser_.error(str(error))
        which = "every model starts" if weights_start_every_model else "the variants that load it start"
        console.print(f"--weights: {which} from {args.weights} ({len(weights[1]) - len(left_out)} "
                      f"tensors; left out, not in the model: {describe_left_out(left_out)})", highlight=False,
                      soft_wrap=True)
        if not weights_start_every_model:
            weights = None
    started = time.perf_counter()
    by_seed = {}
    try:
        for seed in args.seeds:
            by_seed[seed] = run(variants, tasks_of(seed), replace(cfg, seed=seed), args.out / f"seed_{seed}",
                                console, joint_norm=joint_norm, title=title, resume=args.resume,
                                checkpoint_every=args.checkpoint_every, weights=weights,
                                with_joint=getattr(args, "joint", True))
    except CheckpointError as error:  # --resume with other options than the killed run's
        sys.exit(f"--resume: {error}")
    summary = aggregate(by_seed, contrasts)
    config_info = {k: v for k, v in recorded_config(cfg).items() if k != "seed"}
    write(summary, args.out, {"title": title, "setting": setting, "preset": args.preset, "reference": args.reference,
                              "weights": None if args.weights is None else str(args.weights), "config": config_info,
                              "tasks": [t.name for t in tasks_of(args.seeds[0])],
                              "wall_seconds": time.perf_counter() - started, "command": getattr(args, "command", None),
                              "commit": commit(), "machine": machine(), "options": recorded_options(args)})
    finish(summary, args.out, title, console)
    if args.preset == "smoke":
        console.print(f"This is a smoke-size run (--preset smoke, {cfg.epochs} epochs per task, "
                      f"{seeds_text(args.seeds)}): it checks the mechanics, its numbers are not converged. "
                      f"Which questions converged runs answer is in {RESULTS_DOC}, and which runs are pending, "
                      "with their commands, in docs/results/README.md.", highlight=False)
    return summary
