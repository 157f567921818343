"""Differential test: hatnorm's HAT, AdaHAT (reference form) and FG-AdaHAT against an independent port of the
reference formulas (tests/reference_fgadahat.py), at every stage of every step, in float64.

At each step of three tasks, on an MLP and a CNN (convolutions, then a flatten and a linear layer) with more than
10 units per layer: the forward, the rates of every weight and bias, the gradients after ``HAT.protect``
(embeddings compensated too), the step's importance of every unit and the accumulators after ``HAT.step``; at
every task end the masks, the task's importance and the summed importance.
"""

from __future__ import annotations

import pytest
import reference_fgadahat as ref
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hatnorm
from hatnorm import HAT, HATGate, HATModule, TaskHeads
from hatnorm.blocks import Flatten, Layer

TASKS, STEPS, BATCH, CLASSES = 3, 3, 6, 3
CLOSE = {"rtol": 1e-9, "atol": 1e-13}


class GatedCNN(HATModule):
    """conv 2→11 (3×3) → gate → ReLU → conv 11→12 (3×3) → gate → ReLU → flatten → linear → gate → ReLU → head."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(2, 11, 3), nn.Conv2d(11, 12, 3)
        self.fc = nn.Linear(12 * 4 * 4, 13)
        self.gates = nn.ModuleList(HATGate(n, num_tasks=num_tasks) for n in (11, 12, 13))
        self.task_heads = TaskHeads(13, CLASSES, num_tasks=num_tasks)

    def forward(self, x: Tensor, task: int, s: float | None = None) -> Tensor:
        g1, g2, g3 = (g(task, s) for g in self.gates)
        h = F.relu(self.conv1(x) * g1[:, None, None])
        h = F.relu(self.conv2(h) * g2[:, None, None])
        h = F.relu(self.fc(h.flatten(1)) * g3)
        return self.task_heads(h, task)

    def hat_layers(self) -> list[Layer]:
        g1, g2, g3 = self.gates
        return [Layer(self.conv1, out=g1), Layer(self.conv2, out=g2, inp=g1),
                Layer(self.fc, out=g3, inp=Flatten(g2, 16))]

    def head_units(self) -> HATGate:
        return self.gates[-1]


class GatedMLP(HATModule):
    """20 → 16 → 14 → 12, each linear → gate → ReLU, then one head per task (CLArena's ``HATMaskMLP``)."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in ((20, 16), (16, 14), (14, 12)))
        self.gates = nn.ModuleList(HATGate(n, num_tasks=num_tasks) for n in (16, 14, 12))
        self.task_heads = TaskHeads(12, CLASSES, num_tasks=num_tasks)

    def forward(self, x: Tensor, task: int, s: float | None = None) -> Tensor:
        for fc, gate in zip(self.fcs, self.gates, strict=True):
            x = F.relu(fc(x) * gate(task, s))
        return self.task_heads(x, task)

    def hat_layers(self) -> list[Layer]:
        return [Layer(fc, out=g, inp=None if i == 0 else self.gates[i - 1])
                for i, (fc, g) in enumerate(zip(self.fcs, self.gates, strict=True))]

    def head_units(self) -> HATGate:
        return self.gates[-1]


def mlp() -> tuple[nn.Module, list[nn.Module], ref.Stack, tuple[int, ...]]:
    model = GatedMLP(TASKS)
    return model, list(model.fcs), ref.Stack(["linear"] * 3, [True, False, False], [1, 1, 1]), (20,)


def cnn() -> tuple[nn.Module, list[nn.Module], ref.Stack, tuple[int, ...]]:
    model = GatedCNN(TASKS)
    return model, [model.conv1, model.conv2, model.fc], ref.Stack(["conv", "conv", "linear"],
                                                                 [False, False, True], [1, 1, 16]), (2, 8, 8)


MODELS = {"mlp": mlp, "cnn": cnn}


def run(model_name: str, policy: object, expected_rates: object, fg: ref.FGOptions | None = None) -> None:
    """Train three tasks with hatnorm and compare each stage with the port.

    ``expected_rates(s, gates, cumulative, summative, t, state, weights)`` gives the port's rates per layer.
    """
    torch.manual_seed(0)
    model, layers, stack, shape = MODELS[model_name]()
    model.double()
    gates = [m for m in model.modules() if isinstance(m, HATGate)]
    for g in gates:
        g.floor = 0.0  # the reference's plain sigmoid
    hat = HAT(model, policy=policy)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    cumulative = [torch.zeros(g.num_features, dtype=torch.float64) for g in gates]
    summative = [torch.zeros_like(c) for c in cumulative]
    state = ref.FGState([torch.zeros_like(c) for c in cumulative])
    for task in range(TASKS):
        t = task + 1
        hat.begin_task(task)
        state.begin_task()
        head = model.task_heads.heads[task]
        for step in range(STEPS):
            x = torch.randn(BATCH, *shape, dtype=torch.float64)
            y = torch.randint(0, CLASSES, (BATCH,))
            s = hat.scale(step, STEPS)
            soft = [ref.anneal_gate(g.embedding[task].detach(), s) for g in gates]
            weights = [m.weight.detach().clone() for m in layers]
            biases = [m.bias.detach().clone() for m in layers]
            logits_port, acts = ref.forward(stack, x, weights, biases, soft, head.weight.detach(), head.bias.detach())
            logits = model(x, task=task, s=s)
            torch.testing.assert_close(logits, logits_port, **CLOSE)
            optimizer.zero_grad()
            hat.loss(F.cross_entropy(logits, y), s).backward()
            raw = [(m.weight.grad.clone(), m.bias.grad.clone()) for m in layers]
            raw_e = [g.embedding.grad[task].clone() for g in gates]
            rates = expected_rates(s, soft, cumulative, summative, t, state, weights)
            if isinstance(hat.policy, hatnorm.policies.StepPolicy):
                got = hat.policy.rates(s)
                for m, (rw, rb) in zip(layers, rates, strict=True):
                    torch.testing.assert_close(got[m.weight].expand_as(m.weight), rw, **CLOSE)
                    torch.testing.assert_close(got[m.bias].expand_as(m.bias), rb, **CLOSE)
            hat.protect(s)
            for m, (gw, gb), (rw, rb) in zip(layers, raw, rates, strict=True):
                torch.testing.assert_close(m.weight.grad, gw * rw, **CLOSE)
                torch.testing.assert_close(m.bias.grad, gb * rb, **CLOSE)
            for g, e_grad in zip(gates, raw_e, strict=True):
                torch.testing.assert_close(g.embedding.grad[task], e_grad * ref.compensation(
                    g.embedding[task].detach(), s, g.s_max), **CLOSE)
            before = [a.clone() for a in getattr(hat.policy, "accumulated", [])]
            hat.step(optimizer)
            if fg is not None:
                adjusted = [gw * rw for (gw, _), (rw, _) in zip(raw, rates, strict=True)]
                post = [m.weight.detach() for m in layers]
                step_port = state.step_importance(fg, post, adjusted, head.weight.detach(), head.weight.grad, acts,
                                                  soft)
                for b, a, u in zip(before, hat.policy.accumulated, step_port, strict=True):
                    torch.testing.assert_close(a - b, u, **CLOSE)
                for a, a_port in zip(hat.policy.accumulated, state.accumulated, strict=True):
                    torch.testing.assert_close(a, a_port, **CLOSE)
        hat.end_task()
        masks = [(g.embedding[task].detach() > 0).double() for g in gates]
        cumulative = [torch.maximum(c, m) for c, m in zip(cumulative, masks, strict=True)]
        summative = [n + m for n, m in zip(summative, masks, strict=True)]
        for g, c, n in zip(gates, cumulative, summative, strict=True):
            torch.testing.assert_close(g.cumulative, c, rtol=0, atol=0)
            torch.testing.assert_close(g.summative, n, rtol=0, atol=0)
        if fg is not None:
            state.end_task(fg, masks)
            for mine, theirs in zip(hat.policy.history[-1], state.history[-1], strict=True):
                torch.testing.assert_close(mine, theirs, **CLOSE)
            for mine, theirs in zip(hat.policy.summed, state.summed, strict=True):
                torch.testing.assert_close(mine, theirs, **CLOSE)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_hat_matches_the_reference(model_name: str) -> None:
    stack = MODELS[model_name]()[2]
    run(model_name, "hat", lambda s, soft, cum, summ, t, st, w: ref.hat_rates(cum, stack, w))


@pytest.mark.parametrize("mode", hatnorm.policies.ADAHAT_MODES)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_adahat_reference_form_matches_the_reference(model_name: str, mode: str) -> None:
    stack = MODELS[model_name]()[2]

    def expected(s, soft, cum, summ, t, st, w):
        return ref.adahat_rates(mode, 1e-6, 0.1, ref.network_sparsity(soft, cum), summ, t, stack, w)

    run(model_name, hatnorm.create_policy("adahat", reference=True, mode=mode), expected)


def _fg_case(model_name: str, o: ref.FGOptions, **options: object) -> None:
    stack = MODELS[model_name]()[2]

    def expected(s, soft, cum, summ, t, st, w):
        return ref.fg_rates(o, st.summed, cum, summ, ref.network_sparsity(soft, cum), t, stack, w)

    policy = hatnorm.policies.FGAdaHATPolicy(alpha=o.alpha, importance=o.kind, summing=o.summing, scheduler=o.scheduler,
                                    aggregation=o.agg, base_importance=o.b_i, base_sparsity=o.b_r,
                                    base_linear=o.b_l, filter_by_cumulative_mask=o.filter_by_cumulative_mask,
                                    filter_unmasked_importance=o.filter_unmasked_importance,
                                    multiply_gate=o.multiply_gate, reference_decrease=o.reference_decrease,
                                    **options)
    run(model_name, policy, expected, fg=o)


# b_I = 0.01 (the signature's default) and α = 0.01 keep every rate well away from 0 and 1 in a 3-step test
BASE = {"alpha": 1e-2, "b_i": 1e-2}


@pytest.mark.parametrize("kind", sorted(hatnorm.policies.IMPORTANCE_TYPES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_fg_adahat_importance_types_match_the_reference(model_name: str, kind: str) -> None:
    _fg_case(model_name, ref.FGOptions(kind=kind, **BASE))


DECREASE_OPTIONS = {"linear_step": 0.5, "exponential_rate": 1.5, "log_base": 3.0}


@pytest.mark.parametrize(("summing", "reference_decrease"),
                         [(s, False) for s in hatnorm.policies.SUMMING_STRATEGIES]
                         + [(s, True) for s in hatnorm.policies.SUMMING_STRATEGIES
                            if s.endswith("_decrease") and s != "log_decrease"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_fg_adahat_summing_strategies_match_the_reference(model_name: str, summing: str,
                                                          reference_decrease: bool) -> None:
    o = ref.FGOptions(kind="input_weight_abs_sum_x_activation_abs", summing=summing,
                      reference_decrease=reference_decrease, linear_step=0.5, exponential_rate=1.5, log_base=3.0,
                      **BASE)
    needed = {"linear_decrease": "linear_step", "exponential_decrease": "exponential_rate", "log_decrease": "log_base"}
    options = {needed[summing]: DECREASE_OPTIONS[needed[summing]]} if summing in needed else {}
    _fg_case(model_name, o, **options)


@pytest.mark.parametrize("scheduler", hatnorm.policies.SCHEDULERS)
@pytest.mark.parametrize("aggregation", ["min", "max", "mean"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_fg_adahat_schedulers_and_aggregations_match_the_reference(model_name: str, scheduler: str,
                                                                   aggregation: str) -> None:
    _fg_case(model_name, ref.FGOptions(kind="output_weight_gradient_abs_sum", scheduler=scheduler, agg=aggregation,
                                       b_l=0.0 if scheduler == "sparsity_reg" else 5.0, **BASE))


@pytest.mark.parametrize("model_name", list(MODELS))
def test_fg_adahat_filters_and_ungated_steps_match_the_reference(model_name: str) -> None:
    _fg_case(model_name, ref.FGOptions(kind="input_weight_gradient_square_sum_x_activation_abs",
                                       filter_by_cumulative_mask=True, filter_unmasked_importance=True,
                                       multiply_gate=False, **BASE))


@pytest.mark.parametrize("model_name", list(MODELS))
def test_fg_adahat_paper_defaults_match_the_reference(model_name: str) -> None:
    _fg_case(model_name, ref.FGOptions())
