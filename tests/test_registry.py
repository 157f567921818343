"""The registries of norms, gradient policies and architectures, ``build``, and entry-point plugins."""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hatnorm
import hatnorm._arch_registry
import hatnorm._norm_registry
import hatnorm._policies
import hatnorm._registry
from hatnorm._registry import Registry

REGISTRIES = (hatnorm._norm_registry.NORMS, hatnorm._policies.POLICIES, hatnorm._arch_registry.ARCHITECTURES)


@pytest.fixture(autouse=True)
def restore_registries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let each test register freely: the global registries get their entries back afterwards."""
    for registry in REGISTRIES:
        registry.names()  # load installed plugins first, so the copy holds them
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))


# --- the registry shape -----------------------------------------------------------------------------------


def test_registry_register_get_names() -> None:
    widgets: Registry[int] = Registry("widget", "hatnorm_tests.no_such_group")
    assert widgets.register("b", 2) == 2
    widgets.register("a", 1)
    assert widgets.get("a") == 1
    assert widgets.names() == ["a", "b"]
    assert list(widgets) == ["a", "b"]
    assert "a" in widgets
    assert "c" not in widgets


def test_registry_refuses_a_duplicate_and_keeps_the_first() -> None:
    widgets: Registry[int] = Registry("widget", "hatnorm_tests.no_such_group")
    widgets.register("a", 1)
    with pytest.raises(ValueError, match=r"the widget name 'a' is already registered; pick a name not in \['a'\]"):
        widgets.register("a", 2)
    assert widgets.get("a") == 1


def test_registry_unknown_name_lists_the_registered_ones() -> None:
    widgets: Registry[int] = Registry("widget", "hatnorm_tests.no_such_group")
    widgets.register("a", 1)
    widgets.register("b", 2)
    with pytest.raises(ValueError, match=r"unknown widget 'zz'; registered: \['a', 'b'\]"):
        widgets.get("zz")


@pytest.mark.parametrize("name", ["", None, 3])
def test_registry_refuses_a_name_that_is_not_a_non_empty_string(name) -> None:
    widgets: Registry[int] = Registry("widget", "hatnorm_tests.no_such_group")
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        widgets.register(name, 1)
    assert widgets.names() == []


# --- norms ------------------------------------------------------------------------------------------------


def test_register_get_list_norm() -> None:
    @hatnorm.register_norm("test_scaled_none")
    class ScaledNone(hatnorm.MaskedNorm):
        """A norm whose class declares everything: channels first, the batch norms' ranks."""

        layout = "channels_first"
        ranks: ClassVar[dict[int | None, tuple[int, ...]]] = {2: (4,), 1: (2, 3)}
        isolates_tasks = True

        def normalize(self, x: torch.Tensor, gate: torch.Tensor, task: int) -> torch.Tensor:
            return 2 * x * gate.view(-1, *[1] * (x.dim() - 2))

    spec = hatnorm.get_norm("test_scaled_none")
    assert spec == hatnorm.NormSpec("test_scaled_none", ScaledNone)
    assert spec.family == "batch"
    assert "test_scaled_none" in hatnorm.list_norms()
    assert "test_scaled_none" in hatnorm.list_norms("batch")
    assert "test_scaled_none" not in hatnorm.list_norms("layer")
    norm = spec.layer(num_tasks=2)(3)
    assert isinstance(norm, ScaledNone) and (norm.input_ranks, norm.channel_dim) == ((4,), 1)


def test_the_registry_stores_classes_only() -> None:
    def builder(num_features: int, *, num_tasks: int, dims: int | None = 2) -> hatnorm.MaskedNorm:
        return hatnorm.norms.NoNorm(num_features, num_tasks=num_tasks)

    with pytest.raises(TypeError, match=r"^the registered norm must be a MaskedNorm subclass \(the registry stores "
                                        r"classes\), got <function"):
        hatnorm.register_norm("test_function_norm")(builder)
    assert "test_function_norm" not in hatnorm.list_norms()


def test_a_family_given_at_registration_must_be_the_class_s_own() -> None:
    with pytest.raises(ValueError, match=r"^family: MaskedLayerNorm declares layout 'channels_last', family 'layer'; "
                                         r"got 'batch'$"):
        hatnorm.register_norm("test_wrong_family", family="batch")(hatnorm.norms.MaskedLayerNorm)
    assert "test_wrong_family" not in hatnorm.list_norms()


def test_duplicate_norm_name() -> None:
    with pytest.raises(ValueError, match=r"the norm name 'masked_bn' is already registered"):
        hatnorm.register_norm("masked_bn", family="batch")(hatnorm.norms.MaskedBatchNorm2d)
    assert hatnorm.get_norm("masked_bn").layer(num_tasks=2, dims=2)(4).__class__ is hatnorm.norms.MaskedBatchNorm2d


def test_unknown_norm_name_lists_the_registered_ones() -> None:
    names = ", ".join(repr(n) for n in hatnorm.list_norms())
    with pytest.raises(ValueError, match=rf"unknown norm 'batchnorm'; registered: \[{names}\]"):
        hatnorm.get_norm("batchnorm")
    for required in ("masked_bn", "task_bn", "masked_ln", "shared_bn", "none"):
        assert repr(required) in names


def test_register_norm_with_an_unknown_family() -> None:
    with pytest.raises(ValueError, match=r"family must be one of \['batch', 'layer', 'any'\], got 'conv'"):
        hatnorm.register_norm("test_conv_norm", family="conv")
    assert "test_conv_norm" not in hatnorm.list_norms()


def test_list_norms_with_an_unknown_family() -> None:
    with pytest.raises(ValueError, match=r"family must be one of \['batch', 'layer', 'any'\] or None, got 'conv'"):
        hatnorm.list_norms("conv")


# --- gradient policies ------------------------------------------------------------------------------------


def test_register_get_list_policy() -> None:
    @hatnorm.register_policy("test_quarter")
    class Quarter(hatnorm.GradientPolicy):
        def __init__(self, factor: float = 0.25) -> None:
            self.factor = factor

        def rate(self, cumulative: Tensor, summative: Tensor, free: float) -> Tensor:
            return self.factor * (1 - cumulative)

    assert {"hat", "adahat", "test_quarter"} <= set(hatnorm.list_policies())
    policy = hatnorm.create_policy("test_quarter", factor=0.5)
    assert isinstance(policy, Quarter) and policy.factor == 0.5
    assert isinstance(hatnorm.create_policy("hat"), hatnorm.policies.HATPolicy)
    assert isinstance(hatnorm.create_policy("adahat"), hatnorm.policies.AdaHATPolicy)
    # get_policy returns the registered spec, as get_norm and get_architecture do; create_policy builds
    spec = hatnorm.get_policy("test_quarter")
    assert isinstance(spec, hatnorm.PolicySpec) and spec.name == "test_quarter" and spec.factory is Quarter
    assert hatnorm.get_policy("hat").factory is hatnorm.policies.HATPolicy

    # HAT takes the registered name and protects with it
    net = TinyNet(num_tasks=2, norm=hatnorm.get_norm("masked_bn"), num_classes=[2, 2])
    with torch.no_grad():
        net.gate.embedding[0] = torch.tensor([1.0, -1.0, 1.0, -1.0])
    hat = hatnorm.HAT(net, policy="test_quarter")
    hat.begin_task(0)
    hat.end_task()
    hat.begin_task(1)
    assert torch.equal(hat.gradient_multipliers()["fc.bias"], torch.tensor([0.0, 0.25, 0.0, 0.25]))


def test_duplicate_policy_name() -> None:
    with pytest.raises(ValueError, match=r"the gradient policy name 'hat' is already registered"):
        hatnorm.register_policy("hat")(hatnorm.policies.AdaHATPolicy)
    assert hatnorm.get_policy("hat").factory is hatnorm.policies.HATPolicy


def test_unknown_policy_name_lists_the_registered_ones() -> None:
    for get in (hatnorm.get_policy, hatnorm.create_policy):
        with pytest.raises(ValueError, match=r"unknown gradient policy 'ewc'; registered: \[.*'adahat', .*'hat'.*\]"):
            get("ewc")
    net = TinyNet(num_tasks=2, norm=hatnorm.get_norm("masked_bn"), num_classes=[2, 2])
    with pytest.raises(ValueError, match=r"unknown gradient policy 'ewc'; registered: \[.*'adahat', .*'hat'.*\]"):
        hatnorm.HAT(net, policy="ewc")


# --- architectures and build ------------------------------------------------------------------------------


class TinyNet(hatnorm.HATModule):
    """Linear → norm → gate → ReLU → one head per task."""

    def __init__(self, *, num_tasks: int, norm: hatnorm.NormSpec, num_classes: list[int], width: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(3, width)
        self.norm = norm.layer(num_tasks=num_tasks, dims=1)(width)
        self.gate = hatnorm.HATGate(width, num_tasks=num_tasks)
        self.task_heads = hatnorm.TaskHeads(width, num_classes, num_tasks=num_tasks)

    def forward(self, x: Tensor, task: int, s: float | None = None) -> Tensor:
        return self.task_heads(F.relu(self.norm(self.fc(x), self.gate(task, s), task)), task)

    def hat_layers(self) -> list[hatnorm.blocks.Layer]:
        return [hatnorm.blocks.Layer(self.fc, out=self.gate), hatnorm.blocks.Layer(self.norm, out=self.gate)]


@pytest.fixture
def tiny_arch() -> list[dict]:
    """Register ``test_tiny`` (family ``batch``); the list records every builder call."""
    calls: list[dict] = []

    @hatnorm.register_architecture("test_tiny", family="batch")
    def tiny(**kwargs: object) -> nn.Module:
        calls.append(kwargs)
        return TinyNet(**kwargs)

    return calls


def test_register_get_list_architecture(tiny_arch) -> None:
    assert "test_tiny" in hatnorm.list_architectures()
    spec = hatnorm.get_architecture("test_tiny")
    assert isinstance(spec, hatnorm.ArchitectureSpec)
    assert (spec.name, spec.family) == ("test_tiny", "batch")


def test_build_resolves_the_norm_once_and_passes_one_count_per_task(tiny_arch) -> None:
    model = hatnorm.build("test_tiny", num_tasks=3, norm="task_bn", num_classes=[2, 3, 4], width=5)
    (call,) = tiny_arch
    assert call["num_tasks"] == 3
    assert call["norm"] is hatnorm.get_norm("task_bn")
    assert call["num_classes"] == [2, 3, 4]
    assert call["width"] == 5
    assert isinstance(model.norm, hatnorm.norms.TaskBatchNorm1d)
    model.train()
    assert model(torch.randn(4, 3), task=2, s=1.0).shape == (4, 4)


def test_build_repeats_an_int_class_count_and_defaults_to_masked_bn(tiny_arch) -> None:
    model = hatnorm.build("test_tiny", num_tasks=2, num_classes=7)
    assert tiny_arch[0]["num_classes"] == [7, 7]
    assert isinstance(model.norm, hatnorm.norms.MaskedBatchNorm1d)
    hatnorm.HAT(model)  # a HATModule lists its own wiring


def test_build_takes_a_norm_spec(tiny_arch) -> None:
    model = hatnorm.build("test_tiny", num_tasks=2, norm=hatnorm.get_norm("shared_bn"), num_classes=2)
    assert isinstance(model.norm, hatnorm.norms.SharedBatchNorm1d)


def test_build_rejects_a_norm_that_does_not_fit_the_family(tiny_arch) -> None:
    allowed = ", ".join(repr(n) for n in hatnorm.list_norms("batch"))
    message = rf"norm 'masked_ln' does not fit architecture 'test_tiny'; allowed: \[{allowed}\]"
    with pytest.raises(ValueError, match=message):
        hatnorm.build("test_tiny", num_tasks=2, norm="masked_ln", num_classes=2)
    assert tiny_arch == []


@pytest.mark.parametrize(("num_classes", "message"), [
    ([2, 3, 4], r"num_classes must have one count per task \(2\), got 3: \[2, 3, 4\]"),
    ([2], r"num_classes must have one count per task \(2\), got 1: \[2\]"),
    ([2, 0], r"num_classes\[1\] must be an int ≥ 1, got 0"),
    (0, r"num_classes must be an int ≥ 1, got 0"),
    ("10", r"num_classes must be an int or a sequence of 2 ints, got '10'"),
])
def test_build_rejects_wrong_num_classes(tiny_arch, num_classes, message) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        hatnorm.build("test_tiny", num_tasks=2, norm="masked_bn", num_classes=num_classes)
    assert tiny_arch == []


def test_build_rejects_an_unknown_norm(tiny_arch) -> None:
    with pytest.raises(ValueError, match=r"unknown norm 'bn'; registered: \[.*'masked_bn'.*\]"):
        hatnorm.build("test_tiny", num_tasks=2, norm="bn", num_classes=2)
    with pytest.raises(TypeError, match=r"norm must be a registered norm name or a NormSpec, got"):
        hatnorm.build("test_tiny", num_tasks=2, norm=nn.BatchNorm1d, num_classes=2)


def test_build_rejects_bad_num_tasks(tiny_arch) -> None:
    with pytest.raises(ValueError, match=r"num_tasks must be an int ≥ 1, got 0"):
        hatnorm.build("test_tiny", num_tasks=0, num_classes=2)


def test_duplicate_architecture_name(tiny_arch) -> None:
    with pytest.raises(ValueError, match=r"the architecture name 'test_tiny' is already registered"):
        hatnorm.register_architecture("test_tiny", family="layer")(TinyNet)
    assert hatnorm.get_architecture("test_tiny").family == "batch"


def test_unknown_architecture_name_lists_the_registered_ones(tiny_arch) -> None:
    with pytest.raises(ValueError, match=r"unknown architecture 'vgg'; registered: \[.*'test_tiny'.*\]"):
        hatnorm.build("vgg", num_tasks=2, num_classes=2)
    with pytest.raises(ValueError, match=r"unknown architecture 'vgg'; registered: \[.*'test_tiny'.*\]"):
        hatnorm.get_architecture("vgg")


def test_register_architecture_with_an_unknown_family() -> None:
    with pytest.raises(ValueError, match=r"family must be one of \['batch', 'layer', 'any'\], got 'cnn'"):
        hatnorm.register_architecture("test_cnn", family="cnn")


# --- entry-point plugins ----------------------------------------------------------------------------------


PLUGIN_GROUP = "hatnorm_tests.policies"
PLUGIN_MODULE = "hatnorm_fake_plugin"  # tests/hatnorm_fake_plugin.py


def test_entry_point_plugin_registers_on_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    # a fresh policy registry on a group of its own, so the real one stays as it is
    policies: Registry = Registry("gradient policy", PLUGIN_GROUP)
    monkeypatch.setattr(hatnorm._policies, "POLICIES", policies)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.delitem(sys.modules, PLUGIN_MODULE, raising=False)
    asked: list[str] = []

    def entry_points(*, group: str) -> list[EntryPoint]:
        asked.append(group)
        return [EntryPoint(name="fake", value=PLUGIN_MODULE, group=group)] if group == PLUGIN_GROUP else []

    monkeypatch.setattr(hatnorm._registry, "entry_points", entry_points)

    assert asked == []
    assert PLUGIN_MODULE not in sys.modules
    assert hatnorm.list_policies() == ["fake_plugin_policy"]
    assert asked == [PLUGIN_GROUP]
    assert PLUGIN_MODULE in sys.modules

    policy = hatnorm.create_policy("fake_plugin_policy")
    assert "fake_plugin_policy" in policies
    assert asked == [PLUGIN_GROUP]  # plugins are loaded once
    cumulative = torch.tensor([1.0, 0.0, 0.5])
    assert torch.equal(policy.rate(cumulative, torch.zeros(3), 0.5), torch.tensor([0.0, 0.5, 0.25]))


def test_unknown_name_triggers_plugin_loading_before_failing(monkeypatch: pytest.MonkeyPatch) -> None:
    policies: Registry = Registry("gradient policy", PLUGIN_GROUP)
    monkeypatch.setattr(hatnorm._policies, "POLICIES", policies)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.delitem(sys.modules, PLUGIN_MODULE, raising=False)
    monkeypatch.setattr(hatnorm._registry, "entry_points",
                        lambda *, group: [EntryPoint(name="fake", value=PLUGIN_MODULE, group=group)])
    with pytest.raises(ValueError, match=r"unknown gradient policy 'nope'; registered: \['fake_plugin_policy'\]"):
        hatnorm.create_policy("nope")
