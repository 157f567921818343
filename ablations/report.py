"""Markdown tables of finished ablation runs: every variant's mean ± 95% CI, and the paired contrasts.

    python -m ablations.report runs/norms                       # one run's folder (its results.json)
    python -m ablations.report runs/norms_alexnet runs/norms_resnet18
    python -m ablations.report --plot runs/norms                # and redraw its plots

The tables are those docs/ablations.md shows, made from the files a run wrote, so a documented number
can be traced to its run.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ablations._common import METRICS, cell, plot


def variants_table(results: dict[str, Any]) -> str:
    """One row per variant: each metric as mean ± 95% CI half-width, epochs per task, the joint minimum."""
    lines = [f"| variant | {' | '.join(METRICS.values())} | epochs/task | min A_J |",
             "|---|" + "---:|" * (len(METRICS) + 2)]
    for label, r in results["variants"].items():
        joints = [r_["joint"][-1] for r_ in r["runs"].values()]
        lowest = min(a for row in joints for a in row if a == a)
        cells = [cell(r["summary"][m], m) for m in METRICS]
        lines.append(f"| {label} | {' | '.join(cells)} | {r['epochs_mean']:.1f} | {lowest:.3f} |")
    return "\n".join(lines)


def contrasts_table(results: dict[str, Any]) -> str:
    """The paired contrasts: mean difference, its 95% CI and whether it is a finding (CI excludes 0)."""
    lines = ["| a − b | metric | mean Δ | 95% CI | finding |", "|---|---|---:|---:|---|"]
    for c in results["contrasts"]:
        d = c["difference"]
        interval = "n/a" if d["n"] == 1 else f"[{d['low']:+.4f}, {d['high']:+.4f}]"
        finding = "one seed" if d["n"] == 1 else ("**yes**" if c["established"] else "no (CI holds 0)")
        lines.append(f"| {c['a']} − {c['b']} | {METRICS[c['metric']]} | {d['mean']:+.4f} | {interval} | {finding} |")
    return "\n".join(lines)


def describe(results: dict[str, Any]) -> str:
    """The run's settings and wall time in one line."""
    config = results["config"]
    minutes = results.get("wall_seconds", math.nan) / 60
    schedule = (f"{config['optimizer']}, lr {config['lr']:g}, {config['schedule']}"
                + (f" (patience {config['patience']}, lr floor {config['lr_min']:g})"
                   if config["schedule"] == "plateau" else f" (warmup {config['warmup_epochs']})"))
    return (f"{results['title']}; preset {results['preset']}, ≤ {config['epochs']} epochs per task, {schedule}, "
            f"seeds {', '.join(map(str, results['seeds']))}; wall time {minutes:.0f} min")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ablations.report", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="folders of finished runs (each with its results.json)")
    p.add_argument("--plot", action="store_true", help="also redraw each run's plots from its results.json")
    args = p.parse_args(argv)
    for folder in args.runs:
        path = folder / "results.json"
        if not path.is_file():
            p.error(f"{folder}: no results.json (is it the --out folder of a finished run?)")
        results = json.loads(path.read_text())
        if "contrasts" not in results:
            p.error(f"{path}: a results.json of one seed's run; give the run's --out folder")
        print(f"{describe(results)}\n\n{variants_table(results)}\n\n{contrasts_table(results)}\n")
        if args.plot:
            for drawn in plot(results, folder, results["title"]):
                print(f"wrote {drawn}")


if __name__ == "__main__":
    main()
