"""Every task-aware norm against a direct reference computation, and the norm registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hatnorm
from hatnorm.blocks import MaskState

T = 3
C = 6
EPS = 1e-5
# a soft gate whose selection 1[a > 0.5] is [1, 0, 1, 0, 1, 0] (0.5 itself is not selected)
SOFT = torch.tensor([0.9, 0.2, 0.7, 0.5, 1.0, 0.0])
SELECTED = torch.tensor([True, False, True, False, True, False])


def per_channel(v: Tensor, x: Tensor) -> Tensor:
    """``v`` ``[C]`` shaped to broadcast over ``x`` ``[N, C, *spatial]``."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def randomize(norm: nn.Module) -> nn.Module:
    """Give γ, β and every running statistic distinct values, so a wrong row or channel shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in norm.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name == "weight" else 0.0))
        for name, b in norm.named_buffers():
            b.copy_(torch.randn_like(b) if name == "running_mean" else torch.rand_like(b) + 0.5)
    return norm


def batch_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean, biased and unbiased variance of ``x`` ``[N, C, *spatial]``."""
    dims = [0, *range(2, x.dim())]
    return x.mean(dims), x.var(dims, unbiased=False), x.var(dims, unbiased=True)


def bn_reference(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return per_channel(weight, x) * (x - per_channel(mean, x)) / per_channel(var + EPS, x).sqrt() + per_channel(bias, x)


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


BN_INPUTS = {
    "1d_NC": (hatnorm.norms.MaskedBatchNorm1d, (16, C)),
    "1d_NCL": (hatnorm.norms.MaskedBatchNorm1d, (8, C, 5)),
    "2d": (hatnorm.norms.MaskedBatchNorm2d, (8, C, 3, 4)),
}


# --- masked BatchNorm -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "shape"), BN_INPUTS.values(), ids=BN_INPUTS.keys())
def test_masked_bn_training_output_is_mask_times_batch_norm(cls, shape) -> None:
    norm = randomize(cls(C, num_tasks=T)).train()
    x = torch.randn(shape) * 2 + 1
    out = norm(x, SOFT, 1)
    mean, var, _ = batch_moments(x)
    expected = per_channel(SOFT, x) * bn_reference(x, mean, var, norm.weight.detach(), norm.bias.detach())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    reference = per_channel(SOFT, x) * F.batch_norm(x, None, None, norm.weight, norm.bias, True, 0.1, EPS)
    torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("cls", "shape"), BN_INPUTS.values(), ids=BN_INPUTS.keys())
def test_masked_bn_moves_only_selected_statistics_of_its_task(cls, shape) -> None:
    norm = randomize(cls(C, num_tasks=T)).train()
    before_mean, before_var = norm.running_mean.clone(), norm.running_var.clone()
    x = torch.randn(shape) * 2 + 1
    norm(x, SOFT, 1)
    mean, _, unbiased = batch_moments(x)
    # selected units of task 1: the momentum update of nn.BatchNorm (0.9·old + 0.1·batch, unbiased var)
    torch.testing.assert_close(norm.running_mean[1, SELECTED], (0.9 * before_mean[1] + 0.1 * mean)[SELECTED])
    torch.testing.assert_close(norm.running_var[1, SELECTED], (0.9 * before_var[1] + 0.1 * unbiased)[SELECTED])
    # unselected units and every other task: bit-identical
    assert torch.equal(norm.running_mean[1, ~SELECTED], before_mean[1, ~SELECTED])
    assert torch.equal(norm.running_var[1, ~SELECTED], before_var[1, ~SELECTED])
    for t in (0, 2):
        assert torch.equal(norm.running_mean[t], before_mean[t])
        assert torch.equal(norm.running_var[t], before_var[t])


def test_masked_bn_statistics_equal_nn_batchnorm_on_the_selected_units() -> None:
    norm = randomize(hatnorm.norms.MaskedBatchNorm2d(C, num_tasks=T)).train()
    reference = nn.BatchNorm2d(int(SELECTED.sum()))
    with torch.no_grad():
        reference.running_mean.copy_(norm.running_mean[2, SELECTED])
        reference.running_var.copy_(norm.running_var[2, SELECTED])
    for _ in range(3):
        x = torch.randn(8, C, 3, 3) * 3 - 1
        norm(x, SOFT, 2)
        reference(x[:, SELECTED])
    torch.testing.assert_close(norm.running_mean[2, SELECTED], reference.running_mean)
    torch.testing.assert_close(norm.running_var[2, SELECTED], reference.running_var)


@pytest.mark.parametrize(("cls", "shape"), BN_INPUTS.values(), ids=BN_INPUTS.keys())
def test_masked_bn_evaluation_uses_the_task_running_statistics(cls, shape) -> None:
    norm = randomize(cls(C, num_tasks=T)).eval()
    before = snapshot(norm)
    x = torch.randn(shape)
    w, b = norm.weight.detach(), norm.bias.detach()
    for t in range(T):
        expected = per_channel(SOFT, x) * bn_reference(x, norm.running_mean[t], norm.running_var[t], w, b)
        torch.testing.assert_close(norm(x, SOFT, t), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(norm(x, SOFT, 0), norm(x, SOFT, 1))
    # evaluation moves no statistic
    after = snapshot(norm)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_masked_bn_binary_mask_gives_exact_zeros_on_unselected_units() -> None:
    norm = randomize(hatnorm.norms.MaskedBatchNorm2d(C, num_tasks=T)).eval()
    out = norm(torch.randn(4, C, 2, 2), SELECTED.float(), 0)
    assert torch.equal(out[:, ~SELECTED], torch.zeros(4, 3, 2, 2))


def test_masked_bn_with_open_gates_is_nn_batchnorm() -> None:
    norm = randomize(hatnorm.norms.MaskedBatchNorm2d(C, num_tasks=T))
    reference = nn.BatchNorm2d(C)
    with torch.no_grad():
        reference.weight.copy_(norm.weight)
        reference.bias.copy_(norm.bias)
        reference.running_mean.copy_(norm.running_mean[0])
        reference.running_var.copy_(norm.running_var[0])
    x = torch.randn(8, C, 3, 3)
    ones = torch.ones(C)
    torch.testing.assert_close(norm.train()(x, ones, 0), reference.train()(x))
    torch.testing.assert_close(norm.running_mean[0], reference.running_mean)
    torch.testing.assert_close(norm.eval()(x, ones, 0), reference.eval()(x))


def test_masked_bn_gradient_reaches_gamma_beta_and_the_mask() -> None:
    norm = randomize(hatnorm.norms.MaskedBatchNorm2d(C, num_tasks=T)).train()
    mask = SOFT.clone().requires_grad_(True)
    x = torch.randn(8, C, 3, 3)
    (norm(x, mask, 0) * torch.randn(8, C, 3, 3)).sum().backward()
    # a unit with gate 0 passes no gradient to γ/β; the soft gate itself always gets one
    assert norm.weight.grad[5] == 0 and norm.bias.grad[5] == 0
    assert (norm.weight.grad[:5] != 0).all() and (norm.bias.grad[:5] != 0).all()
    assert (mask.grad != 0).all()


# --- per-task BatchNorm -----------------------------------------------------------------------------------


TASK_BN_INPUTS = {
    "1d_NC": (hatnorm.norms.TaskBatchNorm1d, (16, C)),
    "1d_NCL": (hatnorm.norms.TaskBatchNorm1d, (8, C, 5)),
    "2d": (hatnorm.norms.TaskBatchNorm2d, (8, C, 3, 4)),
}


@pytest.mark.parametrize(("cls", "shape"), TASK_BN_INPUTS.values(), ids=TASK_BN_INPUTS.keys())
def test_task_bn_training_uses_and_moves_only_its_own_bn(cls, shape) -> None:
    norm = randomize(cls(C, num_tasks=T)).train()
    before = snapshot(norm)
    x = torch.randn(shape) * 2 + 1
    out = norm(x, SOFT, 1)
    mean, var, unbiased = batch_moments(x)
    expected = per_channel(SOFT, x) * bn_reference(x, mean, var, before["weight"][1], before["bias"][1])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # task 1's statistics move on every unit; the other tasks' stay bit-identical
    torch.testing.assert_close(norm.running_mean[1], 0.9 * before["running_mean"][1] + 0.1 * mean)
    torch.testing.assert_close(norm.running_var[1], 0.9 * before["running_var"][1] + 0.1 * unbiased)
    for t in (0, 2):
        assert torch.equal(norm.running_mean[t], before["running_mean"][t])
        assert torch.equal(norm.running_var[t], before["running_var"][t])
    out.square().sum().backward()
    for p in (norm.weight, norm.bias):
        assert torch.equal(p.grad[[0, 2]], torch.zeros(2, C))
        assert (p.grad[1, SOFT > 0] != 0).all()


@pytest.mark.parametrize(("cls", "shape"), TASK_BN_INPUTS.values(), ids=TASK_BN_INPUTS.keys())
def test_task_bn_evaluation_uses_the_task_bn(cls, shape) -> None:
    norm = randomize(cls(C, num_tasks=T)).eval()
    x = torch.randn(shape)
    for t in range(T):
        expected = per_channel(SOFT, x) * bn_reference(x, norm.running_mean[t], norm.running_var[t],
                                                       norm.weight[t].detach(), norm.bias[t].detach())
        torch.testing.assert_close(norm(x, SOFT, t), expected, rtol=1e-5, atol=1e-6)


# --- shared BatchNorm and BN after the gate (baselines) ---------------------------------------------------


@pytest.mark.parametrize(("cls", "shape"), [(hatnorm.norms.SharedBatchNorm1d, (16, C)),
                                            (hatnorm.norms.SharedBatchNorm1d, (8, C, 5)),
                                            (hatnorm.norms.SharedBatchNorm2d, (8, C, 3, 4))])
def test_shared_bn_is_mask_times_one_batch_norm_for_all_tasks(cls, shape) -> None:
    norm = randomize(cls(C, num_tasks=T)).train()
    before = snapshot(norm)
    x = torch.randn(shape) * 2 + 1
    out = norm(x, SOFT, 2)
    mean, var, unbiased = batch_moments(x)
    expected = per_channel(SOFT, x) * bn_reference(x, mean, var, before["weight"], before["bias"])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # one set of statistics, moved on every unit whatever the task
    assert norm.running_mean.shape == (C,)
    torch.testing.assert_close(norm.running_mean, 0.9 * before["running_mean"] + 0.1 * mean)
    torch.testing.assert_close(norm.running_var, 0.9 * before["running_var"] + 0.1 * unbiased)
    norm.eval()
    expected = per_channel(SOFT, x) * bn_reference(x, norm.running_mean, norm.running_var,
                                                   norm.weight.detach(), norm.bias.detach())
    torch.testing.assert_close(norm(x, SOFT, 0), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm(x, SOFT, 1), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("cls", "shape"), [(hatnorm.norms.PostGateBatchNorm1d, (16, C)),
                                            (hatnorm.norms.PostGateBatchNorm2d, (8, C, 3, 4))])
def test_post_gate_bn_normalises_the_gated_input(cls, shape) -> None:
    norm = randomize(cls(C, num_tasks=T)).train()
    before = snapshot(norm)
    x = torch.randn(shape) * 2 + 1
    gated = per_channel(SOFT, x) * x
    out = norm(x, SOFT, 1)
    mean, var, unbiased = batch_moments(gated)
    torch.testing.assert_close(out, bn_reference(gated, mean, var, before["weight"], before["bias"]),
                               rtol=1e-4, atol=1e-5)
    moved_mean = 0.9 * before["running_mean"][1] + 0.1 * mean
    moved_var = 0.9 * before["running_var"][1] + 0.1 * unbiased
    torch.testing.assert_close(norm.running_mean[1, SELECTED], moved_mean[SELECTED])
    torch.testing.assert_close(norm.running_var[1, SELECTED], moved_var[SELECTED])
    assert torch.equal(norm.running_mean[1, ~SELECTED], before["running_mean"][1, ~SELECTED])
    assert torch.equal(norm.running_mean[[0, 2]], before["running_mean"][[0, 2]])
    norm.eval()
    expected = bn_reference(gated, norm.running_mean[2], norm.running_var[2], norm.weight.detach(), norm.bias.detach())
    torch.testing.assert_close(norm(x, SOFT, 2), expected, rtol=1e-5, atol=1e-6)


# --- no norm ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, C), (4, C, 5), (4, C, 3, 2), (2, C, 2, 2, 2)])
def test_no_norm_is_the_pure_gate(shape) -> None:
    norm = hatnorm.norms.NoNorm(C, num_tasks=T)
    x = torch.randn(shape)
    assert torch.equal(norm(x, SOFT, 2), x * per_channel(SOFT, x))
    assert list(norm.parameters()) == []


@pytest.mark.parametrize("shape", [(4, C), (4, 5, C), (2, 3, 2, C)])
def test_no_norm_features_last_gates_the_last_dim(shape) -> None:
    norm = hatnorm.norms.NoNorm(C, num_tasks=T, channel_dim=-1)
    x = torch.randn(shape)
    assert torch.equal(norm(x, SOFT, 0), x * SOFT)


# --- masked LayerNorm -------------------------------------------------------------------------------------


LN_SHAPES = [(5, C), (3, 4, C), (2, 3, 2, C)]


@pytest.mark.parametrize("shape", LN_SHAPES)
def test_masked_ln_with_a_binary_mask_is_layer_norm_over_the_selected_slice(shape) -> None:
    norm = randomize(hatnorm.norms.MaskedLayerNorm(C, num_tasks=T))
    x = torch.randn(shape) * 3 + 2
    out = norm(x, SELECTED.float(), 0)
    w, b = norm.weight.detach(), norm.bias.detach()
    expected = F.layer_norm(x[..., SELECTED], (3,), w[SELECTED], b[SELECTED], EPS)
    torch.testing.assert_close(out[..., SELECTED], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[..., ~SELECTED], torch.zeros_like(out[..., ~SELECTED]))


@pytest.mark.parametrize("shape", LN_SHAPES)
def test_masked_ln_with_a_soft_mask_uses_the_selected_statistics(shape) -> None:
    norm = randomize(hatnorm.norms.MaskedLayerNorm(C, num_tasks=T))
    x = torch.randn(shape) * 3 + 2
    out = norm(x, SOFT, 1)
    # μ, σ² over the selected features only (biased), by slicing
    mean = x[..., SELECTED].mean(-1, keepdim=True)
    var = x[..., SELECTED].var(-1, unbiased=False, keepdim=True)
    expected = SOFT * (norm.weight.detach() * (x - mean) / (var + EPS).sqrt() + norm.bias.detach())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_masked_ln_ignores_unselected_features() -> None:
    norm = randomize(hatnorm.norms.MaskedLayerNorm(C, num_tasks=T))
    x = torch.randn(4, C)
    y = x.clone()
    y[:, ~SELECTED] = torch.randn(4, 3) * 100
    torch.testing.assert_close(norm(x, SOFT, 0)[:, SELECTED], norm(y, SOFT, 0)[:, SELECTED], rtol=0, atol=1e-6)


def test_masked_ln_with_all_ones_is_layer_norm() -> None:
    norm = randomize(hatnorm.norms.MaskedLayerNorm(C, num_tasks=T))
    x = torch.randn(3, 4, C)
    expected = F.layer_norm(x, (C,), norm.weight, norm.bias, EPS)
    torch.testing.assert_close(norm(x, torch.ones(C), 2), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask", [torch.zeros(C), torch.full((C,), 0.3)], ids=["zeros", "soft_none_selected"])
def test_masked_ln_with_no_selected_feature_gives_zeros_and_no_nan(mask) -> None:
    norm = randomize(hatnorm.norms.MaskedLayerNorm(C, num_tasks=T))
    x = torch.randn(4, C, requires_grad=True)
    mask = mask.clone().requires_grad_(True)
    out = norm(x, mask, 0)
    assert torch.equal(out, torch.zeros(4, C))
    out.sum().backward()
    for grad in (x.grad, mask.grad, norm.weight.grad, norm.bias.grad):
        assert torch.isfinite(grad).all()


# --- shared and per-task LayerNorm (baselines) ------------------------------------------------------------


@pytest.mark.parametrize("shape", LN_SHAPES)
def test_shared_ln_is_mask_times_layer_norm(shape) -> None:
    norm = randomize(hatnorm.norms.SharedLayerNorm(C, num_tasks=T))
    x = torch.randn(shape) * 2 - 1
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    expected = SOFT * (norm.weight.detach() * (x - mean) / (var + EPS).sqrt() + norm.bias.detach())
    for t in range(T):
        torch.testing.assert_close(norm(x, SOFT, t), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", LN_SHAPES)
def test_task_ln_uses_the_task_affine(shape) -> None:
    norm = randomize(hatnorm.norms.TaskLayerNorm(C, num_tasks=T))
    x = torch.randn(shape) * 2 - 1
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    for t in range(T):
        expected = SOFT * (norm.weight[t].detach() * (x - mean) / (var + EPS).sqrt() + norm.bias[t].detach())
        torch.testing.assert_close(norm(x, SOFT, t), expected, rtol=1e-5, atol=1e-5)
    norm(x, SOFT, 1).square().sum().backward()
    assert torch.equal(norm.weight.grad[[0, 2]], torch.zeros(2, C))
    assert (norm.weight.grad[1, SOFT > 0] != 0).all()


# --- the norms' own gradient multipliers ------------------------------------------------------------------


PREVIOUS = MaskState(cumulative=torch.tensor([1.0, 0.0, 0.5, 0.25, 1.0, 0.0]), summative=torch.zeros(C))
SHARED = [hatnorm.norms.MaskedBatchNorm1d, hatnorm.norms.MaskedBatchNorm2d, hatnorm.norms.SharedBatchNorm1d,
          hatnorm.norms.SharedBatchNorm2d, hatnorm.norms.PostGateBatchNorm1d, hatnorm.norms.PostGateBatchNorm2d,
          hatnorm.norms.MaskedLayerNorm, hatnorm.norms.SharedLayerNorm]
PER_TASK = [hatnorm.norms.TaskBatchNorm1d, hatnorm.norms.TaskBatchNorm2d, hatnorm.norms.TaskLayerNorm]


@pytest.mark.parametrize("cls", SHARED, ids=lambda c: c.__name__)
def test_shared_affine_is_protected_like_a_bias(cls) -> None:
    mults = cls(C, num_tasks=T).gradient_multipliers(PREVIOUS, 1, hatnorm.policies.HATPolicy())
    assert set(mults) == {"weight", "bias"}
    for m in mults.values():
        assert torch.equal(m, torch.tensor([0.0, 1.0, 0.5, 0.75, 0.0, 1.0]))


@pytest.mark.parametrize("cls", PER_TASK, ids=lambda c: c.__name__)
def test_per_task_affine_is_owned_by_its_task(cls) -> None:
    mults = cls(C, num_tasks=T).gradient_multipliers(PREVIOUS, 2, hatnorm.policies.HATPolicy())
    own = torch.zeros(T, C)
    own[2] = 1
    assert set(mults) == {"weight", "bias"}
    assert all(torch.equal(m, own) for m in mults.values())


def test_no_norm_has_nothing_to_protect() -> None:
    assert hatnorm.norms.NoNorm(C, num_tasks=T).gradient_multipliers(PREVIOUS, 1, hatnorm.policies.HATPolicy()) == {}


# --- the norm registry ------------------------------------------------------------------------------------


BUILDS = [
    ("masked_bn", 1, hatnorm.norms.MaskedBatchNorm1d),
    ("masked_bn", 2, hatnorm.norms.MaskedBatchNorm2d),
    ("task_bn", 1, hatnorm.norms.TaskBatchNorm1d),
    ("task_bn", 2, hatnorm.norms.TaskBatchNorm2d),
    ("shared_bn", 1, hatnorm.norms.SharedBatchNorm1d),
    ("shared_bn", 2, hatnorm.norms.SharedBatchNorm2d),
    ("post_gate_bn", 1, hatnorm.norms.PostGateBatchNorm1d),
    ("post_gate_bn", 2, hatnorm.norms.PostGateBatchNorm2d),
    ("masked_ln", None, hatnorm.norms.MaskedLayerNorm),
    ("masked_ln", 1, hatnorm.norms.MaskedLayerNorm),
    ("shared_ln", None, hatnorm.norms.SharedLayerNorm),
    ("task_ln", None, hatnorm.norms.TaskLayerNorm),
    ("none", None, hatnorm.norms.NoNorm),
    ("none", 1, hatnorm.norms.NoNorm),
    ("none", 2, hatnorm.norms.NoNorm),
]


def test_required_norm_names_are_registered() -> None:
    assert {"masked_bn", "task_bn", "masked_ln", "shared_bn", "none"} <= set(hatnorm.list_norms())
    assert {"masked_bn", "task_bn", "shared_bn", "none"} <= set(hatnorm.list_norms("batch"))
    assert {"masked_ln", "none"} <= set(hatnorm.list_norms("layer"))
    assert "masked_ln" not in hatnorm.list_norms("batch")
    assert "masked_bn" not in hatnorm.list_norms("layer")


@pytest.mark.parametrize(("name", "dims", "cls"), BUILDS, ids=[f"{n}-dims{d}" for n, d, _ in BUILDS])
def test_registered_name_builds_the_right_class(name, dims, cls) -> None:
    spec = hatnorm.get_norm(name)
    assert spec.name == name
    norm_layer = spec.layer(num_tasks=4, dims=dims)
    norm = norm_layer(7)  # the factory stands where nn.BatchNorm2d stood: norm_layer(num_features)
    assert type(norm) is cls
    assert norm.num_features == 7
    assert norm.num_tasks == 4


def test_none_gates_the_dim_its_layout_names() -> None:
    x = torch.randn(2, C, C)
    first = hatnorm.get_norm("none").layer(num_tasks=T, dims=2)(C)
    last = hatnorm.get_norm("none").layer(num_tasks=T, dims=None)(C)
    assert torch.equal(first(x, SOFT, 0), x * SOFT[:, None])
    assert torch.equal(last(x, SOFT, 0), x * SOFT)


@pytest.mark.parametrize(("name", "dims"), [("masked_bn", 0), ("masked_bn", 3), ("masked_ln", 2)])
def test_registered_builder_refuses_a_layout_it_does_not_have(name, dims) -> None:
    cls = hatnorm.get_norm(name).norm_class.__name__
    with pytest.raises(ValueError, match=rf"^{cls}: dims must be .*, got {dims}$"):
        hatnorm.get_norm(name).layer(num_tasks=T, dims=dims)(C)


@pytest.mark.parametrize("name", hatnorm.list_norms())
def test_a_norm_declares_its_layout_once_and_its_instances_follow_it(name) -> None:
    cls = hatnorm.get_norm(name).norm_class
    for dims, ranks in cls.ranks.items():
        norm = hatnorm.get_norm(name).layer(num_tasks=T, dims=dims)(C)
        assert norm.input_ranks == ranks
        channels_last = cls.layout == "channels_last" or (cls.layout == "any" and dims is None)
        assert norm.channel_dim == (-1 if channels_last else 1)


@pytest.mark.parametrize("name", hatnorm.list_norms())
def test_default_multipliers_follow_the_parameter_shapes(name) -> None:
    norm = hatnorm.get_norm(name).layer(num_tasks=T, dims=next(iter(hatnorm.get_norm(name).norm_class.ranks)))(C)
    previous = hatnorm.blocks.MaskState(cumulative=torch.tensor([1.0, 0, 1, 0, 0.5, 0]), summative=torch.ones(C))
    multipliers = norm.gradient_multipliers(previous, 1, hatnorm.policies.HATPolicy())
    assert set(multipliers) == {n for n, _ in norm.named_parameters()}
    for pname, p in norm.named_parameters():
        if p.shape == (C,):  # shared by every task: protected like a bias, 1 − a^{<t}
            assert torch.equal(multipliers[pname], 1 - previous.cumulative), pname
        else:  # one row per task: task 1 trains its own row only
            assert p.shape == (T, C)
            expected = torch.zeros(T, C)
            expected[1] = 1
            assert torch.equal(multipliers[pname], expected), pname


def test_registered_builders_pass_options_on() -> None:
    norm = hatnorm.get_norm("masked_bn").layer(num_tasks=2, dims=2, eps=1e-3, momentum=0.5)(4)
    assert (norm.eps, norm.momentum) == (1e-3, 0.5)


def inputs_for(family: str) -> list[tuple[int | None, tuple[int, ...]]]:
    """(dims, input shape) pairs a norm of ``family`` must take."""
    batch = [(1, (6, C)), (1, (4, C, 5)), (2, (4, C, 3, 3))]
    layer = [(None, (6, C)), (None, (2, 4, C))]
    return {"batch": batch, "layer": layer, "any": batch + layer}[family]


@pytest.mark.parametrize("name", hatnorm.list_norms())
def test_every_registered_norm_builds_and_runs_forward_and_backward(name) -> None:
    spec = hatnorm.get_norm(name)
    gate = hatnorm.HATGate(C, num_tasks=T)
    torch.manual_seed(0)
    for dims, shape in inputs_for(spec.family):
        norm = spec.layer(num_tasks=T, dims=dims)(C)
        assert isinstance(norm, hatnorm.MaskedNorm)
        norm.train()
        gate.zero_grad()
        x = torch.randn(shape, requires_grad=True)
        out = norm(x, gate(1, 2.0), 1)
        assert out.shape == x.shape
        assert torch.isfinite(out).all()
        out.square().sum().backward()
        assert torch.isfinite(x.grad).all()
        assert torch.isfinite(gate.embedding.grad).all()
        for pname, p in norm.named_parameters():
            assert p.grad is not None, pname
            assert torch.isfinite(p.grad).all(), pname
        norm.eval()
        assert torch.isfinite(norm(x.detach(), gate.eval()(1), 1)).all()
        gate.train()


def test_masked_ln_follows_a_gate_written_in_place_between_calls() -> None:
    """The selection a gate tensor gives is computed once while the tensor is unchanged (the pre-norms of a
    transformer read one); after an in-place write the norm uses the new selection."""
    norm = randomize(hatnorm.norms.MaskedLayerNorm(C, num_tasks=T))
    x = torch.randn(3, 4, C) * 3 + 2
    mask = SOFT.clone()
    first = norm(x, mask, 0)
    assert torch.equal(norm(x, mask, 0), first)
    mask.copy_(1 - SOFT)
    torch.testing.assert_close(norm(x, mask, 0), norm(x, (1 - SOFT).clone(), 0), rtol=0, atol=0)
    assert not torch.allclose(norm(x, mask, 0), first)


# the masked LayerNorm's fused CPU kernels (hatnorm/_fused.py) against its ATen version -------------------

def _masked_ln_run(norm: nn.Module, x: Tensor, mask: Tensor, dy: Tensor, *, fused: bool) -> list[Tensor]:
    """Output and gradients of x, the gate, γ and β of one masked-LN call on one path."""
    from hatnorm import _fused

    x, mask = x.clone().requires_grad_(), mask.clone().requires_grad_()
    with _fused.kernels(fused):
        out = norm(x, mask, 0)
        return [out.detach(), *torch.autograd.grad(out, (x, mask, norm.weight, norm.bias), dy)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("selected", ["none", "one", "half", "all"])
def test_fused_masked_ln_agrees_with_the_aten_version(dtype: torch.dtype, selected: str) -> None:
    from hatnorm import _fused

    gen = torch.Generator().manual_seed(0)
    channels = 96
    norm = hatnorm.norms.MaskedLayerNorm(channels, num_tasks=2).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(generator=gen)
        norm.bias.normal_(generator=gen)
    x = torch.randn(4, 33, channels, generator=gen, dtype=dtype) * 3 + 1
    dy = torch.randn(x.shape, generator=gen, dtype=dtype)
    chosen = {"none": 0, "one": 1, "half": channels // 2, "all": channels}[selected]
    mask = torch.rand(channels, generator=gen, dtype=dtype) * 0.5  # unselected, yet open enough to matter
    mask[torch.randperm(channels, generator=gen)[:chosen]] = 0.75
    assert _fused.applies(x, mask, norm.weight, norm.bias)
    fused = _masked_ln_run(norm, x, mask, dy, fused=True)
    aten = _masked_ln_run(norm, x, mask, dy, fused=False)
    tol = 2e-4 if dtype == torch.float32 else 1e-10
    for what, a, b in zip(("out", "x", "mask", "weight", "bias"), fused, aten, strict=True):
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, msg=what)
    if selected == "none":  # no selected feature: zeros, and no gradient
        assert all(torch.equal(t, torch.zeros_like(t)) for t in fused)
    # the same call again gives the same bits; without gradients the output is the same
    again = _masked_ln_run(norm, x, mask, dy, fused=True)
    assert all(torch.equal(a, b) for a, b in zip(fused, again, strict=True))
    with torch.no_grad():
        assert torch.equal(norm(x, mask, 0), fused[0])


def test_fused_masked_ln_reads_a_strided_input() -> None:
    """A channel LayerNorm over NCHW hands the kernels a moved (non-contiguous) view."""
    gen = torch.Generator().manual_seed(1)
    norm = hatnorm.norms.MaskedChannelLayerNorm(16, num_tasks=2)
    x = torch.randn(3, 16, 5, 7, generator=gen)
    mask = torch.rand(16, generator=gen)
    dy = torch.randn(x.shape, generator=gen)
    fused = _masked_ln_run(norm, x, mask, dy, fused=True)
    aten = _masked_ln_run(norm, x, mask, dy, fused=False)
    for a, b in zip(fused, aten, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4)


def test_fused_kernels_are_not_used_where_they_do_not_apply() -> None:
    from hatnorm import _fused

    x, mask = torch.randn(2, 8), torch.rand(8)
    assert _fused.applies(x, mask, mask, mask)
    assert not _fused.applies(x.half(), mask.half(), mask.half(), mask.half())  # computed in float32 by ATen
    assert not _fused.applies(x, mask.double(), mask, mask)  # mixed dtypes
    assert not _fused.applies(x.to("meta"), mask, mask, mask)
    with _fused.kernels(False):
        assert not _fused.applies(x, mask, mask, mask)
    assert _fused.applies(x, mask, mask, mask)


def test_hatnorm_fused_0_in_the_environment_turns_the_kernels_off() -> None:
    import os
    import subprocess
    import sys

    code = "from hatnorm import _fused; print(_fused.enabled())"
    run = [sys.executable, "-c", code]
    off = subprocess.run(run, env=os.environ | {"HATNORM_FUSED": "0"}, capture_output=True, text=True, check=True)
    on = subprocess.run(run, env=os.environ | {"HATNORM_FUSED": "1"}, capture_output=True, text=True, check=True)
    assert (off.stdout.strip(), on.stdout.strip()) == ("False", "True")
