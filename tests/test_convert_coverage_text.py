"""The coverage script's language models (source ``transformers-text``): one model per text converter (BERT, GPT-2,
LLaMA) passes all three checks through the script itself, its rows merge into results and a docs table that hold
other sources' rows without touching them, and the no-forgetting check catches a model that forgets (BERT with a
shared LayerNorm)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "convert_coverage.py"
#: one class per text converter: an encoder classifier, a causal LM with a tied head, a LLaMA-family classifier
MODELS = ["BertForSequenceClassification", "GPT2LMHeadModel", "LlamaForSequenceClassification"]
OTHER = "| torchvision | `resnet18` | ✓ | max \\|Δ\\| / max \\|y\\| = 0.0e+00 |"


@pytest.fixture(scope="module")
def coverage() -> ModuleType:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import convert_coverage
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return convert_coverage


def test_one_model_per_text_converter_passes_and_merges_into_the_results_and_the_table(tmp_path: Path) -> None:
    out = tmp_path / "coverage.json"
    kept = {"source": "torchvision", "model": "resnet18", "stage": "passed", "detail": "kept", "seconds": 1.0}
    stale = {"source": "transformers-text", "model": MODELS[0], "stage": "convert", "detail": "stale", "seconds": 1.0}
    out.write_text(json.dumps({"machine": "an earlier machine", "rows": [kept, stale]}))
    doc = tmp_path / "doc.md"
    block = ["Measured by `python benchmarks/convert_coverage.py`:", "",
             "- **torchvision**: 1 of 1 pass all three checks (an earlier run)", "", "A note on the earlier run.", "",
             "| source | model | result | detail |", "|---|---|---|---|", OTHER,
             f"| transformers-text | `{MODELS[0]}` | fails at convert | stale |"]
    doc.write_text("before\n<!-- coverage:begin -->\n" + "\n".join(block) + "\n<!-- coverage:end -->\nafter\n")
    subprocess.run([sys.executable, str(SCRIPT), "--sources", "transformers-text", "--only", *MODELS, "--out",
                    str(out), "--markdown", "--doc", str(doc)], capture_output=True, text=True, check=True, cwd=ROOT)
    results = json.loads(out.read_text())
    rows = {(r["source"], r["model"]): r for r in results["rows"]}
    assert rows.pop(("torchvision", "resnet18")) == kept
    assert sorted(rows) == sorted(("transformers-text", m) for m in MODELS)
    assert all(r["stage"] == "passed" for r in rows.values()), rows
    assert [run["sources"] for run in results["runs"]] == [["torchvision", "transformers-text"],
                                                           ["transformers-text"]]
    assert results["runs"][0]["machine"] == "an earlier machine"
    assert results["runs"][1]["command"].startswith("python benchmarks/convert_coverage.py --sources transformers-text")
    text = doc.read_text()
    assert text.startswith("before\n<!-- coverage:begin -->\n") and text.endswith("<!-- coverage:end -->\nafter\n")
    lines = text.splitlines()
    # the other source's summary, note and row stay; the stale row is replaced in place, the new ones follow it
    assert block[2] in lines and block[4] in lines and OTHER in lines
    assert "stale" not in text
    at = lines.index(OTHER)
    assert [line.split(" | ")[1] for line in lines[at + 1:at + 4]] == [f"`{m}`" for m in MODELS]
    assert all(" | ✓ | max \\|Δ\\| / max \\|y\\| = " in line for line in lines[at + 1:at + 4])
    summary = next(line for line in lines if line.startswith("- **transformers-text**"))
    assert summary.startswith("- **transformers-text**: 3 of 3 pass all three checks; measured by "
                              "`python benchmarks/convert_coverage.py --sources transformers-text")
    assert lines.index(summary) == lines.index(block[2]) + 1


def test_the_no_forgetting_check_fails_a_post_norm_model_with_a_shared_layer_norm(
        coverage: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """BERT's LayerNorms read the ungated residual sum: shared, they take their statistics over the units task 1
    writes too, so task 0's outputs move, which the script's check reports; masked, they pass."""
    name = "BertForSequenceClassification"
    make, feed = (lambda: coverage.text_builder(name)), coverage.text_feed(name)
    assert coverage.check(make, feed, steps=2)[0] == "passed"
    monkeypatch.setattr(coverage, "NORM", {"layer": "shared_ln"})
    stage, detail = coverage.check(make, feed, steps=2)
    assert stage == "no forgetting" and detail.startswith("task 0's outputs moved by")
