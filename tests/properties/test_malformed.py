"""Malformed input thrown at the public API: only the documented exception types come back, and nothing changes.

For bad input the documented types are ``TypeError`` and ``ValueError`` (``hatnorm.ConversionError`` is a
``ValueError``); ``RuntimeError`` only for calls out of order (HAT's methods without an active task, or
``begin_task`` while one is active). Any other exception type fails, and so does a call that accepts the input.
Every module, optimizer and HAT method keeps its state bit-identical. Models are built once per test and reused
across examples: each example checks that the state is untouched, so reuse is sound.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import hatnorm
from hatnorm import metrics

from .models import gated_net
from .strategies import bad_scales, bad_tasks, junk, malformed_tensors, non_positive, seeded

T = 3
C = 4
BAD_INPUT = (TypeError, ValueError)


def snapshot(*objects: object) -> list[object]:
    """Every tensor of the modules, optimizers and HAT instances given, and HAT's task bookkeeping, copied."""
    out: list[object] = []
    for obj in objects:
        if isinstance(obj, nn.Module):
            out += [t.detach().clone() for t in obj.state_dict().values()]
            out += [None if p.grad is None else p.grad.clone() for p in obj.parameters()]
        elif isinstance(obj, torch.optim.Optimizer):
            out.append(copy.deepcopy(obj.state_dict()))
        elif isinstance(obj, hatnorm.HAT):
            out += [obj.task, list(obj.learned_tasks), [id(p) for p in obj._params], [id(p) for p in obj._frozen],
                    list(obj._filled), obj._free_total, *(t.clone() for t in (*obj._mults, *obj._drop, *obj._free))]
    return out


def same(a: object, b: object) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def assert_refused(call: Callable[[], object], *objects: object, allowed: tuple[type[Exception], ...] = BAD_INPUT,
                   ) -> Exception:
    """``call()`` raises one of ``allowed``, and every object in ``objects`` keeps its state."""
    before = snapshot(*objects)
    try:
        result = call()
    except allowed as error:
        assert all(map(same, before, snapshot(*objects))), f"state changed by a refused call ({error})"
        return error
    except Exception as error:  # any other type is the failure this test looks for
        raise AssertionError(f"undocumented exception type {type(error).__name__}: {error}") from error
    raise AssertionError(f"malformed input accepted, returned {type(result).__name__}")


# --- norms: every registered norm, in every layout it takes -----------------------------------------------------

# a layout per builder ``dims``: a good input shape (channels at dim 1, or last for dims=None)
LAYOUTS = {1: (3, C), 2: (2, C, 2, 3), None: (2, 3, C)}
NORM_CASES = [(name, dims) for name in hatnorm.list_norms() for dims in LAYOUTS
              if (hatnorm.get_norm(name).family in ("batch", "any") and dims in (1, 2))
              or (hatnorm.get_norm(name).family in ("layer", "any") and dims is None)]


@functools.cache
def norm_for(name: str, dims: int | None) -> hatnorm.MaskedNorm:
    with seeded(0):
        norm = hatnorm.get_norm(name).layer(num_tasks=T, dims=dims)(C)
        with torch.no_grad():
            for p in norm.parameters():
                p.copy_(torch.randn_like(p))
    return norm


@pytest.mark.parametrize(("name", "dims"), NORM_CASES, ids=[f"{n}-{d}" for n, d in NORM_CASES])
@given(data=st.data(), training=st.booleans(), spoil=st.sets(st.sampled_from(["x", "mask", "task"]), min_size=1))
def test_norm_forward_refuses_malformed_input(name, dims, data, training, spoil) -> None:
    norm = norm_for(name, dims).train(training)
    shape = LAYOUTS[dims]
    channel = 1 if dims is not None else len(shape) - 1
    # a norm without parameters (the pure gate) takes any floating dtype and device, as long as x and mask agree
    has_parameters = any(True for _ in norm.parameters())
    bad_floats = (torch.float64,) if has_parameters else ()
    x, mask, task = torch.randn(shape), torch.rand(C), 1
    if "x" in spoil:
        bad_x = malformed_tensors(shape, fixed={channel: C}, ranks=norm.input_ranks, bad_floats=bad_floats,
                                  other_device=has_parameters)
        if training and norm.batch_statistics:  # one value per channel: no batch statistics
            bad_x = st.one_of(bad_x, st.just(torch.randn(1, C, *[1] * (len(shape) - 2))))
        x = data.draw(bad_x, label="x")
    if "mask" in spoil:
        mask = data.draw(malformed_tensors((C,), fixed={0: C}, ranks=(1,), bad_floats=bad_floats,
                                           other_device="x" not in spoil or has_parameters), label="mask")
    if "task" in spoil:
        task = data.draw(bad_tasks(T), label="task")
    assert_refused(lambda: norm(x, mask, task), norm)


# --- gates -----------------------------------------------------------------------------------------------------


@functools.cache
def gate() -> hatnorm.HATGate:
    with seeded(0):
        g = hatnorm.HATGate(C, num_tasks=T)
    g.consolidate(0)
    return g


@given(data=st.data(), training=st.booleans(), method=st.sampled_from(["forward", "selection", "final_mask"]))
def test_gate_refuses_a_malformed_task(data, training, method) -> None:
    g = gate().train(training)
    task = data.draw(bad_tasks(T), label="task")
    call = {"forward": lambda: g(task, 1.0), "selection": lambda: g.selection(task),
            "final_mask": lambda: g.final_mask(task)}[method]
    assert_refused(call, g)


@given(s=bad_scales())
def test_gate_refuses_a_malformed_scale_in_training(s) -> None:
    g = gate().train()
    assert_refused(lambda: g(1, s), g)


@given(e=st.one_of(junk, st.just(torch.zeros(3, dtype=torch.long))), s=st.one_of(st.just(1.0), bad_scales()))
def test_gate_functions_refuse_malformed_input(e, s) -> None:
    assert_refused(lambda: hatnorm.functional.hat_gate(e, s))
    assert_refused(lambda: hatnorm.functional.compensation_factor(e, s, 400.0))


@given(batch=st.one_of(st.integers(min_value=10), st.integers(max_value=-1), junk, st.floats()),
       num_batches=st.one_of(st.just(10), non_positive, junk), s_max=st.one_of(st.just(400.0), non_positive, junk))
def test_anneal_scale_refuses_malformed_input(batch, num_batches, s_max) -> None:
    assert_refused(lambda: hatnorm.functional.anneal_scale(batch, num_batches, s_max))


# --- HAT -------------------------------------------------------------------------------------------------------


@functools.cache
def hat_setups() -> dict[str, tuple[nn.Module, hatnorm.HAT, torch.optim.Optimizer]]:
    """``active``: task 0 learned, task 1 active after one step with momentum, a second batch's gradients in
    place. ``idle``: a fresh HAT with no task begun."""
    setups = {}
    for key in ("active", "idle"):
        with seeded(0):
            model = gated_net("masked_bn", 3, [C, C], num_tasks=T, num_classes=2)
        hat = hatnorm.HAT(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if key == "active":
            x, y = torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 0, 1])
            hat.begin_task(0)
            hat.end_task()
            hat.begin_task(1)
            model.train()
            hat.loss(F.cross_entropy(model(x, task=1, s=2.0), y), 2.0).backward()
            hat.protect(2.0)
            hat.step(optimizer)
            optimizer.zero_grad()
            hat.loss(F.cross_entropy(model(x, task=1, s=2.0), y), 2.0).backward()
        setups[key] = (model, hat, optimizer)
    return setups


HAT_CALLS = ["begin_task", "scale", "regularizer", "protect", "loss", "step"]
NEEDS_TASK = {"regularizer", "protect", "loss", "step"}


@pytest.mark.parametrize("method", HAT_CALLS)
@given(data=st.data(), key=st.sampled_from(["active", "idle"]))
def test_hat_methods_refuse_malformed_input(method, data, key) -> None:
    model, hat, optimizer = hat_setups()[key]
    model.train()
    draw = data.draw
    if method == "begin_task":
        task = draw(bad_tasks(T), label="task")
        call = lambda: hat.begin_task(task)  # noqa: E731
    elif method == "scale":
        batch = draw(st.one_of(st.integers(min_value=0, max_value=3), st.integers(max_value=-1), junk), label="batch")
        num_batches = draw(st.one_of(st.just(4), non_positive, junk), label="num_batches")
        if isinstance(batch, int) and not isinstance(batch, bool) and 0 <= batch < 4 and num_batches == 4:
            num_batches = 0
        call = lambda: hat.scale(batch, num_batches)  # noqa: E731
    elif method == "regularizer":
        s = draw(bad_scales(), label="s")
        call = lambda: hat.regularizer(s)  # noqa: E731
    elif method == "protect":
        s = draw(bad_scales(), label="s")
        call = lambda: hat.protect(s)  # noqa: E731
    elif method == "loss":
        bad_loss = st.one_of(junk, st.sampled_from([float("nan"), float("inf"), -float("inf")]).map(torch.tensor),
                             st.just(torch.ones(3)), st.just(torch.tensor(1)), st.just(torch.zeros(0)))
        task_loss, s = draw(st.one_of(st.tuples(bad_loss, st.just(2.0)),
                                      st.tuples(st.just(torch.tensor(0.5)), bad_scales())), label="task_loss, s")
        call = lambda: hat.loss(task_loss, s)  # noqa: E731
    else:
        not_an_optimizer = draw(st.one_of(junk, st.just(optimizer.state_dict()), st.just([optimizer])))
        call = lambda: hat.step(not_an_optimizer)  # noqa: E731
    allowed = BAD_INPUT + ((RuntimeError,) if key == "idle" and method in NEEDS_TASK else ())
    error = assert_refused(call, model, optimizer, hat, allowed=allowed)
    if isinstance(error, RuntimeError):
        assert "needs an active task; call begin_task(task) first" in str(error)


@given(data=st.data(), option=st.sampled_from(["model", "layers", "c", "clamp", "thres_cosh", "policy"]))
def test_hat_constructor_refuses_malformed_options(data, option) -> None:
    model = hat_setups()["idle"][0]
    bad = {
        "model": junk,
        "layers": st.one_of(st.integers(), st.text(max_size=3), st.just([model]), st.just([None])),
        "c": st.one_of(st.floats(max_value=-1e-9), st.sampled_from([float("nan"), float("inf")]), junk),
        "clamp": st.one_of(non_positive, junk),
        "thres_cosh": st.one_of(non_positive, junk),
        "policy": st.one_of(st.text(max_size=4).filter(lambda n: n not in hatnorm.list_policies()),
                            st.integers(), st.none(), st.builds(object)),
    }[option]
    value = data.draw(bad, label=option)
    if option == "model":
        call = lambda: hatnorm.HAT(value)  # noqa: E731
    elif option == "layers":
        call = lambda: hatnorm.HAT(model, value)  # noqa: E731
    else:
        call = lambda: hatnorm.HAT(model, **{option: value})  # noqa: E731
    assert_refused(call, model)


# --- build and the registries --------------------------------------------------------------------------------

unknown_names = st.one_of(st.text(max_size=8), junk)


@given(data=st.data(), spoil=st.sets(st.sampled_from(["name", "num_tasks", "norm", "num_classes"]), min_size=1))
def test_build_refuses_malformed_arguments(data, spoil) -> None:
    draw = data.draw
    args = {"name": "mlp", "num_tasks": T, "norm": "masked_bn", "num_classes": [2, 3, 4]}
    if "name" in spoil:
        args["name"] = draw(unknown_names.filter(lambda n: n not in hatnorm.list_architectures()), label="name")
    if "num_tasks" in spoil:
        args["num_tasks"] = draw(st.one_of(non_positive, junk, st.floats()), label="num_tasks")
    if "norm" in spoil:
        args["norm"] = draw(unknown_names.filter(lambda n: n not in hatnorm.list_norms()), label="norm")
    if "num_classes" in spoil:
        count = st.one_of(non_positive, st.floats(), st.booleans(), st.text(max_size=2), st.none())
        args["num_classes"] = draw(st.one_of(
            non_positive, st.text(max_size=3), st.none(), st.floats(),
            st.lists(st.integers(min_value=1, max_value=5), max_size=6).filter(lambda c: len(c) != T),
            st.lists(st.one_of(st.integers(min_value=1, max_value=5), count), min_size=T, max_size=T).filter(
                lambda c: not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in c)),
        ), label="num_classes")
    name = args.pop("name")
    assert_refused(lambda: hatnorm.build(name, in_features=8, hidden=(4,), **args))


@given(name=unknown_names.filter(lambda n: not isinstance(n, str) or n not in hatnorm.list_norms() + hatnorm.
                                 list_architectures() + hatnorm.list_policies()))
def test_registries_refuse_unknown_names(name) -> None:
    for get in (hatnorm.get_norm, hatnorm.get_architecture, hatnorm.get_policy, hatnorm.create_policy):
        assert_refused(lambda get=get: get(name))


@given(name=st.sampled_from(hatnorm.list_norms()), builder=st.one_of(st.just(hatnorm.norms.MaskedBatchNorm2d), junk))
def test_registering_a_taken_name_or_a_non_builder_changes_nothing(name, builder) -> None:
    before = {n: hatnorm.get_norm(n) for n in hatnorm.list_norms()}
    assert_refused(lambda: hatnorm.register_norm(name, family="batch")(builder))
    assert {n: hatnorm.get_norm(n) for n in hatnorm.list_norms()} == before


# --- architecture forwards, task heads and converted models ----------------------------------------------------


class SmallCNN(nn.Module):
    """conv → BN → ReLU → flatten → Linear: a model ``hatnorm.convert`` takes, fixed to 8×8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


# name → (make the model, a good input shape, the dims (→ size) the input must have, one sample refused in training)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], dict[int, int], bool]] = {
    "mlp": (lambda: hatnorm.build("mlp", num_tasks=T, num_classes=2, in_features=12, hidden=(4,)), (2, 12),
            {1: 12}, True),
    "alexnet": (lambda: hatnorm.build("alexnet", num_tasks=T, num_classes=2, size=28, width=0.03), (2, 3, 28, 28),
                {1: 3, 2: 28, 3: 28}, True),
    "resnet18": (lambda: hatnorm.build("resnet18", num_tasks=T, num_classes=2, base_width=1), (2, 3, 4, 4), {1: 3},
                 True),
    "vit": (lambda: hatnorm.build("vit", num_tasks=T, norm="masked_ln", num_classes=2, image_size=4, patch_size=2,
                                  dim=4, depth=1, num_heads=2), (2, 3, 4, 4), {1: 3, 2: 4, 3: 4}, False),
    "converted": (lambda: hatnorm.convert(SmallCNN(), num_tasks=T), (2, 3, 8, 8), {1: 3, 2: 8, 3: 8}, False),
}


@functools.cache
def model_for(name: str) -> nn.Module:
    with seeded(0):
        model = MODELS[name][0]().train()
        model(torch.randn(MODELS[name][1]), 1, 2.0).sum().backward()
    return model


@pytest.mark.parametrize("name", MODELS)
@given(data=st.data(), spoil=st.sets(st.sampled_from(["x", "task", "s"]), min_size=1))
def test_model_forward_refuses_malformed_input(name, data, spoil) -> None:
    model = model_for(name).train()
    _, shape, fixed, one_refused = MODELS[name]
    ranks = tuple(range(2, 7)) if name == "mlp" else (len(shape),)
    x, task, s = torch.randn(shape), 1, 2.0
    if "x" in spoil:
        bad_x = malformed_tensors(shape, fixed=fixed, ranks=ranks, bad_floats=(torch.float64, torch.float16,
                                                                               torch.bfloat16))
        if one_refused:  # a batch of one gives some batch-statistics norm one value per channel
            bad_x = st.one_of(bad_x, st.just(torch.randn(1, *shape[1:])))
        x = data.draw(bad_x, label="x")
    if "task" in spoil:
        task = data.draw(bad_tasks(T), label="task")
    if "s" in spoil:
        s = data.draw(bad_scales(), label="s")
    assert_refused(lambda: model(x, task, s), model)


@functools.cache
def heads() -> hatnorm.TaskHeads:
    with seeded(0):
        return hatnorm.TaskHeads(C, [2, 3, 4], num_tasks=T)


@given(data=st.data(), spoil=st.sets(st.sampled_from(["x", "task"]), min_size=1))
def test_task_heads_refuse_malformed_input(data, spoil) -> None:
    h = heads()
    x, task = torch.randn(2, C), 1
    if "x" in spoil:
        x = data.draw(malformed_tensors((2, C), fixed={1: C}, ranks=(2,), bad_floats=(torch.float64,)), label="x")
    if "task" in spoil:
        task = data.draw(bad_tasks(T), label="task")
    assert_refused(lambda: h(x, task), h)


# --- metrics -----------------------------------------------------------------------------------------------------

finite = st.floats(min_value=0, max_value=1)


@st.composite
def malformed_matrices(draw: st.DrawFn) -> object:
    """Not a non-empty square matrix finite on and below its diagonal."""
    kind = draw(st.sampled_from(["junk", "ragged", "shape", "non_finite"]))
    if kind == "junk":
        return draw(st.one_of(st.none(), st.text(max_size=3), st.builds(object), st.dictionaries(st.text(), finite)))
    if kind == "ragged":
        return [[draw(finite)] * 2, [draw(finite)]]
    if kind == "shape":
        shape = draw(st.sampled_from([(0, 0), (2,), (2, 3), (3, 2), (2, 2, 2), ()]))
        return np.full(shape, 0.5)
    n = draw(st.integers(min_value=1, max_value=4))
    a = np.full((n, n), 0.5)
    row = draw(st.integers(min_value=0, max_value=n - 1))
    a[row, draw(st.integers(min_value=0, max_value=row))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return draw(st.sampled_from([a, a.tolist(), torch.tensor(a)]))


@given(matrix=malformed_matrices(), which=st.sampled_from(["matrix", "joint"]))
def test_metrics_refuse_malformed_matrices(matrix, which) -> None:
    good, random = np.full((2, 2), 0.5), [0.25, 0.25]
    if which == "matrix":
        assert_refused(lambda: metrics.average_accuracy(matrix))
        assert_refused(lambda: metrics.backward_transfer(matrix))
        assert_refused(lambda: metrics.forgetting_ratio(matrix, random, good))
    else:
        assert_refused(lambda: metrics.mean_forgetting_ratio(good, random, matrix))


@given(random=st.one_of(
    junk.filter(lambda v: not isinstance(v, list) or len(v) != 2),
    st.lists(finite, max_size=4).filter(lambda r: len(r) != 2),
    st.tuples(finite, st.sampled_from([np.nan, np.inf, -np.inf])).map(list),
))
def test_forgetting_ratio_refuses_malformed_random_accuracies(random) -> None:
    good = np.full((2, 2), 0.5)
    assert_refused(lambda: metrics.forgetting_ratio(good, random, good))


@given(after=st.one_of(st.integers(min_value=2), st.integers(max_value=-1), junk.filter(lambda v: v is not None),
                       st.floats()))
def test_average_accuracy_refuses_a_malformed_task_index(after) -> None:
    assert_refused(lambda: metrics.average_accuracy(np.full((2, 2), 0.5), after=after))
