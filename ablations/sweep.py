"""Ablation 3: HAT's s_max and c, one at a time, with a task-aware norm.

    python -m ablations.sweep --s-max 25 100 400 800 --c 0 0.1 0.75 2.5
"""

from __future__ import annotations

from collections.abc import Sequence

from ablations import _cli, _runner
from ablations._protocol import JOINT_NORM, Contrast
from ablations._runner import Variant
from hatnorm import list_norms
from hatnorm.training import HATMethod


def main(argv: Sequence[str] | None = None) -> dict:
    p = _cli.parser("python -m ablations.sweep", __doc__.splitlines()[0],
                    budget=_cli.Budget(smoke=4, converged=100), out="runs/sweep")
    p.add_argument("--arch", choices=("alexnet", "resnet18"), default="alexnet", help="architecture")
    p.add_argument("--norm", choices=list_norms("batch"), default="masked_bn", help="norm")
    p.add_argument("--width", type=_cli.positive_float, default=0.125,
                   help="AlexNet width multiplier, or ResNet-18 base width (rounded)")
    p.add_argument("--s-max", type=_cli.positive_float, nargs="+", default=[25.0, 100.0, 400.0, 800.0],
                   help="s_max values (c fixed at 0.75)")
    p.add_argument("--c", type=_cli.non_negative_float, nargs="+", default=[0.0, 0.1, 0.75, 2.5],
                   help="c values (s_max fixed at 400)")
    args = p.parse_args(argv)
    _cli.check_cnn_width(p, args.arch, args.width)
    console = _cli.console()
    tasks, channels, size = _cli.load_tasks(args, p)
    base = _cli.cnn_options(args.arch, args.width, channels, size)
    variants = [Variant(f"s_max={s:g}", args.arch, args.norm, HATMethod, base | {"s_max": s}) for s in args.s_max]
    variants += [Variant(f"c={c:g}", args.arch, args.norm, lambda c=c: HATMethod(c=c), base) for c in args.c]
    title = f"s_max and c sweep, {args.arch} + {args.norm} ({_cli.data_text(args)}, {_cli.seeds_text(args.seeds)})"
    # each value against its own control, the reference value (s_max = 400, c = 0.75) run on the same seeds
    # where the sweep holds it: primary on average accuracy, with Holm over all of them
    contrasts = [Contrast(f"s_max={s:g}", "s_max=400", primary=True) for s in args.s_max
                 if s != 400 and 400 in args.s_max]
    contrasts += [Contrast(f"c={c:g}", "c=0.75", primary=True) for c in args.c if c != 0.75 and 0.75 in args.c]
    return _runner.run_and_report(variants, tasks, args, console, joint_norm={args.arch: JOINT_NORM}, title=title,
                                  contrasts=contrasts, parser_=p)


if __name__ == "__main__":
    main()
