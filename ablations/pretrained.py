"""Ablation 5: how to start HAT from pretrained weights: BatchNorm copied per task, reset, or frozen.

A network is first pretrained, as an ordinary network (gates open, shared BatchNorm, one head), on a
source sequence disjoint from the target: Permuted-MNIST tasks, whose pixels are shuffled, pooled into
one 10-class problem. Its state dict (without gates and heads, as a torchvision checkpoint would be) is
saved per seed, and the target sequence is learned under HAT from:

- random initialisation (no pretraining);
- the pretrained weights with BN γ, β and running statistics copied into every task slot (what
  ``hatnorm.convert`` and loading a plain state dict do);
- the pretrained weights with BN reset (statistics 0/1, γ = 1, β = 0);
- the pretrained weights with BN frozen at its pretrained values (normalising with the pretrained
  statistics in training too, γ and β fixed: the PackNet / Piggyback practice),

each with masked BN and with per-task BN. ``--weights PATH`` replaces the pretraining by your own
checkpoint of the same architecture (e.g. torchvision ImageNet weights, with ``--data cifar``).

    python -m ablations.pretrained
    python -m ablations.pretrained --preset converged --seeds 0 1 2
    python -m ablations.pretrained --data cifar --data-root DATA --resnet-width 64 --weights resnet18.pth
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn
from torch.utils.data import TensorDataset

import hatnorm
from ablations import _cli, _runner
from ablations._protocol import JOINT_NORM, Contrast
from ablations._runner import Variant
from hatnorm.data import Task, permuted_mnist
from hatnorm.training import FineTune, HATMethod, TrainConfig, train_sequence

NORMS = ("masked_bn", "task_bn")
LABELS = {"masked_bn": "masked BN", "task_bn": "per-task BN"}
STARTS = ("random init", "BN copied", "BN reset", "BN frozen")
#: the source's permutation seeds are offset so they never meet a target Permuted-MNIST sequence's
SOURCE_SEED_OFFSET = 10_000


def source_task(seed: int, tasks: int, channels: int) -> Task:
    """``tasks`` Permuted-MNIST tasks of ``seed`` pooled into one 10-class task (train and test)."""
    parts = permuted_mnist(num_tasks=tasks, seed=SOURCE_SEED_OFFSET + seed, channels=channels)
    train = [torch.cat([t.train.tensors[i] for t in parts]) for i in (0, 1)]
    test = [torch.cat([t.test.tensors[i] for t in parts]) for i in (0, 1)]
    return Task("source", tuple(range(10)), TensorDataset(*train), TensorDataset(*test))


def trunk_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state without its gates and heads: what a checkpoint of an ordinary network holds."""
    hat_parts = [name for name, m in model.named_modules() if isinstance(m, hatnorm.HATGate | hatnorm.TaskHeads)]
    return {k: v for k, v in model.state_dict().items()
            if not any(k == p or k.startswith(p + ".") for p in hat_parts)}


def pretrain(arch: str, options: dict[str, Any], seed: int, config: TrainConfig, out: Path, console: Console,
             *, source_tasks: int, channels: int) -> Path:
    """Pretrain the ordinary network on the source for ``seed`` and save its trunk; a saved one is reused when it
    was pretrained the same way (architecture, options, source tasks, settings: ``pretrained.json`` beside it)."""
    path = out / f"seed_{seed}" / "pretrained.pt"
    made_from = {"arch": arch, "options": options, "source_tasks": source_tasks, "channels": channels,
                 "config": asdict(replace(config, seed=seed))}
    if _runner.reusable(path, made_from, console, f"pretraining, seed {seed}"):
        return path
    path.with_suffix(".json").unlink(missing_ok=True)  # no record claims the network until the new one is saved
    models: list[nn.Module] = []

    def build() -> nn.Module:
        models.append(hatnorm.build(arch, num_tasks=1, norm="shared_bn", num_classes=10, **options))
        return models[-1]

    source = source_task(seed, source_tasks, channels)
    result = train_sequence(build, [source], FineTune(), replace(config, seed=seed), console=console,
                            title=f"{arch} pretraining s{seed}")
    console.print(f"pretraining, seed {seed}: source test accuracy {result.accuracy[0][0]:.4f} "
                  f"({len(source.train)} images, {result.epochs[0]} epochs)")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(trunk_state(models[0]), path)
    _runner.record_source(path, made_from)
    return path


def batch_norms(model: nn.Module) -> list[hatnorm.MaskedNorm]:
    return [m for m in model.modules() if isinstance(m, hatnorm.MaskedNorm) and m.batch_statistics]


@torch.no_grad()
def reset_norms(model: nn.Module) -> None:
    """Every batch norm back to its initial state: statistics 0 and 1, γ = 1, β = 0, in every task slot."""
    for norm in batch_norms(model):
        norm.running_mean.zero_()
        norm.running_var.fill_(1.0)
        norm.weight.fill_(1.0)
        norm.bias.zero_()


def start(how: str, weights: Callable[[int], Path]) -> Callable[[nn.Module, int], None] | None:
    """What a variant does to its fresh model before training."""
    if how == "random init":
        return None

    def prepare(model: nn.Module, seed: int) -> None:
        path = weights(seed)
        _runner.load_weights(model, _runner.read_weights(path), str(path))
        if how == "BN reset":
            reset_norms(model)
        elif how == "BN frozen":
            for norm in batch_norms(model):
                norm.freeze()

    return prepare


def contrasts(arch: str) -> list[Contrast]:
    """Each start against copying BN per task, per norm (primary, average accuracy), and the two norms with BN
    copied (exploratory)."""
    pairs = []
    for norm in NORMS:
        copied = f"{arch} {LABELS[norm]}, BN copied"
        pairs += [Contrast(copied, f"{arch} {LABELS[norm]}, {how}", primary=True) for how in STARTS
                  if how != "BN copied"]
    return [*pairs, Contrast(f"{arch} masked BN, BN copied", f"{arch} per-task BN, BN copied")]


def main(argv: Sequence[str] | None = None) -> dict:
    p = _cli.parser("python -m ablations.pretrained", __doc__.splitlines()[0],
                    budget=_cli.Budget(smoke=4, converged=100), out="runs/pretrained")
    p.add_argument("--arch", choices=("resnet18", "alexnet"), default="resnet18", help="architecture")
    p.add_argument("--width", type=_cli.positive_float, default=None,
                   help="ResNet-18 base width (rounded), or AlexNet width multiplier (default: 4 for resnet18, "
                        "0.125 for alexnet)")
    p.add_argument("--source-tasks", type=_cli.positive_int, default=2,
                   help="Permuted-MNIST tasks pooled into the pretraining source (4,000 images each)")
    p.add_argument("--c", type=_cli.non_negative_float, default=0.75, help="HAT capacity-regulariser weight")
    args = p.parse_args(argv)
    if args.width is None:
        args.width = 4.0 if args.arch == "resnet18" else 0.125
    _cli.check_cnn_width(p, args.arch, args.width)
    console = _cli.console()
    tasks, channels, size = _cli.load_tasks(args, p)
    options = _cli.cnn_options(args.arch, args.width, channels, size)
    weights_arg = args.weights  # the pretrained variants load it, not every model (checked by run_and_report)
    config = _cli.config(args, p)
    if weights_arg is not None:

        def weights(seed: int) -> Path:
            return weights_arg
    else:
        weights = partial(pretrain, args.arch, options, config=config, out=args.out, console=console,
                          source_tasks=args.source_tasks, channels=channels)
        for seed in args.seeds:  # before any variant: every seed's source network is ready
            weights(seed)
    variants = [Variant(f"{args.arch} {LABELS[norm]}, {how}", args.arch, norm, lambda: HATMethod(c=args.c), options,
                        prepare=start(how, weights)) for norm in NORMS for how in STARTS]
    source = weights_arg if weights_arg is not None else f"{args.source_tasks} Permuted-MNIST tasks"
    title = (f"Pretrained BN under HAT, {args.arch} from {source} ({args.data}, "
             f"{_cli.seeds_text(args.seeds)})")
    return _runner.run_and_report(variants, tasks, args, console, joint_norm={args.arch: JOINT_NORM}, title=title,
                                  contrasts=contrasts(args.arch), parser_=p, weights_start_every_model=False)


if __name__ == "__main__":
    main()
