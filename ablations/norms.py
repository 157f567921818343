"""Ablation 1: which norm keeps old tasks intact under HAT, on ResNet-18 and AlexNet.

Variants per architecture: HAT with no norm, shared BN, masked BN, per-task BN and BN after the gate,
against SGD fine-tuning (the ungated network with ordinary shared BN) and joint training (A_J of the
forgetting ratio). The defaults run on the embedded Split-MNIST in a few minutes on 2 CPU cores;
``--full`` selects the reference settings (full-width networks, 200 epochs) for the CIFAR sequence.

    python -m ablations.norms                                    # the default, embedded data
    python -m ablations.norms --data cifar --data-root DATA --full
"""

from __future__ import annotations

from collections.abc import Sequence

from ablations import _cli, _runner
from ablations._protocol import JOINT_NORM, Contrast
from ablations._runner import Variant
from hatnorm.training import EWC, FineTune, HATMethod

NORMS = ("none", "shared_bn", "masked_bn", "task_bn", "post_gate_bn")
LABELS = {"none": "no norm", "shared_bn": "shared BN", "masked_bn": "masked BN", "task_bn": "per-task BN",
          "post_gate_bn": "BN after gate"}
ARCHS = ("resnet18", "alexnet")
#: the baselines without HAT, on the ungated network with shared BN: SGD fine-tuning and EWC
BASELINES = ("sgd", "ewc")


def variants(archs: Sequence[str], norms: Sequence[str], options: dict[str, dict], c: float,
             baselines: Sequence[str] = ("sgd",), ewc_lambda: float = 100.0) -> list[Variant]:
    """HAT with every norm, then the baselines (SGD fine-tuning, EWC with penalty ``ewc_lambda``), for each
    architecture."""
    out = []
    for arch in archs:
        out += [Variant(f"{arch} HAT {LABELS[n]}", arch, n, lambda: HATMethod(c=c), options[arch]) for n in norms]
        if "sgd" in baselines:
            out.append(Variant(f"{arch} SGD", arch, "shared_bn", FineTune, options[arch]))
        if "ewc" in baselines:
            out.append(Variant(f"{arch} EWC", arch, "shared_bn", lambda: EWC(lam=ewc_lambda), options[arch]))
    return out


#: the questions, per architecture: does masked BN keep old tasks where shared BN forgets (BWT), where BN after
#: the gate does (BWT), does it match per-task BN's accuracy, and does it beat SGD fine-tuning (average accuracy)
PRIMARY = (("masked BN", "shared BN", "bwt"), ("masked BN", "BN after gate", "bwt"),
           ("masked BN", "per-task BN", "average_accuracy"))


def contrasts(archs: Sequence[str], norms: Sequence[str], baselines: Sequence[str] = ("sgd",)) -> list[Contrast]:
    """The paired comparisons of the ablation, per architecture: ``PRIMARY`` and masked BN against SGD on
    average accuracy (where the run has both sides), then the exploratory ones (masked BN against EWC among
    them)."""
    run = {LABELS[n] for n in norms}
    out = []
    for arch in archs:
        primary = [(a, b, m) for a, b, m in PRIMARY if a in run and b in run]
        out += [Contrast(f"{arch} HAT {a}", f"{arch} HAT {b}", m, primary=True) for a, b, m in primary]
        if "masked BN" in run and "sgd" in baselines:
            out.append(Contrast(f"{arch} HAT masked BN", f"{arch} SGD", "average_accuracy", primary=True))
        if "masked BN" in run and "ewc" in baselines:
            out.append(Contrast(f"{arch} HAT masked BN", f"{arch} EWC"))
        if {"per-task BN", "shared BN"} <= run:
            out.append(Contrast(f"{arch} HAT per-task BN", f"{arch} HAT shared BN"))
        if "per-task BN" in run and "sgd" in baselines:
            out.append(Contrast(f"{arch} HAT per-task BN", f"{arch} SGD"))
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    p = _cli.parser("python -m ablations.norms", __doc__.splitlines()[0],
                    budget=_cli.Budget(smoke=4, converged=100), out="runs/norms")
    p.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS), help="architectures")
    p.add_argument("--norms", nargs="+", choices=NORMS, default=list(NORMS), help="norm variants under HAT")
    p.add_argument("--resnet-width", type=_cli.positive_int, default=4,
                   help="ResNet-18 base width (64 is torchvision's, 20 the reduced ResNet-18)")
    p.add_argument("--resnet-stem", choices=("cifar", "imagenet"), default="cifar",
                   help="ResNet-18 stem: 3×3 conv for 32×32 inputs, or torchvision's 7×7 conv + max-pool (what "
                        "ImageNet checkpoints for --weights hold)")
    p.add_argument("--alexnet-width", type=_cli.positive_float, default=0.125,
                   help="AlexNet width multiplier (1 is Serrà's)")
    p.add_argument("--c", type=_cli.non_negative_float, default=0.75, help="HAT capacity-regulariser weight")
    p.add_argument("--baselines", nargs="+", choices=BASELINES, default=["sgd"],
                   help="methods without HAT on the ungated network with shared BN: SGD fine-tuning, EWC")
    p.add_argument("--ewc-lambda", type=_cli.non_negative_float, default=100.0, help="EWC's penalty weight λ")
    p.add_argument("--full", action="store_true",
                   help="reference settings: 200 epochs, ResNet-18 width 64, AlexNet width 1")
    args = p.parse_args(argv)
    if args.full:
        args.resnet_width, args.alexnet_width = 64, 1.0
        if not hasattr(args, "epochs"):
            args.epochs = 200
    if args.alexnet_width > 16:
        p.error(f"--alexnet-width must be ≤ 16, got {args.alexnet_width}")
    console = _cli.console()
    tasks, channels, size = _cli.load_tasks(args, p)
    options = {"resnet18": {"base_width": args.resnet_width, "in_channels": channels, "stem": args.resnet_stem},
               "alexnet": {"width": args.alexnet_width, "in_channels": channels, "size": size}}
    title = (f"Norms under HAT ({_cli.data_text(args)}, {len(tasks(args.seeds[0]))} tasks, "
             f"{_cli.seeds_text(args.seeds)})")
    table = variants(args.archs, args.norms, options, args.c, args.baselines, args.ewc_lambda)
    declared = contrasts(args.archs, args.norms, args.baselines)
    # the variants name the baselines, and λ changes a number only where EWC runs: a run without EWC records the
    # options runs made before these options existed did, so their seeds still merge
    if "ewc" not in args.baselines:
        del args.ewc_lambda
    del args.baselines
    return _runner.run_and_report(table, tasks, args, console, joint_norm=dict.fromkeys(ARCHS, JOINT_NORM),
                                  title=title, contrasts=declared, parser_=p)


if __name__ == "__main__":
    main()
