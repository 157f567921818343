"""Markdown tables of finished ablation runs: every variant's mean ± 95% CI, and the paired contrasts.

    python -m ablations.report runs/norms                       # one run's folder (its results.json)
    python -m ablations.report runs/norms_alexnet runs/norms_resnet18
    python -m ablations.report --plot runs/norms                # and redraw its plots
    python -m ablations.report --merge runs/all runs/seeds012 runs/seeds345   # one table over every seed

``--merge`` joins runs of the same ablation and settings made on different seeds (in turn, or on several
machines) into one summary over all their seeds, written to the given folder like a run's own.

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

from ablations._common import METRICS, aggregate, cell, plot, seeds_text, write


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


def merge(runs: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """One summary over the seeds of several runs of the same ablation, variants and settings.

    Raises:
        ValueError: the runs differ in title (other than the seeds), preset, settings or variants, or share a seed.
    """
    first = runs[0]
    by_seed: dict[int, dict[str, Any]] = {}
    for name, results in zip(names, runs, strict=True):
        for key, default in (("preset", None), ("config", None), ("reference", False), ("weights", None)):
            mine, theirs = results.get(key, default), first.get(key, default)
            if mine != theirs:
                raise ValueError(f"{name}: {key} {mine!r} differs from {names[0]}'s {theirs!r}")
        # the sequence: its data and length (in the title); its tasks themselves may follow the seed
        # (permutations, rotation angles, CIFAR's task order)
        mine, theirs = results["title"].rsplit(", seed", 1)[0], first["title"].rsplit(", seed", 1)[0]
        if mine != theirs or len(results.get("tasks", [])) != len(first.get("tasks", [])):
            raise ValueError(f"{name}: the run {mine!r} ({len(results.get('tasks', []))} tasks) is not the same "
                             f"ablation and sequence as {names[0]}'s {theirs!r} ({len(first.get('tasks', []))} tasks)")
        if list(results["variants"]) != list(first["variants"]):
            raise ValueError(f"{name}: variants {list(results['variants'])} differ from {names[0]}'s")
        for seed in results["seeds"]:
            if seed in by_seed:
                raise ValueError(f"{name}: seed {seed} is in two of the runs; each seed must come from one")
            by_seed[seed] = {label: r["runs"][str(seed)] for label, r in results["variants"].items()}
    pairs = list(dict.fromkeys((c["a"], c["b"]) for c in first["contrasts"]))
    summary = aggregate(dict(sorted(by_seed.items())), pairs)
    title = first["title"].rsplit(", seed", 1)[0] + f", {seeds_text(list(summary['seeds']))})"
    wall = sum(r.get("wall_seconds", math.nan) for r in runs)
    return {k: v for k, v in first.items() if k not in ("variants", "contrasts", "seeds")} | {
        "title": title, "wall_seconds": wall, "merged_from": list(names)} | summary


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ablations.report", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="folders of finished runs (each with its results.json)")
    p.add_argument("--plot", action="store_true", help="also redraw each run's plots from its results.json")
    p.add_argument("--merge", type=Path, default=None, metavar="OUT",
                   help="join the runs (the same ablation and settings, other seeds) into one summary in OUT")
    args = p.parse_args(argv)
    loaded = []
    for folder in args.runs:
        path = folder / "results.json"
        if not path.is_file():
            p.error(f"{folder}: no results.json (is it the --out folder of a finished run?)")
        results = json.loads(path.read_text())
        if "contrasts" not in results:
            p.error(f"{path}: a results.json of one seed's run; give the run's --out folder")
        loaded.append((folder, results))
    if args.merge is not None:
        try:
            merged = merge([r for _, r in loaded], [str(f) for f, _ in loaded])
        except ValueError as error:
            p.error(str(error))
        args.merge.mkdir(parents=True, exist_ok=True)
        write({k: merged[k] for k in ("seeds", "variants", "contrasts")}, args.merge,
              {k: v for k, v in merged.items() if k not in ("seeds", "variants", "contrasts")})
        loaded = [(args.merge, json.loads((args.merge / "results.json").read_text()))]
        args.plot = True
    for folder, results in loaded:
        print(f"{describe(results)}\n\n{variants_table(results)}\n\n{contrasts_table(results)}\n")
        if args.plot:
            for drawn in plot(results, folder, results["title"]):
                print(f"wrote {drawn}")


if __name__ == "__main__":
    main()
