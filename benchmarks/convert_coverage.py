"""Which models ``hatnorm.convert`` takes: every torchvision classification builder, one builder of every timm
model family (each module of ``timm.models`` that registers classifiers; its smallest builder, by parameters), every
transformers ``*ForImageClassification`` class (a small config) and transformers' language models (source
``transformers-text``: the BERT, DistilBERT, RoBERTa, GPT-2, Llama, Qwen2 and Mistral sequence classifiers and the
GPT-2, Llama, Qwen2 and Mistral language models, each from a small config), each tried as a user would bring it.

For every model: random weights with filled norm statistics (non-trivial γ, β and running statistics), saved as a
state dict and loaded into a fresh instance; then three checks, each only if the previous passed:

1. **converts**: ``hatnorm.convert(model, num_tasks=2, norm=NORM, example_input=x)`` with a norm per kind (masked BN,
   masked LN, masked GN, masked RMSNorm) and ``hatnorm.HAT`` accepts it (every parameter covered);
2. **open gates**: with every gate open the converted model reproduces the original's outputs in
   evaluation mode (max |Δ| ≤ 1e-5 relative to the output scale, invariant 7);
3. **no forgetting**: two tasks, a few AdamW steps each (weight decay 0.05), leave task 0's outputs
   bit-identical (invariant 5).

A vision model takes images; a language model takes token ids and their attention mask (every other row padded on
the right), a classifier learns class labels per task (heads of 3 and 4 classes) and a language model the next token
over its one shared vocabulary, its outputs the logits at every position.

    python benchmarks/convert_coverage.py                          # everything (long: tens of minutes)
    python benchmarks/convert_coverage.py --sources torchvision --only resnet18 mobilenet_v3_small
    python benchmarks/convert_coverage.py --sources timm --only sknet hrnet      # timm families (or builders)
    python benchmarks/convert_coverage.py --sources transformers-text            # the language models (two minutes)
    python benchmarks/convert_coverage.py --markdown               # also write the table into the docs
    python benchmarks/convert_coverage.py --model mypackage.models:build_net --size 32   # your own model

A model that fails names its stage and the first line of the error (a ``ConversionError`` names the module).
Each model runs in a process of its own (started from a clean fork server), so the largest builders give their
memory back before the next one and a model killed by the operating system still gets its row.
Results are merged into ``benchmarks/results/convert_coverage.json`` (a row per source and model, written as each
model finishes: this run's rows replace those of the same models, the others stay, with each run's command, commit,
machine, date and start) and, with
``--markdown``, into the table of ``docs/architectures.md`` between the coverage markers the same way: this run's
rows and its sources' summary lines replace theirs, every other line stays as it is.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import io
import json
import multiprocessing
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from run import cpu_model
from torch import nn

import hatnorm
from hatnorm.data import IGNORE_INDEX

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "convert_coverage.json"
#: the timm and transformers rows (their runs write here with ``--out``); a timm family's builder is taken from them
FAMILY_RESULTS = ROOT / "benchmarks" / "results" / "convert_coverage_families.json"
DOC = ROOT / "docs" / "architectures.md"
BEGIN, END = "<!-- coverage:begin -->", "<!-- coverage:end -->"
#: the norm for each kind of torch norm the models hold
NORM = {"batch": "masked_bn", "layer": "masked_ln", "group": "masked_gn", "rms": "masked_rms"}
CLASSES = 10
#: transformers image classifiers whose small config is written out here (the rest shrink their default config)
TRANSFORMERS_CONFIGS = ["ViTForImageClassification", "DeiTForImageClassification", "ConvNextForImageClassification",
                        "ResNetForImageClassification", "SwinForImageClassification", "Swinv2ForImageClassification",
                        "BeitForImageClassification", "Data2VecVisionForImageClassification",
                        "Dinov2ForImageClassification", "ConvNextV2ForImageClassification",
                        "FocalNetForImageClassification", "SegformerForImageClassification",
                        "MobileViTV2ForImageClassification", "ShieldGemma2ForImageClassification"]
#: transformers language models (source ``transformers-text``): sequence classifiers and causal language models
TEXT_CLASSES = ["BertForSequenceClassification", "DistilBertForSequenceClassification",
                "RobertaForSequenceClassification", "GPT2ForSequenceClassification", "GPT2LMHeadModel",
                "LlamaForCausalLM", "LlamaForSequenceClassification", "Qwen2ForCausalLM",
                "Qwen2ForSequenceClassification", "MistralForCausalLM", "MistralForSequenceClassification"]
#: the token ids every language model of ``transformers-text`` reads: its vocabulary and the sequence length
VOCAB, LENGTH = 64, 12
#: the package each source imports, loaded once by the fork server
PACKAGES = {"torchvision": "torchvision", "timm": "timm", "transformers": "transformers",
            "transformers-text": "transformers"}


@dataclass
class Row:
    source: str
    model: str
    stage: str  # "passed", or the check that failed: "build", "convert", "open gates", "no forgetting"
    detail: str
    seconds: float


def filled(model: nn.Module) -> nn.Module:
    """Random non-trivial norm state, as trained weights have, saved and reloaded like a user's checkpoint (an
    RMSNorm of transformers' own, ``LlamaRMSNorm`` and the like, included)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            norm = isinstance(m, nn.modules.batchnorm._BatchNorm | nn.LayerNorm | nn.GroupNorm | nn.RMSNorm) or \
                type(m).__name__.endswith("RMSNorm")
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                if not norm or not isinstance(p, torch.Tensor):
                    continue
                if name == "weight":
                    p.uniform_(0.8, 1.2)
                else:
                    p.normal_(0, 0.05)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    model.load_state_dict(torch.load(buffer, weights_only=True))
    return model.eval()


def logits(output: object) -> object:
    """A model's logits: transformers' output objects name them ``logits``; one with no such field (PPLCNet's
    ``BaseModelOutputWithNoAttention``, the converted model's dict of the same fields) holds them first."""
    if hasattr(output, "logits"):
        return output.logits
    return next(iter(output.values())) if isinstance(output, Mapping) else output


Batch = torch.Tensor | dict[str, torch.Tensor]  # images, or a language model's named inputs


def call(model: nn.Module, batch: Batch, **options: object) -> object:
    """``model`` on ``batch``: images as its input, a language model's inputs by name."""
    return model(**batch, **options) if isinstance(batch, dict) else model(batch, **options)


@dataclass(frozen=True)
class Images:
    """What a vision model is fed: ``[n, 3, size, size]`` images (task t's shifted by t) and class labels."""

    size: int
    causal = False  # a classifier: a head per task

    def probe(self) -> torch.Tensor:
        return torch.randn(2, 3, self.size, self.size)

    def batch(self, n: int, task: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, 3, self.size, self.size) + task, torch.randint(classes, (n,))


@dataclass(frozen=True)
class Tokens:
    """What a language model is fed: ``[n, LENGTH]`` token ids (none of the first three, which are special in every
    config here), every other row padded with ``pad`` over its last third, and their attention mask; labels are a
    class per row for a classifier, the next token at every real position for a causal language model
    (``causal``)."""

    vocab: int
    pad: int
    causal: bool

    def probe(self) -> dict[str, torch.Tensor]:
        return self.batch(2, 0, CLASSES)[0]

    def batch(self, n: int, task: int, classes: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        ids = torch.randint(3, self.vocab, (n, LENGTH))
        mask = torch.ones_like(ids)
        mask[1::2, LENGTH * 2 // 3:] = 0
        ids = ids.masked_fill(mask == 0, self.pad)
        if self.causal:
            labels = F.pad(ids.masked_fill(mask == 0, IGNORE_INDEX)[:, 1:], (0, 1), value=IGNORE_INDEX)
        else:
            labels = torch.randint(classes, (n,))
        return {"input_ids": ids, "attention_mask": mask}, labels


@dataclass(frozen=True)
class PixelTokens:
    """What an image classifier over pixel tokens is fed (ImageGPT: colour-cluster ids, one per pixel): ``[n,
    LENGTH]`` token ids of its vocabulary (task t's drawn from a range shifted by t) and class labels."""

    vocab: int
    causal = False

    def probe(self) -> torch.Tensor:
        return self.batch(2, 0, CLASSES)[0]

    def batch(self, n: int, task: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        low = min(task, self.vocab - 2)
        return torch.randint(low, self.vocab, (n, LENGTH)), torch.randint(classes, (n,))


@dataclass(frozen=True)
class Patches:
    """What a classifier over flattened patches is fed (Siglip2: NaFlex patches): ``[n, side², features]`` patches
    (task t's shifted by t), every patch valid in ``pixel_attention_mask`` and the ``spatial_shapes`` of the
    ``side``×``side`` grid they come from, by name; and class labels."""

    side: int
    features: int
    causal = False

    def probe(self) -> dict[str, torch.Tensor]:
        return self.batch(2, 0, CLASSES)[0]

    def batch(self, n: int, task: int, classes: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        patches = torch.randn(n, self.side ** 2, self.features) + task
        return {"pixel_values": patches, "pixel_attention_mask": torch.ones(n, self.side ** 2, dtype=torch.long),
                "spatial_shapes": torch.tensor([[self.side, self.side]] * n)}, torch.randint(classes, (n,))


Feed = Images | Tokens | PixelTokens | Patches


def torchvision_models(only: list[str] | None = None) -> list[tuple[str, Callable[[], nn.Module], int]]:
    import torchvision

    models = []
    for name in torchvision.models.list_models(module=torchvision.models):
        size = 299 if name == "inception_v3" else 224 if name.startswith(("vit_", "swin", "maxvit")) else 64
        options = {"aux_logits": True, "init_weights": True} if name in ("inception_v3", "googlenet") else {}
        if name == "vit_h_14":  # 632 M parameters: at 112×112 (65 tokens) its AdamW check fits in 24 GiB
            size, options = 112, {"image_size": 112}
        models.append((name, lambda name=name, options=options: torchvision.models.get_model(
            name, weights=None, num_classes=CLASSES, **options), size))
    return [model for model in models if not only or model[0] in only]


def timm_families(only: list[str] | None = None, chosen: dict[str, str] | None = None) -> dict[str, str]:
    """Every timm model family (a module of ``timm.models`` that registers classifiers) → its smallest builder (the
    fewest parameters, counted on the meta device); with ``only``, the families named there (or holding a builder
    named there). A family's builder in ``chosen`` (an earlier run's choice, :func:`earlier_builders`) is taken as it
    is while the family still registers it, without building the family's builders again."""
    import timm

    families = {}
    for family in timm.list_modules():
        names = timm.list_models(module=family)
        if not names or (only and family not in only and not set(names) & set(only)):
            continue
        if chosen and chosen.get(family) in names:
            families[family] = chosen[family]
            continue
        sizes = {}
        for name in names:
            try:
                with torch.device("meta"):
                    sizes[name] = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
            except Exception:  # a builder that cannot be built with its defaults is not the family's smallest
                continue
        if sizes:
            families[family] = min(sizes, key=lambda name: (sizes[name], name))
    return families


def earlier_builders(*paths: Path) -> dict[str, str]:
    """The builder each timm family was checked with in the results at ``paths`` (rows named ``family/builder``)."""
    chosen = {}
    for path in paths:
        if path.exists():
            for row in json.loads(path.read_text()).get("rows", []):
                family, slash, name = row["model"].partition("/")
                if row["source"] == "timm" and slash:
                    chosen.setdefault(family, name)
    return chosen


def timm_models(only: list[str] | None = None, chosen: dict[str, str] | None = None
                ) -> list[tuple[str, Callable[[], nn.Module], int | None]]:
    """One builder per timm family, named ``family/builder`` (``chosen``: see :func:`timm_families`); its input size
    is found when it is checked."""
    return [(f"{family}/{name}", lambda name=name: timm_builder(name), None)
            for family, name in timm_families(only, chosen).items()]


def timm_builder(name: str) -> nn.Module:
    """The timm builder ``name`` at random init, with the options of :data:`TIMM_OPTIONS` where it is named there."""
    import timm

    return timm.create_model(name, pretrained=False, num_classes=CLASSES, **TIMM_OPTIONS.get(name, {}))


#: timm builders checked with fewer blocks than they have: DeepSeek's ViT (32 blocks of width 1,024, 412 M parameters,
#: the family's only classifier) took more than 21 GiB in its checks and was killed for memory in this machine's 24 GiB;
#: 4 of its blocks (52 M parameters) hold every operation the 32 do
TIMM_OPTIONS: dict[str, dict[str, int]] = {"deepseek_vit_412m": {"depth": 4}}


#: timm builders checked below their pretrained config's input size: NASNet-A Large (85 M parameters) at 331×331 is
#: killed for memory in this machine's 24 GiB (its AdamW check: gradients, two moments, the frozen snapshot and the
#: activations of 331×331 images); at 96×96 its last cells still see 3×3 pixels. Gemma 4's ViT (167 M parameters) at
#: 224×224 (196 tokens) is killed for memory beside other runs; at 112×112, 49 tokens. Qwen3's ViT (88 M parameters) at
#: its 768×768 (2,304 tokens) took more than 19 GiB in its checks and was killed; at 224×224, 196 tokens
TIMM_SIZES = {"nasnetalarge": 96, "gemma4_vit_167m": 112, "qwen3_vit_88m": 224}


def timm_size(name: str) -> int:
    """The input size the builder was made for (its pretrained config's), 224 when it names none; the size of
    :data:`TIMM_SIZES` for the builders named there."""
    import timm

    if name in TIMM_SIZES:
        return TIMM_SIZES[name]
    config = timm.get_pretrained_cfg(name)
    return int(config.input_size[-1]) if config is not None and config.input_size else 224


def transformers_classes() -> list[str]:
    import transformers

    return sorted(name for name in dir(transformers) if name.endswith("ForImageClassification")
                  and not name.startswith(("Auto", "TF", "Flax")))


def small_config(name: str) -> object:
    """A small config for the transformers image classifier ``name``: written out for the models of
    :data:`TRANSFORMERS_CONFIGS`, else the default config with its sizes shrunk (fewer, narrower layers; 32×32
    images), or the default config itself when the shrunk one does not build."""
    import transformers

    small = {"num_labels": CLASSES, "image_size": 32}
    encoder = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128, **small}
    written = {
        "ViTForImageClassification": lambda: transformers.ViTConfig(patch_size=4, **encoder),
        "DeiTForImageClassification": lambda: transformers.DeiTConfig(patch_size=4, **encoder),
        "ConvNextForImageClassification": lambda: transformers.ConvNextConfig(hidden_sizes=[16, 32, 64, 128],
                                                                              depths=[1, 1, 1, 1], **small),
        "ResNetForImageClassification": lambda: transformers.ResNetConfig(hidden_sizes=[16, 32, 64, 128],
                                                                          depths=[1, 1, 1, 1], embedding_size=16,
                                                                          **small),
        "SwinForImageClassification": lambda: transformers.SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                                                      window_size=4, patch_size=4, **small),
        "Swinv2ForImageClassification": lambda: transformers.Swinv2Config(embed_dim=16, depths=[2, 2],
                                                                          num_heads=[2, 2], window_size=4,
                                                                          patch_size=4, **small),
        "BeitForImageClassification": lambda: transformers.BeitConfig(patch_size=4, **encoder),
        "Data2VecVisionForImageClassification": lambda: transformers.Data2VecVisionConfig(patch_size=4, **encoder),
        "Dinov2ForImageClassification": lambda: transformers.Dinov2Config(patch_size=4, **encoder),
        "ConvNextV2ForImageClassification": lambda: transformers.ConvNextV2Config(hidden_sizes=[16, 32, 64, 128],
                                                                                  depths=[1, 1, 1, 1], **small),
        "FocalNetForImageClassification": lambda: transformers.FocalNetConfig(embed_dim=16, depths=[1, 1],
                                                                              patch_size=4, **small),
        # 64×64: at 32×32 its last stage's map is 1×1, smaller than its 2×2 patches
        "MobileViTV2ForImageClassification": lambda: transformers.MobileViTV2Config(
            width_multiplier=0.5, num_labels=CLASSES, image_size=64),
        # its default (a 2.3 G-parameter Gemma 3 over SigLIP) is killed for memory: a text model and a vision tower
        # as small as the language models' here
        "ShieldGemma2ForImageClassification": lambda: transformers.ShieldGemma2Config(
            num_labels=CLASSES, mm_tokens_per_image=4,
            text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "head_dim": 8, "vocab_size": VOCAB},
            vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "image_size": 32, "patch_size": 4}),
        "SegformerForImageClassification": lambda: transformers.SegformerConfig(
            num_encoder_blocks=2, depths=[2, 2], sr_ratios=[2, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2],
            patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2], **small),
    }
    if name in written:
        return written[name]()
    classifier = getattr(transformers, name)
    config = classifier.config_class(num_labels=CLASSES)
    shrunk = copy.deepcopy(config)
    for key, value in {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
                       "image_size": 32, "embed_dim": 16, "embedding_size": 16}.items():
        if isinstance(getattr(shrunk, key, None), int):
            setattr(shrunk, key, value)
    for key in ("depths", "num_layers", "layers"):
        if isinstance(getattr(shrunk, key, None), list):
            setattr(shrunk, key, [1] * len(getattr(shrunk, key)))
    try:
        with torch.device("meta"):
            classifier(shrunk)
    except Exception:  # the shrunk sizes break one of the model's own constraints
        return config
    return shrunk


def transformers_models(only: list[str] | None = None) -> list[tuple[str, Callable[[], nn.Module], int | None]]:
    return [(name, lambda name=name: transformers_builder(name), None) for name in transformers_classes()
            if not only or name in only]


def transformers_builder(name: str) -> nn.Module:
    """The image classifier ``name`` from its small config, keeping no key-value cache (ImageGPT's would be an
    output of its forward): a classifier reads its logits alone."""
    import transformers

    config = small_config(name)
    if getattr(config, "use_cache", None):
        config.use_cache = False
    return getattr(transformers, name)(config)


def transformers_feed(name: str) -> Feed:
    """What the image classifier ``name`` takes: images of its small config's size, ImageGPT's pixel token ids of
    its vocabulary, Siglip2's patches of a 4×4 grid with their mask and grid shape."""
    config = small_config(name)
    if name == "ImageGPTForImageClassification":
        return PixelTokens(config.vocab_size)
    if name == "Siglip2ForImageClassification":
        return Patches(4, config.vision_config.num_channels * config.vision_config.patch_size ** 2)
    return Images(transformers_size(name))


def transformers_size(name: str) -> int:
    size = getattr(small_config(name), "image_size", 224)
    return int(size[-1] if isinstance(size, list | tuple) else size)


def text_config(name: str) -> object:
    """A small config for the transformers language model ``name`` (hidden 32, 2 layers, 4 heads, the LLaMA family's
    over 2 key-value heads; vocabulary :data:`VOCAB`; 10 labels; padding id 0 where the default names none, RoBERTa's
    1; GPT-2's begin and end ids 1 and 2, inside the vocabulary), every other option the config's default."""
    import transformers

    family = name.removesuffix("ForSequenceClassification").removesuffix("LMHeadModel").removesuffix("ForCausalLM")
    sizes = {"vocab_size": VOCAB, "num_labels": CLASSES}
    encoder = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
               "max_position_embeddings": 4 * LENGTH, **sizes}
    return {
        "Bert": lambda: transformers.BertConfig(**encoder),
        "Roberta": lambda: transformers.RobertaConfig(**encoder),
        "DistilBert": lambda: transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                            max_position_embeddings=4 * LENGTH, **sizes),
        "GPT2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=4 * LENGTH,
                                                pad_token_id=0, bos_token_id=1, eos_token_id=2, **sizes),
        "Llama": lambda: transformers.LlamaConfig(num_key_value_heads=2, pad_token_id=0, **encoder),
        "Qwen2": lambda: transformers.Qwen2Config(num_key_value_heads=2, pad_token_id=0, **encoder),
        "Mistral": lambda: transformers.MistralConfig(num_key_value_heads=2, pad_token_id=0, **encoder),
    }[family]()


def text_models(only: list[str] | None = None) -> list[tuple[str, Callable[[], nn.Module], int | None]]:
    return [(name, lambda name=name: text_builder(name), None) for name in TEXT_CLASSES if not only or name in only]


def text_builder(name: str) -> nn.Module:
    import transformers

    return getattr(transformers, name)(text_config(name))


def text_feed(name: str) -> Tokens:
    return Tokens(VOCAB, text_config(name).pad_token_id, causal=name.endswith(("LMHeadModel", "ForCausalLM")))


SOURCES = {"torchvision": torchvision_models, "timm": timm_models, "transformers": transformers_models,
           "transformers-text": text_models}


def builder(spec: str) -> Callable[[], nn.Module]:
    """The function ``spec`` names, ``package.module:function`` or ``path/to/file.py:function``, called with
    ``num_classes``: a model of one's own to check."""
    where, colon, name = spec.rpartition(":")
    if not colon or not where or not name.isidentifier():
        raise ValueError(f"--model must be MODULE:FUNCTION or FILE.py:FUNCTION, got {spec!r}")
    if where.endswith(".py"):
        found = importlib.util.spec_from_file_location(Path(where).stem, where)
        if found is None or found.loader is None:
            raise ValueError(f"--model: cannot load {where!r}")
        module = importlib.util.module_from_spec(found)
        found.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    function = getattr(module, name)
    return lambda: function(num_classes=CLASSES)


def first_line(error: BaseException) -> str:
    """The error's type and the first line of its message that says something (transformers' ImportError for a
    missing backend starts with an empty line)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}".strip()[:300]


def check(make: Callable[[], nn.Module], feed: Feed, steps: int) -> tuple[str, str]:
    """The first check that fails, and why; ``("passed", max |Δ|)`` when all three hold."""
    torch.manual_seed(0)
    try:
        original = filled(make())
    except Exception as error:  # a builder that does not run here is not a conversion result
        return "build", first_line(error)
    x = feed.probe()
    example = x if isinstance(x, torch.Tensor) else None  # a language model converts by its structure
    try:
        model = hatnorm.convert(original, num_tasks=2, norm=NORM, example_input=example)
        hatnorm.HAT(model)  # every parameter covered
    except Exception as error:
        return "convert", first_line(error)
    try:
        hatnorm.open_gates(model)
        with torch.no_grad():
            expected = logits(call(original, x))
            got = logits(call(model.eval(), x, task=1))
        gap = float((got - expected).abs().max() / expected.abs().max().clamp_min(1.0))
    except Exception as error:
        return "open gates", first_line(error)
    if not gap <= 1e-5:
        return "open gates", f"max |Δ| / max |y| = {gap:.2e} > 1e-5"
    del model, expected, got  # the largest builders need this memory for the second conversion
    try:
        # a causal language model keeps its one head over the shared vocabulary
        trainee = hatnorm.convert(original, num_tasks=2, norm=NORM, num_classes=None if feed.causal else [3, 4],
                                  example_input=example)
        del original
        moved = forgetting(trainee, x, feed, steps)
    except Exception as error:
        return "no forgetting", first_line(error)
    if moved:
        return "no forgetting", f"task 0's outputs moved by {moved:.2e}"
    return "passed", f"max |Δ| / max |y| = {gap:.1e}"


def forgetting(model: hatnorm.HATModule, probe: Batch, feed: Feed, steps: int) -> float:
    """How far task 0's outputs on ``probe`` move when task 1 is learned (AdamW, weight decay) by ``model``,
    converted with heads of 3 and 4 classes (a causal language model: its one head over the vocabulary): 0.0 when
    they do not."""
    hat = hatnorm.HAT(model)
    # one parameter at a time (foreach=False): the same update without a second copy of the largest models
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, foreach=False)
    outputs = []
    for task, classes in enumerate([3, 4]):
        hat.begin_task(task)
        model.train()
        for b in range(steps):
            s = hat.scale(b, steps)
            batch, labels = feed.batch(4, task, classes)
            output = logits(call(model, batch, task=task, s=s))
            # a model with auxiliary classifiers returns their logits too in training: all of them learn
            every = [output] if isinstance(output, torch.Tensor) else list(output)
            # a language model's logits at every position: one prediction per position
            loss = hat.loss(sum(F.cross_entropy(o.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX)
                                for o in every), s)
            optimizer.zero_grad()
            loss.backward()
            hat.protect(s)
            hat.step(optimizer)
        hat.end_task()
        with torch.no_grad():
            outputs.append(logits(call(model.eval(), probe, task=0)))
    return float((outputs[0] - outputs[1]).abs().max())


def check_in_child(source: str, name: str, size: int | None, steps: int, answer: Connection) -> None:
    """:func:`check` one model in this (child) process and send back its stage and detail; a model of one's
    own (``source`` ``"own"``, ``name`` its ``--model`` spec) at ``size`` pixels. No time limit runs here: the
    parent stops a child that takes too long (an alarm raised inside the model's code could surface as any error,
    a ``ConversionError`` of the walk or a half-finished import, and hide that the limit fired)."""
    try:
        if source == "own":
            make, feed = builder(name), Images(size)
        elif source == "timm":
            builder_name = name.partition("/")[2]
            make, feed = (lambda: timm_builder(builder_name)), Images(timm_size(builder_name))
        elif source == "transformers":
            make, feed = (lambda: transformers_builder(name)), transformers_feed(name)
        elif source == "transformers-text":
            make, feed = (lambda: text_builder(name)), text_feed(name)
        else:
            make, size = {n: (m, s) for n, m, s in torchvision_models([name])}[name]
            feed = Images(size)
        result = check(make, feed, steps)
    except Exception as error:  # a crash in the script itself still gets its row
        result = "error", first_line(error) + " " + traceback.format_exc(limit=1).splitlines()[-1]
    answer.send(result)


def check_apart(context: BaseContext, source: str, name: str, size: int | None, steps: int, timeout: int
                ) -> tuple[str, str]:
    """:func:`check` one model in a process of its own; its memory is returned to the system when it ends. The
    time limit is this process's: a child with no answer ``timeout`` seconds (wall clock) after it started is
    stopped and its row says timeout, whatever it was doing; an answer in time is its row."""
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=check_in_child, args=(source, name, size, steps, send), daemon=True)
    child.start()
    send.close()
    try:
        result = receive.recv() if receive.poll(timeout) else None
    except EOFError:  # the child ended without an answer
        result = None
    child.join(10)
    stopped = child.is_alive()  # no answer in time
    if stopped:
        child.kill()
        child.join()
    if result is not None:
        return result
    if child.exitcode is not None and child.exitcode < 0 and not stopped:
        why = "out of memory?" if -child.exitcode == signal.SIGKILL else signal.Signals(-child.exitcode).name
        return "error", f"the process checking it was killed by signal {-child.exitcode} ({why})"
    return "timeout", f"more than {timeout} s"


#: a row of the docs' table and a source's summary line above it, as :func:`row_line` and :func:`summary` write them
ROW_LINE = re.compile(r"^\| (?P<source>[^|`]+?) \| `(?P<model>[^`]+)` \| (?P<result>[^|]+?) \|")
SUMMARY_LINE = re.compile(r"^- \*\*(?P<source>[^*]+)\*\*: ")


def merged(old: list[tuple[tuple[str, ...], object]], new: list[tuple[tuple[str, ...], object]]) -> list:
    """The items of ``old`` with each item of ``new`` in place of the one of its key; an item of a new key goes after
    the last item of its source (the key's first part), or at the end."""
    items = list(old)
    for key, item in new:
        keys = [k for k, _ in items]
        if key in keys:
            items[keys.index(key)] = (key, item)
        else:
            same = [i for i, k in enumerate(keys) if k[0] == key[0]]
            items.insert(same[-1] + 1 if same else len(items), (key, item))
    return [item for _, item in items]


def row_line(r: Row) -> str:
    detail = r.detail.replace("|", "\\|")
    return f"| {r.source} | `{r.model}` | {'✓' if r.stage == 'passed' else 'fails at ' + r.stage} | {detail} |"


def summary(source: str, lines: list[str], run: str) -> str:
    """The summary line of ``source`` counted over the table ``lines`` (its rows), naming the ``run`` that measured
    its rows."""
    results = [m["result"] for m in map(ROW_LINE.match, lines) if m and m["source"] == source]
    tried = [r for r in results if r != "fails at build"]
    return (f"- **{source}**: {tried.count('✓')} of {len(tried)} pass all three checks"
            + (f" ({len(results) - len(tried)} could not be built here)" if len(results) > len(tried) else "")
            + f"; measured by {run}")


def markdown(block: str, rows: list[Row], run: str) -> str:
    """The coverage block ``block`` of the docs with ``rows`` merged into its table by source and model and the
    summary lines of their sources (counted over the merged table) in place of theirs; every other line as it was.
    An empty block gets a summary and a table."""
    lines = block.strip("\n").splitlines()
    at = [i for i, line in enumerate(lines) if ROW_LINE.match(line)]
    table = merged([((m["source"], m["model"]), m.string) for m in map(ROW_LINE.match, lines) if m],
                   [((r.source, r.model), row_line(r)) for r in rows])
    if at:
        lines[at[0]:at[-1] + 1] = table
    else:
        lines += ["", "| source | model | result | detail |", "|---|---|---|---|", *table]
    at = [i for i, line in enumerate(lines) if SUMMARY_LINE.match(line)]
    summaries = merged([((m["source"],), m.string) for m in map(SUMMARY_LINE.match, lines) if m],
                       [((source,), summary(source, table, run)) for source in dict.fromkeys(r.source for r in rows)])
    if at:
        lines[at[0]:at[-1] + 1] = summaries
    else:
        lines[:0] = ["Measured by `python benchmarks/convert_coverage.py`:", "", *summaries]
    return "\n".join(lines)


def this_run(argv: list[str], machine: str) -> dict[str, str]:
    """The command, the commit it ran on (and whether hatnorm/ or this script had uncommitted edits), the machine,
    the date and the time it started."""
    def git(*command: str) -> str:
        done = subprocess.run(["git", *command], capture_output=True, text=True, cwd=ROOT)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--", "hatnorm", "benchmarks/convert_coverage.py"):
        commit += " with uncommitted edits"
    now = datetime.now(UTC)
    return {"command": " ".join(["python benchmarks/convert_coverage.py", *argv]), "commit": commit,
            "machine": machine, "date": now.strftime("%Y-%m-%d"), "started": now.strftime("%Y-%m-%dT%H:%M:%SZ")}


def write_results(path: Path, rows: list[Row], run: dict[str, str]) -> None:
    """Merge ``rows`` into the results at ``path`` (by source and model) and add ``run`` to its runs, or put it in
    place of the run of the same start (a run writes its rows as each model finishes)."""
    data = json.loads(path.read_text()) if path.exists() else {}
    old = [Row(**r) for r in data.get("rows", [])]
    runs = data.get("runs", [{"machine": data["machine"], "sources": sorted({r.source for r in old})}]
                    if "machine" in data else [])
    runs = [r for r in runs if "started" not in run or r.get("started") != run["started"]]
    data.pop("machine", None)
    data |= {"norm": NORM, "runs": [*runs, {**run, "sources": list(dict.fromkeys(r.source for r in rows))}],
             "rows": [asdict(r) for r in merged([((r.source, r.model), r) for r in old],
                                                [((r.source, r.model), r) for r in rows])]}
    path.parent.mkdir(parents=True, exist_ok=True)
    written = path.with_name(path.name + ".part")  # replaced whole: a run stopped while writing leaves the last rows
    written.write_text(json.dumps(data, indent=2))
    written.replace(path)


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(prog="python benchmarks/convert_coverage.py", description=__doc__.splitlines()[0])
    p.add_argument("--sources", nargs="+", choices=list(SOURCES), default=list(SOURCES), help="model sources")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help="only these models")
    p.add_argument("--model", nargs="+", default=[], metavar="MODULE:FUNCTION",
                   help="models of your own: a function (in a module or a .py file) taking num_classes; with "
                        "only --model, no library's models are tried")
    p.add_argument("--size", type=int, default=64, help="the input size (pixels) for --model models")
    p.add_argument("--steps", type=int, default=2, help="AdamW steps per task in the no-forgetting check")
    p.add_argument("--timeout", type=int, default=300, help="seconds one model may take")
    p.add_argument("--choose-again", action="store_true",
                   help="find each timm family's smallest builder by building them all (on the meta device) rather "
                        "than take the builder of its row in --out or in the timm and transformers results")
    p.add_argument("--out", type=Path, default=RESULTS,
                   help="the JSON results file this run's rows are merged into (by source and model)")
    p.add_argument("--markdown", action="store_true",
                   help="merge this run's rows into the table of --doc between the coverage markers")
    p.add_argument("--doc", type=Path, default=DOC, help="the Markdown file --markdown writes into")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.model and "--sources" not in argv:
        args.sources = []
    for spec in args.model:
        try:
            builder(spec)
        except (ValueError, ImportError, AttributeError) as error:
            p.error(f"--model {spec}: {error}")
    console = Console()
    machine = f"{cpu_model()}, torch {torch.__version__}"
    rows: list[Row] = []
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "hatnorm", *dict.fromkeys(PACKAGES[s] for s in args.sources)])
    jobs = []  # (source, the model's name, the input size of a model of one's own)
    chosen = {} if args.choose_again else earlier_builders(args.out, FAMILY_RESULTS)
    for source in args.sources:
        try:
            candidates = timm_models(args.only, chosen) if source == "timm" else SOURCES[source](args.only)
        except ImportError as error:
            console.print(f"[yellow]{source}: not installed ({error}); skipped[/yellow]")
            continue
        jobs += [(source, name, None) for name, _, _ in candidates]
    jobs += [("own", spec, args.size) for spec in args.model]
    run = this_run(argv, machine)
    for source, name, size in jobs:
        started = time.perf_counter()
        stage, detail = check_apart(context, source, name, size, args.steps, args.timeout)
        rows.append(Row(source, name, stage, detail, time.perf_counter() - started))
        mark = "[green]passed[/green]" if stage == "passed" else f"[red]{stage}[/red]"
        console.print(f"{source} {name}: {mark} {detail} ({rows[-1].seconds:.1f} s)", highlight=False)
        write_results(args.out, rows, run)  # each row as its model finishes: a run stopped early keeps them
    table = Table(title=f"convert coverage ({machine})")
    for column in ("source", "tried", "pass all three", "convert", "open gates", "no forgetting"):
        table.add_column(column, justify="left" if column == "source" else "right")
    for source in dict.fromkeys(r.source for r in rows):
        part = [r for r in rows if r.source == source and r.stage != "build"]
        table.add_row(source, str(len(part)), str(sum(r.stage == "passed" for r in part)),
                      *(str(sum(r.stage == s for r in part)) for s in ("convert", "open gates", "no forgetting")))
    console.print(table)
    console.print(f"merged {len(rows)} rows into {args.out}")
    if args.markdown:
        text = args.doc.read_text()
        if BEGIN not in text or END not in text:
            raise SystemExit(f"--doc: {args.doc} has no {BEGIN} … {END} markers")
        head, rest = text.split(BEGIN, 1)
        block, tail = rest.split(END, 1)
        described = f"`{run['command']}` at commit {run['commit']} ({run['machine']}, {run['date']})"
        args.doc.write_text(head + BEGIN + "\n" + markdown(block, rows, described) + "\n" + END + tail)
        console.print(f"merged the rows into the table of {args.doc}")
    return rows


if __name__ == "__main__":
    main()
