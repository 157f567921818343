"""Launching a test worker on two gloo ranks under ``torchrun``, shared by the multi-process tests.

A rank that dies of a native signal (a segmentation fault, an abort or a bus error inside the C++ transport)
prints its Python stack (``PYTHONFAULTHANDLER``), and the run is made once more in a fresh folder: such a crash
has been seen once in CI inside gloo's all-gather, and never reproduced. A second crash, or any failure of
another kind (an exception, a wrong result the worker checks, a timeout), fails the test with both runs' output.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: exit codes torchrun reports for a rank killed by SIGABRT, SIGBUS, SIGFPE or SIGSEGV
NATIVE_CRASH = re.compile(r"exitcode\s*:\s*-(6|7|8|11)\b")


def died_of_a_native_crash(output: str) -> bool:
    """Whether torchrun's ``output`` reports a rank killed by a native signal, rather than one that failed."""
    return NATIVE_CRASH.search(output) is not None


def launch(worker: Path, out: Path, *, threads: int | None = None, timeout: float = 300) -> Path:
    """Run ``worker OUT`` on two gloo ranks under torchrun and return the folder its ranks wrote into.

    Args:
        worker: the worker script; it takes the folder to write into as its one argument.
        out: an empty folder; each attempt writes into its own subfolder.
        threads: ``OMP_NUM_THREADS`` for the ranks, or None to leave the environment's.
        timeout: seconds one attempt may take.
    """
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                        "PYTHONFAULTHANDLER": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    reports = []
    for attempt in range(2):
        folder = out / f"attempt{attempt}"
        folder.mkdir()
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
                   str(folder)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        if done.returncode == 0:
            if reports:
                warnings.warn(f"torchrun succeeded on a second attempt after a native crash:\n{reports[0]}",
                              stacklevel=2)
            return folder
        reports.append(f"attempt {attempt}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
        if not died_of_a_native_crash(done.stdout + done.stderr):
            break
    raise AssertionError("torchrun failed:\n" + "\n".join(reports))
