"""The registries and ``build`` refuse unknown, duplicate and bad names, builders and options, and change
nothing."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

import hatnorm
import hatnorm._arch_registry
from errors._support import Net, T

# --- registry names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("get", "kind"), [
    (hatnorm.get_norm, "norm"),
    (hatnorm.get_policy, "gradient policy"),
    (hatnorm.get_architecture, "architecture"),
])
def test_unknown_registry_name(get, kind) -> None:
    with pytest.raises(ValueError, match=rf"name: unknown {kind} 'no_such_thing'; registered: \["):
        get("no_such_thing")


@pytest.mark.parametrize(("register", "name", "kind"), [
    (lambda name: hatnorm.register_norm(name, family="batch")(hatnorm.norms.MaskedBatchNorm2d), "masked_bn", "norm"),
    (lambda name: hatnorm.register_policy(name)(hatnorm.policies.HATPolicy), "adahat", "gradient policy"),
])
def test_duplicate_registry_name_changes_nothing(register, name, kind) -> None:
    before = hatnorm.get_norm(name) if kind == "norm" else hatnorm.get_policy(name)
    message = rf"name: the {kind} name '{name}' is already registered; pick a name not in \["
    with pytest.raises(ValueError, match=message):
        register(name)
    after = hatnorm.get_norm(name) if kind == "norm" else hatnorm.get_policy(name)
    assert after is before


def test_duplicate_architecture_name_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = hatnorm._arch_registry.ARCHITECTURES
    registry.names()
    monkeypatch.setattr(registry, "_entries", dict(registry._entries))  # the test's registration is undone

    def first(**options: object) -> nn.Module:
        return Net()

    hatnorm.register_architecture("test_errors_arch", family="batch")(first)
    with pytest.raises(ValueError, match=r"name: the architecture name 'test_errors_arch' is already registered"):
        hatnorm.register_architecture("test_errors_arch", family="layer")(Net)
    spec = hatnorm.get_architecture("test_errors_arch")
    assert (spec.builder, spec.family) == (first, "batch")

# --- build and the registries -----------------------------------------------------------------------------


@pytest.mark.parametrize(("num_classes", "exc", "match"), [
    ([2, 2], ValueError, r"^num_classes must have one count per task \(3\), got 2: \[2, 2\]$"),
    ([2, 0, 2], ValueError, r"^num_classes\[1\] must be an int ≥ 1, got 0$"),
    ([2, 2, 2.5], ValueError, r"^num_classes\[2\] must be an int ≥ 1, got 2.5$"),
    ([2, True, 2], ValueError, r"^num_classes\[1\] must be an int ≥ 1, got True$"),
    (0, ValueError, r"^num_classes must be an int ≥ 1, got 0$"),
    ("10", TypeError, r"^num_classes must be an int or a sequence of 3 ints, got '10'$"),
    (None, TypeError, r"^num_classes must be an int or a sequence of 3 ints, got None$"),
])
def test_build_refuses_wrong_per_task_class_counts(num_classes, exc, match) -> None:
    with pytest.raises(exc, match=match):
        hatnorm.build("mlp", num_tasks=T, norm="masked_bn", num_classes=num_classes)


def test_build_takes_numpy_class_counts() -> None:
    model = hatnorm.build("mlp", num_tasks=T, num_classes=np.int64(4), in_features=8, hidden=(4,))
    assert model.task_heads.num_classes == [4, 4, 4]


@pytest.mark.parametrize(("name", "options", "exc", "match"), [
    ("mlp", {"hidden": ()}, ValueError, r"^hidden must be a non-empty sequence of layer widths, got \(\)$"),
    ("mlp", {"hidden": (8, 0)}, ValueError, r"^hidden\[1\] must be an int ≥ 1, got 0$"),
    ("mlp", {"in_features": -1}, ValueError, r"^in_features must be an int ≥ 1, got -1$"),
    ("mlp", {"dropout": 1.0}, ValueError, r"^dropout must be a number in \[0, 1\), got 1.0$"),
    ("alexnet", {"in_channels": 0}, ValueError, r"^in_channels must be an int ≥ 1, got 0$"),
    ("resnet18", {"in_channels": 2.0}, ValueError, r"^in_channels must be an int ≥ 1, got 2.0$"),
    ("vit", {"norm": "masked_ln", "mlp_dim": -4}, ValueError, r"^mlp_dim must be an int ≥ 1, got -4$"),
    ("vit", {"norm": "masked_ln", "dim_head": 2.5}, ValueError, r"^dim_head must be an int ≥ 1, got 2.5$"),
    ("vit", {"norm": "masked_ln", "in_channels": True}, ValueError, r"^in_channels must be an int ≥ 1, got True$"),
    ("mlp", {"widht": 2}, TypeError, r"widht"),
    ("no_such_arch", {}, ValueError, r"^name: unknown architecture 'no_such_arch'; registered: \["),
    ("vit", {"norm": "masked_bn"}, ValueError, r"^norm 'masked_bn' does not fit architecture 'vit'; allowed: \["),
    ("mlp", {"norm": 3}, TypeError, r"^norm must be a registered norm name or a NormSpec, got 3$"),
    ("mlp", {"num_tasks": 0}, ValueError, r"^num_tasks must be an int ≥ 1, got 0$"),
    ("mlp", {"num_tasks": 10**6}, ValueError, r"^num_tasks must be ≤ 10,000 .*, got 1,000,000$"),
    ("mlp", {"reference": 1}, TypeError, r"^reference must be a bool, got 1$"),
])
def test_build_refuses_bad_options(name, options, exc, match) -> None:
    kwargs = {"num_tasks": T, "num_classes": 2} | options
    with pytest.raises(exc, match=match):
        hatnorm.build(name, **kwargs)


@pytest.mark.parametrize(("register", "kind"), [
    (lambda: hatnorm.register_norm("test_errors_norm", family="batch")(3), "norm"),
    (lambda: hatnorm.register_architecture("test_errors_arch2", family="batch")("resnet"), "architecture"),
    (lambda: hatnorm.register_policy("test_errors_policy")(None), "gradient policy"),
])
def test_registering_something_that_cannot_build_changes_nothing(register, kind) -> None:
    names = (hatnorm.list_norms(), hatnorm.list_architectures(), hatnorm.list_policies())
    with pytest.raises(TypeError, match=rf"^the registered {kind} must be a class or function that builds it, got "):
        register()
    assert (hatnorm.list_norms(), hatnorm.list_architectures(), hatnorm.list_policies()) == names


@pytest.mark.parametrize(("call", "match"), [
    (lambda: hatnorm.register_norm("", family="batch")(hatnorm.norms.MaskedBatchNorm2d), r"^name must be a non-empty "
                                                                                    r"string, got ''$"),
    (lambda: hatnorm.register_norm("x", family="conv"), r"^family must be one of \['batch', 'layer', 'any'\], got "
                                                        r"'conv'$"),
    (lambda: hatnorm.list_norms("conv"), r"^family must be one of \['batch', 'layer', 'any'\] or None, got 'conv'$"),
    (lambda: hatnorm.get_norm(None), r"^name: unknown norm None; registered: \["),
    (lambda: hatnorm.get_norm(["masked_bn"]), r"^name: unknown norm \['masked_bn'\]; registered: \["),
])
def test_registry_refuses_bad_names(call, match) -> None:
    names = hatnorm.list_norms()
    with pytest.raises(ValueError, match=match):
        call()
    assert hatnorm.list_norms() == names

