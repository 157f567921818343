"""The task heads refuse a bad task, input or configuration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hatnorm
from errors._support import T, refused

# --- heads ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("task", "x_shape", "exc", "match"), [
    (T, (2, 4), ValueError, r"task must be in \[0, 3\), got 3"),
    (-1, (2, 4), ValueError, r"task must be in \[0, 3\), got -1"),
    ("0", (2, 4), TypeError, r"task must be an int in \[0, 3\), got '0' of type str"),
    (0, (2, 5), ValueError, r"x must have shape \[N, 4\] with N ≥ 1, got \[2, 5\]"),
    (0, (2, 4, 1), ValueError, r"x must have shape \[N, 4\] with N ≥ 1, got \[2, 4, 1\]"),
    (0, (0, 4), ValueError, r"x must have shape \[N, 4\] with N ≥ 1, got \[0, 4\]"),
])
def test_heads_refuse_bad_input(task, x_shape, exc, match) -> None:
    heads = hatnorm.TaskHeads(4, [2, 3, 4], num_tasks=T)
    with refused(heads, exc, match):
        heads(torch.randn(x_shape), task)

# --- heads ----------------------------------------------------------------------------------------------------


def test_heads_refuse_a_bad_input_type_or_dtype() -> None:
    heads = hatnorm.TaskHeads(4, [2, 3, 4], num_tasks=T)
    for x, exc, match in [
        ([[1.0] * 4], TypeError, r"^x must be a tensor of shape \[N, 4\], got list$"),
        (torch.ones(2, 4, dtype=torch.long), ValueError, r"^x must be a floating-point tensor, got dtype torch.int64$"),
        (torch.ones(2, 4, dtype=torch.float64), ValueError, r"^x must have dtype torch.float32"),
    ]:
        with refused(heads, exc, match):
            heads(x, 0)


def test_convolutional_heads_take_feature_maps_and_refuse_a_bad_configuration() -> None:
    heads = hatnorm.TaskHeads(4, [2, 3, 4], num_tasks=T, conv=nn.Conv2d(4, 9, 1))
    assert heads.convolutional and heads(torch.randn(2, 4, 5, 5), 2).shape == (2, 4, 5, 5)
    with refused(heads, ValueError, r"^x must have shape \[N, 4, H, W\] with N, H, W ≥ 1, got \[2, 4\]$"):
        heads(torch.randn(2, 4), 0)
    for conv, exc, match in [
        (nn.Linear(4, 2), TypeError, r"^conv must be an nn\.Conv1d, nn\.Conv2d or nn\.Conv3d, got Linear$"),
        (nn.Conv2d(4, 4, 1, groups=2), ValueError, r"^conv must have groups=1 and in_features=4 input channels, "
                                                    r"got groups=2 and 4 input channels$"),
        (nn.Conv2d(3, 4, 1), ValueError, r"got groups=1 and 3 input channels$"),
    ]:
        with pytest.raises(exc, match=match):
            hatnorm.TaskHeads(4, 2, num_tasks=T, conv=conv)
    with pytest.raises(TypeError, match=r"^bias must be a bool, got 'no'$"):
        hatnorm.TaskHeads(4, 2, num_tasks=T, bias="no")
    assert all(h.bias is None for h in hatnorm.TaskHeads(4, [2, 3, 4], num_tasks=T, bias=False).heads)

