"""The coverage script's time limit: a model still converting when the limit passes gets a timeout row, never the
error its interrupted conversion would raise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SLOW_MODEL = '''
import time

from torch import nn


class Slow(nn.Module):
    """A layer whose forward takes a minute: convert is still tracing it when the limit passes."""

    def forward(self, x):
        time.sleep(60)
        return x


def slow(num_classes):
    return nn.Sequential(nn.Conv2d(3, 8, 3), Slow(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
'''


def test_a_model_still_converting_at_the_limit_is_a_timeout_row(tmp_path: Path) -> None:
    (tmp_path / "slow_model.py").write_text(SLOW_MODEL)
    out = tmp_path / "coverage.json"
    spec = f"{tmp_path / 'slow_model.py'}:slow"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "convert_coverage.py"), "--model", spec,
                           "--size", "16", "--timeout", "20", "--out", str(out)],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    [row] = json.loads(out.read_text())["rows"]
    assert (row["stage"], row["detail"]) == ("timeout", "more than 20 s"), done.stdout
