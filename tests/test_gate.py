"""HAT's gate: σ(s·e), the per-batch scale schedule, the embedding-gradient compensation and consolidation."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

import hatnorm


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def gate_with(rows: list[list[float]], **options: object) -> hatnorm.HATGate:
    """A gate whose embedding rows are ``rows`` (one per task)."""
    gate = hatnorm.HATGate(len(rows[0]), num_tasks=len(rows), **options)
    with torch.no_grad():
        gate.embedding.copy_(torch.tensor(rows))
    return gate


# --- hat_gate ---------------------------------------------------------------------------------------------


def test_hat_gate_is_the_sigmoid_of_s_times_e() -> None:
    e = torch.tensor([0.0, 1.0, -2.0, 0.25])
    a = hatnorm.functional.hat_gate(e, 0.5)
    expected = torch.tensor([0.5, sigmoid(0.5), sigmoid(-1.0), sigmoid(0.125)])
    torch.testing.assert_close(a, expected, rtol=0, atol=1e-7)


def test_hat_gate_accepts_a_tensor_scale_and_passes_gradients() -> None:
    e = torch.tensor([0.3, -0.7], requires_grad=True)
    a = hatnorm.functional.hat_gate(e, torch.tensor(2.0))
    a.sum().backward()
    # d σ(s e)/de = s σ(s e)(1 − σ(s e))
    expected = [2.0 * sigmoid(2 * v) * (1 - sigmoid(2 * v)) for v in (0.3, -0.7)]
    torch.testing.assert_close(e.grad, torch.tensor(expected), rtol=0, atol=1e-7)


def _subnormals(t: torch.Tensor) -> int:
    return int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum())


@pytest.mark.parametrize("s", [1.0, 25.0, 100.0, 200.0, 400.0])
def test_hat_gate_is_held_at_the_floor_and_never_subnormal(s: float) -> None:
    e = torch.linspace(-6, 6, 4001)
    a, plain = hatnorm.functional.hat_gate(e, s), torch.sigmoid(s * e)
    below = plain < hatnorm.functional.GATE_FLOOR
    assert torch.equal(a[below], torch.full((int(below.sum()),), hatnorm.functional.GATE_FLOOR))
    assert torch.equal(a[~below], plain[~below])
    assert _subnormals(a) == 0
    assert torch.equal(hatnorm.functional.hat_gate(e, s, floor=0), plain)


@pytest.mark.parametrize("s", [1.0, 100.0, 400.0])
def test_hat_gate_keeps_the_sigmoid_gradient_below_the_floor(s: float) -> None:
    # the embedding gradient HAT's compensation rescales is σ'(s·e), also where the gate's value is 0
    e = torch.linspace(-1, 1, 2001, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2001, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (hatnorm.functional.hat_gate(e, s) * upstream).sum().backward()
    floored = e.grad.clone()
    e.grad = None
    (torch.sigmoid(s * e) * upstream).sum().backward()
    assert torch.equal(floored, e.grad)


def test_gate_floor_is_an_option_of_the_module() -> None:
    gate = gate_with([[-0.5, 0.5]])
    plain = gate_with([[-0.5, 0.5]], floor=0.0)
    e = torch.tensor([-0.5, 0.5])
    assert torch.equal(gate(0, 100.0), torch.tensor([1e-8, 1.0]))  # σ(−50) ≈ 2e-22 is below the floor
    assert torch.equal(plain(0, 100.0), torch.sigmoid(100.0 * e))
    assert "floor=1e-08" in repr(gate)
    with pytest.raises(ValueError, match=r"floor must be a number in \[0, 0.5\)"):
        hatnorm.HATGate(3, num_tasks=1, floor=0.5)


@pytest.mark.parametrize("floor", [-1e-12, 0.5, math.nan, "0"])
def test_hat_gate_refuses_a_bad_floor(floor: object) -> None:
    with pytest.raises(ValueError, match=r"floor must be a (finite )?number"):
        hatnorm.functional.hat_gate(torch.zeros(3), 1.0, floor=floor)


# --- anneal_scale -----------------------------------------------------------------------------------------


def test_anneal_scale_first_batch_is_one_over_s_max() -> None:
    assert hatnorm.functional.anneal_scale(0, 10, 400.0) == pytest.approx(1 / 400)


def test_anneal_scale_last_batch_is_s_max() -> None:
    assert hatnorm.functional.anneal_scale(9, 10, 400.0) == pytest.approx(400.0)


def test_anneal_scale_single_batch_is_s_max() -> None:
    assert hatnorm.functional.anneal_scale(0, 1, 400.0) == 400.0


def test_anneal_scale_middle_batch_by_hand() -> None:
    # b = 3 of B = 5 (0-based batch 2): 1/400 + (400 − 1/400)·2/4 = 0.0025 + 199.99875
    assert hatnorm.functional.anneal_scale(2, 5, 400.0) == pytest.approx(200.00125, rel=1e-12)
    # b = 2 of B = 4 with s_max = 10: 0.1 + 9.9·1/3 = 3.4
    assert hatnorm.functional.anneal_scale(1, 4, 10.0) == pytest.approx(3.4, rel=1e-12)


def test_anneal_scale_increases_over_the_epoch() -> None:
    scales = [hatnorm.functional.anneal_scale(b, 7, 50.0) for b in range(7)]
    assert scales == sorted(scales)
    assert len(set(scales)) == 7


# --- compensation -----------------------------------------------------------------------------------------


def test_compensation_factor_by_hand() -> None:
    e = torch.tensor([0.5, -0.5, 0.0], dtype=torch.float64)
    s, s_max = 2.0, 400.0
    expected = [s_max / s * (math.cosh(s * v) + 1) / (math.cosh(v) + 1) for v in (0.5, -0.5, 0.0)]
    # numbers: 200·(cosh 1 + 1)/(cosh 0.5 + 1) = 239.053...; at e = 0 the factor is s_max/s = 200
    assert expected[0] == pytest.approx(239.0534, abs=1e-4)
    assert expected[2] == 200.0
    factor = hatnorm.functional.compensation_factor(e, s, s_max)
    torch.testing.assert_close(factor, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)


def test_compensation_clamps_s_times_e_at_50() -> None:
    # s·e = ±100 is clamped to ±50: factor = (400/100)·(cosh 50 + 1)/(cosh 1 + 1); unclamped cosh(100)
    # overflows float32 to inf.
    e = torch.tensor([1.0, -1.0])
    factor = hatnorm.functional.compensation_factor(e, 100.0, 400.0)
    expected = 4.0 * (math.cosh(50.0) + 1) / (math.cosh(1.0) + 1)
    assert torch.isfinite(factor).all()
    torch.testing.assert_close(factor, torch.full((2,), expected), rtol=1e-5, atol=0)
    assert math.isinf(torch.cosh(torch.tensor(100.0)).item())


def test_compensation_clamp_threshold_is_an_option() -> None:
    e = torch.tensor([1.0])
    factor = hatnorm.functional.compensation_factor(e, 10.0, 400.0, thres_cosh=3.0)
    expected = 40.0 * (math.cosh(3.0) + 1) / (math.cosh(1.0) + 1)
    torch.testing.assert_close(factor, torch.tensor([expected]), rtol=1e-6, atol=0)


def test_compensate_multiplies_the_gradient_by_the_factor() -> None:
    e = torch.tensor([0.5, -0.25, 3.0], dtype=torch.float64)
    grad = torch.tensor([1.5, -2.0, 0.1], dtype=torch.float64)
    s, s_max = 0.75, 400.0
    expected = [
        g * s_max / s * (math.cosh(max(-50.0, min(50.0, s * v))) + 1) / (math.cosh(v) + 1)
        for g, v in zip((1.5, -2.0, 0.1), (0.5, -0.25, 3.0), strict=True)
    ]
    torch.testing.assert_close(hatnorm.functional.compensate(grad, e, s, s_max),
                               torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)


# --- HATGate ----------------------------------------------------------------------------------------------


def test_gate_embedding_is_one_row_per_task() -> None:
    gate = hatnorm.HATGate(5, num_tasks=3)
    assert gate.embedding.shape == (3, 5)
    assert gate.num_features == 5
    assert torch.equal(gate.cumulative, torch.zeros(5))
    assert torch.equal(gate.summative, torch.zeros(5))


def test_gate_in_training_needs_s() -> None:
    gate = gate_with([[0.1, -0.2]])
    gate.train()
    with pytest.raises(ValueError, match="s must be given while training"):
        gate(0)


def test_gate_in_training_is_the_soft_gate_at_s() -> None:
    gate = gate_with([[0.1, -0.2, 0.0], [2.0, 0.5, -1.0]])
    gate.train()
    a = gate(1, 3.0)
    torch.testing.assert_close(a, torch.tensor([sigmoid(6.0), sigmoid(1.5), sigmoid(-3.0)]), rtol=0, atol=1e-7)
    a.sum().backward()
    # only the row of the task gets a gradient
    assert torch.equal(gate.embedding.grad[0], torch.zeros(3))
    assert (gate.embedding.grad[1] != 0).all()


def test_gate_in_evaluation_is_binarized() -> None:
    gate = gate_with([[0.3, -0.001, 0.0, 1e-4, -5.0]])
    gate.eval()
    a = gate(0)
    assert torch.equal(a, torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0]))
    # s is ignored in evaluation
    assert torch.equal(gate(0, 1.0), a)


def test_gate_in_evaluation_without_binarize_is_sigmoid_at_s_max() -> None:
    gate = gate_with([[0.3, -0.001, 0.0, 0.002]], binarize=False, s_max=400.0)
    gate.eval()
    expected = torch.tensor([sigmoid(120.0), sigmoid(-0.4), 0.5, sigmoid(0.8)])
    torch.testing.assert_close(gate(0), expected, rtol=0, atol=1e-7)


def test_selection_is_e_greater_than_zero() -> None:
    gate = gate_with([[0.3, -0.001, 0.0, 1e-4], [-1.0, 1.0, 1.0, -1.0]])
    assert torch.equal(gate.selection(0), torch.tensor([True, False, False, True]))
    assert torch.equal(gate.selection(1), torch.tensor([False, True, True, False]))
    assert gate.selection(0).dtype == torch.bool


def test_consolidate_binarized_takes_cumulative_max_and_counts_tasks() -> None:
    gate = gate_with([[1.0, 1.0, -1.0, -1.0], [1.0, -1.0, 1.0, -1.0], [0.5, -2.0, -3.0, -0.1]])
    gate.consolidate(0)
    assert torch.equal(gate.cumulative, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert torch.equal(gate.summative, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    gate.consolidate(1)
    assert torch.equal(gate.cumulative, torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert torch.equal(gate.summative, torch.tensor([2.0, 1.0, 1.0, 0.0]))
    gate.consolidate(2)
    assert torch.equal(gate.cumulative, torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert torch.equal(gate.summative, torch.tensor([3.0, 1.0, 1.0, 0.0]))


def test_consolidate_soft_takes_the_max_of_gates_at_s_max() -> None:
    # σ(400·e): e = 0.001 → σ(0.4), e = 0.002 → σ(0.8), e = −0.001 → σ(−0.4)
    gate = gate_with([[0.001, -0.001, 0.002], [0.002, -0.002, -0.001]], binarize=False, s_max=400.0)
    gate.consolidate(0)
    torch.testing.assert_close(gate.cumulative, torch.tensor([sigmoid(0.4), sigmoid(-0.4), sigmoid(0.8)]),
                               rtol=0, atol=1e-6)
    gate.consolidate(1)
    torch.testing.assert_close(gate.cumulative, torch.tensor([sigmoid(0.8), sigmoid(-0.4), sigmoid(0.8)]),
                               rtol=0, atol=1e-6)
    # the summative mask counts selections (e > 0), even for soft masks
    assert torch.equal(gate.summative, torch.tensor([2.0, 0.0, 1.0]))


def test_consolidate_changes_no_embedding() -> None:
    gate = gate_with([[1.0, -1.0], [0.5, 0.5]])
    before = gate.embedding.detach().clone()
    gate.consolidate(0)
    assert torch.equal(gate.embedding.detach(), before)


def test_gate_state_exposes_the_buffers() -> None:
    gate = gate_with([[1.0, -1.0, 1.0, -1.0]])
    gate.consolidate(0)
    state = gate.state()
    assert torch.equal(state.cumulative, gate.cumulative)
    assert torch.equal(state.summative, gate.summative)
    assert state.free == pytest.approx(0.5)


def test_gate_values_lie_in_unit_interval_and_saturate_at_s_max() -> None:
    torch.manual_seed(0)
    gate = hatnorm.HATGate(1000, num_tasks=1, binarize=False)
    with torch.no_grad():
        gate.embedding.copy_(torch.randn(1, 1000).sign() * (0.1 + torch.rand(1, 1000)))
    gate.eval()
    a = gate(0)
    assert ((a >= 0) & (a <= 1)).all()
    assert (torch.minimum(a, 1 - a) <= 1e-6).all()


# --- checks once: a model that validated its task and scale calls its parts through the trusted path --------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("s", [25.0, torch.tensor(25.0)])
def test_the_trusted_gate_is_the_checked_gate(training: bool, s: float | torch.Tensor) -> None:
    torch.manual_seed(0)
    gate = hatnorm.HATGate(6, num_tasks=3).train(training)
    assert torch.equal(gate(2, s, trusted=True), gate(2, s))


# small settings of the reference architectures, with their input side
SMALL = {"mlp": ({"in_features": 3 * 8 * 8, "hidden": (8, 8)}, 8), "alexnet": ({"size": 28, "width": 0.05}, 28),
         "resnet18": ({"base_width": 4}, 16), "vit": ({"image_size": 8, "patch_size": 4, "dim": 8, "depth": 1,
                                                      "num_heads": 2, "stem": "conv"}, 8),
         "vit_micro": ({"image_size": 8}, 8), "vit_tiny": ({"image_size": 8, "depth": 1}, 8)}


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_a_reference_model_checks_task_and_scale_once_and_its_parts_take_the_trusted_path(arch: str) -> None:
    options, size = SMALL[arch]
    model = hatnorm.build(arch, num_tasks=2, num_classes=2, norm="none", **options).train()
    calls: list[tuple[str, object]] = []
    parts = [(n, m) for n, m in model.named_modules()
             if isinstance(m, hatnorm.HATGate | hatnorm.MaskedNorm | hatnorm.TaskHeads)]

    def record(name: str) -> Callable[..., None]:
        return lambda module, args, kwargs: calls.append((name, kwargs.get("trusted")))

    handles = [m.register_forward_pre_hook(record(name), with_kwargs=True) for name, m in parts]
    model(torch.randn(2, 3, size, size), task=1, s=torch.tensor(25.0))
    for handle in handles:
        handle.remove()
    assert {name for name, _ in calls} == {name for name, _ in parts}
    assert all(trusted is True for _, trusted in calls), [name for name, trusted in calls if trusted is not True]
    with pytest.raises(ValueError, match=r"task must be in \[0, 2\), got 2"):  # still checked, at the top
        model(torch.randn(2, 3, size, size), task=2, s=25.0)
    with pytest.raises(ValueError, match=r"s must be a finite number > 0, got a tensor holding -1.0"):
        model(torch.randn(2, 3, size, size), task=1, s=torch.tensor(-1.0))
