"""Ablation 2: which LayerNorm keeps old tasks intact under HAT, on a small ViT.

Variants: HAT with shared LN, per-task LN, masked LN and no norm, against SGD fine-tuning (the
ungated ViT with shared LN) and joint training.

    python -m ablations.layernorm
    python -m ablations.layernorm --arch vit_tiny --data cifar --data-root DATA --epochs 200
"""

from __future__ import annotations

from collections.abc import Sequence

from ablations import _common
from ablations._common import Variant
from hatnorm.training import FineTune, HATMethod

NORMS = ("shared_ln", "task_ln", "masked_ln", "none")
LABELS = {"shared_ln": "shared LN", "task_ln": "per-task LN", "masked_ln": "masked LN", "none": "no norm"}


def main(argv: Sequence[str] | None = None) -> dict:
    p = _common.parser("python -m ablations.layernorm", __doc__.splitlines()[0],
                       budget=_common.Budget(smoke=4, converged=30, optimizer="adamw"), out="runs/layernorm")
    p.add_argument("--arch", choices=("vit_micro", "vit_tiny", "vit"), default="vit_micro", help="the ViT")
    p.add_argument("--norms", nargs="+", choices=NORMS, default=list(NORMS), help="norm variants under HAT")
    p.add_argument("--dim", type=_common.positive_int, default=64, help="width of the residual stream")
    p.add_argument("--depth", type=_common.positive_int, default=2, help="number of blocks")
    p.add_argument("--heads", type=_common.positive_int, default=4, help="attention heads")
    p.add_argument("--patch-size", type=_common.positive_int, default=4, help="patch side (divides 32)")
    p.add_argument("--stem", choices=("patch", "conv"), default="patch",
                   help="token embedding: ViT's patchify layer, or a convolutional stem (stride-2 3×3 convolutions)")
    p.add_argument("--c", type=_common.non_negative_float, default=0.75, help="HAT capacity-regulariser weight")
    args = p.parse_args(argv)
    if 32 % args.patch_size:
        p.error(f"--patch-size must divide the image side 32, got {args.patch_size}")
    if args.stem == "conv" and (args.patch_size < 2 or args.patch_size & (args.patch_size - 1)):
        p.error(f"--stem conv needs a --patch-size that is a power of 2 ≥ 2, got {args.patch_size}")
    console = _common.console()
    tasks, channels, size = _common.load_tasks(args, p)
    options = {"in_channels": channels, "image_size": size, "patch_size": args.patch_size, "dim": args.dim,
               "depth": args.depth, "heads": args.heads, "mlp_dim": 2 * args.dim, "stem": args.stem}
    arch = args.arch
    variants = [Variant(f"{arch} HAT {LABELS[n]}", arch, n, lambda: HATMethod(c=args.c), options) for n in args.norms]
    variants.append(Variant(f"{arch} SGD", arch, "shared_ln", FineTune, options))
    title = f"LayerNorm under HAT ({args.data}, {len(tasks(args.seeds[0]))} tasks, {_common.seeds_text(args.seeds)})"
    masked = f"{arch} HAT masked LN"
    contrasts = [(masked, f"{arch} HAT {LABELS[n]}") for n in args.norms if n != "masked_ln"]
    return _common.run_and_report(variants, tasks, args, console, joint_norm={arch: "shared_ln"}, title=title,
                                  contrasts=[*contrasts, (masked, f"{arch} SGD")], parser_=p)


if __name__ == "__main__":
    main()
