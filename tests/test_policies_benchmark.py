"""benchmarks/policy_cost.py runs and prints every policy's step as a ratio to a HAT step, with the machine."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_policy_cost_prints_a_ratio_per_policy_and_the_cpu() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "policy_cost.py"), "--arch", "vit_micro",
                           "--batch", "2", "--repeats", "1", "--warmup", "0"], capture_output=True, text=True,
                          check=True, cwd=ROOT)
    out = done.stdout
    assert "threads), torch" in out.splitlines()[0]
    ratios = dict(re.findall(r"^  (\S.*?)\s+(\d+\.\d+)× a HAT step", out, re.M))
    assert set(ratios) == {"hat", "adahat (task start)", "adahat (reference)", "fg_adahat IG", "fg_adahat ICU",
                           "fg_adahat OG"}
    assert float(ratios["hat"]) == 1.0 and all(float(r) > 0 for r in ratios.values())
