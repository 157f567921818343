"""The benchmarks' harness: interleaved timing, compilation with a graph count, fixed inputs, the machine line and
the Markdown block a run writes into the docs."""

from __future__ import annotations

import platform
import re
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class Clock:
    """Median wall time of interleaved calls, synchronising the device around each."""

    def __init__(self, device: torch.device, repeats: int, warmup: int) -> None:
        self.device, self.repeats, self.warmup = device, repeats, warmup

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, calls: dict[Any, Callable[[], object]]) -> dict[Any, float]:
        for call in calls.values():
            for _ in range(self.warmup):
                call()
        times: dict[Any, list[float]] = {name: [] for name in calls}
        for _ in range(self.repeats):
            for name, call in calls.items():
                self.sync()
                start = time.perf_counter()
                call()
                self.sync()
                times[name].append(time.perf_counter() - start)
        return {name: statistics.median(t) for name, t in times.items()}


class Compiler:
    """``torch.compile`` with a count of the graphs it compiles (a recompile is a new graph)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.graphs = 0
        self.inductor = torch._dynamo.lookup_backend("inductor")

    def backend(self, gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable:
        self.graphs += 1
        return self.inductor(gm, example_inputs)

    def __call__(self, fn: Callable) -> Callable:
        return torch.compile(fn, backend=self.backend) if self.enabled else fn


def inputs(batch: int, device: torch.device, size: int = 32) -> tuple[Tensor, Tensor]:
    """A fixed batch of ``size``×``size`` RGB images and labels in [0, 10)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=generator)
    return x.to(device), torch.randint(0, 10, (batch,), generator=generator).to(device)


def describe(options: dict[str, Any]) -> str:
    """Build options as the benchmark names write them."""
    return ", ".join(f"{k} {v}" for k, v in options.items()) or "defaults"


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), or what the platform says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        if found:
            return found.group(1).strip()
    return platform.processor() or platform.machine()


def flushes_subnormals() -> bool:
    """Whether this process flushes float32 subnormals to zero (``torch.set_flush_denormal``)."""
    return bool((torch.full((4,), 1e-39) * 2 == 0).all())


def subnormal_penalty() -> float:
    """How many times slower this CPU multiplies float32 subnormals than normal floats (median of 7)."""
    normal, subnormal = torch.full((1 << 22,), 1e-3), torch.full((1 << 22,), 1e-39)
    clock = Clock(torch.device("cpu"), repeats=7, warmup=2)
    times = clock({"normal": partial(torch.mul, normal, 0.999), "subnormal": partial(torch.mul, subnormal, 0.999)})
    return times["subnormal"] / times["normal"]


def machine(device: torch.device, gate_floor: float) -> str:
    """The machine line of a run: the GPU, or the CPU with its threads, subnormal handling and the gate floor."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    flush = ("flushed to zero" if flushes_subnormals()
             else f"not flushed, {subnormal_penalty():.1f}× slower than normals")
    return (f"{cpu_model()} ({torch.get_num_threads()} threads), torch {torch.__version__}; float32 subnormals "
            f"{flush}; gate floor {gate_floor:g}")


def update_doc(doc: Path, label: str, text: str) -> None:
    """Put ``text`` between the ``bench:<label>`` markers of ``doc``, appending the block where it has none."""
    start, end = f"<!-- bench:{label}:start -->", f"<!-- bench:{label}:end -->"
    body = doc.read_text() if doc.exists() else "# Performance\n"
    block = f"{start}\n{text}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    body = pattern.sub(lambda _: block, body) if pattern.search(body) else f"{body.rstrip()}\n\n{block}\n"
    doc.write_text(body)
