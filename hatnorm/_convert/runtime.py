"""The modules a converted graph runs: a norm and its gate, a Linear with its gate folded in, the per-task heads,
and self-attention with gated q/k/v. The walk places them; they know nothing of it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hatnorm._gate import HATGate
from hatnorm._hat import Layer
from hatnorm._heads import TaskHeads
from hatnorm._masks import MaskSource
from hatnorm._norm_protocol import MaskedNorm
from hatnorm._transformer import gated_linear


class GatedNorm(nn.Module):
    """A task-aware norm and its gate in one node of a converted graph: ``norm(x, gate(task, s), task)``."""

    def __init__(self, norm: MaskedNorm, gate: HATGate) -> None:
        super().__init__()
        self.norm = norm
        self.gate = gate

    def forward(self, x: Tensor, task: int, s: float | Tensor | None = None) -> Tensor:
        return self.norm(x, self.gate(task, s), task)


class GatedLinear(nn.Module):
    """A ``Linear`` and the gate on its output in one node of a converted graph, the gate folded into the
    weights: ``(a ⊙ W)x + a ⊙ b``, one multiply per weight instead of one per output value."""

    def __init__(self, linear: nn.Linear, gate: HATGate) -> None:
        super().__init__()
        self.linear = linear
        self.gate = gate

    def forward(self, x: Tensor, task: int, s: float | Tensor | None = None) -> Tensor:
        return gated_linear(x, self.linear, self.gate(task, s))


class Heads(nn.Module):
    """Per-task heads in a converted graph, reading ``[N, *, in_features]`` like the ``nn.Linear`` they replace (or
``[N, in_features, *spatial]`` like the convolution)."""

    def __init__(self, task_heads: TaskHeads) -> None:
        super().__init__()
        self.task_heads = task_heads
        self.convolutional = task_heads.convolutional  # export swaps ``task_heads`` for the task's head alone

    def forward(self, x: Tensor, task: int) -> Tensor:
        if self.convolutional:
            return self.task_heads(x, task)
        shape = x.shape
        return self.task_heads(x.reshape(-1, shape[-1]), task).reshape(*shape[:-1], -1)



class GatedMultiheadAttention(nn.Module):
    """An ``nn.MultiheadAttention`` (self-attention) with gates on its q, k and v features and its output,
    built from the original's weights; called like it, ``(x, x, x, task, s)`` → ``(output, None)``.

    Attention mixes tokens, not features: a closed q/k feature is 0 in every dot product and a closed v
    feature in every output, so the gates select features as in the reference ViTs.

    Args:
        attention: the module it replaces (batch-first or not, without extra key/value biases).
        num_tasks: number of tasks.
        s_max: the gates' largest scale.
    """

    def __init__(self, attention: nn.MultiheadAttention, *, num_tasks: int, s_max: float) -> None:
        super().__init__()
        dim = attention.embed_dim
        self.num_heads, self.batch_first, self.dropout = attention.num_heads, attention.batch_first, attention.dropout
        bias = attention.in_proj_bias is not None
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=bias) for _ in range(3))
        with torch.no_grad():
            for i, projection in enumerate((self.to_q, self.to_k, self.to_v)):
                projection.weight.copy_(attention.in_proj_weight[i * dim:(i + 1) * dim])
                if bias:
                    projection.bias.copy_(attention.in_proj_bias[i * dim:(i + 1) * dim])
        self.to_out = nn.Linear(dim, dim, bias=attention.out_proj.bias is not None)
        self.to_out.load_state_dict(attention.out_proj.state_dict())
        self.gate_q, self.gate_k, self.gate_v, self.gate_out = (HATGate(dim, num_tasks=num_tasks, s_max=s_max)
                                                                for _ in range(4))
        self.to(attention.out_proj.weight.device)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, task: int, s: float | Tensor | None = None,
                **_: Any) -> tuple[Tensor, None]:
        x = query if self.batch_first else query.transpose(0, 1)
        q, k, v = (gated_linear(x, projection, gate(task, s)).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
                   for projection, gate in ((self.to_q, self.gate_q), (self.to_k, self.gate_k),
                                            (self.to_v, self.gate_v)))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        out = gated_linear(out.transpose(1, 2).flatten(2), self.to_out, self.gate_out(task, s))
        return (out if self.batch_first else out.transpose(0, 1)), None

    def wiring(self, inp: MaskSource | None) -> list[Layer]:
        return [Layer(self.to_q, out=self.gate_q, inp=inp), Layer(self.to_k, out=self.gate_k, inp=inp),
                Layer(self.to_v, out=self.gate_v, inp=inp), Layer(self.to_out, out=self.gate_out, inp=self.gate_v)]

