"""The MaskedNorm protocol as the one extension point: a norm from another package, installed with its entry
point, is found by hatnorm and enters every test that enumerates norms by what they declare."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import ClassVar

import distributed_worker
import pytest
import torch
import torchvision
from properties.models import isolating_norms
from test_architectures import TASK_AWARE
from test_convert import task_aware
from test_training import STATISTICS_NORMS

import hatnorm
import hatnorm._norm_registry

PLUGIN = "example_task_affine_bn"  # tests/plugin: the hatnorm-example-norm package


def test_the_plugin_norm_registers_through_its_entry_point() -> None:
    points = {p.name: p.value for p in entry_points(group="hatnorm.norms")}
    assert points.get("example") == "hatnorm_example_norm", "install the dev extra (uv sync --all-extras)"
    spec = hatnorm.get_norm(PLUGIN)
    assert spec.norm_class.__module__ == "hatnorm_example_norm"
    assert (spec.family, spec.isolates_tasks, spec.batch_statistics) == ("batch", True, True)
    assert spec.replaces == (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)


def test_hatnorm_does_not_know_the_plugin() -> None:
    package = Path(hatnorm.__file__).parent
    for source in [*package.rglob("*.py"), *(package.parent / "architectures").rglob("*.py")]:
        text = source.read_text()
        assert PLUGIN not in text and "hatnorm_example_norm" not in text, source


def test_the_tests_enumerating_norms_by_their_declarations_include_the_plugin() -> None:
    # invariants (protection, no forgetting), every architecture and export, conversion, recalibration,
    # and the two-process run: each list is built from what the norms declare, not from names
    assert PLUGIN in isolating_norms(conv=False) and PLUGIN in isolating_norms(conv=True)
    assert PLUGIN in TASK_AWARE
    assert PLUGIN in task_aware(torch.nn.BatchNorm2d)
    assert PLUGIN in STATISTICS_NORMS
    assert PLUGIN in distributed_worker.NORMS


def test_convert_swaps_the_modules_the_plugin_replaces() -> None:
    torch.manual_seed(0)
    original = torchvision.models.resnet18(num_classes=5).eval()
    with torch.no_grad():
        for m in original.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    converted = hatnorm.convert(original, num_tasks=2, norm=PLUGIN)
    norms = [m for m in converted.modules() if isinstance(m, hatnorm.get_norm(PLUGIN).norm_class)]
    assert len(norms) == 20 and all(n.input_ranks == (4,) for n in norms)
    first = converted.get_submodule("body.layer1.0.bn1.norm")
    for t in range(2):  # the pretrained statistics in every task slot, options read from the module
        assert torch.equal(first.running_mean[t], original.layer1[0].bn1.running_mean)
    assert first.eps == original.layer1[0].bn1.eps
    hatnorm.open_gates(converted)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x, task=1), original(x), atol=1e-5, rtol=0)
    with pytest.raises(hatnorm.ConversionError, match=rf"norm '{PLUGIN}' cannot replace module '1' \(LayerNorm\)"):
        hatnorm.convert(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2)),
                        num_tasks=2, norm=PLUGIN)


# --- a plug-in norm's declarations are checked when the first model is built with it ----------------------


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The norms registered by a test are gone afterwards."""
    hatnorm.list_norms()  # load the installed plugins first, so the copy holds them
    monkeypatch.setattr(hatnorm._norm_registry.NORMS, "_entries", dict(hatnorm._norm_registry.NORMS._entries))


class GateBlindLayerNorm(hatnorm.MaskedNorm):
    """Declares that it forgets nothing, but normalises without its gate: γ, β are shared, so the units task 0
    left closed keep training, and task 0's outputs there move."""

    layout = "channels_last"
    ranks: ClassVar[dict[int | None, tuple[int, ...]]] = {None: (2, 3), 1: (2, 3)}
    isolates_tasks = True

    def __init__(self, num_features: int, *, num_tasks: int, dims: int | None = None) -> None:
        super().__init__(num_features, num_tasks=num_tasks, dims=dims)
        self.weight = torch.nn.Parameter(torch.ones(num_features))
        self.bias = torch.nn.Parameter(torch.zeros(num_features))

    def normalize(self, x: torch.Tensor, gate: torch.Tensor, task: int) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, (self.num_features,), self.weight, self.bias)


class SharedStatisticsBatchNorm(hatnorm.MaskedNorm):
    """Declares that it forgets nothing and gates its output, but its running statistics are shared: a later
    task's batches move the statistics an earlier task is evaluated with."""

    layout = "channels_first"
    ranks: ClassVar[dict[int | None, tuple[int, ...]]] = {2: (4,), 1: (2, 3)}
    batch_statistics = True
    isolates_tasks = True

    def __init__(self, num_features: int, *, num_tasks: int, dims: int | None = 2) -> None:
        super().__init__(num_features, num_tasks=num_tasks, dims=dims)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def normalize(self, x: torch.Tensor, gate: torch.Tensor, task: int) -> torch.Tensor:
        return hatnorm.functional.selective_batch_norm(x, None, gate, None, self.running_mean, self.running_var,
                                            training=self.training, momentum=0.1, eps=1e-5)


class DroppingLayerNorm(hatnorm.MaskedNorm):
    """Returns one feature fewer than it was given (a slicing bug)."""

    layout = "channels_last"
    ranks: ClassVar[dict[int | None, tuple[int, ...]]] = {None: (2, 3), 1: (2, 3)}

    def normalize(self, x: torch.Tensor, gate: torch.Tensor, task: int) -> torch.Tensor:
        return (x * gate)[..., :-1]


def test_a_norm_that_ignores_its_gate_is_refused_when_the_first_model_is_built(registry) -> None:
    hatnorm.register_norm("test_gate_blind_ln")(GateBlindLayerNorm)  # registering reads declarations only
    with pytest.raises(TypeError, match=r"^norm 'test_gate_blind_ln' \(GateBlindLayerNorm\) declares "
                                        r"isolates_tasks=True, but its output is not 0 where the gate is 0"):
        hatnorm.build("vit_micro", num_tasks=2, norm="test_gate_blind_ln", num_classes=2)


def test_a_norm_whose_statistics_follow_later_tasks_is_refused_when_the_first_model_is_built(registry) -> None:
    hatnorm.register_norm("test_shared_statistics_bn")(SharedStatisticsBatchNorm)
    with pytest.raises(TypeError, match=r"^norm 'test_shared_statistics_bn' \(SharedStatisticsBatchNorm\) declares "
                                        r"isolates_tasks=True, but one step of task 1 under HAT's protection changed "
                                        r"task 0's output by up to [0-9.e-]+:"):
        hatnorm.build("resnet18", num_tasks=2, norm="test_shared_statistics_bn", num_classes=2, base_width=4)


def test_the_same_norms_declared_as_baselines_build_and_train(registry) -> None:
    class GateBlindBaseline(GateBlindLayerNorm):
        isolates_tasks = False

    hatnorm.register_norm("test_gate_blind_baseline")(GateBlindBaseline)
    model = hatnorm.build("vit_micro", num_tasks=2, norm="test_gate_blind_baseline", num_classes=2, image_size=16)
    assert model(torch.randn(2, 3, 16, 16), task=0, s=1.0).shape == (2, 2)


def test_a_norm_returning_the_wrong_shape_is_reported_at_its_first_build(registry) -> None:
    hatnorm.register_norm("test_dropping_ln")(DroppingLayerNorm)
    with pytest.raises(TypeError, match=r"^DroppingLayerNorm.normalize must return a tensor of x's shape \[4, 16\] "
                                        r"\(gate ⊙ norm\(x\)\), got shape \[4, 15\]$"):
        hatnorm.get_norm("test_dropping_ln").layer(num_tasks=2, dims=None)(8)


def test_a_norm_returning_the_wrong_shape_is_reported_at_its_first_call() -> None:
    norm = DroppingLayerNorm(8, num_tasks=2)  # built directly, not through the registry
    for trusted in (False, True):
        with pytest.raises(TypeError, match=r"^DroppingLayerNorm.normalize must return a tensor of x's shape "
                                            r"\[2, 5, 8\] \(gate ⊙ norm\(x\)\), got shape \[2, 5, 7\]$"):
            norm(torch.randn(2, 5, 8), torch.ones(8), 0, trusted=trusted)


def test_the_probe_leaves_torch_s_random_numbers_alone(registry) -> None:
    class Fresh(GateBlindLayerNorm):  # a class the probe has not seen
        isolates_tasks = False

    hatnorm.register_norm("test_fresh_ln")(Fresh)
    torch.manual_seed(0)
    hatnorm.get_norm("test_fresh_ln").layer(num_tasks=2, dims=None)(8)  # the first build runs the probe
    after_probe = torch.rand(3)
    torch.manual_seed(0)
    hatnorm.get_norm("test_fresh_ln").layer(num_tasks=2, dims=None)(8)
    assert torch.equal(torch.rand(3), after_probe)


def test_a_norm_written_against_the_old_protocol_is_told_what_to_implement() -> None:
    with pytest.raises(TypeError, match=r"^OldStyle overrides forward: a MaskedNorm implements normalize\(x, gate, "
                                        r"task\), which the protocol's forward calls after its checks$"):
        class OldStyle(hatnorm.MaskedNorm):
            def forward(self, x: torch.Tensor, mask: torch.Tensor, task: int) -> torch.Tensor:
                return x * mask
