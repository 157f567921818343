"""The coverage script writes each model's row as the model finishes: a run stopped before its last model keeps the
rows it measured."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SLOW = f"{ROOT / 'tests' / 'coverage_models.py'}:slow"


def test_a_run_stopped_early_keeps_the_rows_it_measured(tmp_path: Path) -> None:
    out = tmp_path / "coverage.json"
    first = f"{ROOT / 'tests' / 'coverage_models.py'}:small_cnn"
    run = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "convert_coverage.py"), "--model", first,
                            SLOW, "--size", "16", "--out", str(out)],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not out.exists() and time.monotonic() < deadline and run.poll() is None:
            time.sleep(1)
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # the run and the processes it started, stopped before the slow model ends
        run.wait()
    results = json.loads(out.read_text())
    assert [(r["model"], r["stage"]) for r in results["rows"]] == [(first, "passed")]
    assert results["runs"][-1]["command"].startswith("python benchmarks/convert_coverage.py --model")
