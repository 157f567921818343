"""The natural-image program: the report's CIFAR-10/100 sequence at full width, every part in one command.

Serrà et al.'s 10-task sequence (CIFAR-10, then CIFAR-100 in 9 tasks of 10 classes; task order shuffled by the
seed), each part a resumable ablation writing its own folder under ``--out``:

1. ``norms``: ResNet-18 (base width 64, 3×3 stem) and AlexNet (width 1) from random initialisation under HAT with
   every BatchNorm variant (none, shared, masked, per-task, after the gate), SGD fine-tuning, EWC and joint
   training;
2. ``norms_imagenet`` (with ``--weights``): ResNet-18 with torchvision's ImageNet stem, every model (every BN
   variant, SGD, EWC, joint training) started from the ImageNet checkpoint;
3. ``pretrained`` (with ``--weights``): HAT from the ImageNet checkpoint with the BatchNorm statistics kept or
   re-estimated and γ/β copied or reset, against random initialisation, with the SGD transfer check.

It needs the data (``cifar-10-batches-py`` and ``cifar-100-python`` under ``--data-root``, verified against the
published checksums) and, for parts 2 and 3, a torchvision ``resnet18`` ImageNet state dict (``--weights``).
Neither can be downloaded where the program was written; see docs/ablations.md.

    python -m ablations.cifar --data-root DATA --weights resnet18-f37072fd.pth --device cuda
    python -m ablations.cifar --data-root DATA --weights resnet18-f37072fd.pth --device cuda --resume  # interrupted
    python -m ablations.cifar --data-root DATA --dry-run                                              # commands only
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path

from ablations import _cli, norms, pretrained

#: the parts: folder name, module, and whether it needs --weights
PARTS: tuple[tuple[str, Callable[[Sequence[str]], dict], bool], ...] = (
    ("norms", norms.main, False), ("norms_imagenet", norms.main, True), ("pretrained", pretrained.main, True))
SEEDS = (0, 1, 2, 3, 4)


def commands(args: argparse.Namespace) -> list[tuple[str, Callable[[Sequence[str]], dict], list[str]]]:
    """Every part's folder, entry point and options, in order (parts that need ``--weights`` only with it)."""
    common = ["--data", "cifar", "--data-root", str(args.data_root), "--epochs", str(args.epochs),
              "--batch-size", str(args.batch_size), "--seeds", *map(str, args.seeds)]
    common += ["--tasks", str(args.tasks)] if args.tasks is not None else []
    common += ["--unverified-data"] if args.unverified_data else []
    common += ["--resume"] if args.resume else []
    common += ["--checkpoint-every", str(args.checkpoint_every)] if args.checkpoint_every else []
    common += ["--device", args.device] if args.device is not None else []
    weights = [] if args.weights is None else ["--weights", str(args.weights)]
    own = {
        "norms": ["--resnet-width", str(args.resnet_width), "--alexnet-width", f"{args.alexnet_width:g}",
                  "--baselines", "sgd", "ewc"],
        "norms_imagenet": ["--archs", "resnet18", "--resnet-width", str(args.resnet_width), "--resnet-stem",
                           "imagenet", "--baselines", "sgd", "ewc", *weights],
        "pretrained": ["--arch", "resnet18", "--width", str(args.resnet_width), "--resnet-stem", "imagenet",
                       *weights],
    }
    return [(name, entry, [*common, *own[name], "--out", str(args.out / name)])
            for name, entry, needs_weights in PARTS if args.weights is not None or not needs_weights]


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(prog="python -m ablations.cifar", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-root", type=Path, required=True,
                   help="folder holding cifar-10-batches-py and cifar-100-python")
    p.add_argument("--weights", type=Path, default=None, metavar="PATH",
                   help="torchvision resnet18 ImageNet state dict; without it the ImageNet parts are skipped")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="seeds of every part")
    p.add_argument("--epochs", type=_cli.positive_int, default=200,
                   help="most epochs per task (the reference's plateau schedule usually ends a task first)")
    p.add_argument("--resnet-width", type=_cli.positive_int, default=64, help="ResNet-18 base width")
    p.add_argument("--alexnet-width", type=_cli.positive_float, default=1.0, help="AlexNet width multiplier")
    p.add_argument("--batch-size", type=_cli.positive_int, default=64, help="batch size")
    p.add_argument("--tasks", type=_cli.positive_int, default=None, help="tasks of the sequence (default 10)")
    p.add_argument("--unverified-data", action="store_true",
                   help="read CIFAR files that are not the published ones (stand-ins in the same format)")
    p.add_argument("--out", type=Path, default=Path("runs/cifar"), help="one folder per part under it")
    p.add_argument("--resume", action="store_true", help="continue every part from its checkpoints")
    p.add_argument("--checkpoint-every", type=_cli.positive_int, default=None, metavar="N",
                   help="also checkpoint every N epochs within a task")
    p.add_argument("--device", default=None,
                   help="where every part trains: cpu, cuda, cuda:1, mps (default: cpu)")
    p.add_argument("--dry-run", action="store_true", help="print the parts' commands and run nothing")
    args = p.parse_args(argv)
    if args.weights is None:
        print("--weights not given: the ImageNet parts (norms_imagenet, pretrained) are skipped")
    done = {}
    for name, entry, options in commands(args):
        module = entry.__module__
        print(f"[{name}] python -m {module} {shlex.join(options)}", flush=True)
        if not args.dry_run:
            done[name] = entry(options)
    return done


if __name__ == "__main__":
    main()
