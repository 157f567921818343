"""The reference architectures and their building blocks refuse bad input before any layer runs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hatnorm
from errors._support import C, T, no_layer_runs, refused

# --- the reference architectures' forwards -------------------------------------------------------------------

# name → (norm, build options, a good input shape); small so every case builds fast
ARCHS: dict[str, tuple[str, dict, tuple[int, ...]]] = {
    "mlp": ("masked_bn", {"in_features": 3 * 4 * 4, "hidden": (8,)}, (4, 3, 4, 4)),
    "alexnet": ("masked_bn", {"size": 28, "width": 0.05}, (4, 3, 28, 28)),
    "resnet18": ("masked_bn", {"base_width": 2}, (4, 3, 8, 8)),
    "vit": ("masked_ln", {"image_size": 8, "patch_size": 4, "dim": 8, "depth": 1, "num_heads": 2}, (4, 3, 8, 8)),
}
# name → (argument name, the expected shape as the message writes it)
ARCH_SHAPES = {
    "mlp": ("x", r"\[N, 48\] \(or \[N, \.\.\.\] with 48 values per sample\) with N ≥ 1"),
    "alexnet": ("x", r"\[N, 3, 28, 28\] with N ≥ 1"),
    "resnet18": ("x", r"\[N, 3, H, W\] with N, H, W ≥ 1"),
    "vit": ("img", r"\[N, 3, 8, 8\] with N ≥ 1"),
}


def make_model(name: str) -> nn.Module:
    norm, options, _ = ARCHS[name]
    torch.manual_seed(0)
    model = hatnorm.build(name, num_tasks=T, norm=norm, num_classes=[2, 3, 4], **options).train()
    model(torch.randn(ARCHS[name][2]), 1, 2.0).sum().backward()  # statistics and gradients that are not the defaults
    return model


def bad_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Input shapes the model refuses, made from its good ``[N, C, H, W]``: ResNet-18 takes any H, W ≥ 1, the
    MLP any shape with its number of values per sample."""
    n, c, h, w = ARCHS[name][2]
    shapes = {"wrong_channels": (n, 1, h, w), "wrong_rank": (n, c, h), "one_more_dim": (n, c, h, w, 2),
              "empty_batch": (0, c, h, w)}
    if name == "resnet18":
        shapes["empty_map"] = (n, c, 0, w)
    else:
        shapes["wrong_size"] = (n, c, h + 4, w + 4)
    return shapes


BAD_SHAPE_CASES = [(name, case) for name in ARCHS for case in bad_shapes(name)]


@pytest.mark.parametrize(("name", "case"), BAD_SHAPE_CASES, ids=[f"{n}-{c}" for n, c in BAD_SHAPE_CASES])
def test_architecture_refuses_a_bad_input_shape_before_any_layer_runs(name, case) -> None:
    model = make_model(name)
    shape = bad_shapes(name)[case]
    arg, expected = ARCH_SHAPES[name]
    given = ", ".join(map(str, shape))
    with refused(model, ValueError, rf"^{arg} must have shape {expected}, got \[{given}\]$"), no_layer_runs(model):
        model(torch.randn(shape), 1, 2.0)
    model(torch.randn(ARCHS[name][2]), 1, 2.0)


@pytest.mark.parametrize("name", ARCHS)
def test_architecture_refuses_a_bad_input_type_dtype_or_device_before_any_layer_runs(name) -> None:
    model = make_model(name)
    arg = ARCH_SHAPES[name][0]
    x = torch.randn(ARCHS[name][2])
    cases = [
        (x.tolist(), TypeError, rf"^{arg} must be a tensor of shape \[N, .*, got list$"),
        (x.long(), ValueError, rf"^{arg} must be a floating-point tensor, got dtype torch.int64$"),
        (x.double(), ValueError, rf"^{arg} must have dtype torch.float32 \(the dtype of the model's parameters\), "
                                 r"got torch.float64$"),
        (x.half(), ValueError, rf"^{arg} must have dtype torch.float32 .* got torch.float16$"),
        (x.to("meta"), ValueError, rf"^{arg} must be on the device of the model's parameters, cpu, got meta$"),
    ]
    for bad, exc, match in cases:
        with refused(model, exc, match), no_layer_runs(model):
            model(bad, 1, 2.0)


@pytest.mark.parametrize("name", ARCHS)
def test_architecture_refuses_a_bad_task_or_scale_before_any_layer_runs(name) -> None:
    model = make_model(name)
    x = torch.randn(ARCHS[name][2])
    cases = [
        ((x, 3, 2.0), ValueError, r"^task must be in \[0, 3\), got 3$"),
        ((x, 1.0, 2.0), TypeError, r"^task must be an int in \[0, 3\), got 1.0 of type float$"),
        ((x, 1, None), ValueError, r"^s must be given while training"),
        ((x, 1, 0.0), ValueError, r"^s must be a finite number > 0, got 0.0$"),
        ((x, 1, math.inf), ValueError, r"^s must be a finite number > 0, got inf$"),
    ]
    for args, exc, match in cases:
        with refused(model, exc, match), no_layer_runs(model):
            model(*args)


@pytest.mark.parametrize(("name", "shape"), [("mlp", (1, 3, 4, 4)), ("alexnet", (1, 3, 28, 28)),
                                             ("resnet18", (1, 3, 8, 8))])
def test_batch_norm_architecture_refuses_a_batch_of_one_in_training(name, shape) -> None:
    model = make_model(name)
    given = ", ".join(map(str, shape))
    with refused(model, ValueError, rf"^x must have N ≥ 2 in training: the model's batch-statistics norms need more "
                                    rf"than 1 value per channel, got shape \[{given}\]$"), no_layer_runs(model):
        model(torch.randn(shape), 1, 2.0)
    model.eval()
    assert model(torch.randn(shape), 1).shape == (1, 3)  # evaluation reads the running statistics


def test_a_batch_of_one_is_fine_where_every_norm_sees_more_than_one_value() -> None:
    # ResNet-18's last stage is 2×2 for 16×16 inputs; the gate-only MLP and the ViT have no batch statistics
    resnet = hatnorm.build("resnet18", num_tasks=T, norm="masked_bn", num_classes=2, base_width=2).train()
    assert resnet(torch.randn(1, 3, 16, 16), 0, 2.0).shape == (1, 2)
    mlp = hatnorm.build("mlp", num_tasks=T, norm="none", num_classes=2, in_features=8, hidden=(4,)).train()
    assert mlp(torch.randn(1, 8), 0, 2.0).shape == (1, 2)
    vit = make_model("vit")
    assert vit(torch.randn(1, 3, 8, 8), 0, 2.0).shape == (1, 2)

# --- the other public pieces ------------------------------------------------------------------------------


def test_mask_sources_refuse_what_is_not_a_mask_source() -> None:
    gate = hatnorm.HATGate(C, num_tasks=T)
    for make, name in [(lambda: hatnorm.blocks.Residual(gate, "g"), "paths"),
                       (lambda: hatnorm.blocks.Flatten(3, 4), "channels"),
                       (lambda: hatnorm.blocks.Concat(gate, None), "parts")]:
        with pytest.raises(TypeError, match=rf"^{name} must be gates or other mask sources "
                                            r"\(hatnorm.blocks.MaskSource\), got a (str|int|NoneType)$"):
            make()


def test_token_embedding_refuses_patches_of_the_wrong_shape() -> None:
    tokens = hatnorm.blocks.TokenEmbedding(4, 8)
    with refused(tokens, ValueError, r"^patches must have shape \[N, 4, 8\] with N ≥ 1, got \[2, 5, 8\]$"):
        tokens(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"^num_patches must be an int ≥ 1, got 0$"):
        hatnorm.blocks.TokenEmbedding(0, 8)
