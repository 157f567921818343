"""torchvision's Swin window attention (v1 and v2) in a converted graph.

torchvision computes a Swin block's attention in one function, ``shifted_window_attention`` (padding,
cyclic shift, window partition, attention with a relative position bias and the shifted-window mask; for v2,
cosine attention with a learned logit scale), which ``torch.fx`` keeps as a single call.
:class:`GatedShiftedWindowAttention` calls the same function with the gates folded into the q/k/v and output
projections (``(a ⊙ W)x + a ⊙ b``), so with every gate open it computes exactly what the original does. What
biases a whole head is one copy per task: v1's relative position bias table (:class:`hatnorm.blocks.TaskParameter`),
v2's logit scale and the MLP that computes its continuous position bias from fixed coordinates.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hatnorm._convert.params import TaskModule, TaskParameter
from hatnorm._gate import HATGate
from hatnorm._hat import Layer
from hatnorm._masks import MaskSource, Select


def is_window_attention(module: nn.Module) -> bool:
    """Whether ``module`` is torchvision's Swin ``ShiftedWindowAttention`` or ``ShiftedWindowAttentionV2`` (by
    class, so torchvision stays optional)."""
    kind = type(module)
    return kind.__name__ in ("ShiftedWindowAttention", "ShiftedWindowAttentionV2") and \
        kind.__module__ == "torchvision.models.swin_transformer"


def is_patch_merging_pad(target: object) -> bool:
    """torchvision's ``_patch_merging_pad``: pads and interleaves a map's positions, so it only moves units."""
    return getattr(target, "__name__", None) == "_patch_merging_pad" and \
        getattr(target, "__module__", None) == "torchvision.models.swin_transformer"


class GatedShiftedWindowAttention(nn.Module):
    """A ``ShiftedWindowAttention`` (or ``ShiftedWindowAttentionV2``) with gates on its q/k/v features and its
    output, around the original's weights; called as ``(x [N, H, W, C], task, s)``.

    Args:
        attention: the module it replaces.
        num_tasks: number of tasks.
        s_max: the gates' largest scale.
    """

    def __init__(self, attention: nn.Module, *, num_tasks: int, s_max: float) -> None:
        super().__init__()
        self.qkv, self.proj = attention.qkv, attention.proj
        self.window_size, self.shift_size = list(attention.window_size), list(attention.shift_size)
        self.num_heads = attention.num_heads
        self.attention_dropout, self.dropout = attention.attention_dropout, attention.dropout
        self.version = 2 if hasattr(attention, "cpb_mlp") else 1
        if self.version == 2:
            self.cpb_mlp = TaskModule(attention.cpb_mlp, num_tasks)
            self.logit_scale = TaskParameter(attention.logit_scale, num_tasks)
            self.register_buffer("relative_coords_table", attention.relative_coords_table.clone())
        else:
            self.table = TaskParameter(attention.relative_position_bias_table, num_tasks)
        self.register_buffer("relative_position_index", attention.relative_position_index.clone())
        self.gate_qkv = HATGate(self.qkv.out_features, num_tasks=num_tasks, s_max=s_max)
        self.gate_out = HATGate(self.proj.out_features, num_tasks=num_tasks, s_max=s_max)
        self.to(self.qkv.weight.device)

    def forward(self, x: Tensor, task: int, s: float | Tensor | None = None) -> Tensor:
        from torchvision.models.swin_transformer import _get_relative_position_bias, shifted_window_attention

        logit_scale = None
        if self.version == 2:
            table = self.cpb_mlp(task, self.relative_coords_table).view(-1, self.num_heads)
            bias = 16 * torch.sigmoid(_get_relative_position_bias(table, self.relative_position_index,
                                                                  self.window_size))
            logit_scale = self.logit_scale(task)
        else:
            bias = _get_relative_position_bias(self.table(task), self.relative_position_index, self.window_size)
        a_qkv, a_out = self.gate_qkv(task, s), self.gate_out(task, s)
        return shifted_window_attention(
            x, self.qkv.weight * a_qkv[:, None], self.proj.weight * a_out[:, None], bias, self.window_size,
            self.num_heads, shift_size=self.shift_size, attention_dropout=self.attention_dropout,
            dropout=self.dropout, qkv_bias=None if self.qkv.bias is None else self.qkv.bias * a_qkv,
            proj_bias=None if self.proj.bias is None else self.proj.bias * a_out, logit_scale=logit_scale,
            training=self.training)

    def wiring(self, inp: MaskSource | None) -> list[Layer]:
        """q/k/v read the input's units; the output projection reads the v features (the last third)."""
        dim = self.proj.in_features
        values = Select(self.gate_qkv, torch.arange(2 * dim, 3 * dim))
        per_task = [self.cpb_mlp, self.logit_scale] if self.version == 2 else [self.table]
        return [Layer(self.qkv, out=self.gate_qkv, inp=inp), Layer(self.proj, out=self.gate_out, inp=values),
                *(Layer(module, out=self.gate_out) for module in per_task)]
