"""Ablation 2: which LayerNorm keeps old tasks intact under HAT, on a small ViT, pre-norm and post-norm.

In the pre-norm ViT (``--positions pre``) every LN reads the gated residual stream, whose unselected units are 0
for every task: no LN can drift, and BWT = 0 for shared, per-task and masked LN by construction (only
plasticity differs). In the post-norm ViT (``--positions post``, the architecture's ``norm_position="post"``)
each LN reads the ungated residual sum x + f(x), whose unselected units come from weights later tasks train:
there shared and per-task LN can drift and masked LN cannot. Both run at every HAT c (``--c``, default 0.1 and
0.75: a smaller c leaves more units open to later tasks).

Variants, per position and c: HAT with shared LN, per-task LN, masked LN (and no norm on request), against SGD
fine-tuning (the ungated ViT with shared LN) and joint training; and a transformers ``ViTForImageClassification``
of the same size, loaded from a saved state dict and converted by ``hatnorm.convert`` (its
LayerNorms become masked LN), as a user with pretrained weights would. Unless ``--hf-weights``
gives a state dict, that model is first pretrained as an ordinary classifier on a disjoint source
(Permuted-MNIST tasks pooled into one 10-class problem) and saved per seed.

The default sequence is Rotated-MNIST (10 tasks): digits keep their spatial structure, which the
ViT's convolutional stem and patches rely on (on Permuted-MNIST a ViT stays below 0.9).

    python -m ablations.layernorm
    python -m ablations.layernorm --preset converged --seeds 0 1 2 3 4 --no-converted
    python -m ablations.layernorm --arch vit_tiny --data cifar --data-root DATA --epochs 200 --no-converted
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn
from transformers import ViTConfig, ViTForImageClassification

import hatnorm
from ablations import _cli, _runner
from ablations._protocol import Contrast
from ablations._runner import Variant
from ablations.pretrained import source_task
from hatnorm.training import FineTune, HATMethod, TrainConfig, train_sequence

NORMS = ("shared_ln", "task_ln", "masked_ln", "none")
#: where the LayerNorms sit: reading the gated stream (pre) or the ungated residual sum (post)
POSITIONS = ("pre", "post")
#: the LNs over every unit, which masked LN is contrasted with (primary, post-norm)
BASELINES = ("shared_ln", "task_ln")
LABELS = {"shared_ln": "shared LN", "task_ln": "per-task LN", "masked_ln": "masked LN", "none": "no norm"}
#: the name of the converted transformers model in tables (and its joint training)
CONVERTED = "transformers ViT"


class Classifier(nn.Module):
    """A transformers image classifier called as hatnorm's trainer calls models: ``model(x, task=, s=)``.

    It has one head and no gates; ``task`` and ``s`` are ignored. Used to pretrain the model to convert.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, task: int, s: float | Tensor | None = None) -> Tensor:
        return self.model(pixel_values=x).logits


def hf_config(*, channels: int, size: int, patch_size: int, dim: int, depth: int, num_heads: int) -> ViTConfig:
    """The transformers ViT of the ablation's sizes (patch stem, MLP 2·dim, 10 classes)."""
    return ViTConfig(image_size=size, patch_size=patch_size, num_channels=channels, hidden_size=dim,
                     num_hidden_layers=depth, num_attention_heads=num_heads, intermediate_size=2 * dim, num_labels=10)


def pretrain_hf(config: ViTConfig, seed: int, train: TrainConfig, path: Path, console: Console,
                *, source_tasks: int) -> Path:
    """Pretrain a transformers ViT as an ordinary classifier on the source and save its state dict to ``path``;
    a saved one is reused when it was pretrained the same way (sizes, source tasks, settings: the ``.json``
    beside it)."""
    made_from = {"config": config.to_dict(), "source_tasks": source_tasks, "train": asdict(replace(train, seed=seed))}
    if _runner.reusable(path, made_from, console, f"{CONVERTED} pretraining, seed {seed}"):
        return path
    path.with_suffix(".json").unlink(missing_ok=True)  # no record claims the network until the new one is saved
    models: list[ViTForImageClassification] = []

    def build() -> nn.Module:
        models.append(ViTForImageClassification(config))
        return Classifier(models[-1])

    source = source_task(seed, source_tasks, config.num_channels)
    result = train_sequence(build, [source], FineTune(), replace(train, seed=seed), console=console,
                            title=f"{CONVERTED} pretraining s{seed}")
    console.print(f"{CONVERTED} pretraining, seed {seed}: source test accuracy {result.accuracy[0][0]:.4f} "
                  f"({len(source.train)} images, {result.epochs[0]} epochs)")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(models[0].state_dict(), path)
    _runner.record_source(path, made_from)
    return path


def converted(config: ViTConfig, weights: Callable[[int], Path]) -> Callable[[int, str, list[int], int], nn.Module]:
    """Builds the converted variant: a ``ViTForImageClassification`` of ``config`` loads the seed's state dict
    (strictly, as ``from_pretrained`` would), then ``hatnorm.convert`` swaps its LayerNorms for ``norm``."""

    def make(num_tasks: int, norm: str, num_classes: list[int], seed: int) -> nn.Module:
        model = ViTForImageClassification(config)
        path = weights(seed)
        model.load_state_dict(_runner.read_weights(path, "--hf-weights"))
        return hatnorm.convert(model.train(), num_tasks=num_tasks, norm=norm, num_classes=num_classes)

    return make


def main(argv: Sequence[str] | None = None) -> dict:
    p = _cli.parser("python -m ablations.layernorm", __doc__.splitlines()[0],
                    budget=_cli.Budget(smoke=4, converged=20, optimizer="adamw", lr=2e-3), out="runs/layernorm",
                    data="rotated_mnist")
    p.add_argument("--arch", choices=("vit_micro", "vit_tiny", "vit"), default="vit_micro", help="the ViT")
    p.add_argument("--norms", nargs="+", choices=NORMS, default=["shared_ln", "task_ln", "masked_ln"],
                   help="norm variants under HAT")
    p.add_argument("--positions", nargs="+", choices=POSITIONS, default=list(POSITIONS),
                   help="pre-norm (every LN reads the gated stream) and post-norm (each LN reads the ungated "
                        "residual sum, where an LN over every unit can drift)")
    p.add_argument("--dim", type=_cli.positive_int, default=64, help="width of the residual stream")
    p.add_argument("--depth", type=_cli.positive_int, default=2, help="number of blocks")
    p.add_argument("--num-heads", type=_cli.positive_int, default=4, help="attention heads")
    p.add_argument("--patch-size", type=_cli.positive_int, default=8, help="patch side (divides 32)")
    p.add_argument("--stem", choices=("patch", "conv"), default="conv",
                   help="token embedding: ViT's patchify layer, or a convolutional stem (stride-2 3×3 convolutions)")
    p.add_argument("--c", type=_cli.non_negative_float, nargs="+", default=[0.1, 0.75],
                   help="HAT capacity-regulariser weights (the converted variant takes 0.75 if given, else the first)")
    p.add_argument("--converted", action=argparse.BooleanOptionalAction, default=True,
                   help=f"also run the {CONVERTED} variant: a transformers ViTForImageClassification of the same "
                        "sizes (patch stem), loaded from a state dict and converted with masked LN")
    p.add_argument("--hf-weights", type=Path, default=None, metavar="PATH",
                   help="the converted variant's state dict (a ViTForImageClassification of the ablation's sizes, "
                        "1 input channel, 10 labels); default: pretrain one per seed on pooled Permuted-MNIST")
    p.add_argument("--source-tasks", type=_cli.positive_int, default=2,
                   help="Permuted-MNIST tasks pooled into the converted variant's pretraining source")
    args = p.parse_args(argv)
    if 32 % args.patch_size:
        p.error(f"--patch-size must divide the image side 32, got {args.patch_size}")
    if args.stem == "conv" and (args.patch_size < 2 or args.patch_size & (args.patch_size - 1)):
        p.error(f"--stem conv needs a --patch-size that is a power of 2 ≥ 2, got {args.patch_size}")
    if args.dim % args.num_heads:
        p.error(f"--dim must be a multiple of --num-heads, got {args.dim} and {args.num_heads}")
    console = _cli.console()
    tasks, channels, size = _cli.load_tasks(args, p)
    options = {"in_channels": channels, "image_size": size, "patch_size": args.patch_size, "dim": args.dim,
               "depth": args.depth, "num_heads": args.num_heads, "mlp_dim": 2 * args.dim, "stem": args.stem}
    for name, values in (("--c", args.c), ("--positions", args.positions), ("--norms", args.norms)):
        if len(set(values)) != len(values):
            p.error(f"{name} must not repeat a value, got {' '.join(map(str, values))}")
    arch = args.arch
    variants, contrasts = table(arch, options, args.positions, args.norms, args.c)
    converted_c = 0.75 if 0.75 in args.c else args.c[0]
    if args.converted:
        config = hf_config(channels=channels, size=size, patch_size=args.patch_size, dim=args.dim,
                           depth=args.depth, num_heads=args.num_heads)
        if args.hf_weights is not None:
            try:
                ViTForImageClassification(config).load_state_dict(_runner.read_weights(args.hf_weights, "--hf-weights"))
            except (ValueError, RuntimeError) as error:
                p.error(f"--hf-weights: {args.hf_weights} does not fit a ViTForImageClassification of the "
                        f"ablation's sizes ({error})".replace("\n", " "))
        train = _cli.config(args, p)

        def weights(seed: int) -> Path:
            if args.hf_weights is not None:
                return args.hf_weights
            return pretrain_hf(config, seed, train, args.out / f"seed_{seed}" / "vit_hf.pt", console,
                               source_tasks=args.source_tasks)

        label = f"{CONVERTED} HAT masked LN (converted)"
        variants.append(Variant(label, CONVERTED, "masked_ln", lambda: HATMethod(c=converted_c),
                                {"patch_size": args.patch_size, "dim": args.dim, "depth": args.depth,
                                 "num_heads": args.num_heads}, make=converted(config, weights)))
        if "pre" in args.positions and "masked_ln" in args.norms:
            contrasts.append((label, hat_label(arch, "pre", "masked_ln", converted_c, args.c)))
    title = (f"LayerNorm under HAT ({_cli.data_text(args)}, {len(tasks(args.seeds[0]))} tasks, "
             f"{_cli.seeds_text(args.seeds)})")
    return _runner.run_and_report(variants, tasks, args, console, title=title, contrasts=contrasts, parser_=p,
                                  joint_norm={arch: "shared_ln", CONVERTED: "shared_ln"})


def hat_label(arch: str, position: str, norm: str, c: float, cs: Sequence[float]) -> str:
    """A HAT variant's label: the pre-norm ViT is ``arch``, the post-norm one ``arch post-norm``; c is named when
    the table has several."""
    return f"{arch}{' post-norm' if position == 'post' else ''} HAT {LABELS[norm]}" + (
        f" c={c:g}" if len(cs) > 1 else "")


def table(arch: str, options: dict[str, Any], positions: Sequence[str], norms: Sequence[str], cs: Sequence[float]
          ) -> tuple[list[Variant], list[Contrast]]:
    """The variants (per position: HAT with every norm at every c, then SGD) and the declared contrasts.

    Primary, in the post-norm ViT at each c: masked − shared LN and masked − per-task LN on BWT (the LN over
    every unit can drift there). Exploratory: the same pairs in the pre-norm ViT on average accuracy (BWT is 0
    there by construction), masked LN post − pre, and masked LN against SGD.
    """
    variants, contrasts = [], []
    for position in positions:
        placed = options | {"norm_position": position}
        variants += [Variant(hat_label(arch, position, n, c, cs), arch, n, lambda c=c: HATMethod(c=c), placed)
                     for c in cs for n in norms]
        sgd = f"{arch}{' post-norm' if position == 'post' else ''} SGD"
        variants.append(Variant(sgd, arch, "shared_ln", FineTune, placed))
        if "masked_ln" not in norms:
            continue
        for c in cs:
            masked = hat_label(arch, position, "masked_ln", c, cs)
            contrasts += [Contrast(masked, hat_label(arch, position, n, c, cs), "bwt" if position == "post"
                                   else "average_accuracy", primary=position == "post" and n in BASELINES)
                          for n in norms if n != "masked_ln"]
            contrasts.append(Contrast(masked, sgd))
    if set(POSITIONS) <= set(positions) and "masked_ln" in norms:
        contrasts += [Contrast(hat_label(arch, "post", "masked_ln", c, cs), hat_label(arch, "pre", "masked_ln", c, cs))
                      for c in cs]
    return variants, contrasts


if __name__ == "__main__":
    main()
