"""docs/integrations.md: every example runs as written and keeps task 0's outputs bit-identical."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"
#: the page's examples in order, by the framework each needs (None: torch alone)
EXAMPLES = [None, "lightning", "transformers", "avalanche"]


def python_blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), re.S)


def test_the_page_has_one_example_per_trainer() -> None:
    blocks = python_blocks("integrations.md")
    assert len(blocks) == len(EXAMPLES)
    for block, framework in zip(blocks, EXAMPLES, strict=True):
        assert framework is None or f"hatnorm.integrations.{framework}" in block


@pytest.mark.parametrize("index", range(len(EXAMPLES)), ids=[f or "attach" for f in EXAMPLES])
def test_example_keeps_task_zero(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # the Trainer's output folder
    torch.manual_seed(0)
    exec(python_blocks("integrations.md")[index], {})
    assert capsys.readouterr().out.strip().splitlines()[-1] == "True"
