"""hatnorm's benchmarks: HAT models against their plain PyTorch twins, measured in one run on the same inputs.

    python benchmarks/run.py                   # CPU, default sizes (a few minutes on 2 cores)
    python benchmarks/run.py --compile         # everything under torch.compile, with recompile counts
    python benchmarks/run.py --device cuda     # on a GPU
    python benchmarks/run.py --quick           # smaller sizes and fewer repeats, to try the script

Every figure is the median of ``--repeats`` timed calls after ``--warmup`` untimed ones, the HAT and the
plain call interleaved so machine noise hits both alike. A HAT training step is forward, the loss with the
capacity regulariser, backward, protection and the optimizer step with frozen entries restored, timed on
task 1 after task 0 was learned (so protection is real). The gate's scale s changes what the arithmetic
meets (at large s a closed unit's plain sigmoid gate is a float32 subnormal, which x86 cores process far
slower), so HAT steps are timed at s = 1, 100 and s_max and over an epoch's schedule (the mean of steps
at ``SCHEDULE_POINTS`` evenly spaced batches), and the norm layers with a gate from an embedding at
each s. ``--plain-sigmoid`` times the plain sigmoid gate instead of the floored one (``GATE_FLOOR``).
The machine line names the CPU model, whether the process flushes subnormals to zero, and how much
slower this CPU multiplies subnormals than normal floats. Peak memory is the peak resident-set growth of a
fresh process over a few steps on CPU, measured after the masked LayerNorm's fused kernels are loaded (their
code is a fixed cost per process, reported in a row of its own), and ``torch.cuda.max_memory_allocated`` on
a GPU.

Results go to ``benchmarks/results/<device>[-compile].json`` and, as a Markdown table, into
``docs/performance.md`` between the markers for that run.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from plain import PlainAlexNet, PlainResNet18, PlainViT
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

import hatnorm
import hatnorm._fused
from hatnorm.data import split_mnist
from hatnorm.training import HATMethod, TrainConfig, train_sequence

ROOT = Path(__file__).resolve().parent.parent
BATCHES_PER_EPOCH = 100  # the scale s anneals over this many batches
SCHEDULE_POINTS = 8  # an epoch's mean step: steps at this many evenly spaced batches of the schedule
SCALES = (1.0, 100.0, 400.0)  # s = 1, 100 and s_max
MEMORY_PROBES = 5  # fresh processes per peak-memory figure on CPU, their median reported

# architecture → (hatnorm options, plain twin, HAT norms to time, input side)
MODELS: dict[str, tuple[dict[str, Any], Callable[..., nn.Module], tuple[str, ...]]] = {
    "resnet18": ({"base_width": 64}, lambda o: PlainResNet18(10, base_width=o["base_width"]),
                 ("masked_bn", "task_bn", "none")),
    "alexnet": ({"width": 1.0}, lambda o: PlainAlexNet(10, width=o["width"]), ("masked_bn", "task_bn", "none")),
    "vit_micro": ({}, lambda o: PlainViT(10), ("masked_ln", "task_ln", "none")),
}
QUICK = {"resnet18": {"base_width": 16}, "alexnet": {"width": 0.25}, "vit_micro": {}}
TARGETS = {("resnet18", "masked_bn"): 1.10, ("vit_micro", "masked_ln"): 1.15}  # SPEC §8, a HAT step / plain


class Clock:
    """Median wall time of interleaved calls, synchronising the device around each."""

    def __init__(self, device: torch.device, repeats: int, warmup: int) -> None:
        self.device, self.repeats, self.warmup = device, repeats, warmup

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, calls: dict[str, Callable[[], object]]) -> dict[str, float]:
        for call in calls.values():
            for _ in range(self.warmup):
                call()
        times: dict[str, list[float]] = {name: [] for name in calls}
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


GATE_FLOOR = hatnorm.GATE_FLOOR  # 0 with --plain-sigmoid


def hat_model(arch: str, norm: str, options: dict[str, Any], num_tasks: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = hatnorm.build(arch, num_tasks=num_tasks, norm=norm, num_classes=10, **options).to(device)
    for gate in model.modules():
        if isinstance(gate, hatnorm.HATGate):
            gate.floor = GATE_FLOOR
    return model


HATStep = Callable[[float], None]


def hat_step(model: nn.Module, x: Tensor, y: Tensor, compiler: Compiler) -> tuple[HATStep, hatnorm.HAT]:
    """A HAT training step at a given scale s on task 1, after a short task 0 (3 steps across its schedule)."""
    hat = hatnorm.HAT(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def train(task: int) -> HATStep:
        loss_fn = compiler(lambda x, y, s: hat.loss(F.cross_entropy(model(x, task=task, s=s), y), s))

        def step(s: float) -> None:
            s = torch.tensor(s, device=x.device)  # the scale as a tensor: a changing s does not recompile
            loss = loss_fn(x, y, s)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            hat.protect(s)
            hat.step(optimizer)

        return step

    model.train()
    hat.begin_task(0)
    first = train(0)
    for batch in (0, BATCHES_PER_EPOCH // 2, BATCHES_PER_EPOCH - 1):
        first(hat.scale(batch, BATCHES_PER_EPOCH))
    hat.end_task()
    hat.begin_task(1)
    return train(1), hat


def schedule_scales(hat: hatnorm.HAT) -> list[float]:
    """The scales of ``SCHEDULE_POINTS`` evenly spaced batches of an epoch, first and last included."""
    batches = (round(i * (BATCHES_PER_EPOCH - 1) / (SCHEDULE_POINTS - 1)) for i in range(SCHEDULE_POINTS))
    return [hat.scale(b, BATCHES_PER_EPOCH) for b in batches]


def epoch_of(step: HATStep, scales: list[float]) -> Callable[[], None]:
    """One call that takes a step at each of ``scales``: its time divided by their number is an epoch's mean step."""
    return lambda: [step(s) for s in scales]


def plain_step(model: nn.Module, x: Tensor, y: Tensor, compiler: Compiler) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = compiler(lambda x, y: F.cross_entropy(model(x), y))
    model.train()

    def step() -> None:
        loss = loss_fn(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def inputs(batch: int, device: torch.device, size: int = 32) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=generator)
    return x.to(device), torch.randint(0, 10, (batch,), generator=generator).to(device)


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
    plain_sigmoid = ["--plain-sigmoid"] if GATE_FLOOR == 0 else []
    return _median_of_probes("--memory-probe", json.dumps(spec), *plain_sigmoid)


def _median_of_probes(*flags: str) -> float:
    """The median of the MiB that ``MEMORY_PROBES`` fresh processes of this script, run with ``flags``, print."""
    probes = [subprocess.run([sys.executable, __file__, *flags], capture_output=True, text=True, check=True)
              for _ in range(MEMORY_PROBES)]
    return statistics.median(float(out.stdout.strip().splitlines()[-1]) for out in probes)


def make_step(spec: dict[str, Any], device: torch.device, compiler: Compiler) -> Callable[[], None]:
    x, y = inputs(spec["batch"], device)
    if spec["kind"] == "plain":
        torch.manual_seed(0)
        return plain_step(MODELS[spec["arch"]][1](spec["options"]).to(device), x, y, compiler)
    model = hat_model(spec["arch"], spec["norm"], spec["options"], spec.get("num_tasks", 10), device)
    step, hat = hat_step(model, x, y, compiler)
    return epoch_of(step, schedule_scales(hat))


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def probe_memory(spec: dict[str, Any]) -> None:
    """The child side of :func:`peak_memory`: prints the peak resident-set growth (MiB) from just before the
    model is built to the end of 3 training steps: parameters, gradients, optimizer and HAT state, activations.
    The masked LayerNorm's fused kernels are loaded before, in every probe: their code is a fixed cost per
    process, not the model's (:func:`kernel_load_memory` measures it)."""
    hatnorm._fused.load()
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set (VmHWM) to the current size
    before = _status_kib("VmRSS")
    step = make_step(spec, torch.device("cpu"), Compiler(False))
    for _ in range(3):
        step()
    print((_status_kib("VmHWM") - before) / 1024)


def kernel_load_memory() -> dict[str, Any]:
    """The resident memory (MiB) that loading the fused masked-LN kernels adds to a fresh process that has
    imported hatnorm: the median of ``MEMORY_PROBES`` processes."""
    return {"benchmark": "fused masked-LN kernels loaded (numba), once per process: resident memory added",
            "fixed_mib": _median_of_probes("--kernel-probe")}


def probe_kernel_load() -> None:
    """The child side of :func:`kernel_load_memory`: prints the resident-set growth (MiB) of loading the kernels."""
    before = _status_kib("VmRSS")
    hatnorm._fused.load()
    print((_status_kib("VmRSS") - before) / 1024)


def training_steps(args: argparse.Namespace, clock: Clock, compiler: Compiler) -> list[dict[str, Any]]:
    """Each HAT model's step at s = 1, 100 and s_max and its epoch mean, against the plain twin's step."""
    rows = []
    for arch, (options, _, norms) in MODELS.items():
        options = QUICK[arch] if args.quick else options
        x, y = inputs(args.batch, args.device)
        plain_spec = {"kind": "plain", "arch": arch, "options": options, "batch": args.batch}
        calls = {"plain": make_step(plain_spec, args.device, compiler)}
        recompiles = {}
        for norm in norms:
            step, hat = hat_step(hat_model(arch, norm, options, 10, args.device), x, y, compiler)
            before = compiler.graphs
            step(1.0)
            step(2.0)
            recompiles[norm] = compiler.graphs - before
            for s in SCALES:
                calls[norm, s] = partial(step, s)
            calls[norm, "epoch"] = epoch_of(step, schedule_scales(hat))
        times = clock(calls)
        memory = {"plain": peak_memory(plain_spec, args.device)} if args.memory else {}
        for norm in norms:
            if args.memory:
                memory[norm] = peak_memory(plain_spec | {"kind": "hat", "norm": norm}, args.device)
            for s in (*SCALES, "epoch"):
                hat_time = times[norm, s] / (SCHEDULE_POINTS if s == "epoch" else 1)
                at = "epoch mean" if s == "epoch" else f"s = {s:g}"
                rows.append({
                    "benchmark": f"train step {arch} ({_describe(options)}, batch {args.batch}), HAT {norm} {at} "
                                 "/ plain",
                    "hat_ms": 1e3 * hat_time, "base_ms": 1e3 * times["plain"], "ratio": hat_time / times["plain"],
                    "target": TARGETS.get((arch, norm)),
                    "memory_ratio": memory[norm] / memory["plain"] if args.memory and s == "epoch" else None,
                    "hat_mib": memory.get(norm), "base_mib": memory.get("plain"),
                    "recompiles": recompiles[norm] if args.compile else None,
                })
    if args.memory and args.device.type == "cpu":
        rows.append(kernel_load_memory())
    return rows


def _describe(options: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in options.items()) or "defaults"


def _forward_backward(forward: Callable[..., Tensor], *args: Tensor, grad: Tensor) -> None:
    forward(*args).backward(grad)


def norm_layers(args: argparse.Namespace, clock: Clock, compiler: Compiler) -> list[dict[str, Any]]:
    """Forward and backward of masked BN against nn.BatchNorm2d and masked LN against nn.LayerNorm, training mode."""
    rows = []
    shapes_bn = [(32, 64, 32, 32), (32, 128, 16, 16), (128, 512, 4, 4)]
    shapes_ln = [(32, 65, 64), (32, 65, 192), (8, 197, 768)]
    if args.quick:
        shapes_bn, shapes_ln = shapes_bn[1:], shapes_ln[:2]
    generator = torch.Generator().manual_seed(0)
    for kind, shapes in (("bn", shapes_bn), ("ln", shapes_ln)):
        for shape in shapes:
            channels = shape[1] if kind == "bn" else shape[-1]
            x = torch.randn(*shape, generator=generator).to(args.device).requires_grad_()
            grad = torch.randn(*shape, generator=generator).to(args.device)
            embedding = torch.randn(channels, generator=generator).to(args.device)
            if kind == "bn":
                ours = hatnorm.MaskedBatchNorm2d(channels, num_tasks=10).to(args.device)
                theirs = nn.BatchNorm2d(channels).to(args.device)
            else:
                ours = hatnorm.MaskedLayerNorm(channels, num_tasks=10).to(args.device)
                theirs = nn.LayerNorm(channels).to(args.device)
            forward_ours = compiler(lambda x, m, ours=ours: ours(x, m, 1))
            forward_theirs = compiler(lambda x, theirs=theirs: theirs(x))
            calls: dict[object, Callable[[], None]] = {
                "theirs": partial(_forward_backward, forward_theirs, x, grad=grad)}
            for s in SCALES:  # the soft gate a task's training sees at s
                mask = hatnorm.hat_gate(embedding, s, GATE_FLOOR).requires_grad_()
                calls[s] = partial(_forward_backward, forward_ours, x, mask, grad=grad)
            times = clock(calls)
            name = "masked BN / nn.BatchNorm2d" if kind == "bn" else "masked LN / nn.LayerNorm"
            target = 1.25 if kind == "bn" else 1.3 if args.compile else 2.0
            for s in SCALES:
                rows.append({"benchmark": f"{name} forward+backward {list(shape)}, gate at s = {s:g}",
                             "hat_ms": 1e3 * times[s], "base_ms": 1e3 * times["theirs"],
                             "ratio": times[s] / times["theirs"], "target": target})
    return rows


def task_count(args: argparse.Namespace, clock: Clock, compiler: Compiler) -> list[dict[str, Any]]:
    """The same HAT steps (an epoch's schedule) with 2 and with 100 tasks."""
    options = QUICK["resnet18"] if args.quick else MODELS["resnet18"][0]
    spec = {"kind": "hat", "arch": "resnet18", "norm": "masked_bn", "options": options, "batch": args.batch}
    calls = {n: make_step(spec | {"num_tasks": n}, args.device, compiler) for n in (2, 100)}
    times = clock(calls)
    return [{"benchmark": f"train step resnet18 masked_bn ({_describe(options)}, epoch mean), 100 tasks / 2 tasks",
             "hat_ms": 1e3 * times[100], "base_ms": 1e3 * times[2], "ratio": times[100] / times[2], "target": 1.05}]


def export_inference(args: argparse.Namespace, clock: Clock, compiler: Compiler) -> list[dict[str, Any]]:
    """Inference of task 1's export (after tasks 0 and 1 were learned) against the plain twin."""
    rows = []
    for arch, (options, plain, norms) in MODELS.items():
        options = QUICK[arch] if args.quick else options
        x, y = inputs(args.batch, args.device)
        model = hat_model(arch, norms[0], options, 10, args.device)
        step, hat = hat_step(model, x, y, Compiler(False))
        step(hat.s_max)
        hat.end_task()
        model.eval()
        exported = hatnorm.export(model, 1)
        torch.manual_seed(0)
        twin = plain(options).to(args.device).eval()
        ours, theirs = compiler(exported), compiler(twin)
        with torch.no_grad():
            times = clock({"export": partial(ours, x), "plain": partial(theirs, x)})
        kept = 1 - exported.parameters_saved / exported.parameters_before
        rows.append({"benchmark": f"inference {arch} {norms[0]} export of task 1 ({kept:.0%} of the HAT "
                                  f"model's parameters) / plain", "hat_ms": 1e3 * times["export"],
                     "base_ms": 1e3 * times["plain"], "ratio": times["export"] / times["plain"], "target": 1.0})
    return rows


def precise_validation(args: argparse.Namespace, clock: Clock, compiler: Compiler) -> list[dict[str, Any]]:
    """One training epoch of the default ablation's models on a Split-MNIST task (720 training images, 80 for
    validation), with validation on statistics re-estimated for the current weights against without."""
    task = split_mnist(num_tasks=1)
    rows = []
    for arch, options in (("resnet18", {"base_width": 4, "in_channels": 1}),
                          ("alexnet", {"width": 0.125, "in_channels": 1, "size": 32})):
        def epoch(recalibrate: bool, arch: str = arch, options: dict[str, Any] = options) -> None:
            config = TrainConfig(epochs=1, recalibrate=recalibrate)
            train_sequence(lambda: hatnorm.build(arch, num_tasks=1, norm="masked_bn", num_classes=2, **options),
                           task, HATMethod(), config, console=Console(quiet=True))

        times = clock({"precise": partial(epoch, True), "plain": partial(epoch, False)})
        rows.append({"benchmark": f"training epoch {arch} masked_bn ({_describe(options)}, Split-MNIST task), "
                                  "validation on precise statistics / on running averages",
                     "hat_ms": 1e3 * times["precise"], "base_ms": 1e3 * times["plain"],
                     "ratio": times["precise"] / times["plain"], "target": None})
    return rows


def recompiles_during_a_task(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Graphs compiled over 20 batches of one task, once the first batch compiled."""
    rows = []
    for arch, (options, _, norms) in MODELS.items():
        options = QUICK[arch]  # compile time grows with the model, recompiles do not
        compiler = Compiler(True)
        x, y = inputs(8, args.device)
        step, hat = hat_step(hat_model(arch, norms[0], options, 10, args.device), x, y, compiler)
        step(hat.scale(0, 21))
        first = compiler.graphs
        for batch in range(1, 21):
            step(hat.scale(batch, 21))
        rows.append({"benchmark": f"recompiles in 20 batches of task 1, {arch} {norms[0]}",
                     "recompiles": compiler.graphs - first, "graphs": first})
    return rows


def markdown(rows: list[dict[str, Any]], machine: str) -> str:
    lines = [f"Measured on {machine}.", "",
             "| benchmark | HAT / export (ms) | baseline (ms) | ratio | target | peak memory ratio |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "fixed_mib" in r:
            lines.append(f"| {r['benchmark']} | | | | | {r['fixed_mib']:.0f} MiB |")
            continue
        if "hat_ms" not in r:
            lines.append(f"| {r['benchmark']} | | | {r['recompiles']} recompiles | 0 | |")
            continue
        target = "" if r.get("target") is None else f"≤ {r['target']:.2f}"
        memory = "" if r.get("memory_ratio") is None else (f"{r['memory_ratio']:.2f} ({r['hat_mib']:.0f} / "
                                                           f"{r['base_mib']:.0f} MiB)")
        lines.append(f"| {r['benchmark']} | {r['hat_ms']:.2f} | {r['base_ms']:.2f} | {r['ratio']:.3f} | {target} | "
                     f"{memory} |")
    return "\n".join(lines)


def update_doc(doc: Path, label: str, text: str) -> None:
    start, end = f"<!-- bench:{label}:start -->", f"<!-- bench:{label}:end -->"
    body = doc.read_text() if doc.exists() else "# Performance\n"
    block = f"{start}\n{text}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    body = pattern.sub(lambda _: block, body) if pattern.search(body) else f"{body.rstrip()}\n\n{block}\n"
    doc.write_text(body)


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


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    flush = ("flushed to zero" if flushes_subnormals()
             else f"not flushed, {subnormal_penalty():.1f}× slower than normals")
    return (f"{cpu_model()} ({torch.get_num_threads()} threads), torch {torch.__version__}; float32 subnormals "
            f"{flush}; gate floor {GATE_FLOOR:g}")


SECTIONS = {"training": training_steps, "norms": norm_layers, "tasks": task_count, "export": export_inference,
            "validation": precise_validation}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--batch", type=int, default=32, help="batch size of the training steps")
    p.add_argument("--repeats", type=int, default=15, help="timed calls per figure (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    p.add_argument("--compile", action="store_true", help="run everything under torch.compile")
    p.add_argument("--quick", action="store_true", help="small models and 5 repeats, to try the script")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    p.add_argument("--plain-sigmoid", action="store_true",
                   help="gates without the floor (hatnorm.GATE_FLOOR), as in Serrà et al.'s code, to compare")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the JSON")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "performance.md", help="Markdown file to update")
    p.add_argument("--only", nargs="+", choices=list(SECTIONS),
                   help="run only these sections (training steps, norm layers, task count, export inference, "
                        "the cost of precise-BN validation); "
                        "the table is printed and no file is written")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)
    p.add_argument("--kernel-probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    global GATE_FLOOR
    if args.plain_sigmoid:
        GATE_FLOOR = 0.0
    if args.memory_probe:
        probe_memory(json.loads(args.memory_probe))
        return
    if args.kernel_probe:
        probe_kernel_load()
        return
    for name in ("batch", "repeats"):
        if getattr(args, name) < 2:
            p.error(f"--{name} must be ≥ 2, got {getattr(args, name)}")
    if args.warmup < 1:
        p.error(f"--warmup must be ≥ 1, got {args.warmup}")
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        p.error(f"--device must be cpu or cuda (when a GPU is present), got {args.device}")
    if args.quick:
        args.repeats = min(args.repeats, 5)
    args.device = torch.device(args.device)
    console = Console() if Console().is_terminal else Console(width=200)
    clock, compiler = Clock(args.device, args.repeats, args.warmup), Compiler(args.compile)
    rows: list[dict[str, Any]] = []
    for name, section in SECTIONS.items():
        if args.only is None or name in args.only:
            console.print(f"[bold]{name}[/bold] …")
            rows += section(args, clock, compiler)
    if args.compile:
        console.print("[bold]recompiles[/bold] …")
        rows += recompiles_during_a_task(args)
    label = (args.device.type + ("-compile" if args.compile else "") + ("-sigmoid" if args.plain_sigmoid else "")
             + ("-quick" if args.quick else ""))
    where = machine(args.device)
    table = Table(title=f"hatnorm benchmarks ({label}; {where}; median of {args.repeats})")
    for column in ("benchmark", "HAT (ms)", "baseline (ms)", "ratio", "target", "memory ratio", "recompiles"):
        table.add_column(column, justify="left" if column == "benchmark" else "right")
    for r in rows:
        table.add_row(r["benchmark"], f"{r['hat_ms']:.2f}" if "hat_ms" in r else "",
                      f"{r['base_ms']:.2f}" if "base_ms" in r else "", f"{r['ratio']:.3f}" if "ratio" in r else "",
                      f"≤ {r['target']:.2f}" if r.get("target") else "",
                      f"{r['memory_ratio']:.2f}" if r.get("memory_ratio") else
                      f"{r['fixed_mib']:.0f} MiB" if "fixed_mib" in r else "",
                      str(r["recompiles"]) if r.get("recompiles") is not None else "")
    console.print(table)
    if args.only:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{label}.json"
    path.write_text(json.dumps({"machine": where, "repeats": args.repeats, "batch": args.batch, "rows": rows},
                               indent=2))
    update_doc(args.doc, label, markdown(rows, where))
    console.print(f"wrote {path} and the {label} table in {args.doc}")


if __name__ == "__main__":
    main()
