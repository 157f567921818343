"""The coverage script's time limit: a model still converting when the limit passes gets a timeout row, never the
error its interrupted conversion would raise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SLOW = f"{ROOT / 'tests' / 'coverage_models.py'}:slow"


def test_a_model_still_converting_at_the_limit_is_a_timeout_row(tmp_path: Path) -> None:
    out = tmp_path / "coverage.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "convert_coverage.py"), "--model", SLOW,
                           "--size", "16", "--timeout", "20", "--out", str(out)],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    [row] = json.loads(out.read_text())["rows"]
    assert (row["stage"], row["detail"]) == ("timeout", "more than 20 s"), done.stdout
