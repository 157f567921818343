"""Ablation 7: which norm keeps a language model's old tasks under HAT, on the shipped synthetic text benchmark.

Two tables, each on its own task sequence of :mod:`hatnorm.text_tasks` (synthetic, generated from the seed; no
corpus is downloaded):

- ``causal``: a LLaMA-style causal language model (a transformers ``LlamaForCausalLM`` built from a small config:
  RMSNorm, rotary positions, grouped-query attention, SwiGLU) converted by ``hatnorm.convert``, on the generation
  tasks (exact match of the generated answer). HAT with masked, shared and per-task RMSNorm, SGD fine-tuning, and
  joint training. The model is pre-norm: every RMSNorm reads the gated residual stream, whose units outside a
  task's selection are 0 for that task, so no RMSNorm can drift and HAT's BWT is 0 with each of them; the norms
  differ in what later tasks can still learn. Primary: masked − shared and masked − per-task RMSNorm on average
  accuracy.
- ``classifier``: a BERT-style post-norm classifier (a transformers ``BertForSequenceClassification``) converted
  the same way, on the classification tasks: HAT with masked, shared and per-task LayerNorm, SGD, joint. Each
  LayerNorm reads the ungated residual sum x + f(x), whose units outside the task come from weights later tasks
  train: a LayerNorm whose statistics read every unit *can* drift there, the design the vision ablation cannot
  show. Primary: masked − shared and masked − per-task LN on BWT.

Holm's correction runs over each table's primary contrasts. Every model starts from the seed's random
initialisation (``torch.manual_seed(seed)`` before the transformers model is built); the sizes are small enough
for a CPU.

    python -m ablations language --seeds 0 1 2
    python -m ablations language --parts classifier --preset converged --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import hatnorm
from ablations import _cli, _runner
from ablations._protocol import Contrast
from ablations._report import SETTING, SHARED_HEAD_SETTING
from ablations._runner import Variant
from hatnorm import text_tasks
from hatnorm.data import Task
from hatnorm.training import FineTune, HATMethod

PARTS = ("causal", "classifier")
#: the generation tasks the causal table runs by default: every one the small model learns above chance at the
#: converged budget in docs/data.md (``add_mod`` is left out: not learned)
GENERATION = ("copy", "reverse", "sort", "count", "close")
#: per part: the HAT norms (masked first), the norm of SGD and joint training, and the primary metric
NORMS = {"causal": ("masked_rms", "shared_rms", "task_rms"), "classifier": ("masked_ln", "shared_ln", "task_ln")}
PLAIN = {"causal": "shared_rms", "classifier": "shared_ln"}
PRIMARY = {"causal": "average_accuracy", "classifier": "bwt"}
LABELS = {"masked_rms": "masked RMSNorm", "shared_rms": "shared RMSNorm", "task_rms": "per-task RMSNorm",
          "masked_ln": "masked LN", "shared_ln": "shared LN", "task_ln": "per-task LN"}
ARCH = {"causal": "LLaMA-style LM", "classifier": "BERT-style classifier"}


def llama_config(dim: int, depth: int, num_heads: int) -> LlamaConfig:
    """The causal table's model: RMSNorm, rotary positions, half as many kv heads as heads, SwiGLU 2·dim, over the
    benchmark's vocabulary."""
    return LlamaConfig(vocab_size=len(text_tasks.VOCABULARY), hidden_size=dim, intermediate_size=2 * dim,
                       num_hidden_layers=depth, num_attention_heads=num_heads,
                       num_key_value_heads=max(num_heads // 2, 1), pad_token_id=text_tasks.PAD,
                       tie_word_embeddings=False)


def bert_config(dim: int, depth: int, num_heads: int, length: int) -> BertConfig:
    """The classifier table's model: post-norm BERT, MLP 2·dim, positions for the longest sample, 2 labels."""
    return BertConfig(vocab_size=len(text_tasks.VOCABULARY), hidden_size=dim, num_hidden_layers=depth,
                      num_attention_heads=num_heads, intermediate_size=2 * dim, max_position_embeddings=length,
                      num_labels=2, pad_token_id=text_tasks.PAD)


def converted(build: Callable[[], nn.Module], *, causal: bool) -> Callable[[int, str, list[int], int], nn.Module]:
    """A variant's model: the seed's randomly initialised transformers model, converted with ``norm``."""

    def make(num_tasks: int, norm: str, num_classes: list[int], seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return hatnorm.convert(build().train(), num_tasks=num_tasks, norm=norm,
                               num_classes=None if causal else num_classes)

    return make


def table(part: str, make: Callable[[int, str, list[int], int], nn.Module], options: dict[str, Any], c: float
          ) -> tuple[list[Variant], list[Contrast]]:
    """One part's variants (HAT with each norm, then SGD) and its declared contrasts."""
    arch, norms, metric = ARCH[part], NORMS[part], PRIMARY[part]
    variants = [Variant(f"{arch} HAT {LABELS[n]}", arch, n, lambda: HATMethod(c=c), options, make=make)
                for n in norms]
    sgd = f"{arch} SGD"
    variants.append(Variant(sgd, arch, PLAIN[part], FineTune, options, make=make))
    masked = variants[0].label
    contrasts = [Contrast(masked, v.label, metric, primary=True) for v in variants[1:len(norms)]]
    contrasts.append(Contrast(masked, sgd))
    return variants, contrasts


def tasks_of(part: str, args: argparse.Namespace) -> Callable[[int], list[Task]]:
    """The part's task sequence for a seed (cached: every variant of a seed trains on the same samples)."""
    cache: dict[int, list[Task]] = {}

    def tasks(seed: int) -> list[Task]:
        if seed not in cache:
            if part == "causal":
                cache[seed] = text_tasks.generation_tasks(args.generation, seed=seed, train_size=args.train_size,
                                                          test_size=args.test_size)
            else:
                cache[seed] = text_tasks.classification_tasks(args.classification, seed=seed,
                                                              train_size=args.train_size, test_size=args.test_size)
        return cache[seed]

    return tasks


def main(argv: Sequence[str] | None = None) -> dict:
    p = _cli.parser("python -m ablations.language", __doc__.splitlines()[0],
                    budget=_cli.Budget(smoke=2, converged=15, optimizer="adamw", lr=3e-3), out="runs/language",
                    data=None)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="causal: a converted LlamaForCausalLM on the generation tasks (masked vs shared vs per-task "
                        "RMSNorm); classifier: a converted post-norm BertForSequenceClassification on the "
                        "classification tasks (masked vs shared vs per-task LayerNorm)")
    p.add_argument("--generation", nargs="+", choices=text_tasks.GENERATION_TASKS, default=list(GENERATION),
                   help="the causal table's tasks, in order")
    p.add_argument("--classification", nargs="+", choices=text_tasks.CLASSIFICATION_TASKS,
                   default=list(text_tasks.CLASSIFICATION_TASKS), help="the classifier table's tasks, in order")
    p.add_argument("--train-size", type=_cli.positive_int, default=1000, help="training samples per task")
    p.add_argument("--test-size", type=_cli.positive_int, default=300, help="test samples per task")
    p.add_argument("--dim", type=_cli.positive_int, default=64, help="width of the residual stream")
    p.add_argument("--depth", type=_cli.positive_int, default=2, help="number of blocks")
    p.add_argument("--num-heads", type=_cli.positive_int, default=4, help="attention heads")
    p.add_argument("--c", type=_cli.non_negative_float, default=0.75, help="HAT's capacity-regulariser weight")
    args = p.parse_args(argv)
    if args.dim % args.num_heads:
        p.error(f"--dim must be a multiple of --num-heads, got {args.dim} and {args.num_heads}")
    for name, values in (("--parts", args.parts), ("--generation", args.generation),
                         ("--classification", args.classification), ("--seeds", args.seeds)):
        if len(set(values)) != len(values):
            p.error(f"{name} must not repeat a value, got {' '.join(map(str, values))}")
    if args.weights is not None:
        p.error("--weights does not apply: the language models start from the seed's random initialisation")
    console = _cli.console()
    options = {"dim": args.dim, "depth": args.depth, "num_heads": args.num_heads}
    summaries = {}
    for part in args.parts:
        tasks = tasks_of(part, args)
        if part == "causal":
            config = llama_config(args.dim, args.depth, args.num_heads)
            make = converted(lambda config=config: LlamaForCausalLM(config), causal=True)
        else:
            length = max(t.train[0]["input_ids"].shape[0] for t in tasks(args.seeds[0]))
            config = bert_config(args.dim, args.depth, args.num_heads, length)
            make = converted(lambda config=config: BertForSequenceClassification(config), causal=False)
        variants, contrasts = table(part, make, options, args.c)
        names = args.generation if part == "causal" else args.classification
        title = (f"{ARCH[part]} under HAT (synthetic text, {len(names)} tasks: {', '.join(names)}; "
                 f"{_cli.seeds_text(args.seeds)})")
        part_args = copy.copy(args)
        part_args.out = args.out / part
        summaries[part] = _runner.run_and_report(variants, tasks, part_args, console, title=title,
                                                 contrasts=contrasts, parser_=p, joint_norm={ARCH[part]: PLAIN[part]},
                                                 setting=SHARED_HEAD_SETTING if part == "causal" else SETTING)
    return summaries


if __name__ == "__main__":
    main()
