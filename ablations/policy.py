"""Ablation 4: gradient policy, HAT's hard protection against AdaHAT's soft one.

    python -m ablations.policy --alpha 0.1
"""

from __future__ import annotations

from collections.abc import Sequence

from ablations import _cli, _runner
from ablations._protocol import Contrast
from ablations._runner import Variant
from hatnorm import AdaHATPolicy, list_norms
from hatnorm.training import HATMethod


def main(argv: Sequence[str] | None = None) -> dict:
    p = _cli.parser("python -m ablations.policy", __doc__.splitlines()[0],
                    budget=_cli.Budget(smoke=4, converged=100), out="runs/policy")
    p.add_argument("--arch", choices=("alexnet", "resnet18"), default="alexnet", help="architecture")
    p.add_argument("--norms", nargs="+", choices=list_norms("batch"), default=["masked_bn", "task_bn"], help="norms")
    p.add_argument("--width", type=_cli.positive_float, default=0.125,
                   help="AlexNet width multiplier, or ResNet-18 base width (rounded)")
    p.add_argument("--alpha", type=_cli.positive_float, default=0.1, help="AdaHAT adjustment intensity α")
    p.add_argument("--c", type=_cli.non_negative_float, default=0.75, help="HAT capacity-regulariser weight")
    args = p.parse_args(argv)
    _cli.check_cnn_width(p, args.arch, args.width)
    console = _cli.console()
    tasks, channels, size = _cli.load_tasks(args, p)
    options = _cli.cnn_options(args.arch, args.width, channels, size)
    variants = []
    for norm in args.norms:
        variants.append(Variant(f"{norm} hat", args.arch, norm, lambda: HATMethod(c=args.c), options))
        variants.append(Variant(f"{norm} adahat", args.arch, norm,
                                lambda: HATMethod(c=args.c, policy=AdaHATPolicy(alpha=args.alpha)), options))
    title = f"Gradient policy, {args.arch} ({args.data}, {_cli.seeds_text(args.seeds)})"
    contrasts = [Contrast(f"{norm} hat", f"{norm} adahat", primary=True) for norm in args.norms]
    return _runner.run_and_report(variants, tasks, args, console, joint_norm={args.arch: "shared_bn"}, title=title,
                                  contrasts=contrasts, parser_=p)


if __name__ == "__main__":
    main()
