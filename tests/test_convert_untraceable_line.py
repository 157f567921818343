"""A model torch.fx cannot trace is refused with a ``ConversionError`` that names the line of the model's own code
where tracing stopped, with and without an example input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hatnorm


class DataBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.sum() > 0:  # a branch on data: no single graph
            x = x.relu()
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("example", [None, torch.randn(2, 3, 8, 8)], ids=["alone", "alongside the example"])
def test_the_line_tracing_stopped_at_is_named(example: torch.Tensor | None) -> None:
    with pytest.raises(hatnorm.ConversionError, match=r"cannot trace DataBranch.* \(stopped at "
                                                      r"test_convert_untraceable_line\.py:\d+ `if x\.sum\(\) > 0:"):
        hatnorm.convert(DataBranch(), num_tasks=2, example_input=example)
