"""Converted models refuse bad input, task or scale before any layer runs and move no statistic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hatnorm
from errors._support import T, no_layer_runs, refused

# --- converted models ---------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """conv → BN → ReLU → flatten → Linear → BN1d → ReLU → Linear: fixed 8×8 inputs, a norm after an FC layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.fc, self.bn_fc, self.out = nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn(self.conv(x))).flatten(1)
        return self.out(F.relu(self.bn_fc(self.fc(h))))


def make_converted() -> hatnorm.ConvertedModel:
    torch.manual_seed(0)
    model = hatnorm.convert(SmallCNN(), num_tasks=T).train()
    model(torch.randn(4, 3, 8, 8), 1, 2.0).sum().backward()
    return model


@pytest.mark.parametrize(("x", "exc", "match"), [
    (torch.randn(4, 3, 9, 9), ValueError, r"^x must have a shape the converted model takes, got \[4, 3, 9, 9\]: "),
    (torch.randn(4, 1, 8, 8), ValueError, r"^x must have a shape the converted model takes, got \[4, 1, 8, 8\]: .*"
                                          r"channels"),
    (torch.randn(4, 3, 8), ValueError, r"^x must have a shape the converted model takes, got \[4, 3, 8\]"),
    (torch.randn(0, 3, 8, 8), ValueError, r"^x must be a non-empty batch \[N, \.\.\.\] with N ≥ 1 and every size "
                                          r"≥ 1, got shape \[0, 3, 8, 8\]$"),
    (torch.randn(4, 3, 8, 8).double(), ValueError, r"^x must have dtype torch.float32 \(the dtype of the model's "
                                                   r"parameters\), got torch.float64$"),
    (torch.ones(4, 3, 8, 8, dtype=torch.long), ValueError, r"^x must be a floating-point tensor, got dtype "
                                                           r"torch.int64$"),
    ([[1.0]], TypeError, r"^x must be a tensor \[N, \.\.\.\], got list$"),
    (torch.randn(1, 3, 8, 8), ValueError, r"^x must have N ≥ 2 in training: the model's batch-statistics norms"),
], ids=["size", "channels", "rank", "empty", "float64", "int", "list", "one"])
def test_converted_model_refuses_bad_input_and_moves_no_statistic(x, exc, match) -> None:
    model = make_converted()
    with refused(model, exc, match):
        model(x, 1, 2.0)
    assert all(m.training for m in model.modules()), "the shape check left a module in evaluation mode"
    model(torch.randn(4, 3, 8, 8), 1, 2.0)


def test_converted_model_refuses_a_bad_task_or_scale_before_any_layer_runs() -> None:
    model = make_converted()
    x = torch.randn(4, 3, 8, 8)
    for args, exc, match in [((x, T, 2.0), ValueError, r"^task must be in \[0, 3\), got 3$"),
                             ((x, 1, None), ValueError, r"^s must be given while training"),
                             ((x, 1, -1.0), ValueError, r"^s must be a finite number > 0, got -1.0$")]:
        with refused(model, exc, match), no_layer_runs(model):
            model(*args)


def test_converted_vit_refuses_bad_pixel_values() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=16, num_labels=3)
    model = hatnorm.convert(transformers.ViTForImageClassification(config), num_tasks=T, norm="masked_ln").train()
    for x, exc, match in [
        (torch.randn(2, 1, 8, 8), ValueError, r"^pixel_values must have shape \[N, 3, 8, 8\] with N ≥ 1, got "
                                              r"\[2, 1, 8, 8\]$"),
        (torch.randn(0, 3, 8, 8), ValueError, r"^pixel_values must have shape \[N, 3, 8, 8\] with N ≥ 1, got \[0, "),
        (torch.randn(2, 3, 8, 8).double(), ValueError, r"^pixel_values must have dtype torch.float32"),
    ]:
        with refused(model, exc, match), no_layer_runs(model):
            model(x, 1, 2.0)
    with refused(model, ValueError, r"^task must be in \[0, 3\), got 3$"), no_layer_runs(model):
        model(torch.randn(2, 3, 8, 8), 3, 2.0)


def test_open_gates_refuses_something_that_is_not_a_model() -> None:
    with pytest.raises(TypeError, match=r"^model must be an nn.Module, got str$"):
        hatnorm.open_gates("model")

