"""The benchmark script runs: a small section end to end, and the machine line it prints."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def test_norm_layer_section_runs_at_every_scale_and_names_the_machine() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only", "norms",
                           "--repeats", "2", "--warmup", "1", "--no-memory"], capture_output=True, text=True,
                          check=True, cwd=ROOT)
    out = " ".join(done.stdout.split())
    for s in ("1", "100", "400"):
        assert f"gate at s = {s}" in out
    assert "float32 subnormals" in out and "gate floor 1e-08" in out
    assert "wrote" not in out  # --only prints the table and writes no file


def test_kernel_probe_measures_loading_the_fused_kernels_in_a_fresh_process() -> None:
    # the peak-memory probes load the kernels before their baseline; this row reports what that load costs,
    # which is more than nothing only if importing hatnorm does not load them already
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--kernel-probe"],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    assert float(done.stdout.split()[-1]) > 0


def test_flush_detection_follows_torch_setting() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import harness
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    before = harness.flushes_subnormals()
    try:
        if torch.set_flush_denormal(True):  # False where the CPU cannot flush
            assert harness.flushes_subnormals()
        torch.set_flush_denormal(False)
        assert not harness.flushes_subnormals()
    finally:
        torch.set_flush_denormal(before)


def test_convert_coverage_reports_each_model_with_its_stage(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("before\n<!-- coverage:begin -->\nold\n<!-- coverage:end -->\nafter\n")
    out = tmp_path / "coverage.json"
    own = [f"{ROOT / 'tests' / 'coverage_models.py'}:{name}" for name in ("small_cnn", "running_sum")]
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "convert_coverage.py"), "--sources",
                           "torchvision", "--only", "resnet18", "--model", *own, "--size", "16", "--out", str(out),
                           "--markdown", "--doc", str(doc)], capture_output=True, text=True, check=True, cwd=ROOT)
    rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["resnet18"]["stage"] == "passed" and rows[own[0]]["stage"] == "passed"
    # what fails fails at conversion, with a ConversionError naming the module and the source line
    assert rows[own[1]]["stage"] == "convert"
    assert re.match(r"ConversionError: module '2' \(RunningSum\), coverage_models\.py:\d+ `return x\.cumsum\(1\)`: "
                    r"operation cumsum", rows[own[1]]["detail"])
    text = doc.read_text()
    assert text.startswith("before\n<!-- coverage:begin -->\n") and text.endswith("<!-- coverage:end -->\nafter\n")
    assert "**torchvision**: 1 of 1 pass all three checks" in text and "| torchvision | `resnet18` | ✓ |" in text
    assert "**own**: 1 of 2 pass all three checks" in text
    assert "convert coverage" in done.stdout


def test_convert_coverage_refuses_a_model_it_cannot_import() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "convert_coverage.py"), "--model",
                           "no_such_module_here:build"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "--model no_such_module_here:build: No module named" in done.stderr


def test_each_kind_of_row_is_rendered_once_for_the_terminal_the_docs_and_the_json() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import rows
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    ratio = rows.Ratio("step", hat_ms=3.0, base_ms=2.0, target=1.1, hat_mib=30.0, base_mib=20.0)
    table = [ratio, rows.FixedMemory("kernels", 58.4), rows.Recompiles("recompiles", recompiles=0, graphs=3)]
    lines = rows.markdown(table, "a machine").splitlines()
    assert lines[0] == "Measured on a machine."
    assert lines[2] == ("| benchmark | HAT / export (ms) | baseline (ms) | ratio | target | peak memory ratio | "
                        "recompiles |")
    assert lines[4:] == ["| " + " | ".join(r.cells()) + " |" for r in table]
    assert lines[4] == "| step | 3.00 | 2.00 | 1.500 | ≤ 1.10 | 1.50 (30 / 20 MiB) |  |"
    # the recompile count's column only where a row has one
    assert "recompiles" not in rows.markdown(table[:2], "m")
    assert [c.header for c in rows.terminal_table(table[:2], "t").columns][-1] == "peak memory ratio"
    assert ratio.to_json() == {"benchmark": "step", "hat_ms": 3.0, "base_ms": 2.0, "ratio": 1.5, "target": 1.1,
                               "hat_mib": 30.0, "base_mib": 20.0, "memory_ratio": 1.5, "recompiles": None}
