"""The language section: a LLaMA-style causal LM of about 20M parameters converted with :func:`hatnorm.convert`,
its HAT training step (AdamW) against the unconverted transformers ``LlamaForCausalLM`` with the same weights on the
same token ids, and inference of one task's export against the plain model's.

The model (``SIZES``): hidden 384, 6 layers, 6 heads of 64 over 2 kv heads, SwiGLU 1536, a vocabulary of 8192 with
an untied LM head, sequences of 128 tokens, batch 8 (``--quick``: hidden 64, 2 layers, vocabulary 512, 32 tokens).
Both steps compute the same next-token cross-entropy from the logits; the plain model runs without its key/value
cache (``use_cache=False``), the cheaper of its two calls. The export is timed twice: task 1 as trained (the units it
does not use removed), and the same model with every gate open (nothing removed: the cost of the exported forward
itself).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from harness import Clock, Compiler
from rows import Ratio, Row
from steps import BATCHES_PER_EPOCH, SCALES, SCHEDULE_POINTS, epoch_of, schedule_scales
from torch import Tensor, nn

import hatnorm

SIZES = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 6, "num_key_value_heads": 2,
         "intermediate_size": 1536, "vocab_size": 8192, "length": 128, "batch": 8}
QUICK_SIZES = SIZES | {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
                       "vocab_size": 512, "length": 32}
TARGETS = {"step": 1.15, "export": 1.0}  # issue 30: a HAT step / plain, an export / plain inference


def plain_llama(sizes: dict[str, int], device: torch.device) -> nn.Module:
    """The transformers ``LlamaForCausalLM`` of ``sizes``, seeded, untied head, no dropout."""
    import transformers  # an optional dependency: only this section needs it

    config = transformers.LlamaConfig(
        **{k: v for k, v in sizes.items() if k not in ("length", "batch")}, max_position_embeddings=sizes["length"],
        tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(device)


def tokens(sizes: dict[str, int], device: torch.device) -> tuple[Tensor, Tensor]:
    """Fixed token ids ``[batch, length]`` and their attention mask (every token real)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, sizes["vocab_size"], (sizes["batch"], sizes["length"]), generator=generator).to(device)
    return ids, torch.ones_like(ids)


def next_token_loss(logits: Tensor, ids: Tensor) -> Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def plain_step(model: nn.Module, ids: Tensor, mask: Tensor, compiler: Compiler) -> Callable[[], None]:
    """The plain model's step: forward, next-token loss, backward, AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = compiler(lambda ids, mask: next_token_loss(
        model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids))
    model.train()

    def step() -> None:
        loss = loss_fn(ids, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def hat_step(model: nn.Module, ids: Tensor, mask: Tensor, compiler: Compiler) -> tuple[Callable[[float], None],
                                                                                      hatnorm.HAT]:
    """A HAT step (AdamW) at a given scale s on task 1, after a short task 0 (3 steps across its schedule)."""
    hat = hatnorm.HAT(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train(task: int) -> Callable[[float], None]:
        loss_fn = compiler(lambda ids, mask, s: hat.loss(next_token_loss(
            model(input_ids=ids, attention_mask=mask, task=task, s=s), ids), s))

        def step(s: float) -> None:
            s = torch.tensor(s, device=ids.device)  # the scale as a tensor: a changing s does not recompile
            loss = loss_fn(ids, mask, s)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            hat.protect(s)
            hat.step(optimizer)

        return step

    model.train()
    hat.begin_task(0)
    first = train(0)
    for batch in (0, BATCHES_PER_EPOCH // 2, BATCHES_PER_EPOCH - 1):
        first(hat.scale(batch, BATCHES_PER_EPOCH))
    hat.end_task()
    hat.begin_task(1)
    return train(1), hat


def language(args: Any, clock: Clock, compiler: Compiler) -> list[Row]:
    """A converted LLaMA-style model's HAT step at s = 1, 100, s_max and its epoch mean against the plain step, and
    task 1's export against the plain model's inference."""
    sizes = QUICK_SIZES if args.quick else SIZES
    plain = plain_llama(sizes, args.device)
    parameters = sum(p.numel() for p in plain.parameters())
    converted = hatnorm.convert(copy.deepcopy(plain).eval(), num_tasks=10, norm="masked_rms")
    for gate in converted.modules():
        if isinstance(gate, hatnorm.HATGate):
            gate.floor = args.gate_floor
    ids, mask = tokens(sizes, args.device)
    step, hat = hat_step(converted, ids, mask, compiler)
    calls: dict[object, Any] = {"plain": plain_step(plain, ids, mask, compiler)}
    for s in SCALES:
        calls[s] = partial(step, s)
    calls["epoch"] = epoch_of(step, schedule_scales(hat))
    times = clock(calls)
    name = (f"LlamaForCausalLM {parameters / 1e6:.1f}M (hidden {sizes['hidden_size']}, {sizes['num_hidden_layers']} "
            f"layers, vocabulary {sizes['vocab_size']}, batch {sizes['batch']}×{sizes['length']} tokens)")
    rows: list[Row] = []
    for s in (*SCALES, "epoch"):
        at = "epoch mean" if s == "epoch" else f"s = {s:g}"
        hat_time = times[s] / (SCHEDULE_POINTS if s == "epoch" else 1)
        rows.append(Ratio(f"train step {name}, HAT masked_rms AdamW {at} / plain", 1e3 * hat_time,
                          1e3 * times["plain"], TARGETS["step"]))
    step(hat.s_max)
    hat.end_task()
    converted.eval()
    everything = copy.deepcopy(converted)
    hatnorm.open_gates(everything)  # the export's own cost: a task that uses every unit, so nothing is removed
    exports = {"task 1": hatnorm.export(converted, 1), "every gate open": hatnorm.export(everything, 1)}
    plain.eval()
    calls = {"plain": partial(compiler(lambda ids, mask: plain(input_ids=ids, attention_mask=mask,
                                                                 use_cache=False).logits), ids, mask)}
    for what, exported in exports.items():
        calls[what] = partial(compiler(lambda ids, mask, exported=exported: exported(input_ids=ids,
                                                                                    attention_mask=mask)), ids, mask)
    with torch.no_grad():
        times = clock(calls)
    for what, exported in exports.items():
        kept = 1 - exported.parameters_saved / exported.parameters_before
        rows.append(Ratio(f"inference {name}, masked_rms export of {what} ({kept:.0%} of the HAT model's parameters) "
                          "/ plain", 1e3 * times[what], 1e3 * times["plain"], TARGETS["export"]))
    return rows
