"""The MaskedNorm protocol as the one extension point: a norm from another package, installed with its entry
point, is found by hatnorm and enters every test that enumerates norms by what they declare."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import distributed_worker
import pytest
import torch
import torchvision
from properties.models import isolating_norms
from test_architectures import TASK_AWARE
from test_convert import task_aware
from test_training import STATISTICS_NORMS

import hatnorm

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
    assert len(norms) == 20 and all(n.dims == (4,) for n in norms)
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
