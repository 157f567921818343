"""The gates, the gate functions and the scale schedule refuse a bad task, scale or option."""

from __future__ import annotations

import math

import pytest
import torch

import hatnorm
from errors._support import GATE_TASK_CASES, C, T, refused

# --- gates ------------------------------------------------------------------------------------------------


def make_gate() -> hatnorm.HATGate:
    torch.manual_seed(0)
    gate = hatnorm.HATGate(C, num_tasks=T)
    gate.consolidate(0)
    return gate.train()


@pytest.mark.parametrize(("task", "exc", "match"), GATE_TASK_CASES)
@pytest.mark.parametrize("method", ["forward", "selection", "final_mask", "consolidate"])
def test_gate_refuses_a_bad_task(method, task, exc, match) -> None:
    gate = make_gate()
    call = {"forward": lambda: gate(task, 1.0), "selection": lambda: gate.selection(task),
            "final_mask": lambda: gate.final_mask(task), "consolidate": lambda: gate.consolidate(task)}[method]
    with refused(gate, exc, match):
        call()


def test_gate_accepts_an_integer_tensor_task() -> None:
    gate = make_gate()
    assert torch.equal(gate(torch.tensor(2), 1.0), gate(2, 1.0))


@pytest.mark.parametrize(("s", "match"), [
    (0.0, r"s must be a finite number > 0, got 0.0"),
    (-1.0, r"s must be a finite number > 0, got -1.0"),
    (0, r"s must be a finite number > 0, got 0"),
    (math.nan, r"s must be a finite number > 0, got nan"),
    (math.inf, r"s must be a finite number > 0, got inf"),
    ("1", r"s must be a finite number > 0, got '1'"),
    (torch.tensor([1.0, 2.0]), r"s must be a number > 0 or a one-element float tensor, got a tensor of shape \(2,\)"),
    (torch.tensor(2), r"s must be a number > 0 or a one-element float tensor, got a tensor of shape \(\) and dtype "
                      r"torch.int64"),
])
def test_gate_refuses_a_bad_scale_in_training(s, match) -> None:
    gate = make_gate()
    with refused(gate, ValueError, match):
        gate(0, s)


def test_gate_needs_a_scale_in_training() -> None:
    gate = make_gate()
    with refused(gate, ValueError, r"s must be given while training \(a number > 0"):
        gate(0)


@pytest.mark.parametrize(("args", "kwargs", "exc", "match"), [
    ((0,), {"num_tasks": T}, ValueError, r"num_features must be an int ≥ 1, got 0"),
    ((C,), {"num_tasks": 0}, ValueError, r"num_tasks must be an int ≥ 1, got 0"),
    ((C,), {"num_tasks": 10**6}, ValueError, r"num_tasks must be ≤ 10,000 .*, got 1,000,000"),
    ((C,), {"num_tasks": T, "s_max": 0.0}, ValueError, r"s_max must be a finite number > 0, got 0.0"),
    ((C,), {"num_tasks": T, "s_max": -400}, ValueError, r"s_max must be a finite number > 0, got -400"),
    ((C,), {"num_tasks": T, "binarize": 1}, TypeError, r"binarize must be a bool, got 1"),
])
def test_gate_constructor_refuses_bad_options(args, kwargs, exc, match) -> None:
    with pytest.raises(exc, match=match):
        hatnorm.HATGate(*args, **kwargs)


# --- the scale schedule -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("batch", "num_batches", "s_max", "exc", "match"), [
    (0, 10, 0.0, ValueError, r"s_max must be a finite number > 0, got 0.0"),
    (0, 10, -400.0, ValueError, r"s_max must be a finite number > 0, got -400.0"),
    (0, 10, math.inf, ValueError, r"s_max must be a finite number > 0, got inf"),
    (10, 10, 400.0, ValueError, r"batch must be an int in \[0, 10\), got 10"),
    (-1, 10, 400.0, ValueError, r"batch must be an int in \[0, 10\), got -1"),
    (1.5, 10, 400.0, ValueError, r"batch must be an int in \[0, 10\), got 1.5"),
    (True, 10, 400.0, ValueError, r"batch must be an int in \[0, 10\), got True"),
    (0, 0, 400.0, ValueError, r"num_batches must be an int ≥ 1, got 0"),
    (0, -3, 400.0, ValueError, r"num_batches must be an int ≥ 1, got -3"),
    (0, 2.0, 400.0, ValueError, r"num_batches must be an int ≥ 1, got 2.0"),
])
def test_anneal_scale_refuses_bad_input(batch, num_batches, s_max, exc, match) -> None:
    with pytest.raises(exc, match=match):
        hatnorm.functional.anneal_scale(batch, num_batches, s_max)



@pytest.mark.parametrize(("call", "exc", "match"), [
    (lambda: hatnorm.functional.hat_gate(torch.zeros(3), 0.0), ValueError, r"^s must be a finite number > 0, got 0.0$"),
    (lambda: hatnorm.functional.hat_gate([0.0], 1.0), TypeError, r"^e must be a floating-point tensor, got list$"),
    (lambda: hatnorm.functional.hat_gate(torch.zeros(3, dtype=torch.long), 1.0), TypeError,
     r"^e must be a floating-point tensor, got dtype torch.int64$"),
    (lambda: hatnorm.functional.compensation_factor(torch.zeros(3), 1.0, -400.0), ValueError,
     r"^s_max must be a finite number > 0, got -400.0$"),
    (lambda: hatnorm.functional.compensate(torch.zeros(2), torch.zeros(3), 1.0, 400.0), ValueError,
     r"^grad must have the shape of e, \[3\], got \[2\]$"),
    # a CPU tensor scale is read (free there): 0 would make the embeddings NaN, −400 would invert the gates
    (lambda: hatnorm.functional.hat_gate(torch.zeros(3), torch.tensor(0.0)), ValueError,
     r"^s must be a finite number > 0, got a tensor holding 0.0$"),
    (lambda: hatnorm.functional.compensation_factor(torch.zeros(3), torch.tensor(-400.0), 400.0), ValueError,
     r"^s must be a finite number > 0, got a tensor holding -400.0$"),
    (lambda: hatnorm.functional.hat_gate(torch.zeros(3), torch.tensor(float("nan"))), ValueError,
     r"^s must be a finite number > 0, got a tensor holding nan$"),
])
def test_gate_functions_refuse_bad_input(call, exc, match) -> None:
    with pytest.raises(exc, match=match):
        call()

