"""The ablations' report: the tables (terminal and Markdown) and the plots, made from a run's summary."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from rich.console import Console
from rich.table import Table

from ablations._results import LABELS


def cell(s: dict[str, Any], metric: str) -> str:
    """A metric's summary as the tables print it: mean ± 95% CI half-width (the mean alone for one seed)."""
    if math.isnan(s["mean"]):
        return "n/a"
    mean = f"{s['mean']:.4f}" if metric in ("average_accuracy", "newest_accuracy") else f"{s['mean']:+.4f}"
    return mean if s["n"] == 1 else f"{mean} ± {(s['high'] - s['low']) / 2:.4f}"


def parameters(variant: dict[str, Any]) -> str:
    """A variant's parameter count (every task's gates and heads included), or n/a for runs that predate it."""
    count = variant.get("parameters")
    return "n/a" if count is None else f"{count:,}"


def metrics_of(summary: dict[str, Any]) -> list[str]:
    """The metrics a table reports, in column order: those its variants' summaries hold."""
    held = next(iter(summary["variants"].values()))["summary"]
    return [m for m in LABELS if m in held]


def forgetting_seeds(variant: dict[str, Any]) -> str:
    """On how many of the variant's seeds it forgets (BWT < 0), as ``k/n``."""
    runs = variant["runs"].values()
    return f"{sum(run['bwt'] < 0 for run in runs)}/{len(runs)}"


#: the column of :func:`forgetting_seeds`
FORGETS = "BWT < 0 on"


def table(summary: dict[str, Any], title: str) -> Table:
    """The ablation's table: one row per variant, each metric as mean ± 95% CI half-width over the seeds, and on
    how many seeds the variant forgets."""
    n = len(summary["seeds"])
    metrics = metrics_of(summary)
    t = Table(title=title, caption=f"mean ± 95% CI half-width over {n} seeds" if n > 1 else "one seed: no interval")
    for column in ("variant", "parameters", *(LABELS[m] for m in metrics), FORGETS, "epochs/task", "time (s)"):
        t.add_column(column, justify="left" if column == "variant" else "right")
    for label, r in summary["variants"].items():
        t.add_row(label, parameters(r), *(cell(r["summary"][m], m) for m in metrics), forgetting_seeds(r),
                  f"{r['epochs_mean']:.1f}", f"{r['seconds']:.0f}")
    return t


#: the contrast tables' columns, terminal and Markdown alike
CONTRAST_COLUMNS = ("a − b", "metric", "role", "mean Δ", "95% CI", "p (t)", "p (Holm)", "p (sign-flip)", "finding")
#: the setting every table is in
SETTING = "task-incremental: one head per task, the task id given at test"
#: a causal language model's setting: one head over the vocabulary, which every task shares
SHARED_HEAD_SETTING = ("task-incremental: one language-model head over the shared vocabulary, the task id given at "
                       "test (it selects the gates)")


def _p(value: float | None) -> str:
    if value is None:
        return "—"
    if math.isnan(value):
        return "n/a"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def contrast_cells(c: dict[str, Any]) -> tuple[str, ...]:
    """One contrast as both contrast tables print it: a primary one is a finding when its Holm-adjusted
    paired-t p-value is below 0.05; an exploratory one is never called a finding."""
    d = c["difference"]
    interval = "n/a" if d["n"] == 1 else f"[{d['low']:+.4f}, {d['high']:+.4f}]"
    primary = c.get("primary", False)  # runs made before the protocol declared nothing: all exploratory
    if not primary:
        finding = "exploratory"
    elif d["n"] == 1:
        finding = "one seed"
    else:
        finding = "**yes**" if c["finding"] else "no"
    return (f"{c['a']} − {c['b']}", LABELS[c["metric"]], "primary" if primary else "exploratory",
            f"{d['mean']:+.4f}", interval, _p(c.get("p_t", math.nan)), _p(c.get("p_holm")),
            _p(c.get("p_sign_flip", math.nan)), finding)


def contrast_table(summary: dict[str, Any]) -> Table:
    """The paired contrasts: mean difference over seeds, its 95% CI, p-values and, for primary ones, whether
    they are findings after Holm's correction."""
    t = Table(title="Paired contrasts over seeds (a − b); Holm over the table's primary contrasts")
    for column in CONTRAST_COLUMNS:
        t.add_column(column, justify="left" if column in ("a − b", "metric", "role") else "right")
    for c in summary["contrasts"]:
        t.add_row(*contrast_cells(c))
    return t


def plot(summary: dict[str, Any], out: Path, title: str) -> list[Path]:
    """ρ^{≤t} over t for every variant with its 95% band over seeds (one panel per architecture), and the
    seed-mean accuracy matrices as heatmaps."""
    results = summary["variants"]
    archs = list(dict.fromkeys(r["arch"] for r in results.values()))
    fig, axes = plt.subplots(1, len(archs), figsize=(max(7.0, 5.5 * len(archs)), 4.5), squeeze=False,
                             layout="constrained")
    for ax, arch in zip(axes[0], archs, strict=True):
        for label, r in results.items():
            if r["arch"] != arch:
                continue
            curve = {k: np.array(v, dtype=float) for k, v in r["rho_curve"].items()}
            steps = np.arange(1, len(curve["mean"]) + 1)
            line, = ax.plot(steps, curve["mean"], marker="o", label=label)
            if len(r["seeds"]) > 1:
                ax.fill_between(steps, curve["low"], curve["high"], color=line.get_color(), alpha=0.15, lw=0)
        ax.axhline(0, color="gray", lw=0.8, ls="--")
        if all(np.isnan(r["rho_curve"]["mean"]).all() for r in results.values() if r["arch"] == arch):
            ax.text(0.5, 0.5, "not measured: no joint baseline (--no-joint)", ha="center", transform=ax.transAxes)
        ax.set(title=f"{arch}", xlabel="tasks learned $t$", ylabel=r"forgetting ratio $\rho^{\leq t}$")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)
    n = len(summary["seeds"])
    fig.suptitle(title + (f"\nmean and 95% band over {n} seeds" if n > 1 else ""), fontsize=10)
    rho_path = out / "forgetting_ratio.png"
    fig.savefig(rho_path, dpi=120)
    plt.close(fig)

    count = len(results)
    cols = min(count, 4)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 1, 3.0 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[count:]:
        ax.axis("off")
    for ax, (label, r) in zip(axes.flat, results.items(), strict=False):
        a = np.array(r["accuracy_mean"])
        a[np.triu_indices_from(a, 1)] = np.nan
        image = ax.imshow(a, vmin=0, vmax=1, cmap="viridis")
        if len(a) <= 10:
            for (t, tau), value in np.ndenumerate(a):
                if not np.isnan(value):
                    ax.text(tau, t, f"{value:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if value < 0.6 else "black")
        ax.set(title=label, xlabel="tested on task", ylabel="after task")
        ax.title.set_fontsize(8)
    fig.colorbar(image, ax=axes, shrink=0.6, label="test accuracy" + (f" (mean of {n} seeds)" if n > 1 else ""))
    heat_path = out / "accuracy_matrices.png"
    fig.savefig(heat_path, dpi=120)
    plt.close(fig)
    return [rho_path, heat_path]


def finish(summary: dict[str, Any], out: Path, title: str, console: Console) -> None:
    console.print(table(summary, title))
    if summary["contrasts"]:
        console.print(contrast_table(summary))
    for path in plot(summary, out, title):
        console.print(f"wrote {path}")
    console.print(f"wrote {out / 'results.json'}, {out / 'results.csv'} and {out / 'contrasts.csv'}")


def variants_table(results: dict[str, Any]) -> str:
    """One row per variant: each metric as mean ± 95% CI half-width, on how many seeds it forgets, epochs per
    task, the joint minimum."""
    metrics = metrics_of(results)
    lines = [f"| variant | parameters | {' | '.join(LABELS[m] for m in metrics)} | {FORGETS} | epochs/task | min A_J |",
             "|---|" + "---:|" * (len(metrics) + 4)]
    for label, r in results["variants"].items():
        # a run without joint training (--no-joint) has no A_J
        joints = [a for run in r["runs"].values() if run.get("joint") for a in run["joint"][-1] if a == a]
        lowest = f"{min(joints):.3f}" if joints else "n/a"
        cells = [cell(r["summary"][m], m) for m in metrics]
        lines.append(f"| {label} | {parameters(r)} | {' | '.join(cells)} | {forgetting_seeds(r)} | "
                     f"{r['epochs_mean']:.1f} | {lowest} |")
    return "\n".join(lines)


def contrasts_table(results: dict[str, Any]) -> str:
    """The paired contrasts as a Markdown table (the cells of :func:`contrast_cells`)."""
    lines = ["| " + " | ".join(CONTRAST_COLUMNS) + " |", "|---|---|---|" + "---:|" * (len(CONTRAST_COLUMNS) - 3)]
    lines += ["| " + " | ".join(contrast_cells(c)) + " |" for c in results["contrasts"]]
    return "\n".join(lines)


def describe(results: dict[str, Any]) -> str:
    """The run's setting, settings and wall time in one line, and the command, commit and machine that made it."""
    config = results["config"]
    minutes = results.get("wall_seconds", math.nan) / 60
    schedule = (f"{config['optimizer']}, lr {config['lr']:g}, {config['schedule']}"
                + (f" (patience {config['patience']}, lr floor {config['lr_min']:g})"
                   if config["schedule"] == "plateau" else f" (warmup {config['warmup_epochs']})"))
    line = (f"{results['title']}; {results.get('setting', SETTING)}; preset {results['preset']}, "
            f"≤ {config['epochs']} epochs per task, {schedule}, seeds {', '.join(map(str, results['seeds']))}; "
            f"wall time {minutes:.0f} min")
    merged = "merged_from" in results
    if merged:
        line += " (the merged runs' wall times added)"
    if "command" in results:
        first = f"{len(results['merged_from'])} runs merged, the first by " if merged else ""
        line += f"\n\nCommand: {first}`{results['command']}` at commit {results['commit']} on {results['machine']}."
    return line
