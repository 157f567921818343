"""Ablation 2b: which LayerNorm or GroupNorm keeps old tasks in a CNN, where a norm over every channel can drift.

In a CNN under HAT a convolution's output channels that task t does not select are computed by weights later
tasks train; a LayerNorm over the channels at each position (ConvNeXt's ``LayerNorm2d``) or a GroupNorm that
reads every channel takes its statistics from them too, so task t's outputs can move after it ends (unlike the
pre-norm ViT, where every LN reads the gated stream). Variants, per architecture: HAT with masked channel-LN
(``masked_cln``) and masked GroupNorm (``masked_gn``), which read only the task's channels, against shared and
per-task channel-LN (``shared_cln``, ``task_cln``) and GroupNorm (``shared_gn``, ``task_gn``), which read every
channel, and masked BN; SGD fine-tuning (the ungated network with shared channel-LN); joint training.

    python -m ablations.channelnorm
    python -m ablations.channelnorm --preset converged --seeds 0 1 2 3 4
"""

from __future__ import annotations

from collections.abc import Sequence

from ablations import _cli, _runner
from ablations._protocol import JOINT_NORM, Contrast
from ablations._runner import Variant
from hatnorm.training import FineTune, HATMethod

NORMS = ("masked_cln", "shared_cln", "task_cln", "masked_gn", "shared_gn", "task_gn", "masked_bn")
LABELS = {"masked_cln": "masked CLN", "shared_cln": "shared CLN", "task_cln": "per-task CLN",
          "masked_gn": "masked GN", "shared_gn": "shared GN", "task_gn": "per-task GN", "masked_bn": "masked BN"}
ARCHS = ("alexnet", "resnet18")
#: the ungated network of SGD fine-tuning normalises with an ordinary channel LayerNorm
SGD_NORM = "shared_cln"
#: the questions, per architecture: does the masked form keep old tasks where the form over every channel drifts
#: (BWT), for channel-LN and GroupNorm, against the shared and the per-task form
PRIMARY = (("masked CLN", "shared CLN", "bwt"), ("masked CLN", "per-task CLN", "bwt"),
           ("masked GN", "shared GN", "bwt"), ("masked GN", "per-task GN", "bwt"))
#: exploratory: what the masked channel norms cost against masked BN, and against SGD
EXPLORATORY = (("masked CLN", "masked BN"), ("masked GN", "masked BN"), ("masked CLN", "masked GN"))


def variants(archs: Sequence[str], norms: Sequence[str], options: dict[str, dict], c: float) -> list[Variant]:
    """HAT with every norm, then SGD fine-tuning, for each architecture."""
    out = []
    for arch in archs:
        out += [Variant(f"{arch} HAT {LABELS[n]}", arch, n, lambda: HATMethod(c=c), options[arch]) for n in norms]
        out.append(Variant(f"{arch} SGD", arch, SGD_NORM, FineTune, options[arch]))
    return out


def contrasts(archs: Sequence[str], norms: Sequence[str]) -> list[Contrast]:
    """``PRIMARY`` per architecture (where the run has both sides), then the exploratory ones and each masked
    channel norm against SGD."""
    run = {LABELS[n] for n in norms}
    out = []
    for arch in archs:
        out += [Contrast(f"{arch} HAT {a}", f"{arch} HAT {b}", m, primary=True) for a, b, m in PRIMARY
                if {a, b} <= run]
        out += [Contrast(f"{arch} HAT {a}", f"{arch} HAT {b}") for a, b in EXPLORATORY if {a, b} <= run]
        out += [Contrast(f"{arch} HAT {a}", f"{arch} SGD") for a in ("masked CLN", "masked GN") if a in run]
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    p = _cli.parser("python -m ablations.channelnorm", __doc__.splitlines()[0],
                    budget=_cli.Budget(smoke=4, converged=100), out="runs/channelnorm")
    p.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS), help="architectures")
    p.add_argument("--norms", nargs="+", choices=NORMS, default=list(NORMS), help="norm variants under HAT")
    p.add_argument("--resnet-width", type=_cli.positive_int, default=4, help="ResNet-18 base width (64: torchvision's)")
    p.add_argument("--alexnet-width", type=_cli.positive_float, default=0.125,
                   help="AlexNet width multiplier (1 is Serrà's)")
    p.add_argument("--c", type=_cli.non_negative_float, default=0.75, help="HAT capacity-regulariser weight")
    args = p.parse_args(argv)
    _cli.check_cnn_width(p, "alexnet", args.alexnet_width)
    console = _cli.console()
    tasks, channels, size = _cli.load_tasks(args, p)
    options = {"resnet18": {"base_width": args.resnet_width, "in_channels": channels},
               "alexnet": {"width": args.alexnet_width, "in_channels": channels, "size": size}}
    title = (f"Channel LayerNorm and GroupNorm in CNNs under HAT ({_cli.data_text(args)}, "
             f"{len(tasks(args.seeds[0]))} tasks, {_cli.seeds_text(args.seeds)})")
    return _runner.run_and_report(variants(args.archs, args.norms, options, args.c), tasks, args, console,
                                  joint_norm=dict.fromkeys(args.archs, JOINT_NORM), title=title,
                                  contrasts=contrasts(args.archs, args.norms), parser_=p)


if __name__ == "__main__":
    main()
