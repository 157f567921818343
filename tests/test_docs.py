"""The documentation's code runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import hatnorm
from hatnorm import _arch_registry

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), re.S)


def test_add_your_architecture_tutorial(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_arch_registry.ARCHITECTURES, "_entries", dict(_arch_registry.ARCHITECTURES._entries))
    block, checked = python_blocks("add_your_architecture.md")
    assert len(block.strip().splitlines()) < 40
    namespace: dict = {}
    exec(block, namespace)
    exec(checked, namespace)
    norm = hatnorm.get_norm("masked_bn")
    strict = namespace["CheckedTinyCNN"]([2, 2], num_tasks=2, norm_layer_2d=norm.layer(num_tasks=2, dims=2),
                                          norm_layer_1d=norm.layer(num_tasks=2, dims=1))
    with pytest.raises(ValueError, match="x must have shape"):
        strict(torch.randn(4, 1, 32, 32), task=0)
    with pytest.raises(ValueError, match=r"task must be in \[0, 2\), got 5"):
        strict(torch.randn(4, 3, 32, 32), task=5)
    assert "tiny_cnn" in hatnorm.list_architectures()
    model, hat = namespace["model"], namespace["hat"]
    hat.begin_task(0)
    model.train()
    out = model(torch.randn(4, 3, 32, 32), task=0, s=hat.scale(0, 2))
    assert out.shape == (4, 2)
    for norm in hatnorm.list_norms("batch"):
        hatnorm.HAT(hatnorm.build("tiny_cnn", num_tasks=2, norm=norm, num_classes=[2, 3]))


def test_concepts_example_forgets_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    example = python_blocks("concepts.md")[-1]
    torch.manual_seed(0)
    exec(example, {})
    assert capsys.readouterr().out.strip() == "True"
