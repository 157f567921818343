"""Ablation 4: gradient policy, HAT's hard protection against AdaHAT's and FG-AdaHAT's soft ones.

    python -m ablations.policy --alpha 0.1
    python -m ablations.policy --policies hat adahat_reference fg_icu fg_afi fg_og --gamma-beta both

Soft policies: ``adahat`` (hatnorm's task-start form, α = ``--alpha``), ``adahat_reference`` (the authors' code,
per-step sparsity, α = 1e-6), ``fg_<type>`` (FG-AdaHAT with the paper's α and b_L for the importance type:
IG, OG, ICU, CU, AFI). ``--gamma-beta`` adjusts the shared γ/β of the norms (``adjusted``), leaves them free as the
reference does (``free``), or runs both; it applies to the per-step policies.
"""

from __future__ import annotations

from collections.abc import Sequence

from ablations import _cli, _runner
from ablations._protocol import JOINT_NORM, Contrast
from ablations._runner import Variant
from hatnorm import GradientPolicy, list_norms
from hatnorm.policies import AdaHATPolicy, AdaHATReferencePolicy, FGAdaHATPolicy
from hatnorm.training import HATMethod

#: FG-AdaHAT variants: importance type, α and b_L of the paper's configs (fgadahat_<x>_*.yaml)
FG_VARIANTS = {
    "fg_ig": ("input_weight_gradient_abs_sum", 1.5e-7, 5.0),
    "fg_og": ("output_weight_gradient_abs_sum", 1e-7, 10.0),
    "fg_icu": ("input_weight_abs_sum_x_activation_abs", 1.5e-7, 5.0),
    "fg_cu": ("output_weight_abs_sum_x_activation_abs", 1.5e-7, 5.0),
    "fg_afi": ("input_weight_gradient_square_sum_x_activation_abs", 1.5e-7, 5.0),
}
POLICIES = ("hat", "adahat", "adahat_reference", *FG_VARIANTS)


def make_policy(name: str, alpha: float, norms: bool) -> str | GradientPolicy:
    """The gradient policy of a variant, built fresh for every run (a per-step policy serves one model)."""
    if name == "hat":
        return "hat"
    if name == "adahat":
        return AdaHATPolicy(alpha=alpha)
    if name == "adahat_reference":
        return AdaHATReferencePolicy(norms=norms)
    importance, fg_alpha, base_linear = FG_VARIANTS[name]
    return FGAdaHATPolicy(alpha=fg_alpha, importance=importance, base_linear=base_linear, norms=norms)


def main(argv: Sequence[str] | None = None) -> dict:
    p = _cli.parser("python -m ablations.policy", __doc__.splitlines()[0],
                    budget=_cli.Budget(smoke=4, converged=100), out="runs/policy")
    p.add_argument("--arch", choices=("alexnet", "resnet18", "mlp"), default="alexnet",
                   help="architecture (mlp: the FG-AdaHAT paper's, hidden sizes --hidden)")
    p.add_argument("--hidden", nargs="+", type=int, default=[256, 100, 64], help="mlp: hidden layer sizes")
    p.add_argument("--norms", nargs="+", choices=list_norms("batch"), default=["masked_bn", "task_bn"], help="norms")
    p.add_argument("--width", type=_cli.positive_float, default=0.125,
                   help="AlexNet width multiplier, or ResNet-18 base width (rounded)")
    p.add_argument("--alpha", type=_cli.positive_float, default=0.1, help="AdaHAT adjustment intensity α")
    p.add_argument("--c", type=_cli.non_negative_float, default=0.75, help="HAT capacity-regulariser weight")
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=["hat", "adahat"],
                   help="gradient policies; every one but hat is contrasted with hat")
    p.add_argument("--gamma-beta", choices=("adjusted", "free", "both"), default="adjusted",
                   help="per-step policies: adjust the norms' shared γ/β, leave them free, or run both")
    args = p.parse_args(argv)
    _cli.check_cnn_width(p, args.arch, args.width)
    console = _cli.console()
    tasks, channels, size = _cli.load_tasks(args, p)
    options = ({"in_features": channels * size * size, "hidden": args.hidden} if args.arch == "mlp"
               else _cli.cnn_options(args.arch, args.width, channels, size))
    variants = []
    contrasts = []
    settings = {"adjusted": [True], "free": [False], "both": [True, False]}[args.gamma_beta]
    for norm in args.norms:
        for name in args.policies:
            for norms in settings if name not in ("hat", "adahat") else [True]:
                label = f"{norm} {name}" + ("" if norms or name in ("hat", "adahat") else " γβ free")
                variants.append(Variant(label, args.arch, norm, lambda name=name, norms=norms: HATMethod(
                    c=args.c, policy=make_policy(name, args.alpha, norms)), options))
                if name != "hat" and "hat" in args.policies:
                    contrasts.append(Contrast(f"{norm} hat", label, primary=True))
            if name not in ("hat", "adahat") and len(settings) == 2:
                contrasts.append(Contrast(f"{norm} {name}", f"{norm} {name} γβ free"))
    title = f"Gradient policy, {args.arch} ({_cli.data_text(args)}, {_cli.seeds_text(args.seeds)})"
    return _runner.run_and_report(variants, tasks, args, console, joint_norm={args.arch: JOINT_NORM}, title=title,
                                  contrasts=contrasts, parser_=p)


if __name__ == "__main__":
    main()
