"""The HAT method: capacity regulariser, gradient multipliers, protection, optimizer-safe steps, task order."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hatnorm

T = 3
S_MAX = 400.0


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def embedding_for(p: float) -> float:
    """An embedding e with σ(s_max·e) = p (±1 for the saturated values 1 and 0)."""
    if p == 1.0:
        return 1.0
    if p == 0.0:
        return -1.0
    return math.log(p / (1 - p)) / S_MAX


def act(x: Tensor) -> Tensor:
    # leaky: no unit goes dead in a few steps, so every unprotected entry keeps getting a gradient
    return F.leaky_relu(x, 0.1)


class Net(nn.Module):
    """Every wiring case: a first conv reading data, a grouped conv between two gates, a conv after a
    residual add, a Linear after a flatten, a Linear between two gates, masked/per-task/no norm and heads.

    Shapes: x [N, 2, 4, 4] → h1, h2 [N, 4, 4, 4] → h3 [N, 3, 2, 2] → flatten [N, 12] → h4 [N, 5] → h5 [N, 4].
    """

    def __init__(self, *, binarize: bool = True) -> None:
        super().__init__()
        gate = functools.partial(hatnorm.HATGate, num_tasks=T, s_max=S_MAX, binarize=binarize)
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = hatnorm.norms.MaskedBatchNorm2d(4, num_tasks=T)
        self.g1 = gate(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.bn2 = hatnorm.norms.TaskBatchNorm2d(4, num_tasks=T)
        self.g2 = gate(4)
        self.conv3 = nn.Conv2d(4, 3, 3, stride=2, padding=1)
        self.n3 = hatnorm.norms.NoNorm(3, num_tasks=T)
        self.g3 = gate(3)
        self.fc1 = nn.Linear(3 * 2 * 2, 5)
        self.n4 = hatnorm.norms.MaskedLayerNorm(5, num_tasks=T)
        self.g4 = gate(5)
        self.fc2 = nn.Linear(5, 4)
        self.g5 = gate(4)
        self.task_heads = hatnorm.TaskHeads(4, 2, num_tasks=T)

    def forward(self, x: Tensor, task: int, s: float | None = None) -> Tensor:
        h1 = act(self.bn1(self.conv1(x), self.g1(task, s), task))
        h2 = act(self.bn2(self.conv2(h1), self.g2(task, s), task))
        h3 = act(self.n3(self.conv3(h1 + h2), self.g3(task, s), task))
        h4 = act(self.n4(self.fc1(h3.flatten(1)), self.g4(task, s), task))
        h5 = act(self.fc2(h4) * self.g5(task, s))
        return self.task_heads(h5, task)

    def layers(self) -> list[hatnorm.blocks.Layer]:
        L = hatnorm.blocks.Layer
        return [
            L(self.conv1, out=self.g1),
            L(self.bn1, out=self.g1),
            L(self.conv2, out=self.g2, inp=self.g1),
            L(self.bn2, out=self.g2),
            L(self.conv3, out=self.g3, inp=hatnorm.blocks.Residual(self.g1, self.g2)),
            L(self.n3, out=self.g3),
            L(self.fc1, out=self.g4, inp=hatnorm.blocks.Flatten(self.g3, 2 * 2)),
            L(self.n4, out=self.g4),
            L(self.fc2, out=self.g5, inp=self.g4),
        ]

    def gates(self) -> list[hatnorm.HATGate]:
        return [self.g1, self.g2, self.g3, self.g4, self.g5]


# the masks task 0 leaves on g1..g5 (soft values to tell min from product)
A = {
    "g1": [1.0, 0.0, 0.6, 0.25],
    "g2": [0.0, 0.75, 1.0, 0.2],
    "g3": [0.5, 1.0, 0.1],
    "g4": [0.3, 0.0, 1.0, 0.9, 0.4],
    "g5": [0.8, 0.0, 1.0, 0.35],
}


def spread(net: nn.Module, task: int) -> None:
    """Give ``task`` embeddings of alternating sign on every gate, so every layer selects some units
    (a masked LayerNorm with no selected feature outputs zeros and passes no gradient)."""
    with torch.no_grad():
        for g in (m for m in net.modules() if isinstance(m, hatnorm.HATGate)):
            signs = torch.tensor([1.0, -1.0]).repeat(g.num_features)[: g.num_features]
            g.embedding[task] = signs * (0.2 + torch.rand(g.num_features))


def learn(hat: hatnorm.HAT, task: int, rows: dict[str, list[float]]) -> None:
    """Run ``task`` without training, its embeddings set to ``rows``."""
    with torch.no_grad():
        for name, row in rows.items():
            getattr(hat.model, name).embedding[task] = torch.tensor(row)
    hat.begin_task(task)
    hat.end_task()


def soft_net() -> tuple[Net, hatnorm.HAT]:
    """A Net whose task 0 left the soft masks ``A``, with task 1 begun."""
    torch.manual_seed(0)
    net = Net(binarize=False)
    hat = hatnorm.HAT(net, net.layers())
    learn(hat, 0, {g: [embedding_for(p) for p in ps] for g, ps in A.items()})
    spread(net, 1)
    hat.begin_task(1)
    return net, hat


def expected_multipliers(net: Net, task: int) -> dict[str, Tensor]:
    """The multipliers of ``task`` computed by hand from ``A`` (HAT, Serrà et al. eq. 3)."""
    a = {g: torch.tensor(ps) for g, ps in A.items()}
    exp: dict[str, Tensor] = {}

    # first layer reads data: output side only
    exp["conv1.weight"] = (1 - a["g1"]).view(4, 1, 1, 1).expand(4, 2, 3, 3)
    exp["conv1.bias"] = 1 - a["g1"]
    exp["bn1.weight"] = exp["bn1.bias"] = 1 - a["g1"]

    # grouped conv, 2 groups of 2 channels: output i reads input channels 2·(i // 2) + j
    w = torch.empty(4, 2)
    for i in range(4):
        for j in range(2):
            w[i, j] = 1 - min(A["g2"][i], A["g1"][2 * (i // 2) + j])
    exp["conv2.weight"] = w.view(4, 2, 1, 1).expand(4, 2, 3, 3)
    exp["conv2.bias"] = 1 - a["g2"]
    own = torch.zeros(T, 4)
    own[task] = 1
    exp["bn2.weight"] = exp["bn2.bias"] = own

    # after the residual add h1 + h2: the input units carry the elementwise max of g1 and g2
    residual = [max(p, q) for p, q in zip(A["g1"], A["g2"], strict=True)]
    assert residual == [1.0, 0.75, 1.0, 0.25]
    w = torch.tensor([[1 - min(A["g3"][i], residual[j]) for j in range(4)] for i in range(3)])
    exp["conv3.weight"] = w.view(3, 4, 1, 1).expand(3, 4, 3, 3)
    exp["conv3.bias"] = 1 - a["g3"]

    # after flattening [3, 2, 2]: feature k is channel k // 4
    flat = [A["g3"][k // 4] for k in range(12)]
    exp["fc1.weight"] = torch.tensor([[1 - min(A["g4"][i], flat[k]) for k in range(12)] for i in range(5)])
    exp["fc1.bias"] = 1 - a["g4"]
    exp["n4.weight"] = exp["n4.bias"] = 1 - a["g4"]

    # between two gates: 1 − min(a_i, a_j)
    exp["fc2.weight"] = torch.tensor([[1 - min(A["g5"][i], A["g4"][j]) for j in range(5)] for i in range(4)])
    exp["fc2.bias"] = 1 - a["g5"]

    # heads: head t is owned by task t; its own head keeps the raw gradient and is left out
    for t in range(T):
        if t != task:
            exp[f"task_heads.heads.{t}.weight"] = torch.zeros(2, 4)
            exp[f"task_heads.heads.{t}.bias"] = torch.zeros(2)

    # embeddings: only the row of the active task trains
    for g in net.gates():
        rows = torch.zeros(T, g.num_features)
        rows[task] = 1
        exp[f"{next(n for n, m in net.named_modules() if m is g)}.embedding"] = rows
    return exp


# --- gradient multipliers ---------------------------------------------------------------------------------


def test_soft_cumulative_masks_are_the_task_masks_at_s_max() -> None:
    net, _ = soft_net()
    for name, ps in A.items():
        torch.testing.assert_close(getattr(net, name).cumulative, torch.tensor(ps), rtol=0, atol=1e-6)


def test_gradient_multipliers_match_the_hand_computation() -> None:
    net, hat = soft_net()
    got = hat.gradient_multipliers()
    expected = expected_multipliers(net, task=1)
    assert set(got) == set(expected)
    for name, mult in expected.items():
        torch.testing.assert_close(got[name], mult, rtol=0, atol=1e-6, msg=name)


def test_own_head_keeps_its_raw_gradient() -> None:
    _, hat = soft_net()
    got = hat.gradient_multipliers()
    assert "task_heads.heads.1.weight" not in got
    assert "task_heads.heads.1.bias" not in got


def test_first_task_protects_nothing_but_other_tasks_rows() -> None:
    torch.manual_seed(0)
    net = Net()
    hat = hatnorm.HAT(net, net.layers())
    hat.begin_task(0)
    got = hat.gradient_multipliers()
    # no earlier task: every shared weight, bias, γ and β keeps its raw gradient
    assert sorted(got) == sorted(
        ["bn2.weight", "bn2.bias", "task_heads.heads.1.weight", "task_heads.heads.1.bias", "task_heads.heads.2.weight",
         "task_heads.heads.2.bias"] + [f"g{i}.embedding" for i in range(1, 6)]
    )
    assert torch.equal(got["bn2.weight"], torch.tensor([[1.0] * 4, [0.0] * 4, [0.0] * 4]))


def test_binarized_cumulative_gives_hard_zeros_and_ones() -> None:
    torch.manual_seed(0)
    net = Net(binarize=True)
    hat = hatnorm.HAT(net, net.layers())
    learn(hat, 0, {g: [embedding_for(p) for p in ps] for g, ps in A.items()})
    # binarized: a^{<1} = 1[e^0 > 0]; σ(400·0) = 0.5 is not > 0.5, so g3's first unit stays free
    assert torch.equal(net.g1.cumulative, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert torch.equal(net.g3.cumulative, torch.tensor([0.0, 1.0, 0.0]))
    hat.begin_task(1)
    got = hat.gradient_multipliers()
    assert torch.equal(got["conv1.bias"], torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert torch.equal(got["bn1.weight"], torch.tensor([0.0, 1.0, 0.0, 1.0]))


def test_soft_cumulative_is_the_running_max_over_tasks() -> None:
    torch.manual_seed(0)
    net = Net(binarize=False)
    hat = hatnorm.HAT(net, net.layers())
    e0 = [0.001, -0.002, 0.004, -1.0]
    e1 = [0.003, -0.001, -0.004, 0.0005]
    learn(hat, 0, {"g1": e0})
    learn(hat, 1, {"g1": e1})
    expected = [max(sigmoid(S_MAX * u), sigmoid(S_MAX * v)) for u, v in zip(e0, e1, strict=True)]
    torch.testing.assert_close(net.g1.cumulative, torch.tensor(expected), rtol=0, atol=1e-6)
    assert torch.equal(net.g1.summative, torch.tensor([2.0, 0.0, 1.0, 1.0]))
    hat.begin_task(2)
    torch.testing.assert_close(hat.gradient_multipliers()["conv1.bias"], 1 - torch.tensor(expected),
                               rtol=0, atol=1e-6)


# --- protect ----------------------------------------------------------------------------------------------


def test_protect_applies_multipliers_and_compensation_to_real_gradients() -> None:
    net, hat = soft_net()
    net.train()
    torch.manual_seed(1)
    x, y = torch.randn(8, 2, 4, 4), torch.randint(0, 2, (8,))
    s = hat.scale(1, 200)  # ≈ 2: gates not saturated, so every embedding gets a gradient
    loss = hat.loss(F.cross_entropy(net(x, 1, s), y), s)
    loss.backward()
    raw = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    embeddings = {n: p.detach().clone() for n, p in net.named_parameters() if n.endswith("embedding")}
    hat.protect(s)

    expected = expected_multipliers(net, task=1)
    for name, p in net.named_parameters():
        if p.grad is None:
            continue
        if name.endswith("embedding"):
            # row 1: q' = s_max·[cosh(clamp(s·e, ±50)) + 1] / (s·[cosh(e) + 1])·q; other rows 0
            e = embeddings[name][1].double().tolist()
            factor = [S_MAX * (math.cosh(max(-50, min(50, s * v))) + 1) / (s * (math.cosh(v) + 1)) for v in e]
            want = torch.zeros_like(p.grad)
            want[1] = raw[name][1] * torch.tensor(factor, dtype=torch.float32)
            torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=0, msg=name)
            assert (raw[name][1] != 0).any(), name
        elif name in expected:
            torch.testing.assert_close(p.grad, raw[name] * expected[name], rtol=1e-6, atol=1e-9, msg=name)
        else:
            assert name.startswith("task_heads.heads.1."), name
            assert torch.equal(p.grad, raw[name]), name


@pytest.mark.parametrize("s", [25.0, 100.0, 400.0])
def test_floored_gates_give_serras_gradients(s: float) -> None:
    # the same protected step with the plain sigmoid gate (Serrà et al.'s code) and with the floored one:
    # at these scales many gates are far below the floor, yet every compensated embedding gradient and
    # every weight gradient agrees
    grads = []
    for floor in (0.0, hatnorm.functional.GATE_FLOOR):
        torch.manual_seed(0)
        model = hatnorm.build("alexnet", num_tasks=2, norm="masked_bn", num_classes=4, width=0.25)
        for gate in model.modules():
            if isinstance(gate, hatnorm.HATGate):
                gate.floor = floor
        hat = hatnorm.HAT(model)
        hat.begin_task(1)
        model.train()
        x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 4, (16,))
        hat.loss(F.cross_entropy(model(x, task=1, s=s), y), s).backward()
        hat.protect(s)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    plain, floored = grads
    below = sum(int((torch.sigmoid(s * g.embedding[1]) < hatnorm.functional.GATE_FLOOR).sum()) for g in hat.gates)
    assert below > 10
    assert plain.keys() == floored.keys()
    for name in plain:
        torch.testing.assert_close(floored[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)
    assert all(bool((g.embedding.grad[1] != 0).any()) for g in hat.gates)


def test_protect_zeroes_exactly_where_the_binarized_mask_is_one() -> None:
    torch.manual_seed(0)
    net = Net(binarize=True)
    hat = hatnorm.HAT(net, net.layers())
    learn(hat, 0, {g: [embedding_for(p) for p in ps] for g, ps in A.items()})
    hat.begin_task(1)
    net.train()
    x = torch.randn(8, 2, 4, 4)
    net(x, 1, 2.0).square().sum().backward()
    raw = net.bn1.weight.grad.clone(), net.conv1.bias.grad.clone()
    hat.protect(2.0)
    # g1 cumulative [1, 0, 1, 0]: units 0 and 2 get exactly 0, units 1 and 3 their raw gradient
    for grad, before in zip((net.bn1.weight.grad, net.conv1.bias.grad), raw, strict=True):
        assert torch.equal(grad[[0, 2]], torch.zeros(2))
        assert torch.equal(grad[[1, 3]], before[[1, 3]])


# --- step: optimizer safety -------------------------------------------------------------------------------


OPTIMIZERS = {
    "sgd_momentum_wd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1),
    "adam": lambda params: torch.optim.Adam(params, lr=0.05),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.05, weight_decay=0.1),
}


def train_steps(net: Net, hat: hatnorm.HAT, optimizer: torch.optim.Optimizer, task: int, steps: int) -> None:
    net.train()
    s = 1.0  # a moderate scale keeps the gates soft, so every unprotected entry gets a gradient
    for _ in range(steps):
        x, y = torch.randn(8, 2, 4, 4), torch.randint(0, 2, (8,))
        loss = hat.loss(F.cross_entropy(net(x, task, s), y), s)
        optimizer.zero_grad()
        loss.backward()
        hat.protect(s)
        hat.step(optimizer)


@pytest.mark.parametrize("make_optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_step_restores_frozen_entries_and_moves_the_others(make_optimizer) -> None:
    torch.manual_seed(0)
    net = Net(binarize=True)
    hat = hatnorm.HAT(net, net.layers())
    optimizer = make_optimizer(net.parameters())
    spread(net, 0)
    spread(net, 1)
    # task 0 trains for real, so momentum and Adam moments carry over into task 1
    hat.begin_task(0)
    train_steps(net, hat, optimizer, 0, 3)
    hat.end_task()
    # at least one unit of every gate protected and at least one free, so both kinds of entries exist
    with torch.no_grad():
        for g in net.gates():
            g.cumulative[0], g.cumulative[1] = 1.0, 0.0

    hat.begin_task(1)
    mults = hat.gradient_multipliers()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    train_steps(net, hat, optimizer, 1, 3)
    after = dict(net.named_parameters())

    assert any(bool((m == 0).any()) for m in mults.values())
    for name, mult in mults.items():
        frozen = mult == 0
        assert torch.equal(after[name].detach()[frozen], before[name][frozen]), name
        if (~frozen).any():
            assert not torch.equal(after[name].detach()[~frozen], before[name][~frozen]), name
    for name in ("task_heads.heads.1.weight", "task_heads.heads.1.bias"):
        assert not torch.equal(after[name].detach(), before[name]), name


def test_step_clamps_the_active_embedding() -> None:
    torch.manual_seed(0)
    net = Net()
    hat = hatnorm.HAT(net, net.layers())
    hat.begin_task(1)
    with torch.no_grad():
        net.g1.embedding[1] = torch.tensor([10.0, -10.0, 5.0, -7.0])
        net.g1.embedding[0] = torch.tensor([10.0, -10.0, 5.0, -7.0])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    hat.step(optimizer)
    assert torch.equal(net.g1.embedding[1].detach(), torch.tensor([6.0, -6.0, 5.0, -6.0]))
    # other tasks' rows are not the active task's: left as they are
    assert torch.equal(net.g1.embedding[0].detach(), torch.tensor([10.0, -10.0, 5.0, -7.0]))


# --- reference mode: Serrà et al.'s code where it differs from the paper ----------------------------------


def test_reference_mode_anneals_over_the_sample_index_and_clamps_every_row() -> None:
    torch.manual_seed(0)
    net = TwoGates(binarize=False)
    hat = hatnorm.HAT(net, net.layers(), reference=True)
    # s = 1/s_max + (s_max − 1/s_max)·i/N, i = b·64 of N = 10·64: the last batch stays below s_max
    assert [hat.scale(b, 10) for b in (0, 5, 9)] == pytest.approx(
        [1 / S_MAX, 1 / S_MAX + (S_MAX - 1 / S_MAX) * 0.5, 1 / S_MAX + (S_MAX - 1 / S_MAX) * 0.9])
    hat.begin_task(1)
    with torch.no_grad():
        net.g1.embedding[0] = torch.tensor([10.0, -10.0, 5.0])
    hat.step(torch.optim.SGD(net.parameters(), lr=0.0))
    assert torch.equal(net.g1.embedding[0].detach(), torch.tensor([6.0, -6.0, 5.0]))  # not the active row


def test_the_paper_mode_reaches_s_max_on_the_last_batch() -> None:
    net = TwoGates()
    assert hatnorm.HAT(net, net.layers()).scale(9, 10) == S_MAX


def test_reference_mode_refuses_binarizing_gates_and_build_makes_soft_ones() -> None:
    net = TwoGates()
    with pytest.raises(ValueError, match=r"reference=True reproduces Serrà et al.'s soft masks, but gates "
                                         r"\['g1', 'g2'\] binarize"):
        hatnorm.HAT(net, net.layers(), reference=True)
    model = hatnorm.build("mlp", num_tasks=2, norm="masked_bn", num_classes=2, in_features=4, hidden=(8,),
                          reference=True)
    assert all(not g.binarize for g in model.modules() if isinstance(g, hatnorm.HATGate))
    hat = hatnorm.HAT(model, reference=True)
    hat.begin_task(0)
    hat.end_task()
    cumulative = model.gates[0].cumulative
    # soft: σ(s_max·e)
    assert torch.equal(cumulative, hatnorm.functional.hat_gate(model.gates[0].embedding[0].detach(), S_MAX))
    with pytest.raises(TypeError, match="reference must be a bool, got 'yes'"):
        hatnorm.build("mlp", num_tasks=2, norm="masked_bn", num_classes=2, in_features=4, reference="yes")


# --- capacity regulariser ---------------------------------------------------------------------------------


class TwoGates(nn.Module):
    def __init__(self, *, binarize: bool = True) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(2, 3), nn.Linear(3, 2)
        self.g1 = hatnorm.HATGate(3, num_tasks=T, binarize=binarize)
        self.g2 = hatnorm.HATGate(2, num_tasks=T, binarize=binarize)

    def layers(self) -> list[hatnorm.blocks.Layer]:
        return [hatnorm.blocks.Layer(self.fc1, out=self.g1), hatnorm.blocks.Layer(self.fc2, out=self.g2, inp=self.g1)]


def test_regularizer_on_the_first_task_is_the_mean_gate() -> None:
    net = TwoGates()
    hat = hatnorm.HAT(net, net.layers())
    with torch.no_grad():
        net.g1.embedding[0] = torch.tensor([0.5, -0.25, 2.0])
        net.g2.embedding[0] = torch.tensor([0.1, -0.3])
    hat.begin_task(0)
    s = 2.0
    expected = (sigmoid(1.0) + sigmoid(-0.5) + sigmoid(4.0) + sigmoid(0.2) + sigmoid(-0.6)) / 5
    assert hat.regularizer(s).item() == pytest.approx(expected, abs=1e-7)


def test_regularizer_by_hand_with_binarized_cumulative_masks() -> None:
    net = TwoGates()
    hat = hatnorm.HAT(net, net.layers())
    learn(hat, 0, {"g1": [1.0, -1.0, 1.0], "g2": [-1.0, -1.0]})  # a^{<1}: g1 [1, 0, 1], g2 [0, 0]
    with torch.no_grad():
        net.g1.embedding[1] = torch.tensor([0.5, -0.25, 2.0])
        net.g2.embedding[1] = torch.tensor([0.1, -0.3])
    hat.begin_task(1)
    s = 2.0
    # R = Σ a(1 − a^{<t}) / Σ (1 − a^{<t}) = [σ(−0.5) + σ(0.2) + σ(−0.6)] / (1 + 2)
    expected = (sigmoid(-0.5) + sigmoid(0.2) + sigmoid(-0.6)) / 3
    r = hat.regularizer(s)
    assert r.item() == pytest.approx(expected, abs=1e-7)
    assert hat.loss(torch.tensor(1.0), s).item() == pytest.approx(1.0 + 0.75 * expected, abs=1e-6)
    r.backward()
    # only the active task's embeddings get a gradient, and used units (a^{<t} = 1) none
    assert torch.equal(net.g1.embedding.grad[[0, 2]], torch.zeros(2, 3))
    assert net.g1.embedding.grad[1, 0] == 0 and net.g1.embedding.grad[1, 2] == 0
    assert net.g1.embedding.grad[1, 1] > 0


def test_regularizer_by_hand_with_soft_cumulative_masks() -> None:
    net = TwoGates(binarize=False)
    hat = hatnorm.HAT(net, net.layers(), c=0.5)
    cum1, cum2 = [0.6, 0.0, 1.0], [0.25, 0.9]
    learn(hat, 0, {"g1": [embedding_for(p) for p in cum1], "g2": [embedding_for(p) for p in cum2]})
    with torch.no_grad():
        net.g1.embedding[1] = torch.tensor([0.5, -0.25, 2.0])
        net.g2.embedding[1] = torch.tensor([0.1, -0.3])
    hat.begin_task(1)
    s = 3.0
    a = [sigmoid(3 * 0.5), sigmoid(-0.75), sigmoid(6.0), sigmoid(0.3), sigmoid(-0.9)]
    free = [1 - p for p in cum1 + cum2]
    expected = sum(x * f for x, f in zip(a, free, strict=True)) / sum(free)
    assert hat.regularizer(s).item() == pytest.approx(expected, abs=1e-6)
    assert hat.loss(torch.tensor(0.0), s).item() == pytest.approx(0.5 * expected, abs=1e-6)


# --- AdaHAT -----------------------------------------------------------------------------------------------


class AdaNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)
        self.n1 = hatnorm.norms.MaskedBatchNorm1d(4, num_tasks=T)
        self.g1 = hatnorm.HATGate(4, num_tasks=T)
        self.g2 = hatnorm.HATGate(2, num_tasks=T)

    def layers(self) -> list[hatnorm.blocks.Layer]:
        return [hatnorm.blocks.Layer(self.fc1, out=self.g1), hatnorm.blocks.Layer(self.n1, out=self.g1),
                hatnorm.blocks.Layer(self.fc2, out=self.g2, inp=self.g1)]


@pytest.mark.parametrize("policy", [hatnorm.policies.AdaHATPolicy(alpha=0.1, epsilon=0.1), "adahat"])
def test_adahat_rate_by_hand(policy) -> None:
    net = AdaNet()
    hat = hatnorm.HAT(net, net.layers(), policy=policy)
    learn(hat, 0, {"g1": [1.0, 1.0, -1.0, -1.0], "g2": [1.0, -1.0]})
    learn(hat, 1, {"g1": [1.0, -1.0, 1.0, -1.0], "g2": [1.0, -1.0]})
    # g1: cumulative [1, 1, 1, 0], summative n = [2, 1, 1, 0], free = 1/4 → r = 0.1/(0.1 + 0.25) = 2/7
    # r/(n + r): n = 2 → 1/8, n = 1 → 2/9, n = 0 → 1
    # g2: cumulative [1, 0], summative [2, 0], free = 1/2 → r = 0.1/0.6 = 1/6: n = 2 → 1/13, n = 1 → 1/7
    hat.begin_task(2)
    got = hat.gradient_multipliers()
    unit1 = torch.tensor([1 / 8, 2 / 9, 2 / 9, 1.0])
    torch.testing.assert_close(got["fc1.bias"], unit1, rtol=1e-6, atol=0)
    torch.testing.assert_close(got["n1.weight"], unit1, rtol=1e-6, atol=0)
    torch.testing.assert_close(got["n1.bias"], unit1, rtol=1e-6, atol=0)
    torch.testing.assert_close(got["fc1.weight"], unit1[:, None].expand(4, 3), rtol=1e-6, atol=0)
    # fc2 weight: n = min(summative of output i, of input j) = min([2, 0][i], [2, 1, 1, 0][j])
    fc2 = torch.tensor([[1 / 13, 1 / 7, 1 / 7, 1.0], [1.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(got["fc2.weight"], fc2, rtol=1e-6, atol=0)
    torch.testing.assert_close(got["fc2.bias"], torch.tensor([1 / 13, 1.0]), rtol=1e-6, atol=0)


def test_adahat_options_change_the_rate() -> None:
    net = AdaNet()
    hat = hatnorm.HAT(net, net.layers(), policy=hatnorm.create_policy("adahat", alpha=0.5, epsilon=0.25))
    learn(hat, 0, {"g1": [1.0, 1.0, -1.0, -1.0], "g2": [1.0, -1.0]})
    hat.begin_task(1)
    # g1 free = 1/2 → r = 0.5/0.75 = 2/3; n = 1 → (2/3)/(5/3) = 2/5
    torch.testing.assert_close(hat.gradient_multipliers()["fc1.bias"], torch.tensor([0.4, 0.4, 1.0, 1.0]),
                               rtol=1e-6, atol=0)


# --- coverage and task order ------------------------------------------------------------------------------


class WithLoose(Net):
    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(4, 4)


def test_unwired_linear_is_refused_by_name() -> None:
    net = WithLoose()
    with pytest.raises(ValueError, match=r"extra\.weight.*extra\.bias|extra\.bias.*extra\.weight"):
        hatnorm.HAT(net, net.layers())


def test_frozen_unwired_linear_is_accepted() -> None:
    net = WithLoose()
    net.extra.requires_grad_(False)
    hatnorm.HAT(net, net.layers())


def test_missing_norm_layer_is_refused_by_name() -> None:
    net = Net()
    layers = [layer for layer in net.layers() if layer.module is not net.bn1]
    with pytest.raises(ValueError, match=r"bn1\.weight"):
        hatnorm.HAT(net, layers)


def test_end_task_without_begin_task() -> None:
    net = Net()
    hat = hatnorm.HAT(net, net.layers())
    with pytest.raises(RuntimeError, match=r"end_task needs an active task; call begin_task"):
        hat.end_task()


def test_begin_task_twice() -> None:
    net = Net()
    hat = hatnorm.HAT(net, net.layers())
    hat.begin_task(0)
    with pytest.raises(RuntimeError, match=r"task 0 is still being trained; call end_task\(\) before begin_task\(1\)"):
        hat.begin_task(1)
    assert hat.task == 0


def test_begin_a_learned_task() -> None:
    net = Net()
    hat = hatnorm.HAT(net, net.layers())
    hat.begin_task(0)
    hat.end_task()
    with pytest.raises(ValueError, match=r"task must be a task not learned yet, got 0; learned: \[0\]"):
        hat.begin_task(0)
    hat.begin_task(2)
    hat.end_task()
    assert hat.learned_tasks == [0, 2]


@pytest.mark.parametrize("call", [
    lambda hat: hat.protect(1.0),
    lambda hat: hat.regularizer(1.0),
    lambda hat: hat.step(torch.optim.SGD(hat.model.parameters(), lr=0.1)),
    lambda hat: hat.gradient_multipliers(),
], ids=["protect", "regularizer", "step", "gradient_multipliers"])
def test_calls_that_need_an_active_task(call) -> None:
    net = Net()
    hat = hatnorm.HAT(net, net.layers())
    with pytest.raises(RuntimeError, match="needs an active task"):
        call(hat)
    hat.begin_task(0)
    hat.end_task()
    with pytest.raises(RuntimeError, match="needs an active task"):
        call(hat)
