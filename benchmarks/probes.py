"""Peak-memory probes: each figure on CPU is the median over fresh processes of this folder's ``run.py``, which
prints the resident-set growth of a few training steps (or of loading the fused kernels) and exits."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from harness import Compiler
from rows import FixedMemory
from steps import make_step

import hatnorm.fused

MEMORY_PROBES = 5  # fresh processes per peak-memory figure on CPU, their median reported
RUN = Path(__file__).with_name("run.py")


def peak_memory(spec: dict[str, Any], device: torch.device) -> float:
    """Peak memory (MiB) of a few training steps of ``spec``: on CPU the median of ``MEMORY_PROBES`` fresh
    processes (one process's resident-set growth moves by tens of MiB from run to run)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step = make_step(spec, device, Compiler(False))
        for _ in range(3):
            step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return _median_of_probes("--memory-probe", json.dumps(spec))


def _median_of_probes(*flags: str) -> float:
    """The median of the MiB that ``MEMORY_PROBES`` fresh processes of ``run.py``, run with ``flags``, print."""
    probes = [subprocess.run([sys.executable, str(RUN), *flags], capture_output=True, text=True, check=True)
              for _ in range(MEMORY_PROBES)]
    return statistics.median(float(out.stdout.strip().splitlines()[-1]) for out in probes)


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def probe_memory(spec: dict[str, Any]) -> None:
    """The child side of :func:`peak_memory`: prints the peak resident-set growth (MiB) from just before the
    model is built to the end of 3 training steps: parameters, gradients, optimizer and HAT state, activations.
    The masked LayerNorm's fused kernels are loaded before, in every probe: their code is a fixed cost per
    process, not the model's (:func:`kernel_load_memory` measures it)."""
    hatnorm.fused.load()
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set (VmHWM) to the current size
    before = _status_kib("VmRSS")
    step = make_step(spec, torch.device("cpu"), Compiler(False))
    for _ in range(3):
        step()
    print((_status_kib("VmHWM") - before) / 1024)


def kernel_load_memory() -> FixedMemory:
    """The resident memory (MiB) that loading the fused masked-LN kernels adds to a fresh process that has
    imported hatnorm: the median of ``MEMORY_PROBES`` processes."""
    return FixedMemory("fused masked-LN kernels loaded (numba), once per process: resident memory added",
                       _median_of_probes("--kernel-probe"))


def probe_kernel_load() -> None:
    """The child side of :func:`kernel_load_memory`: prints the resident-set growth (MiB) of loading the kernels."""
    before = _status_kib("VmRSS")
    hatnorm.fused.load()
    print((_status_kib("VmRSS") - before) / 1024)
