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
from collections.abc import Sequence
from pathlib import Path

from ablations._report import contrasts_table, describe, plot, variants_table
from ablations._results import merge, write


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ablations.report", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="folders of finished runs (each with its results.json)")
    p.add_argument("--plot", action="store_true", help="also redraw each run's plots from its results.json")
    p.add_argument("--merge", type=Path, default=None, metavar="OUT",
                   help="join the runs (the same ablation and settings, other seeds) into one summary in OUT")
    args = p.parse_args(argv)
    if args.merge is not None and args.merge.resolve() in {folder.resolve() for folder in args.runs}:
        p.error(f"--merge: {args.merge} is one of the runs to merge; its results.json would be overwritten. Give "
                "the merged summary a folder of its own")
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
