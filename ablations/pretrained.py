"""Ablation 5: how to start HAT from pretrained BatchNorm: statistics kept or re-estimated, γ/β copied or reset.

A network is first pretrained, as an ordinary network (gates open, shared BatchNorm, one head), on a source
that transfers to the target. The default source (``--source rotated``) is the target's own training digits
(the embedded MNIST's training split, never its test images), all 10 classes, each copy rotated by an angle
drawn from [45°, 315°) per source task, pooled into one 10-class problem: the same strokes in other poses,
whose pixel statistics differ from the upright target's. ``--source permuted`` pools Permuted-MNIST tasks
instead (the earlier design; it transfers nothing measurable to upright digits). The source network's state
dict (without gates and heads, as a torchvision checkpoint would be) is saved per seed, and the target
sequence is learned under HAT from:

- random initialisation (no pretraining);
- the pretrained weights, every BatchNorm's state copied into every task slot, crossed as
  **statistics** × **γ/β**: the statistics *re-estimated* (training normalises with batch statistics and the
  running ones are re-estimated on the target by precise BN, what ``hatnorm.convert`` and training do by
  default) or *kept* (the copied source statistics normalise in training and at test and never move), and
  γ/β *copied* or *reset* (γ = 1, β = 0; trained either way);
- the pretrained weights with BN frozen (statistics kept and γ, β fixed: the PackNet / Piggyback practice),

each with masked BN and with per-task BN. Two SGD fine-tuning runs (the ungated network with shared BN) from
random initialisation and from the source (statistics re-estimated, γ/β copied) check that the source
transfers: their difference in the newest task's accuracy A[t][t] is the transfer margin. ``--weights PATH``
replaces the pretraining by your own checkpoint of the same architecture (e.g. torchvision ImageNet weights,
with ``--data cifar``).

    python -m ablations.pretrained
    python -m ablations.pretrained --preset converged --seeds 0 1 2 3 4
    python -m ablations.pretrained --data cifar --data-root DATA --width 64 --resnet-stem imagenet \\
        --weights resnet18.pth
"""

from __future__ import annotations

import argparse
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
from hatnorm.data import Task, permuted_mnist, rotate, split_mnist
from hatnorm.training import FineTune, HATMethod, TrainConfig, train_sequence

NORMS = ("masked_bn", "task_bn")
LABELS = {"masked_bn": "masked BN", "task_bn": "per-task BN"}
#: the control: what loading a plain checkpoint and training with precise BN do
CONTROL = "stats re-estimated, γβ copied"
STARTS = ("random init", CONTROL, "stats re-estimated, γβ reset", "stats kept, γβ copied", "stats kept, γβ reset",
          "BN frozen")
SOURCES = ("rotated", "permuted")
#: the source's seeds are offset so they never meet a target sequence's (permutations, rotation angles)
SOURCE_SEED_OFFSET = 10_000
#: the rotated source's angles are drawn from this range, away from the upright target
SOURCE_ANGLES = (45.0, 315.0)


def source_task(seed: int, tasks: int, channels: int, kind: str = "permuted") -> Task:
    """The pretraining source of ``seed``: ``tasks`` copies of the embedded digits pooled into one 10-class task.

    ``"rotated"``: the training digits (the split every MNIST sequence here shares; never a test image in the
    training set) rotated by one angle per copy drawn from ``SOURCE_ANGLES``; its test set is the test digits
    under the same angles. ``"permuted"``: Permuted-MNIST tasks of their own permutations.
    """
    if kind not in SOURCES:
        raise ValueError(f"kind must be one of {list(SOURCES)}, got {kind!r}")
    if kind == "permuted":
        parts = permuted_mnist(num_tasks=tasks, seed=SOURCE_SEED_OFFSET + seed, channels=channels)
        train = [torch.cat([t.train.tensors[i] for t in parts]) for i in (0, 1)]
        test = [torch.cat([t.test.tensors[i] for t in parts]) for i in (0, 1)]
        return Task("source", tuple(range(10)), TensorDataset(*train), TensorDataset(*test))
    digits = split_mnist(num_tasks=5, channels=channels)
    # Split-MNIST's labels are 0/1 within a pair: back to the digit
    upright = [(torch.cat([t.train.tensors[0] for t in digits]), torch.cat([t.test.tensors[0] for t in digits])),
               (torch.cat([t.train.tensors[1] + t.classes[0] for t in digits]),
                torch.cat([t.test.tensors[1] + t.classes[0] for t in digits]))]
    low, high = SOURCE_ANGLES
    generator = torch.Generator().manual_seed(SOURCE_SEED_OFFSET + seed)
    angles = (low + torch.rand(tasks, generator=generator, dtype=torch.float64) * (high - low)).tolist()
    background = float(upright[0][0].min())  # the padding's value in normalised space
    parts = {split: ([rotate(upright[0][split], a, fill=background) for a in angles], upright[1][split])
             for split in (0, 1)}
    train, test = (TensorDataset(torch.cat(images), labels.repeat(tasks)) for images, labels in parts.values())
    return Task("source", tuple(range(10)), train, test)


def trunk_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state without its gates and heads: what a checkpoint of an ordinary network holds."""
    hat_parts = [name for name, m in model.named_modules() if isinstance(m, hatnorm.HATGate | hatnorm.TaskHeads)]
    return {k: v for k, v in model.state_dict().items()
            if not any(k == p or k.startswith(p + ".") for p in hat_parts)}


def pretrain(arch: str, options: dict[str, Any], seed: int, config: TrainConfig, out: Path, console: Console,
             *, source_tasks: int, channels: int, source: str = "permuted") -> Path:
    """Pretrain the ordinary network on the source for ``seed`` and save its trunk; a saved one is reused when it
    was pretrained the same way (architecture, options, source and its tasks, settings: ``pretrained.json``
    beside it)."""
    path = out / f"seed_{seed}" / "pretrained.pt"
    made_from = {"arch": arch, "options": options, "source": source, "source_tasks": source_tasks,
                 "channels": channels, "config": asdict(replace(config, seed=seed))}
    if _runner.reusable(path, made_from, console, f"pretraining, seed {seed}"):
        return path
    path.with_suffix(".json").unlink(missing_ok=True)  # no record claims the network until the new one is saved
    models: list[nn.Module] = []

    def build() -> nn.Module:
        models.append(hatnorm.build(arch, num_tasks=1, norm="shared_bn", num_classes=10, **options))
        return models[-1]

    data = source_task(seed, source_tasks, channels, source)
    result = train_sequence(build, [data], FineTune(), replace(config, seed=seed), console=console,
                            title=f"{arch} pretraining s{seed}")
    console.print(f"pretraining, seed {seed}: source test accuracy {result.accuracy[0][0]:.4f} "
                  f"({len(data.train)} images, {result.epochs[0]} epochs)")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(trunk_state(models[0]), path)
    _runner.record_source(path, made_from)
    return path


def batch_norms(model: nn.Module) -> list[hatnorm.MaskedNorm]:
    return [m for m in model.modules() if isinstance(m, hatnorm.MaskedNorm) and m.batch_statistics]


@torch.no_grad()
def reset_affine(model: nn.Module) -> None:
    """Every batch norm's γ back to 1 and β to 0, in every task slot (the statistics are left as they are)."""
    for norm in batch_norms(model):
        norm.weight.fill_(1.0)
        norm.bias.zero_()


def keep_statistics(model: nn.Module) -> None:
    """Every batch norm normalises with its running statistics in training too, and they never move (precise BN's
    re-estimation included); γ and β still train (:meth:`~hatnorm.norms.MaskedBatchNorm.freeze` without fixing them)."""
    for norm in batch_norms(model):
        norm.frozen = True


def start(how: str, weights: Callable[[int], Path]) -> Callable[[nn.Module, int], None] | None:
    """What a variant starting ``how`` (one of ``STARTS``) does to its fresh model before training.

    Raises:
        ValueError: ``how`` is not one of ``STARTS``.
    """
    if how not in STARTS:
        raise ValueError(f"how must be one of {list(STARTS)}, got {how!r}")
    if how == "random init":
        return None

    def prepare(model: nn.Module, seed: int) -> None:
        path = weights(seed)
        _runner.load_weights(model, _runner.read_weights(path), str(path))
        if how == "BN frozen":
            for norm in batch_norms(model):
                norm.freeze()
            return
        if how.endswith("γβ reset"):
            reset_affine(model)
        if how.startswith("stats kept"):
            keep_statistics(model)

    return prepare


def label(arch: str, norm: str, how: str) -> str:
    """A variant's label: HAT with ``norm`` started ``how``."""
    return f"{arch} {LABELS[norm]}, {how}"


#: the transfer check: SGD fine-tuning of the ungated network from random initialisation and from the source
SGD_STARTS = ("random init", CONTROL)


def sgd_label(arch: str, how: str) -> str:
    return f"{arch} SGD, {how}"


def contrasts(arch: str, norms: Sequence[str] = NORMS, starts: Sequence[str] = STARTS,
              transfer: bool = True) -> list[Contrast]:
    """The paired comparisons, where the run has both sides.

    Primary, per norm on average accuracy: the control (statistics re-estimated, γ/β copied) against statistics
    kept (the statistics question), against γ/β reset (the γ/β question) and against random initialisation
    (does pretraining help HAT); and the transfer margin on the newest task's accuracy A[t][t] (each task right
    after fine-tuning on it, which SGD's forgetting of earlier tasks does not enter): SGD from the source − SGD
    from random initialisation (does the source transfer at all). Exploratory: the control against the other
    starts, and the two norms.
    """
    primary_others = ("stats kept, γβ copied", "stats re-estimated, γβ reset", "random init")
    out = []
    if transfer:
        out.append(Contrast(sgd_label(arch, CONTROL), sgd_label(arch, "random init"), "newest_accuracy",
                            primary=True))
    if CONTROL not in starts:
        return out
    for norm in norms:
        out += [Contrast(label(arch, norm, CONTROL), label(arch, norm, how), primary=how in primary_others)
                for how in starts if how != CONTROL]
    if set(NORMS) <= set(norms):
        out.append(Contrast(label(arch, "masked_bn", CONTROL), label(arch, "task_bn", CONTROL)))
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    p = _cli.parser("python -m ablations.pretrained", __doc__.splitlines()[0],
                    budget=_cli.Budget(smoke=4, converged=100), out="runs/pretrained")
    p.add_argument("--arch", choices=("resnet18", "alexnet"), default="resnet18", help="architecture")
    p.add_argument("--width", type=_cli.positive_float, default=None,
                   help="ResNet-18 base width (rounded), or AlexNet width multiplier (default: 4 for resnet18, "
                        "0.125 for alexnet)")
    p.add_argument("--source", choices=SOURCES, default="rotated",
                   help="pretraining source: the training digits rotated away from upright (transfers), or "
                        "Permuted-MNIST tasks (transfers nothing measurable to upright digits)")
    p.add_argument("--source-tasks", type=_cli.positive_int, default=2,
                   help="rotated copies (or Permuted-MNIST tasks) pooled into the pretraining source (4,000 images "
                        "each)")
    p.add_argument("--norms", nargs="+", choices=NORMS, default=list(NORMS), help="norms under HAT")
    p.add_argument("--starts", nargs="+", choices=STARTS, default=list(STARTS), help="how HAT's models start")
    p.add_argument("--transfer-check", action=argparse.BooleanOptionalAction, default=True,
                   help="also run SGD fine-tuning from random initialisation and from the source (the transfer "
                        "margin)")
    p.add_argument("--resnet-stem", choices=("cifar", "imagenet"), default="cifar",
                   help="ResNet-18 stem (imagenet: torchvision's 7×7 conv + max-pool, what ImageNet checkpoints hold)")
    p.add_argument("--c", type=_cli.non_negative_float, default=0.75, help="HAT capacity-regulariser weight")
    args = p.parse_args(argv)
    if args.width is None:
        args.width = 4.0 if args.arch == "resnet18" else 0.125
    _cli.check_cnn_width(p, args.arch, args.width)
    console = _cli.console()
    tasks, channels, size = _cli.load_tasks(args, p)
    options = _cli.cnn_options(args.arch, args.width, channels, size)
    if args.arch == "resnet18":
        options["stem"] = args.resnet_stem
    weights_arg = args.weights  # the pretrained variants load it, not every model (checked by run_and_report)
    config = _cli.config(args, p)
    if weights_arg is not None:

        def weights(seed: int) -> Path:
            return weights_arg
    else:
        weights = partial(pretrain, args.arch, options, config=config, out=args.out, console=console,
                          source_tasks=args.source_tasks, channels=channels, source=args.source)
        for seed in args.seeds:  # before any variant: every seed's source network is ready
            weights(seed)
    variants = [Variant(label(args.arch, norm, how), args.arch, norm, lambda: HATMethod(c=args.c), options,
                        prepare=start(how, weights)) for norm in args.norms for how in args.starts]
    if args.transfer_check:
        variants += [Variant(sgd_label(args.arch, how), args.arch, "shared_bn", FineTune, options,
                             prepare=start(how, weights)) for how in SGD_STARTS]
    kind = "rotated copies of the digits" if args.source == "rotated" else "Permuted-MNIST tasks"
    source = weights_arg if weights_arg is not None else f"{args.source_tasks} {kind}"
    title = (f"Pretrained BN under HAT, {args.arch} from {source} ({_cli.data_text(args)}, "
             f"{_cli.seeds_text(args.seeds)})")
    return _runner.run_and_report(variants, tasks, args, console, joint_norm={args.arch: JOINT_NORM}, title=title,
                                  contrasts=contrasts(args.arch, args.norms, args.starts, args.transfer_check),
                                  parser_=p, weights_start_every_model=False)


if __name__ == "__main__":
    main()
