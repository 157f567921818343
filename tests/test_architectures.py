"""Registry-driven tests: every architecture × every norm that fits it builds, trains and forgets nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hatnorm

# small but real settings per architecture, and two input sizes each
OPTIONS = {
    "mlp": [({"in_features": 3 * 28 * 28}, 28), ({"in_features": 3 * 32 * 32}, 32)],
    "alexnet": [({"size": 28}, 28), ({"size": 36}, 36)],
    "resnet18": [({"base_width": 8}, 32), ({"base_width": 8, "stem": "imagenet"}, 48)],
    "resnet10": [({"base_width": 8}, 32), ({"base_width": 8, "stem": "imagenet"}, 48)],
    "resnet34": [({"base_width": 8}, 32), ({"base_width": 8, "stem": "imagenet"}, 48)],
    "vit": [({"image_size": 16, "patch_size": 4, "dim": 16, "depth": 1, "num_heads": 2}, 16),
            ({"image_size": 24, "patch_size": 8, "dim": 16, "depth": 2, "num_heads": 2}, 24),
            ({"image_size": 16, "patch_size": 4, "dim": 16, "depth": 1, "num_heads": 2, "stem": "conv"}, 16)],
    "vit_micro": [({}, 32), ({"image_size": 16}, 16)],
    "vit_post": [({"image_size": 16, "dim": 16, "depth": 1, "num_heads": 2}, 16),
                 ({"image_size": 24, "patch_size": 4, "dim": 16, "depth": 2, "num_heads": 2, "stem": "conv"}, 24)],
    "vit_tiny": [({"depth": 2}, 32), ({"depth": 2, "image_size": 16}, 16)],
}
# the norms that declare they forget nothing (plug-in norms included); task_ln and shared_ln normalise over
# every feature, so units other tasks own shift their statistics: they are ablation baselines
TASK_AWARE = {name for name in hatnorm.list_norms() if hatnorm.get_norm(name).isolates_tasks}
assert {"masked_bn", "task_bn", "masked_ln", "none"} <= TASK_AWARE
CASES = [
    (arch, norm, options, size)
    for arch in hatnorm.list_architectures()
    for norm in hatnorm.list_norms(hatnorm.get_architecture(arch).family)
    for options, size in OPTIONS[arch]
]


def ids(case: tuple) -> str:
    arch, norm, _, size = case
    return f"{arch}-{norm}-{size}"


def test_reference_architectures_are_registered() -> None:
    assert {"alexnet", "resnet18", "vit_micro", "vit_tiny"} <= set(hatnorm.list_architectures())
    assert set(OPTIONS) == set(hatnorm.list_architectures()), "add test settings for the new architecture"


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_builds_runs_and_every_parameter_gets_a_gradient(case: tuple) -> None:
    arch, norm, options, size = case
    torch.manual_seed(0)
    model = hatnorm.build(arch, num_tasks=3, norm=norm, num_classes=[2, 3, 4], in_channels=3, **options) \
        if arch != "mlp" else hatnorm.build(arch, num_tasks=3, norm=norm, num_classes=[2, 3, 4], **options)
    hat = hatnorm.HAT(model)
    x = torch.randn(4, 3, size, size)
    hat.begin_task(1)
    model.train()
    # the first batch's scale (1/s_max): at a large s, a gate whose few units all saturate passes a gradient
    # that underflows to exactly 0 (σ'(s·e) ≈ e^{-s|e|}), by luck of the initialisation, not of the wiring
    out = model(x, task=1, s=hat.scale(0, 4))
    assert out.shape == (4, 3)
    out.square().sum().backward()
    unreached = {n for n, p in model.named_parameters() if p.grad is None}
    assert unreached == {f"task_heads.heads.{t}.{p}" for t in (0, 2) for p in ("weight", "bias")}
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
            if not name.startswith("task_heads"):
                assert p.grad.abs().sum() > 0, f"{name} gets no gradient"
    plain = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
    assert not any(isinstance(m, plain) for m in model.modules())


def _train_two_tasks(arch: str, norm: str, options: dict, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Task 0's outputs on a probe after task 0 and after task 1 (3 HAT steps each, binarized masks)."""
    torch.manual_seed(0)
    model = hatnorm.build(arch, num_tasks=2, norm=norm, num_classes=2, in_channels=3, **options)
    hat = hatnorm.HAT(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = torch.randn(6, 3, size, size)
    outputs = []
    for task in range(2):
        hat.begin_task(task)
        for b in range(3):
            model.train()
            x, y = torch.randn(8, 3, size, size) * (task + 1), torch.randint(0, 2, (8,))
            s = hat.scale(b, 3)
            loss = hat.loss(F.cross_entropy(model(x, task=task, s=s), y), s)
            optimizer.zero_grad()
            loss.backward()
            hat.protect(s)
            hat.step(optimizer)
        hat.end_task()
        model.eval()
        with torch.no_grad():
            outputs.append(model(probe, task=0))
    return outputs[0], outputs[1]


@pytest.mark.parametrize("norm", ["shared_ln", "task_ln", "masked_ln"])
def test_only_the_post_norm_vit_lets_a_layernorm_over_every_unit_drift(norm: str) -> None:
    """In the pre-norm ViT every LN reads the gated stream, whose unselected units are 0 for every task: task 0's
    outputs stay bit-identical whatever the LN. In the post-norm ViT each LN reads the ungated residual sum,
    whose unselected units come from weights task 1 trains: an LN whose statistics read every unit (shared,
    per-task) moves task 0's outputs; masked LN reads only task 0's units and keeps them bit-identical."""
    options, size = OPTIONS["vit_post"][0]
    before, after = _train_two_tasks("vit_micro", norm, options, size)
    assert torch.equal(before, after)
    before, after = _train_two_tasks("vit_post", norm, options, size)
    if norm == "masked_ln":
        assert torch.equal(before, after)
    else:
        assert not torch.equal(before, after)


@pytest.mark.parametrize("norm", ["shared_cln", "task_cln", "shared_gn", "task_gn", "masked_cln", "masked_gn"])
def test_a_channel_norm_over_every_channel_drifts_in_a_cnn(norm: str) -> None:
    """The channel LayerNorm and GroupNorm baselines read channels task 1 trains, so task 0's outputs move;
    their masked forms read only task 0's channels and keep them bit-identical."""
    for arch in ("alexnet", "resnet18"):
        before, after = _train_two_tasks(arch, norm, *OPTIONS[arch][0])
        assert torch.equal(before, after) == norm.startswith("masked"), arch


def optimizers() -> list:
    return [
        lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3),
        lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05),
    ]


@pytest.mark.parametrize("make_optimizer", optimizers(), ids=["sgd-momentum-wd", "adamw"])
@pytest.mark.parametrize("case", [c for c in CASES if c[1] in TASK_AWARE and c[2] is OPTIONS[c[0]][0][0]], ids=ids)
def test_no_forgetting_after_a_new_task(case: tuple, make_optimizer) -> None:
    """Invariant 5: with binarized masks, training task 1 leaves task 0's outputs bit-identical."""
    arch, norm, options, size = case
    torch.manual_seed(0)
    kwargs = options if arch == "mlp" else {"in_channels": 3, **options}
    model = hatnorm.build(arch, num_tasks=2, norm=norm, num_classes=2, **kwargs)
    hat = hatnorm.HAT(model)
    optimizer = make_optimizer(model.parameters())
    probe = torch.randn(6, 3, size, size)
    reference = None
    for task in range(2):
        hat.begin_task(task)
        for b in range(3):
            model.train()
            x, y = torch.randn(8, 3, size, size) * (task + 1), torch.randint(0, 2, (8,))
            s = hat.scale(b, 3)
            loss = hat.loss(F.cross_entropy(model(x, task=task, s=s), y), s)
            optimizer.zero_grad()
            loss.backward()
            hat.protect(s)
            hat.step(optimizer)
        hat.end_task()
        model.eval()
        with torch.no_grad():
            out = model(probe, task=0)
        if reference is None:
            reference = out
    assert torch.equal(out, reference)
