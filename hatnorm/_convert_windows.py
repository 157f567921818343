"""torchvision's Swin (v1) window attention in a converted graph.

torchvision computes a Swin block's attention in one function, ``shifted_window_attention`` (padding,
cyclic shift, window partition, attention with a relative position bias and the shifted-window mask),
which ``torch.fx`` keeps as a single call. :class:`GatedShiftedWindowAttention` calls the same function
with the gates folded into the q/k/v and output projections (``(a ⊙ W)x + a ⊙ b``), so with every gate
open it computes exactly what the original does; its relative position bias table, shared by every unit
of a head, is one copy per task (:class:`hatnorm.TaskParameter`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hatnorm._convert_params import TaskParameter
from hatnorm._gate import HATGate
from hatnorm._hat import Layer
from hatnorm._masks import MaskSource, Select


def is_window_attention(module: nn.Module) -> bool:
    """Whether ``module`` is torchvision's Swin v1 ``ShiftedWindowAttention`` (by class, so torchvision stays
    optional)."""
    kind = type(module)
    return kind.__name__ == "ShiftedWindowAttention" and kind.__module__ == "torchvision.models.swin_transformer"


def is_patch_merging_pad(target: object) -> bool:
    """torchvision's ``_patch_merging_pad``: pads and interleaves a map's positions, so it only moves units."""
    return getattr(target, "__name__", None) == "_patch_merging_pad" and \
        getattr(target, "__module__", None) == "torchvision.models.swin_transformer"


class GatedShiftedWindowAttention(nn.Module):
    """A ``ShiftedWindowAttention`` with gates on its q/k/v features and its output, around the original's
    weights; called as ``(x [N, H, W, C], task, s)``.

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
        self.table = TaskParameter(attention.relative_position_bias_table, num_tasks)
        self.register_buffer("relative_position_index", attention.relative_position_index.clone())
        self.gate_qkv = HATGate(self.qkv.out_features, num_tasks=num_tasks, s_max=s_max)
        self.gate_out = HATGate(self.proj.out_features, num_tasks=num_tasks, s_max=s_max)
        self.to(self.qkv.weight.device)

    def forward(self, x: Tensor, task: int, s: float | Tensor | None = None) -> Tensor:
        from torchvision.models.swin_transformer import _get_relative_position_bias, shifted_window_attention

        bias = _get_relative_position_bias(self.table(task), self.relative_position_index, self.window_size)
        a_qkv, a_out = self.gate_qkv(task, s), self.gate_out(task, s)
        return shifted_window_attention(
            x, self.qkv.weight * a_qkv[:, None], self.proj.weight * a_out[:, None], bias, self.window_size,
            self.num_heads, shift_size=self.shift_size, attention_dropout=self.attention_dropout,
            dropout=self.dropout, qkv_bias=None if self.qkv.bias is None else self.qkv.bias * a_qkv,
            proj_bias=None if self.proj.bias is None else self.proj.bias * a_out, training=self.training)

    def wiring(self, inp: MaskSource | None) -> list[Layer]:
        """q/k/v read the input's units; the output projection reads the v features (the last third)."""
        dim = self.proj.in_features
        values = Select(self.gate_qkv, torch.arange(2 * dim, 3 * dim))
        return [Layer(self.qkv, out=self.gate_qkv, inp=inp), Layer(self.proj, out=self.gate_out, inp=values),
                Layer(self.table, out=self.gate_out)]
