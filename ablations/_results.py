"""The ablations' results: one seed's files, the summary over seeds with the paired contrasts, and the run's
files (``results.json``, ``results.csv``, ``contrasts.csv``)."""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ablations._cli import option_differences, seeds_text
from ablations._protocol import ALPHA, Contrast, expand, holm, paired_t_pvalue, sign_flip_pvalue
from hatnorm.stats import Summary, paired_difference, summarize

#: the metrics every table, file and contrast reports
METRICS = {"average_accuracy": "avg acc", "bwt": "BWT", "rho_final": "ρ^{≤T}"}
#: metrics read from a run's accuracy matrix, reported by a table that declares a contrast on one of them:
#: the mean over t of A[t][t], each task's accuracy right after it is learned (plasticity)
DERIVED = {"newest_accuracy": "newest acc"}
#: every metric's name in tables
LABELS = METRICS | DERIVED


def table_metrics(contrasts: Sequence[Contrast | tuple[str, str]]) -> list[str]:
    """The metrics of a table: ``METRICS``, then each of ``DERIVED`` that one of ``contrasts`` declares."""
    named = {c.metric for c in contrasts if isinstance(c, Contrast)}
    return [*METRICS, *(m for m in DERIVED if m in named)]


def metric(run: dict[str, Any], name: str) -> float:
    """One run's value of a metric of ``METRICS`` (stored) or ``DERIVED`` (from its accuracy matrix)."""
    if name == "newest_accuracy":
        return float(np.mean(np.diag(np.asarray(run["accuracy"], dtype=float))))
    return run[name]


def write_seed(results: dict[str, Any], out: Path, info: dict[str, Any]) -> None:
    """One seed's ``results.json`` and ``results.csv`` (one row per variant)."""
    (out / "results.json").write_text(json.dumps(info | {"variants": results}, indent=2))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "arch", "norm", "method", "average_accuracy", "bwt", "rho_final", "seconds"])
        for label, r in results.items():
            writer.writerow([label, r["arch"], r["norm"], r["method"], f"{r['average_accuracy']:.6f}",
                             f"{r['bwt']:.6f}", f"{r['rho_final']:.6f}", f"{r['seconds']:.1f}"])


def _summary(values: Sequence[float]) -> Summary:
    """The summary of one metric over seeds; NaN throughout where a seed's value is undefined (ρ at chance)."""
    if any(math.isnan(v) for v in values):
        return Summary(math.nan, math.nan, math.nan, math.nan, len(values), 0.95)
    return summarize(values)


def aggregate(by_seed: dict[int, dict[str, Any]], contrasts: Sequence[Contrast | tuple[str, str]]
              ) -> dict[str, Any]:
    """Every variant's metrics over seeds (mean, std, 95% CI) and the paired contrasts between variants.

    Every variant of a table runs on the same seeds, so each contrast pairs a variant with its control seed by
    seed. ``contrasts`` are the ablation's declaration (:func:`ablations._protocol.expand` gives every metric
    of a pair): each gets its mean difference with a 95% interval, the paired-t p-value and the sign-flip
    p-value; the primary ones also the Holm-adjusted p-value over the table's primary contrasts, and are a
    finding when that is below ``ALPHA``.
    """
    seeds = list(by_seed)
    labels = list(by_seed[seeds[0]])
    metrics = table_metrics(contrasts)
    variants: dict[str, Any] = {}
    for label in labels:
        runs = [by_seed[seed][label] for seed in seeds]
        first = runs[0]
        rho = np.array([r["rho"] for r in runs], dtype=float)  # [seeds, T]
        curve = [_summary(rho[:, t].tolist()) for t in range(rho.shape[1])]
        variants[label] = {
            "arch": first["arch"], "norm": first["norm"], "method": first["method"], "seeds": seeds,
            "parameters": first.get("parameters"),
            "summary": {m: _summary([metric(r, m) for r in runs]).to_dict() for m in metrics},
            "rho_curve": {k: [getattr(c, k) for c in curve] for k in ("mean", "low", "high")},
            "accuracy_mean": np.mean([r["accuracy"] for r in runs], axis=0).tolist(),
            "epochs_mean": float(np.mean([np.mean(r["epochs"]) for r in runs])),
            "seconds": float(np.sum([r["seconds"] for r in runs])),
            "runs": {str(seed): r for seed, r in zip(seeds, runs, strict=True)},
        }
    declared = expand(contrasts, metrics)
    paired = []
    for c in declared:
        if c.a not in variants or c.b not in variants:
            continue
        values = [[metric(by_seed[seed][label], c.metric) for seed in seeds] for label in (c.a, c.b)]
        if any(math.isnan(v) for side in values for v in side):
            continue
        differences = [x - y for x, y in zip(*values, strict=True)]
        paired.append({"a": c.a, "b": c.b, "metric": c.metric, "primary": c.primary,
                       "difference": paired_difference(*values).to_dict(), "p_t": paired_t_pvalue(differences),
                       "p_sign_flip": sign_flip_pvalue(differences), "p_holm": None, "finding": False})
    primaries = [entry for entry in paired if entry["primary"]]
    for entry, adjusted in zip(primaries, holm([e["p_t"] for e in primaries]), strict=True):
        entry["p_holm"] = adjusted
        entry["finding"] = bool(adjusted < ALPHA)
    return {"seeds": seeds, "variants": variants, "declared": [asdict(c) for c in declared], "contrasts": paired}


def write(summary: dict[str, Any], out: Path, info: dict[str, Any]) -> None:
    """The run's ``results.json`` (everything, every seed), ``results.csv`` (one row per variant, mean, std and
    95% CI of every metric) and ``contrasts.csv`` (the paired contrasts)."""
    (out / "results.json").write_text(json.dumps(info | summary, indent=2))
    metrics = [m for m in LABELS if m in next(iter(summary["variants"].values()))["summary"]]
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "arch", "norm", "method", "seeds",
                         *(f"{m}_{k}" for m in metrics for k in ("mean", "std", "ci_low", "ci_high")),
                         "epochs_per_task", "seconds"])
        for label, r in summary["variants"].items():
            cells = [f"{r['summary'][m][k]:.6f}" for m in metrics for k in ("mean", "std", "low", "high")]
            writer.writerow([label, r["arch"], r["norm"], r["method"], len(r["seeds"]), *cells,
                             f"{r['epochs_mean']:.2f}", f"{r['seconds']:.1f}"])
    with (out / "contrasts.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["a", "b", "metric", "role", "difference_mean", "ci_low", "ci_high", "seeds", "p_t", "p_holm",
                         "p_sign_flip", "finding"])
        for c in summary["contrasts"]:
            d = c["difference"]
            writer.writerow([c["a"], c["b"], c["metric"], "primary" if c["primary"] else "exploratory",
                             f"{d['mean']:.6f}", f"{d['low']:.6f}", f"{d['high']:.6f}", d["n"], f"{c['p_t']:.6g}",
                             "" if c["p_holm"] is None else f"{c['p_holm']:.6g}", f"{c['p_sign_flip']:.6g}",
                             c["finding"]])


def _without_seeds(title: str) -> tuple[str, str]:
    """A run's title without its seeds (the part from the last ``, seed`` or ``; seed`` on) and the separator."""
    found = re.match(r"(.*)([,;]) seeds? ", title, re.DOTALL)
    return (title, ",") if found is None else (found[1], found[2])


def merge(runs: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """One summary over the seeds of several runs of the same ablation, variants and settings.

    Runs agree when every option that changes a number does (``"options"``, see
    :func:`ablations._cli.recorded_options`: widths, ``--c``, ``--alpha``, the ViT's sizes, the weights'
    digests, ...), besides the preset, the training settings and the variants.

    Raises:
        ValueError: the runs differ in title (other than the seeds), preset, settings, an option or variants,
            or share a seed.
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
        mine, theirs = _without_seeds(results["title"])[0], _without_seeds(first["title"])[0]
        if mine != theirs or len(results.get("tasks", [])) != len(first.get("tasks", [])):
            raise ValueError(f"{name}: the run {mine!r} ({len(results.get('tasks', []))} tasks) is not the same "
                             f"ablation and sequence as {names[0]}'s {theirs!r} ({len(first.get('tasks', []))} tasks)")
        if list(results["variants"]) != list(first["variants"]):
            raise ValueError(f"{name}: variants {list(results['variants'])} differ from {names[0]}'s")
        differences = option_differences(results.get("options") or {}, first.get("options") or {}, names[0])
        if differences:
            shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
            raise ValueError(f"{name}: {shown}. Only runs of the same options (other seeds) merge into one summary")
        for seed in results["seeds"]:
            if seed in by_seed:
                raise ValueError(f"{name}: seed {seed} is in two of the runs; each seed must come from one")
            by_seed[seed] = {label: r["runs"][str(seed)] for label, r in results["variants"].items()}
    declared = [Contrast(**c) for c in first.get("declared", [])] or [(c["a"], c["b"]) for c in first["contrasts"]]
    summary = aggregate(dict(sorted(by_seed.items())), declared)
    stem, separator = _without_seeds(first["title"])
    title = f"{stem}{separator} {seeds_text(list(summary['seeds']))})"
    wall = sum(r.get("wall_seconds", math.nan) for r in runs)
    return {k: v for k, v in first.items() if k not in ("variants", "contrasts", "seeds")} | {
        "title": title, "wall_seconds": wall, "merged_from": list(names)} | summary
