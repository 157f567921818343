"""Invariants of the norms beyond the first three (SPEC §4's welcome list), as hypothesis properties.

- masked GroupNorm: each group's selected outputs ignore the unselected channels; with every channel
  selected it is ``F.group_norm``; unselected channels still pass a gradient to their gates;
- masked LayerNorm over channels (``[N, C, *]``): the selected outputs ignore the unselected channels;
  with every channel selected it is ``F.layer_norm`` over the channels at every position;
- masked RMSNorm: the selected outputs ignore the unselected features; with every feature selected it is
  ``F.rms_norm``; with none selected it gives zeros and finite gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

import hatnorm

from .strategies import (
    bn_shapes,
    dtypes,
    epsilons,
    features,
    gates,
    generator,
    ln_shapes,
    offsets,
    randn,
    seeds,
    spreads,
)


def tolerance(dtype: torch.dtype) -> float:
    return 1e-6 if dtype == torch.float64 else 1e-5


def with_random_affine(norm: hatnorm.MaskedNorm, gen: torch.Generator, dtype: torch.dtype) -> hatnorm.MaskedNorm:
    norm = norm.to(dtype)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(randn(p.shape, gen, dtype))
    return norm


def replaced_where_unselected(x: Tensor, selected: Tensor, gen: torch.Generator, dtype: torch.dtype, far: float,
                              channel_dim: int) -> Tensor:
    """``x`` with every unselected channel's values replaced by unrelated ones, some far away."""
    view = selected.view(-1, *([1] * (x.dim() - 2))) if channel_dim == 1 else selected
    return torch.where(view, x, randn(x.shape, gen, dtype, 10.0, far))


def assert_selected_outputs_ignore_unselected(norm: hatnorm.MaskedNorm, x: Tensor, mask: Tensor,
                                              gen: torch.Generator, far: float) -> None:
    """Replacing every unselected unit's values by unrelated ones, some far away, leaves the selected outputs."""
    selected = mask > 0.5
    changed = replaced_where_unselected(x, selected, gen, x.dtype, far, channel_dim=norm.channel_dim)

    out, out_changed = norm(x, mask, 0), norm(changed, mask, 0)

    index = (slice(None), selected) if norm.channel_dim == 1 else (..., selected)
    torch.testing.assert_close(out_changed[index], out[index], rtol=0, atol=1e-6)
    assert torch.isfinite(out).all() and torch.isfinite(out_changed).all()


@st.composite
def group_norms(draw: st.DrawFn) -> tuple[int, int]:
    """(channels, groups) with the groups dividing the channels."""
    groups = draw(st.integers(min_value=1, max_value=3))
    return groups * draw(st.integers(min_value=1, max_value=3)), groups


# masked GroupNorm -----------------------------------------------------------------------------------------


@given(sizes=group_norms(), dims=st.sampled_from([1, 2]), dtype=dtypes, eps=epsilons, seed=seeds, spread=spreads,
       offset=offsets, far=st.floats(min_value=-1e4, max_value=1e4), data=st.data())
def test_masked_gn_selected_outputs_ignore_unselected_channels(sizes, dims, dtype, eps, seed, spread, offset, far,
                                                               data):
    channels, groups = sizes
    shape = data.draw(bn_shapes(dims, channels), label="shape")
    mask = data.draw(gates(channels, dtype), label="mask")
    gen = generator(seed)
    norm = hatnorm.norms.MaskedGroupNorm(channels, num_tasks=1, num_groups=groups, eps=eps)
    norm = with_random_affine(norm, gen, dtype)
    x = randn(shape, gen, dtype, spread, offset)
    assert_selected_outputs_ignore_unselected(norm, x, mask, gen, far)


@given(sizes=group_norms(), dims=st.sampled_from([1, 2]), dtype=dtypes, eps=epsilons, seed=seeds, spread=spreads,
       offset=offsets, data=st.data())
def test_masked_gn_with_every_channel_selected_is_group_norm(sizes, dims, dtype, eps, seed, spread, offset, data):
    channels, groups = sizes
    shape = data.draw(bn_shapes(dims, channels), label="shape")
    mask = data.draw(gates(channels, dtype, selection="all"), label="mask")
    gen = generator(seed)
    norm = hatnorm.norms.MaskedGroupNorm(channels, num_tasks=1, num_groups=groups, eps=eps)
    norm = with_random_affine(norm, gen, dtype)
    x = randn(shape, gen, dtype, spread, offset)

    # the reference in float64: float32 F.group_norm of a group of one value is off by ~1e-5 (its rounded
    # x − μ, scaled by (0 + eps)^−½), where the masked norm gives exactly β
    expected = F.group_norm(x.double(), groups, (norm.weight * mask).double(), (norm.bias * mask).double(), eps)

    tol = tolerance(dtype)
    torch.testing.assert_close(norm(x, mask, 0), expected.to(dtype), rtol=tol, atol=tol)


@given(sizes=group_norms(), dtype=dtypes, seed=seeds, data=st.data())
def test_masked_gn_unselected_channels_pass_a_gradient_to_their_gates(sizes, dtype, seed, data):
    # a unit HAT has not selected yet must be recruitable: its gate gets a gradient, a group without any
    # selected channel included (it reads all its channels)
    channels, groups = sizes
    mask = data.draw(gates(channels, dtype, selection="none"), label="mask").clamp_min(0.25).requires_grad_()
    gen = generator(seed)
    norm = with_random_affine(hatnorm.norms.MaskedGroupNorm(channels, num_tasks=1, num_groups=groups), gen, dtype)
    x = randn((4, channels, 3, 3), gen, dtype)

    out = norm(x, mask, 0)
    out.backward(randn(out.shape, gen, dtype))

    assert torch.isfinite(out).all() and (mask.grad != 0).all()


# masked LayerNorm over channels ---------------------------------------------------------------------------


@given(channels=features, dims=st.sampled_from([1, 2]), dtype=dtypes, eps=epsilons, seed=seeds, spread=spreads,
       offset=offsets, far=st.floats(min_value=-1e4, max_value=1e4), data=st.data())
def test_masked_channel_ln_selected_outputs_ignore_unselected_channels(channels, dims, dtype, eps, seed, spread,
                                                                       offset, far, data):
    shape = data.draw(bn_shapes(dims, channels), label="shape")
    mask = data.draw(gates(channels, dtype), label="mask")
    gen = generator(seed)
    norm = with_random_affine(hatnorm.norms.MaskedChannelLayerNorm(channels, num_tasks=1, eps=eps), gen, dtype)
    x = randn(shape, gen, dtype, spread, offset)
    assert_selected_outputs_ignore_unselected(norm, x, mask, gen, far)


@given(channels=features, dims=st.sampled_from([1, 2]), dtype=dtypes, eps=epsilons, seed=seeds, spread=spreads,
       offset=offsets, data=st.data())
def test_masked_channel_ln_with_every_channel_selected_is_layer_norm_over_channels(channels, dims, dtype, eps, seed,
                                                                                   spread, offset, data):
    shape = data.draw(bn_shapes(dims, channels), label="shape")
    mask = data.draw(gates(channels, dtype, selection="all"), label="mask")
    gen = generator(seed)
    norm = with_random_affine(hatnorm.norms.MaskedChannelLayerNorm(channels, num_tasks=1, eps=eps), gen, dtype)
    x = randn(shape, gen, dtype, spread, offset)

    channels_last = F.layer_norm(x.movedim(1, -1), (channels,), norm.weight * mask, norm.bias * mask, eps)

    tol = tolerance(dtype)
    torch.testing.assert_close(norm(x, mask, 0), channels_last.movedim(-1, 1), rtol=tol, atol=tol)


# masked RMSNorm -------------------------------------------------------------------------------------------


@given(channels=features, dtype=dtypes, eps=epsilons, seed=seeds, spread=spreads, offset=offsets,
       far=st.floats(min_value=-1e4, max_value=1e4), data=st.data())
def test_masked_rms_selected_outputs_ignore_unselected_features(channels, dtype, eps, seed, spread, offset, far,
                                                                data):
    shape = data.draw(ln_shapes(channels), label="shape")
    mask = data.draw(gates(channels, dtype), label="mask")
    gen = generator(seed)
    norm = with_random_affine(hatnorm.norms.MaskedRMSNorm(channels, num_tasks=1, eps=eps), gen, dtype)
    x = randn(shape, gen, dtype, spread, offset)
    assert_selected_outputs_ignore_unselected(norm, x, mask, gen, far)


@given(channels=features, dtype=dtypes, eps=epsilons, seed=seeds, spread=spreads, offset=offsets, data=st.data())
def test_masked_rms_with_every_feature_selected_is_rms_norm(channels, dtype, eps, seed, spread, offset, data):
    shape = data.draw(ln_shapes(channels), label="shape")
    mask = data.draw(gates(channels, dtype, selection="all"), label="mask")
    gen = generator(seed)
    norm = with_random_affine(hatnorm.norms.MaskedRMSNorm(channels, num_tasks=1, eps=eps), gen, dtype)
    x = randn(shape, gen, dtype, spread, offset)

    tol = tolerance(dtype)
    torch.testing.assert_close(norm(x, mask, 0), F.rms_norm(x, (channels,), norm.weight * mask, eps), rtol=tol,
                               atol=tol)


@given(channels=features, dtype=dtypes, eps=epsilons, seed=seeds, spread=spreads, offset=offsets, data=st.data())
def test_masked_rms_with_no_feature_selected_gives_zeros_and_finite_gradients(channels, dtype, eps, seed, spread,
                                                                              offset, data):
    shape = data.draw(ln_shapes(channels), label="shape")
    mask = data.draw(gates(channels, dtype, selection="none"), label="mask").requires_grad_()
    gen = generator(seed)
    norm = with_random_affine(hatnorm.norms.MaskedRMSNorm(channels, num_tasks=1, eps=eps), gen, dtype)
    x = randn(shape, gen, dtype, spread, offset).requires_grad_()

    out = norm(x, mask, 0)
    out.backward(randn(shape, gen, dtype))

    assert torch.equal(out, torch.zeros_like(out))
    for grad in (x.grad, mask.grad, norm.weight.grad):
        assert torch.isfinite(grad).all()
