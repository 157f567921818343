"""Ablation 6: does HAT's newest task stay below SGD's, and more so with depth and c?

The ResNet-18 report observed that each task's accuracy right after it is learned, A[t][t], is lower under
HAT than under SGD fine-tuning (HAT's capacity regulariser and its closed units cost plasticity) and that the
gap may grow with depth. This ablation measures the gap A_SGD[t][t] − A_HAT[t][t] (averaged over t: the
``A[t][t]`` metric) for ResNet-10, -18 and -34 (BasicBlock × [1, 1, 1, 1], [2, 2, 2, 2], [3, 4, 6, 3]) under
HAT with masked BN at each c, against SGD fine-tuning of the same network (ungated, shared BN) on the same seeds.

    python -m ablations.depth
    python -m ablations.depth --preset converged --seeds 0 1 2 3 4
"""

from __future__ import annotations

from collections.abc import Sequence

from ablations import _cli, _runner
from ablations._protocol import JOINT_NORM, Contrast
from ablations._runner import Variant
from hatnorm.training import FineTune, HATMethod

DEPTHS = (10, 18, 34)
#: the metric of the question: the mean over t of A[t][t]
NEWEST = "newest_accuracy"


def hat_label(depth: int, c: float) -> str:
    return f"resnet{depth} HAT c={c:g}"


def sgd_label(depth: int) -> str:
    return f"resnet{depth} SGD"


def variants(depths: Sequence[int], cs: Sequence[float], norm: str, options: dict) -> list[Variant]:
    """Per depth: HAT with ``norm`` at every c, then SGD fine-tuning."""
    out = []
    for depth in depths:
        out += [Variant(hat_label(depth, c), f"resnet{depth}", norm, lambda c=c: HATMethod(c=c), options)
                for c in cs]
        out.append(Variant(sgd_label(depth), f"resnet{depth}", "shared_bn", FineTune, options))
    return out


def contrasts(depths: Sequence[int], cs: Sequence[float]) -> list[Contrast]:
    """Primary: SGD − HAT on A[t][t] at every depth and c (the newest-task gap). Exploratory: the deepest
    network against the shallowest, for HAT at each c and for SGD (does the gap come from HAT or from depth)."""
    out = [Contrast(sgd_label(d), hat_label(d, c), NEWEST, primary=True) for d in depths for c in cs]
    if len(depths) > 1:
        deep, shallow = max(depths), min(depths)
        out += [Contrast(hat_label(deep, c), hat_label(shallow, c), NEWEST) for c in cs]
        out.append(Contrast(sgd_label(deep), sgd_label(shallow), NEWEST))
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    p = _cli.parser("python -m ablations.depth", __doc__.splitlines()[0],
                    budget=_cli.Budget(smoke=4, converged=100), out="runs/depth")
    p.add_argument("--depths", nargs="+", type=int, choices=DEPTHS, default=list(DEPTHS), help="ResNet depths")
    p.add_argument("--c", nargs="+", type=_cli.non_negative_float, default=[0.1, 0.75],
                   help="HAT capacity-regulariser weights")
    p.add_argument("--norm", choices=("masked_bn", "task_bn"), default="masked_bn", help="HAT's norm")
    p.add_argument("--width", type=_cli.positive_int, default=4, help="ResNet base width (64: torchvision's)")
    p.add_argument("--resnet-stem", choices=("cifar", "imagenet"), default="cifar", help="ResNet stem")
    args = p.parse_args(argv)
    for name, values in (("--depths", args.depths), ("--c", args.c)):
        if len(set(values)) != len(values):
            p.error(f"{name} must not repeat a value, got {' '.join(map(str, values))}")
    console = _cli.console()
    tasks, channels, _ = _cli.load_tasks(args, p)
    options = {"base_width": args.width, "in_channels": channels, "stem": args.resnet_stem}
    title = (f"Newest-task accuracy of HAT and SGD against ResNet depth ({_cli.data_text(args)}, "
             f"{len(tasks(args.seeds[0]))} tasks, {_cli.seeds_text(args.seeds)})")
    return _runner.run_and_report(variants(args.depths, args.c, args.norm, options), tasks, args, console,
                                  joint_norm={f"resnet{d}": JOINT_NORM for d in args.depths}, title=title,
                                  contrasts=contrasts(args.depths, args.c), parser_=p)


if __name__ == "__main__":
    main()
