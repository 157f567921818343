"""The norms refuse a bad task, gate, input, size or option, an empty batch and a dtype or device their
parameters cannot meet, and change no statistic or parameter."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

import hatnorm
from errors._support import C, T, refused
from hatnorm.norms import (
    MaskedBatchNorm,
    MaskedBatchNorm2d,
    MaskedChannelLayerNorm,
    MaskedGroupNorm,
    MaskedLayerNorm,
    MaskedRMSNorm,
    NoNorm,
    PostGateBatchNorm,
    SharedBatchNorm,
    SharedLayerNorm,
    TaskBatchNorm,
    TaskBatchNorm1d,
    TaskLayerNorm,
)

# --- norms ------------------------------------------------------------------------------------------------

class Kind:
    """A norm class with constructor options: the batch norms' layouts (``dims``) are one class each."""

    def __init__(self, cls: type[hatnorm.MaskedNorm], **options: object) -> None:
        self.cls, self.options = cls, options
        self.__name__ = cls.__name__ + "".join(f"_{k}{v}" for k, v in options.items())
        self.channel_dim = cls.channel_dim
        self.input_ranks = cls(C, num_tasks=T, **options).input_ranks

    def __call__(self, *args: object, **kwargs: object) -> hatnorm.MaskedNorm:
        return self.cls(*args, **self.options, **kwargs)


NO_NORM = Kind(NoNorm)
# kind → (a valid input shape, an input shape of a rank the kind does not take, the message for it)
NORMS: dict[Kind, tuple[tuple[int, ...], tuple[int, ...], str]] = {
    Kind(MaskedBatchNorm, dims=1): ((4, C), (2, C, 3, 3),
                                    r"x must be 2-D or 3-D, got a 4-D tensor of shape \[2, 6, 3, 3"),
    Kind(MaskedBatchNorm, dims=2): ((4, C, 3, 3), (4, C, 3),
                                    r"x must be 4-D, got a 3-D tensor of shape \[4, 6, 3\]"),
    Kind(MaskedBatchNorm): ((4, C, 3), (C,), r"x must be 2-D or 3-D or 4-D or 5-D, got a 1-D tensor"),
    Kind(TaskBatchNorm, dims=1): ((4, C, 5), (C,), r"x must be 2-D or 3-D, got a 1-D tensor of shape \[6\]"),
    Kind(TaskBatchNorm, dims=2): ((4, C, 3, 3), (4, C), r"x must be 4-D, got a 2-D tensor of shape \[4, 6\]"),
    Kind(SharedBatchNorm, dims=1): ((4, C), (2, C, 3, 3), r"x must be 2-D or 3-D, got a 4-D tensor"),
    Kind(SharedBatchNorm, dims=2): ((4, C, 3, 3), (4, C, 3), r"x must be 4-D, got a 3-D tensor"),
    Kind(PostGateBatchNorm, dims=1): ((4, C), (2, C, 3, 3), r"x must be 2-D or 3-D, got a 4-D tensor"),
    Kind(PostGateBatchNorm, dims=2): ((4, C, 3, 3), (4, C, 3), r"x must be 4-D, got a 3-D tensor"),
    Kind(MaskedLayerNorm): ((2, 4, C), (C,), r"x must be 2-D or 3-D or 4-D, got a 1-D tensor of shape \[6\]"),
    Kind(SharedLayerNorm): ((2, 4, C), (1, 1, 1, 1, C), r"x must be 2-D or 3-D or 4-D, got a 5-D tensor"),
    Kind(TaskLayerNorm): ((2, 4, C), (C,), r"x must be 2-D or 3-D or 4-D, got a 1-D tensor"),
    NO_NORM: ((4, C, 3), (C,), r"x must be 2-D or 3-D or 4-D or 5-D, got a 1-D tensor of shape \[6\]"),
    Kind(MaskedGroupNorm, dims=2): ((4, C, 3, 3), (4, C, 3), r"x must be 4-D, got a 3-D tensor"),
    Kind(MaskedChannelLayerNorm, dims=1): ((4, C), (2, C, 3, 3), r"x must be 2-D or 3-D, got a 4-D tensor"),
    Kind(MaskedRMSNorm): ((2, 4, C), (C,), r"x must be 2-D or 3-D or 4-D, got a 1-D tensor"),
}
GATE = torch.tensor([0.9, 0.2, 0.7, 0.5, 1.0, 0.0])


def with_channels(cls: Kind, shape: tuple[int, ...], channels: int) -> tuple[int, ...]:
    dim = cls.channel_dim % len(shape)
    return (*shape[:dim], channels, *shape[dim + 1:])


NORM_CASES: dict[str, tuple[Callable, type[Exception], str]] = {
    # name: (call(norm, x), error, message)
    "task_out_of_range": (lambda n, x: n(x, GATE, T), ValueError, r"task must be in \[0, 3\), got 3"),
    "task_negative": (lambda n, x: n(x, GATE, -1), ValueError, r"task must be in \[0, 3\), got -1"),
    "task_float": (lambda n, x: n(x, GATE, 1.0), TypeError, r"task must be an int in \[0, 3\), got 1.0 of type float"),
    "task_str": (lambda n, x: n(x, GATE, "1"), TypeError, r"task must be an int in \[0, 3\), got '1' of type str"),
    "task_bool": (lambda n, x: n(x, GATE, True), TypeError, r"task must be an int in \[0, 3\), got True of type bool"),
    "task_tensor": (lambda n, x: n(x, GATE, torch.tensor([0, 1])), TypeError,
                    r"task must be an int in \[0, 3\), got a tensor of shape \(2,\)"),
    "mask_too_long": (lambda n, x: n(x, torch.ones(C + 1), 0), ValueError,
                      r"gate must have shape \[6\] \(one gate value per feature\), got shape \[7\]"),
    "mask_too_short": (lambda n, x: n(x, torch.ones(C - 1), 0), ValueError,
                       r"gate must have shape \[6\] \(one gate value per feature\), got shape \[5\]"),
    "mask_batched": (lambda n, x: n(x, torch.ones(2, C), 0), ValueError,
                     r"gate must have shape \[6\] \(one gate value per feature\), got shape \[2, 6\]"),
    "mask_int": (lambda n, x: n(x, torch.ones(C, dtype=torch.long), 0), ValueError,
                 r"gate must be a floating-point tensor with values in \[0, 1\], got dtype torch.int64"),
    "mask_list": (lambda n, x: n(x, [1.0] * C, 0), TypeError, r"gate must be a tensor of shape \[6\], got list"),
    "mask_above_one": (lambda n, x: n(x, torch.full((C,), 1.5), 0), ValueError,
                       r"gate must hold values in \[0, 1\], got 6 outside, e\.g\. \[1\.5, 1\.5, 1\.5\]"),
    "mask_negative": (lambda n, x: n(x, torch.tensor([0.5, -0.1, 1.0, 0.0, 1.0, 1.0]), 0), ValueError,
                      r"gate must hold values in \[0, 1\], got 1 outside, e\.g\. \[-0\.1"),
    "mask_nan": (lambda n, x: n(x, torch.tensor([0.5, math.nan, 1.0, 0.0, 1.0, 1.0]), 0), ValueError,
                 r"gate must hold values in \[0, 1\], got 1 outside, e\.g\. \[nan\]"),
    "x_int": (lambda n, x: n(x.long(), GATE, 0), ValueError,
              r"x must be a floating-point tensor, got dtype torch.int64"),
    "x_not_a_tensor": (lambda n, x: n(x.tolist(), GATE, 0), TypeError, r"x must be a tensor, got list"),
}


def make_norm(cls: Kind) -> hatnorm.MaskedNorm:
    torch.manual_seed(0)
    norm = cls(C, num_tasks=T).train()
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn_like(p))
    return norm


@pytest.mark.parametrize("case", NORM_CASES, ids=NORM_CASES.keys())
@pytest.mark.parametrize("cls", NORMS, ids=lambda c: c.__name__)
def test_norm_refuses_bad_task_mask_and_input(cls, case) -> None:
    norm = make_norm(cls)
    call, exc, match = NORM_CASES[case]
    x = torch.randn(NORMS[cls][0])
    with refused(norm, exc, match):
        call(norm, x)
    norm(x, GATE, 0)  # the good call still works


@pytest.mark.parametrize("cls", NORMS, ids=lambda c: c.__name__)
def test_norm_refuses_a_wrong_channel_count(cls) -> None:
    norm = make_norm(cls)
    good = NORMS[cls][0]
    dim = cls.channel_dim
    for channels in (C - 1, C + 1):
        shape = with_channels(cls, good, channels)
        given = ", ".join(map(str, shape))
        with refused(norm, ValueError, rf"x must have 6 features in dim {dim}, got shape \[{given}\]"):
            norm(torch.randn(shape), GATE, 0)


@pytest.mark.parametrize("cls", NORMS, ids=lambda c: c.__name__)
def test_norm_refuses_a_wrong_rank(cls) -> None:
    norm = make_norm(cls)
    _, bad, match = NORMS[cls]
    with refused(norm, ValueError, match):
        norm(torch.randn(bad), GATE, 0)


@pytest.mark.parametrize("cls", [c for c in NORMS if c.cls.batch_statistics],
                         ids=lambda c: c.__name__)
def test_batch_norm_refuses_one_value_per_channel_in_training(cls) -> None:
    norm = make_norm(cls)
    shape = (1, C) if 2 in cls.input_ranks else (1, C, 1, 1)
    with refused(norm, ValueError, r"x: batch statistics need more than 1 value per channel in training, got shape"):
        norm(torch.randn(shape), GATE, 0)
    norm.eval()
    norm(torch.randn(shape), GATE, 0)  # evaluation uses the running statistics: one sample is fine


@pytest.mark.parametrize("cls", NORMS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(("num_features", "num_tasks", "match"), [
    (0, T, r"num_features must be an int ≥ 1, got 0"),
    (2.5, T, r"num_features must be an int ≥ 1, got 2.5"),
    (C, 0, r"num_tasks must be an int ≥ 1, got 0"),
    (C, 10**6, r"num_tasks must be ≤ 10,000 \(every gate and per-task norm keeps a row per task\), got 1,000,000"),
], ids=["num_features_0", "num_features_float", "num_tasks_0", "num_tasks_huge"])
def test_norm_constructor_refuses_bad_sizes(cls, num_features, num_tasks, match) -> None:
    with pytest.raises(ValueError, match=match):
        cls(num_features, num_tasks=num_tasks)


@pytest.mark.parametrize(("cls", "kwargs", "match"), [
    (MaskedBatchNorm2d, {"eps": 0.0}, r"eps must be a finite number > 0, got 0.0"),
    (MaskedBatchNorm2d, {"momentum": 1.5}, r"momentum must be in \[0, 1\], got 1.5"),
    (TaskBatchNorm1d, {"momentum": -0.1}, r"momentum must be a finite number ≥ 0, got -0.1"),
    (MaskedLayerNorm, {"eps": -1e-5}, r"eps must be a finite number > 0, got -1e-05"),
    (NoNorm, {"channel_dim": 2}, r"channel_dim must be 1 \(channels first\) or -1 \(features last\), got 2"),
    (MaskedGroupNorm, {"num_groups": 4}, r"num_groups must divide num_features 6, got 4"),
    (MaskedGroupNorm, {"num_groups": 0}, r"num_groups must be an int ≥ 1, got 0"),
    (MaskedRMSNorm, {"eps": 0.0}, r"eps must be a finite number > 0, got 0.0"),
    (SharedBatchNorm, {"dims": 3}, r"dims must be 1 \(\[N, C\] or \[N, C, L\]\), 2 \(\[N, C, H, W\]\) or None "
                                   r"\(any \[N, C, \*\]\), got 3"),
])
def test_norm_constructor_refuses_bad_options(cls, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        cls(C, num_tasks=T, **kwargs)

# --- empty batches, dtypes and devices at the norms ----------------------------------------------------------


def empty_shapes(cls: Kind) -> list[tuple[int, ...]]:
    """A batch of N = 0, and a batch with a size-0 dim other than the batch and channel dims, where there is one."""
    good = NORMS[cls][0]
    channel = cls.channel_dim % len(good)
    others = [d for d in range(1, len(good)) if d != channel]
    return [(0, *good[1:]), *(tuple(0 if d == other else n for d, n in enumerate(good)) for other in others)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cls", NORMS, ids=lambda c: c.__name__)
def test_norm_refuses_an_empty_batch(cls, training) -> None:
    norm = make_norm(cls).train(training)
    for shape in empty_shapes(cls):
        given = ", ".join(map(str, shape))
        with refused(norm, ValueError, rf"x must not be empty \(every size ≥ 1, a batch of N ≥ 1\), got shape "
                                       rf"\[{given}\]"):
            norm(torch.randn(shape), GATE, 0)


PARAMETRIZED_NORMS = [c for c in NORMS if c is not NO_NORM]
WRONG_PRECISION = r"must have dtype torch.float32 \(the parameters' dtype\), or torch.float16 or torch.bfloat16 " \
                  r"\(mixed precision\), got torch.float64"


@pytest.mark.parametrize("cls", PARAMETRIZED_NORMS, ids=lambda c: c.__name__)
def test_norm_refuses_a_dtype_or_device_its_parameters_cannot_meet(cls) -> None:
    norm = make_norm(cls)
    x = torch.randn(NORMS[cls][0])
    with refused(norm, ValueError, "x " + WRONG_PRECISION):
        norm(x.double(), GATE, 0)
    with refused(norm, ValueError, "gate " + WRONG_PRECISION):
        norm(x, GATE.double(), 0)
    with refused(norm, ValueError, r"x must be on the device of the model's parameters, cpu, got meta"):
        norm(x.to("meta"), GATE, 0)
    with refused(norm, ValueError, r"gate must be on the device of x, cpu, got meta"):
        norm(x, GATE.to("meta"), 0)
    norm.double()
    norm(x.double(), GATE.double(), 0)  # parameters and input in float64 agree


def test_no_norm_refuses_a_gate_on_another_device() -> None:
    norm = make_norm(NO_NORM)
    with refused(norm, ValueError, r"^gate must be on the device of x, cpu, got meta$"):
        norm(torch.randn(NORMS[NO_NORM][0]), GATE.to("meta"), 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls", NORMS, ids=lambda c: c.__name__)
def test_norm_takes_half_precision_inputs_with_float32_parameters(cls, dtype) -> None:
    """Mixed precision is not bad input: F.batch_norm and F.layer_norm take it with float32 parameters."""
    norm = make_norm(cls)
    out = norm(torch.randn(NORMS[cls][0], dtype=dtype), GATE.to(dtype), 0)
    assert out.shape == NORMS[cls][0]


@pytest.mark.parametrize("cls", NORMS, ids=lambda c: c.__name__)
def test_norm_rechecks_a_gate_written_in_place_after_a_good_call(cls) -> None:
    """A gate tensor's range is checked once while it is unchanged (a transformer's norms share one); an
    in-place write to it is seen."""
    norm = make_norm(cls)
    x, mask = torch.randn(NORMS[cls][0]), GATE.clone()
    norm(x, mask, 0)
    mask.fill_(1.5)
    with refused(norm, ValueError, r"gate must hold values in \[0, 1\], got 6 outside"):
        norm(x, mask, 0)
