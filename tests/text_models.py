"""Tiny gated transformers over token ids, built from hatnorm's own blocks: a causal language model with one
language-model head over the shared vocabulary, and a bidirectional classifier with a head per task.

They take what transformers' models take (``input_ids``, ``attention_mask`` by name) and return logits, so the
trainer runs them on :mod:`hatnorm.text_tasks` as it will run a converted ``LlamaForCausalLM`` or
``BertForSequenceClassification``. Run this file to measure how well they learn the benchmark:
``python tests/text_models.py``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from hatnorm import text_tasks
from hatnorm._gate import HATGate
from hatnorm._hat import HATModule, Layer
from hatnorm._heads import TaskHeads
from hatnorm._masks import MaskSource
from hatnorm._norm_registry import get_norm
from hatnorm.blocks import (
    GatedAttention,
    GatedFeedForward,
    SharedLMHead,
    StreamEmbedding,
    blocks_wiring,
    run_blocks,
)
from hatnorm.text_tasks import VOCABULARY
from hatnorm.training import HATMethod, TrainConfig, train_sequence


class TinyTextTransformer(HATModule):
    """A pre-norm gated transformer over token ids: ``model(input_ids=, attention_mask=, task=, s=)`` → logits.

    ``causal=True``: causal attention and :class:`SharedLMHead`, logits ``[N, L, V]`` (``num_classes`` must
    give every task the vocabulary size). ``causal=False``: attention over all unpadded tokens and a head per
    task on the first token (``<bos>``), logits ``[N, C_task]``.
    """

    def __init__(self, num_classes: Sequence[int], *, num_tasks: int, norm: str = "masked_ln", causal: bool,
                 vocab_size: int = len(VOCABULARY), max_length: int = 32, dim: int = 64, depth: int = 2,
                 num_heads: int = 4, s_max: float = 400.0) -> None:
        super().__init__()
        norm_layer = get_norm(norm).layer(num_tasks=num_tasks, dims=None)
        if causal and set(num_classes) != {vocab_size}:
            raise ValueError(f"a causal model predicts the vocabulary: num_classes must be {vocab_size} for every "
                             f"task, got {list(num_classes)}")
        self.causal, self.num_tasks = causal, num_tasks
        self.embedding = StreamEmbedding(vocab_size, dim, max_length=max_length)
        self.gate_stream = HATGate(dim, num_tasks=num_tasks, s_max=s_max)
        self.attentions = nn.ModuleList(
            GatedAttention(dim, num_heads=num_heads, dim_head=dim // num_heads, num_tasks=num_tasks,
                           norm_layer=norm_layer, s_max=s_max) for _ in range(depth))
        self.feedforwards = nn.ModuleList(
            GatedFeedForward(dim, 2 * dim, num_tasks=num_tasks, norm_layer=norm_layer, s_max=s_max)
            for _ in range(depth))
        self.norm = norm_layer(dim)
        self.head = SharedLMHead(dim, vocab_size) if causal else TaskHeads(dim, num_classes, num_tasks=num_tasks)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, *, task: int,
                s: float | Tensor | None = None) -> Tensor:
        length = input_ids.shape[1]
        keys = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                else attention_mask.bool())[:, None, None, :]
        mask = keys & torch.ones(length, length, dtype=torch.bool).tril() if self.causal else keys
        stream_gate = self.gate_stream(task, s)
        x = self.embedding(input_ids, stream_gate)
        x = run_blocks(x, stream_gate, self.attentions, self.feedforwards, task, s, attn_mask=mask)
        h = self.norm(x, stream_gate, task)
        return self.head(h) if self.causal else self.head(h[:, 0], task)

    def hat_layers(self) -> list[Layer]:
        stream = self.gate_stream
        layers = [Layer(self.embedding, out=stream), Layer(self.norm, out=stream)]
        if self.causal:
            layers.append(Layer(self.head, out=stream))
        return layers + blocks_wiring(stream, self.attentions, self.feedforwards)

    def head_units(self) -> MaskSource:
        return self.gate_stream


def measure(seed: int = 0, epochs: int = 20, train_size: int = 2000) -> None:
    """Train both models with HAT over their whole sequence and print the accuracy after each task, and the time."""
    torch.set_num_threads(1)
    config = TrainConfig(epochs=epochs, lr=3e-3, optimizer="adamw", schedule="cosine", warmup_epochs=1,
                         batch_size=64, seed=seed, recalibrate=False)
    for causal, tasks in ((True, text_tasks.generation_tasks(seed=seed, train_size=train_size)),
                          (False, text_tasks.classification_tasks(seed=seed, train_size=train_size))):
        start = time.perf_counter()
        result = train_sequence(
            lambda causal=causal, tasks=tasks: TinyTextTransformer([t.num_classes for t in tasks], num_tasks=len(tasks),
                                                                   causal=causal),
            tasks, HATMethod(), config)
        print(f"{'causal LM' if causal else 'classifier'}: {time.perf_counter() - start:.0f} s "
              f"({', '.join(f'{s:.0f}' for s in result.seconds)} s per task)")
        for t, row in enumerate(result.accuracy):
            print(f"  after {result.tasks[t]:>16}: " + " ".join(f"{a:.3f}" for a in row[: t + 1]))
        print("  chance: " + " ".join(f"{text_tasks.chance_accuracy(t):.3f}" for t in tasks))


if __name__ == "__main__":
    measure(*(int(a) for a in sys.argv[1:]))
