"""Per-step gradient policies (FG-AdaHAT, AdaHAT's reference form) on every architecture, converted models and
the trainer; the γ/β option; checkpoints; and the errors their arguments raise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from toys import toy_tasks

import hatnorm
from hatnorm import HAT
from hatnorm.policies import AdaHATPolicy, AdaHATReferencePolicy, FGAdaHATPolicy
from hatnorm.training import HATMethod, TrainConfig, train_sequence

ARCHITECTURES = {
    "mlp": ({"in_features": 8, "hidden": [12, 12]}, "masked_bn", (8,)),
    "alexnet": ({"size": 28, "in_channels": 3, "width": 0.0625}, "masked_bn", (3, 28, 28)),
    "resnet18": ({"base_width": 4}, "masked_bn", (3, 16, 16)),
    "vit_micro": ({}, "masked_ln", (3, 32, 32)),
}


def train(model: nn.Module, hat: HAT, shape: tuple[int, ...], tasks: int = 2, steps: int = 2) -> list[torch.Tensor]:
    """A few Adam steps per task; returns the loss of every step."""
    torch.manual_seed(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for task in range(tasks):
        hat.begin_task(task)
        model.train()
        for step in range(steps):
            x, y = torch.randn(4, *shape), torch.randint(0, 3, (4,))
            s = hat.scale(step, steps)
            loss = hat.loss(F.cross_entropy(model(x, task=task, s=s), y), s)
            optimizer.zero_grad()
            loss.backward()
            hat.protect(s)
            hat.step(optimizer)
            losses.append(loss.detach())
        hat.end_task()
    return losses


@pytest.mark.parametrize("importance", ["input_weight_abs_sum_x_activation_abs", "output_weight_gradient_abs_sum"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_fg_adahat_trains_every_reference_architecture(arch: str, importance: str) -> None:
    options, norm, shape = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = hatnorm.build(arch, num_tasks=3, norm=norm, num_classes=3, **options)
    hat = HAT(model, policy=FGAdaHATPolicy(alpha=1e-3, importance=importance))
    losses = train(model, hat, shape)
    assert all(torch.isfinite(loss) for loss in losses)
    summed = hat.policy.summed
    assert all(torch.isfinite(s).all() for s in summed) and all(float(s.max()) > 0 for s in summed)
    hat.begin_task(2)
    rates = hat.policy.rates(hat.scale(0, 2))
    governed = {id(p) for p in rates}
    for layer in hat.layers:  # every weighted layer is governed by the policy
        if not isinstance(layer.module, hatnorm.Protected):
            assert id(layer.module.weight) in governed
    assert all(bool(((r > 0) & (r <= 1)).all()) for r in rates.values())
    assert min(float(r.min()) for r in rates.values()) < 0.5  # what earlier tasks used is damped


def test_fg_adahat_trains_a_converted_model() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 12, 3), nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 12, 3), nn.BatchNorm2d(12),
                          nn.ReLU(), nn.Flatten(), nn.Linear(12 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 5))
    probe = torch.randn(2, 3, 8, 8)
    model = hatnorm.convert(plain, num_tasks=3, num_classes=[3, 3, 3], example_input=probe)
    hat = HAT(model, policy=FGAdaHATPolicy(alpha=1e-3, importance="input_weight_gradient_abs_sum"))
    losses = train(model, hat, (3, 8, 8))
    assert all(torch.isfinite(loss) for loss in losses)
    assert all(float(s.max()) > 0 for s in hat.policy.summed)


def test_the_adahat_default_is_unchanged() -> None:
    """``"adahat"`` without ``reference`` is the task-start policy: the same training, bit for bit."""
    runs = []
    for policy in ("adahat", AdaHATPolicy(alpha=0.1, epsilon=0.1)):
        torch.manual_seed(0)
        model = hatnorm.build("mlp", num_tasks=2, norm="masked_bn", num_classes=3, in_features=8, hidden=[12, 12])
        hat = HAT(model, policy=policy)
        assert type(hat.policy) is AdaHATPolicy
        train(model, hat, (8,))
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@pytest.mark.parametrize("policy", [
    lambda norms: FGAdaHATPolicy(alpha=1e-3, importance="activation_abs", norms=norms),
    lambda norms: hatnorm.create_policy("adahat", reference=True, norms=norms),
], ids=["fg_adahat", "adahat_reference"])
def test_gamma_beta_follow_their_gate_or_stay_free(policy) -> None:
    """``norms=True``: γ_i, β_i of a masked norm get the rate of the bias of unit i of its gate;
    ``norms=False``: their gradient is left as it is (the reference's BatchNorm)."""
    for norms in (True, False):
        torch.manual_seed(0)
        model = hatnorm.build("mlp", num_tasks=3, norm="masked_bn", num_classes=3, in_features=8, hidden=[12, 12])
        hat = HAT(model, policy=policy(norms))
        train(model, hat, (8,))
        hat.begin_task(2)
        s = hat.scale(1, 2)
        rates = hat.policy.rates(s)
        for fc, norm in zip(model.fcs, model.norms, strict=True):
            if norms:
                torch.testing.assert_close(rates[norm.weight], rates[fc.bias])
                torch.testing.assert_close(rates[norm.bias], rates[fc.bias])
                assert float(rates[norm.weight].min()) < 1
            else:
                assert norm.weight not in rates and norm.bias not in rates
        x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
        hat.loss(F.cross_entropy(model(x, task=2, s=s), y), s).backward()
        raw = model.norms[0].weight.grad.clone()
        hat.protect(s)
        expected = raw * rates[model.norms[0].weight] if norms else raw
        torch.testing.assert_close(model.norms[0].weight.grad, expected)


def test_a_checkpoint_mid_task_resumes_the_policy() -> None:
    torch.manual_seed(0)
    model = hatnorm.build("mlp", num_tasks=3, norm="masked_bn", num_classes=3, in_features=8, hidden=[12, 12])
    hat = HAT(model, policy=FGAdaHATPolicy(alpha=1e-3, summing="linear_decrease", linear_step=2.0))
    train(model, hat, (8,))
    hat.begin_task(2)
    state = hat.state_dict()
    copy = hatnorm.build("mlp", num_tasks=3, norm="masked_bn", num_classes=3, in_features=8, hidden=[12, 12])
    copy.load_state_dict(model.state_dict())
    resumed = HAT(copy, policy=FGAdaHATPolicy(alpha=1e-3, summing="linear_decrease", linear_step=2.0))
    resumed.load_state_dict(state)
    assert resumed.task == 2 and resumed.learned_tasks == [0, 1]
    for mine, theirs in zip(resumed.policy.summed, hat.policy.summed, strict=True):
        assert torch.equal(mine, theirs)
    names = {id(p): n for n, p in model.named_parameters()}
    copies = dict(copy.named_parameters())
    rates = hat.policy.rates(3.0)
    again = resumed.policy.rates(3.0)
    for p, rate in rates.items():
        assert torch.equal(again[copies[names[id(p)]]], rate)


def test_soft_policies_train_with_the_trainer() -> None:
    tasks = toy_tasks(2, samples=64, test=16)
    config = TrainConfig(epochs=1, batch_size=16, optimizer="adamw", schedule="cosine", lr=1e-3)
    for policy in ("fg_adahat", AdaHATReferencePolicy()):
        result = train_sequence(
            lambda: hatnorm.build("mlp", num_tasks=2, norm="masked_bn", num_classes=2, in_features=16,
                                  hidden=[12, 12]),
            tasks, HATMethod(policy=policy), config)
        accuracy = torch.tensor(result.accuracy)
        assert accuracy.shape == (2, 2) and bool(torch.isfinite(accuracy).all())


@pytest.mark.parametrize(("make", "match"), [
    (lambda: FGAdaHATPolicy(importance="conductance"), "importance must be one of"),
    (lambda: FGAdaHATPolicy(summing="add_some"), "summing must be one of"),
    (lambda: FGAdaHATPolicy(scheduler="cosine"), "scheduler must be one of"),
    (lambda: FGAdaHATPolicy(aggregation="median"), "aggregation must be one of"),
    (lambda: FGAdaHATPolicy(alpha=0.0), "alpha"),
    (lambda: FGAdaHATPolicy(base_sparsity=0.0), "base_sparsity"),
    (lambda: FGAdaHATPolicy(base_linear=-1.0), "base_linear"),
    (lambda: FGAdaHATPolicy(summing="exponential_decrease"), "exponential_rate"),
    (lambda: FGAdaHATPolicy(summing="log_decrease", log_base=2.0, reference_decrease=True), "no reference form"),
    (lambda: FGAdaHATPolicy(norms=1), "norms must be a bool"),
    (lambda: hatnorm.create_policy("adahat", reference=True, mode="adahat_fast"), "mode must be one of"),
    (lambda: hatnorm.create_policy("adahat", mode="adahat_no_sum"), "reference=True only"),
])
def test_bad_policy_arguments_are_named(make, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_a_step_policy_serves_one_model() -> None:
    policy = FGAdaHATPolicy()
    HAT(hatnorm.build("mlp", num_tasks=2, norm="masked_bn", num_classes=3, in_features=8, hidden=[12]), policy=policy)
    other = hatnorm.build("mlp", num_tasks=2, norm="masked_bn", num_classes=3, in_features=8, hidden=[12])
    with pytest.raises(ValueError, match="another model"):
        HAT(other, policy=policy)


def test_a_state_without_the_policy_is_refused() -> None:
    model = hatnorm.build("mlp", num_tasks=2, norm="masked_bn", num_classes=3, in_features=8, hidden=[12])
    hat = HAT(model, policy="fg_adahat")
    with pytest.raises(ValueError, match=r"state\['policy'\]"):
        hat.load_state_dict({"learned_tasks": [], "task": None})
    assert hat.learned_tasks == [] and hat.task is None


def test_a_policy_state_of_another_model_changes_nothing() -> None:
    model = hatnorm.build("mlp", num_tasks=3, norm="masked_bn", num_classes=3, in_features=8, hidden=[12, 12])
    hat = HAT(model, policy=FGAdaHATPolicy(alpha=1e-3))
    train(model, hat, (8,))
    before = [s.clone() for s in hat.policy.summed]
    state = hat.state_dict()
    state["policy"]["summed"] = [torch.zeros(5)]
    with pytest.raises(ValueError, match=r"state\['summed'\] must hold one tensor per gate"):
        hat.load_state_dict(state)
    del state["policy"]["steps"]
    with pytest.raises(ValueError, match="'steps'"):
        hat.load_state_dict(state)
    assert hat.learned_tasks == [0, 1]
    assert all(torch.equal(a, b) for a, b in zip(hat.policy.summed, before, strict=True))
