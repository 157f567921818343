"""Models of one's own for the coverage script's test (``--model FILE.py:FUNCTION``): one converts, one cannot."""

from __future__ import annotations

import time

import torch
from torch import nn


class RunningSum(nn.Module):
    """Mixes channels along dim 1: no rule follows the units through it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.cumsum(1)


def small_cnn(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))


def running_sum(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), RunningSum(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))


class Sleeping(nn.Module):
    """A layer whose forward takes ten minutes: a check of it is still running when a test stops the script."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(600)
        return x


def slow(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), Sleeping(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))
