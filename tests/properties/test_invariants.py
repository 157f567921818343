"""The invariants of SPEC §4, as hypothesis properties.

1. masked BN moves only the selected running statistics of its task, exactly as ``nn.BatchNorm`` would;
2. masked LN ignores unselected features, equals ``F.layer_norm`` when every feature is selected, and
   gives zeros (never NaN) when none is;
3. HAT's protection zeroes exactly the gradients of used units and leaves the others raw;
4. per-task BN: training one task touches no row of another;
5. no forgetting, end to end, for every task-aware norm and optimizer;
6. gates lie in [0, 1] and are saturated at s_max.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import Tensor, nn

import hatnorm
from hatnorm import _fused

from .models import gated_net, isolating_norms
from .strategies import (
    S_MAX,
    batch_sizes,
    binary_masks,
    bn_shapes,
    dtypes,
    epsilons,
    features,
    gates,
    generator,
    ln_shapes,
    momenta,
    offsets,
    optimizers,
    randn,
    scales,
    seeded,
    seeds,
    spreads,
    task_setups,
)

MASKED_BN = {1: hatnorm.norms.MaskedBatchNorm1d, 2: hatnorm.norms.MaskedBatchNorm2d}
TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
TASK_BN = {1: hatnorm.norms.TaskBatchNorm1d, 2: hatnorm.norms.TaskBatchNorm2d}


def train_step(model: nn.Module, hat: hatnorm.HAT, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
               task: int, s: float) -> None:
    """One HAT training step, as a user writes it; an example whose training diverges (a non-finite parameter or
    loss, where the trainer stops) is rejected: the guarantee is for training that stays finite, since a free unit
    gone inf or NaN reaches earlier tasks through 0·NaN in the gated products (docs/reliability.md)."""
    assume(all(bool(torch.isfinite(p).all()) for p in model.parameters()))
    task_loss = F.cross_entropy(model(x, task=task, s=s), y)
    assume(bool(torch.isfinite(task_loss)))
    loss = hat.loss(task_loss, s)
    optimizer.zero_grad()
    loss.backward()
    hat.protect(s)
    hat.step(optimizer)


def assert_rows_equal(before: Tensor, after: Tensor, keep: list[int], what: str) -> None:
    for k in keep:
        assert torch.equal(before[k], after[k]), f"{what}[{k}] changed"


# 1. Masked BN ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2])
@given(setup=task_setups(), channels=features, dtype=dtypes, momentum=momenta, eps=epsilons, seed=seeds,
       spread=spreads, offset=offsets, data=st.data())
def test_masked_bn_training_moves_only_selected_statistics_of_its_task(
        dims, setup, channels, dtype, momentum, eps, seed, spread, offset, data):
    num_tasks, task = setup
    shape = data.draw(bn_shapes(dims, channels), label="shape")
    mask = data.draw(gates(channels, dtype), label="mask")
    gen = generator(seed)
    norm = MASKED_BN[dims](channels, num_tasks=num_tasks, momentum=momentum, eps=eps).to(dtype)
    with torch.no_grad():
        norm.running_mean.copy_(randn(norm.running_mean.shape, gen, dtype))
        norm.running_var.copy_(randn(norm.running_var.shape, gen, dtype).abs() + 0.1)
        norm.weight.copy_(randn([channels], gen, dtype))
        norm.bias.copy_(randn([channels], gen, dtype))
    x = randn(shape, gen, dtype, spread, offset)
    mean0, var0 = norm.running_mean.clone(), norm.running_var.clone()

    out = norm.train()(x, mask, task)

    selected = mask > 0.5
    others = [k for k in range(num_tasks) if k != task]
    assert_rows_equal(mean0, norm.running_mean, others, "running_mean")
    assert_rows_equal(var0, norm.running_var, others, "running_var")
    assert torch.equal(norm.running_mean[task, ~selected], mean0[task, ~selected])
    assert torch.equal(norm.running_var[task, ~selected], var0[task, ~selected])

    if selected.any():
        reference = TORCH_BN[dims](int(selected.sum()), eps=eps, momentum=momentum).to(dtype)
        with torch.no_grad():
            reference.running_mean.copy_(mean0[task, selected])
            reference.running_var.copy_(var0[task, selected])
            reference.weight.copy_(norm.weight[selected])
            reference.bias.copy_(norm.bias[selected])
        expected = reference.train()(x[:, selected])
        # the statistics come out bit-identical on CPU (the same kernel computes each channel alone);
        # the zero tolerance states that, and a backend that reduced in another order would need a tight one
        torch.testing.assert_close(norm.running_mean[task, selected], reference.running_mean, rtol=0, atol=0)
        torch.testing.assert_close(norm.running_var[task, selected], reference.running_var, rtol=0, atol=0)
        # the output is the gated BN of the selected channels, a ⊙ (γ·x̂ + β)
        gate = mask[selected].view(-1, *[1] * (x.dim() - 2))
        torch.testing.assert_close(out[:, selected], gate * expected.detach())


@pytest.mark.parametrize("dims", [1, 2])
@given(setup=task_setups(), channels=features, dtype=dtypes, seed=seeds, data=st.data())
def test_masked_bn_evaluation_moves_no_statistics(dims, setup, channels, dtype, seed, data):
    num_tasks, task = setup
    shape = data.draw(bn_shapes(dims, channels), label="shape")
    mask = data.draw(gates(channels, dtype), label="mask")
    gen = generator(seed)
    norm = MASKED_BN[dims](channels, num_tasks=num_tasks).to(dtype).eval()
    mean0, var0 = norm.running_mean.clone(), norm.running_var.clone()
    norm(randn(shape, gen, dtype), mask, task)
    assert torch.equal(norm.running_mean, mean0)
    assert torch.equal(norm.running_var, var0)


# 2. Masked LN ---------------------------------------------------------------------------------------------


def ln_tolerance(dtype: torch.dtype) -> float:
    return 1e-6 if dtype == torch.float64 else 1e-5


def masked_ln(channels: int, dtype: torch.dtype, gen: torch.Generator, eps: float) -> hatnorm.norms.MaskedLayerNorm:
    norm = hatnorm.norms.MaskedLayerNorm(channels, num_tasks=1, eps=eps).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(randn([channels], gen, dtype))
        norm.bias.copy_(randn([channels], gen, dtype))
    return norm


@given(channels=features, dtype=dtypes, eps=epsilons, seed=seeds, spread=spreads, offset=offsets,
       far=st.floats(min_value=-1e4, max_value=1e4), data=st.data())
def test_masked_ln_selected_outputs_ignore_unselected_features(channels, dtype, eps, seed, spread, offset, far,
                                                               data):
    shape = data.draw(ln_shapes(channels), label="shape")
    mask = data.draw(gates(channels, dtype), label="mask")
    gen = generator(seed)
    norm = masked_ln(channels, dtype, gen, eps)
    x = randn(shape, gen, dtype, spread, offset)
    selected = mask > 0.5
    # unselected features replaced by unrelated values, some far from the selected ones
    changed = torch.where(selected, x, randn(shape, gen, dtype, spread * 10, far))

    out, out_changed = norm(x, mask, 0), norm(changed, mask, 0)

    torch.testing.assert_close(out_changed[..., selected], out[..., selected], rtol=0, atol=1e-6)
    assert torch.isfinite(out).all() and torch.isfinite(out_changed).all()


@given(channels=features, dtype=dtypes, eps=epsilons, seed=seeds, spread=spreads, offset=offsets, data=st.data())
def test_masked_ln_with_every_feature_selected_is_layer_norm(channels, dtype, eps, seed, spread, offset, data):
    shape = data.draw(ln_shapes(channels), label="shape")
    mask = data.draw(gates(channels, dtype, selection="all"), label="mask")
    gen = generator(seed)
    norm = masked_ln(channels, dtype, gen, eps)
    x = randn(shape, gen, dtype, spread, offset)

    expected = F.layer_norm(x, (channels,), norm.weight * mask, norm.bias * mask, eps)

    tol = ln_tolerance(dtype)
    torch.testing.assert_close(norm(x, mask, 0), expected, rtol=tol, atol=tol)


@given(channels=features, dtype=dtypes, eps=epsilons, seed=seeds, spread=spreads, offset=offsets, data=st.data())
def test_masked_ln_with_no_feature_selected_gives_zeros_and_finite_gradients(channels, dtype, eps, seed, spread,
                                                                             offset, data):
    shape = data.draw(ln_shapes(channels), label="shape")
    mask = data.draw(gates(channels, dtype, selection="none"), label="mask").requires_grad_()
    gen = generator(seed)
    norm = masked_ln(channels, dtype, gen, eps)
    x = randn(shape, gen, dtype, spread, offset).requires_grad_()

    out = norm(x, mask, 0)
    out.backward(randn(shape, gen, dtype))

    assert torch.equal(out, torch.zeros_like(out))
    for grad in (x.grad, mask.grad, norm.weight.grad, norm.bias.grad):
        assert torch.isfinite(grad).all()


def reference_masked_ln(x: Tensor, mask: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """SPEC's masked LayerNorm written plainly, for autograd to differentiate: statistics over the selected
    features (at least one), every feature normalised with them, then a ⊙ (γ·x̂ + β)."""
    selected = (mask.detach() > 0.5).to(x.dtype)
    mean = (x * selected).sum(-1, keepdim=True) / selected.sum()
    var = ((x - mean).square() * selected).sum(-1, keepdim=True) / selected.sum()
    return mask * (weight * (x - mean) / torch.sqrt(var + eps) + bias)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernels", "aten"])
@given(channels=features, dtype=dtypes, eps=epsilons, seed=seeds, spread=spreads, offset=offsets, data=st.data())
def test_masked_ln_gradients_are_those_of_its_definition(fused, channels, dtype, eps, seed, spread, offset, data):
    """Both written-out versions (the fused CPU kernels; ATen's LayerNorm backward with the masked
    statistics, then a correction) give autograd's outputs and gradients of the definition, computed in
    float64, for x, the gate, γ and β."""
    shape = data.draw(ln_shapes(channels), label="shape")
    mask = data.draw(gates(channels, dtype, selection="any"), label="mask")
    assume(bool((mask > 0.5).any()))
    gen = generator(seed)
    norm = masked_ln(channels, dtype, gen, eps)
    x, dy = randn(shape, gen, dtype, spread, offset), randn(shape, gen, dtype)

    x_in, mask_in = x.clone().requires_grad_(), mask.clone().requires_grad_()
    with _fused.kernels(fused):
        assert _fused.applies(x, mask, norm.weight, norm.bias) == fused
        out = norm(x_in, mask_in, 0)
        got = [out, *torch.autograd.grad(out, (x_in, mask_in, norm.weight, norm.bias), dy)]
    reference = [t.detach().double().requires_grad_() for t in (x, mask, norm.weight, norm.bias)]
    out = reference_masked_ln(*reference, eps)
    expected = [out, *torch.autograd.grad(out, reference, dy.double())]

    tol = 1e-4 if dtype == torch.float32 else 1e-9
    for what, a, b in zip(("out", "x", "mask", "weight", "bias"), got, expected, strict=True):
        scale = max(1.0, float(b.detach().abs().max()))
        torch.testing.assert_close(a.detach().double(), b.detach(), rtol=tol, atol=tol * scale, msg=what)


# 3. Protection --------------------------------------------------------------------------------------------

# every registered norm that declares it forgets nothing, plug-in norms included
PROTECTED_NETS = [pytest.param(name, conv, id=f"{'conv' if conv else 'linear'}-{name}")
                  for conv in (False, True) for name in isolating_norms(conv)]


def assert_protected(grad: Tensor, raw: Tensor, protected: Tensor, what: str) -> None:
    """Protected entries have exactly zero gradient; the others keep their raw gradient exactly."""
    protected = protected.expand_as(grad)
    assert torch.equal(grad[protected], torch.zeros_like(grad[protected])), f"{what}: a protected entry moves"
    assert torch.equal(grad[~protected], raw[~protected]), f"{what}: a free entry lost its raw gradient"


@pytest.mark.parametrize(("norm", "conv"), PROTECTED_NETS)
@given(setup=task_setups(), in_features=features, widths=st.lists(features, min_size=2, max_size=2),
       batch=batch_sizes, dtype=dtypes, s=scales, seed=seeds, data=st.data())
def test_protection_zeroes_exactly_the_gradients_of_used_units(norm, conv, setup, in_features, widths, batch,
                                                               dtype, s, seed, data):
    num_tasks, task = setup
    with seeded(seed):
        model = gated_net(norm, in_features, widths, num_tasks=num_tasks, conv=conv).to(dtype).train()
    used = [data.draw(binary_masks(w), label=f"a<t of layer {k}").bool() for k, w in enumerate(widths)]
    for gate, mask in zip(model.gates, used, strict=True):
        gate.cumulative.copy_(mask)
    hat = hatnorm.HAT(model)
    hat.begin_task(task)
    gen = generator(seed)
    x = randn((batch, in_features, 3, 3) if conv else (batch, in_features), gen, dtype)
    out = model(x, task=task, s=s)
    hat.loss((out * randn(out.shape, gen, dtype)).sum(), s).backward()
    raw = {name: p.grad.clone() for name, p in model.named_parameters()}

    hat.protect(s)

    previous = None  # the first layer reads data: only its output units protect it
    for k, (layer, norm_k, gate) in enumerate(zip(model.layers, model.norms, model.gates, strict=True)):
        out_used = used[k]
        # weight (i, j) is protected when both its units were used, 1 − min(a_i, a_j) (Serrà et al. eq. 3)
        both = out_used[:, None] if previous is None else out_used[:, None] & previous[None, :]
        both = both.view(*both.shape, *[1] * (layer.weight.dim() - 2))
        assert_protected(layer.weight.grad, raw[f"layers.{k}.weight"], both, f"layers.{k}.weight")
        assert_protected(layer.bias.grad, raw[f"layers.{k}.bias"], out_used, f"layers.{k}.bias")
        for name in ("weight", "bias"):
            param = getattr(norm_k, name, None)
            if param is None:
                continue
            if param.dim() == 2:  # per-task γ/β: only row `task` trains
                protected = torch.ones(num_tasks, 1, dtype=torch.bool)
                protected[task] = False
            else:  # shared γ/β, protected like a bias
                protected = out_used
            assert_protected(param.grad, raw[f"norms.{k}.{name}"], protected, f"norms.{k}.{name}")
        other_tasks = torch.ones(num_tasks, 1, dtype=torch.bool)
        other_tasks[task] = False
        assert torch.equal(gate.embedding.grad[other_tasks.expand_as(gate.embedding)],
                           torch.zeros(num_tasks - 1, widths[k], dtype=dtype).flatten())
        previous = out_used


# 4. Per-task BN -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2])
@given(setup=task_setups(min_tasks=2), in_features=features, width=features, batch=batch_sizes, dtype=dtypes,
       seed=seeds, steps=st.integers(min_value=1, max_value=4), warm=st.booleans(),
       make_optimizer=optimizers(names=("sgd", "adamw"), decay=True))
def test_task_bn_training_changes_no_row_of_another_task(dims, setup, in_features, width, batch, dtype, seed, steps,
                                                         warm, make_optimizer):
    num_tasks, task = setup
    with seeded(seed):
        model = gated_net("task_bn", in_features, [width], num_tasks=num_tasks, conv=dims == 2).to(dtype).train()
    norm, gate = model.norms[0], model.gates[0]
    assert isinstance(norm, TASK_BN[dims])
    gen = generator(seed)
    with torch.no_grad():  # every task's BN distinct, as after training them
        for t in (norm.weight, norm.bias, norm.running_mean):
            t.copy_(randn(t.shape, gen, dtype))
        norm.running_var.copy_(randn(norm.running_var.shape, gen, dtype).abs() + 0.1)
    hat = hatnorm.HAT(model)
    optimizer = make_optimizer(model.parameters())
    shape = (batch, in_features, 3, 3) if dims == 2 else (batch, in_features)

    def train(t: int) -> None:
        hat.begin_task(t)
        for b in range(steps):
            s = hat.scale(b, steps)
            out = model(randn(shape, gen, dtype), task=t, s=s)
            loss = hat.loss((out * randn(out.shape, gen, dtype)).sum(), s)
            optimizer.zero_grad()
            loss.backward()
            hat.protect(s)
            hat.step(optimizer)
        hat.end_task()

    if warm:  # the optimizer arrives with momentum / moments of an earlier task's rows
        train((task + 1) % num_tasks)
    before = {name: t.clone() for name, t in [*norm.named_parameters(), *norm.named_buffers()]}
    embedding = gate.embedding.detach().clone()

    train(task)

    others = [k for k in range(num_tasks) if k != task]
    for name, t in [*norm.named_parameters(), *norm.named_buffers()]:
        assert_rows_equal(before[name], t.detach(), others, name)
    assert_rows_equal(embedding, gate.embedding.detach(), others, "embedding")


# 5. No forgetting -----------------------------------------------------------------------------------------


FORGETTING_NETS = [pytest.param(name, conv, id=f"{'cnn' if conv else 'mlp'}-{name}")
                   for conv in (False, True) for name in isolating_norms(conv)]


@pytest.mark.parametrize(("norm", "conv"), FORGETTING_NETS)
@given(num_tasks=st.integers(min_value=2, max_value=3), in_features=features,
       widths=st.lists(features, min_size=2, max_size=2), classes=st.integers(min_value=2, max_value=3),
       side=st.integers(min_value=1, max_value=3), dtype=dtypes, seed=seeds, data=st.data())
def test_no_forgetting_earlier_task_outputs_are_bit_identical(norm, conv, num_tasks, in_features, widths, classes,
                                                              side, dtype, seed, data):
    with seeded(seed):
        model = gated_net(norm, in_features, widths, num_tasks=num_tasks, conv=conv, num_classes=classes).to(dtype)
    hat = hatnorm.HAT(model)  # binarized cumulative masks by default
    gen = generator(seed)
    sample = (in_features, side, side) if conv else (in_features,)
    probe = randn((4, *sample), gen, dtype)
    recorded: dict[int, Tensor] = {}
    optimizer = None
    for task in range(num_tasks):
        steps = data.draw(st.integers(min_value=1, max_value=6), label=f"steps of task {task}")
        batch = data.draw(batch_sizes, label=f"batch of task {task}")
        spread = data.draw(spreads, label=f"data spread of task {task}")
        make_optimizer = data.draw(optimizers(), label=f"optimizer of task {task}")
        if optimizer is None or not data.draw(st.booleans(), label=f"task {task} keeps the optimizer"):
            optimizer = make_optimizer(model.parameters())
        model.train()
        hat.begin_task(task)
        for b in range(steps):
            x = randn((batch, *sample), gen, dtype, spread)
            y = torch.randint(classes, (batch,), generator=gen)
            train_step(model, hat, optimizer, x, y, task, hat.scale(b, steps))
        hat.end_task()
        assume(all(bool(torch.isfinite(p).all()) for p in model.parameters()))  # the last step stayed finite

        model.eval()
        with torch.no_grad():
            for earlier, outputs in recorded.items():
                assert torch.equal(model(probe, task=earlier), outputs), f"task {earlier} forgot after task {task}"
            recorded[task] = model(probe, task=task)


# 6. Gates -------------------------------------------------------------------------------------------------

finite_embeddings = st.floats(allow_nan=False, allow_infinity=False, width=32)
saturating_embeddings = st.one_of(
    st.floats(min_value=0.1, max_value=1e30),
    st.floats(min_value=-1e30, max_value=-0.1),
    st.sampled_from([0.1, -0.1]),
)


@given(e=st.lists(finite_embeddings, min_size=1, max_size=8), s=st.floats(min_value=1e-6, max_value=1e6),
       dtype=dtypes)
def test_gates_lie_in_unit_interval(e, s, dtype):
    e = torch.tensor(e, dtype=dtype)
    gate = hatnorm.HATGate(len(e), num_tasks=1, binarize=False).to(dtype)
    with torch.no_grad():
        gate.embedding[0] = e
    for a in (hatnorm.functional.hat_gate(e, s), gate.train()(0, s), gate.eval()(0)):
        assert a.dtype == dtype
        assert ((a >= 0) & (a <= 1)).all()


@given(e=st.lists(saturating_embeddings, min_size=1, max_size=8), dtype=dtypes)
def test_gates_at_s_max_are_saturated_away_from_zero_embedding(e, dtype):
    e = torch.tensor(e, dtype=dtype)
    gate = hatnorm.HATGate(len(e), num_tasks=1, s_max=S_MAX, binarize=False).to(dtype)
    with torch.no_grad():
        gate.embedding[0] = e
    target = (e > 0).to(dtype)
    for a in (hatnorm.functional.hat_gate(e, S_MAX), gate.train()(0, S_MAX), gate.eval()(0)):
        torch.testing.assert_close(a, target, rtol=0, atol=1e-6)
