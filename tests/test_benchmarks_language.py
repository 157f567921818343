"""The benchmark script's language section: a converted LLaMA-style model's HAT step and export against the plain
transformers model, run alone, writes a table of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent


def test_the_language_section_alone_writes_its_own_table(tmp_path: Path) -> None:
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\n<!-- bench:cpu-quick:start -->\nother run\n<!-- bench:cpu-quick:end -->\n")
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only", "language", "--repeats",
                    "2", "--warmup", "1", "--device", "cpu", "--out", str(tmp_path), "--doc", str(doc)],
                   capture_output=True, text=True, check=True, cwd=ROOT)
    rows = json.loads((tmp_path / "cpu-quick-language.json").read_text())["rows"]
    names = [row["benchmark"] for row in rows]
    for at in ("s = 1 ", "s = 100 ", "s = 400 ", "epoch mean"):
        assert sum(at in name and name.startswith("train step LlamaForCausalLM") for name in names) == 1, at
    assert sum(name.startswith("inference LlamaForCausalLM") for name in names) == 2
    assert {row["target"] for row in rows} == {1.15, 1.0}
    text = doc.read_text()
    assert "other run" in text  # the main table is left as it was
    assert text.count("<!-- bench:cpu-quick-language:start -->") == 1 and "export of every gate open" in text
