"""hatnorm's benchmarks: HAT models against their plain PyTorch twins, measured in one run on the same inputs.

    python benchmarks/run.py                   # CPU, default sizes (a few minutes on 2 cores)
    python benchmarks/run.py --compile         # everything under torch.compile, with recompile counts
    python benchmarks/run.py --device cuda     # on a GPU
    python benchmarks/run.py --quick           # smaller sizes and fewer repeats, to try the script
    python benchmarks/run.py --only language   # a converted LLaMA-style LM (about 20M parameters), its own table

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

The script is split by job: ``harness.py`` (timing, compilation, the machine line), ``steps.py`` (the steps
timed), ``language.py`` (the converted language model's section), ``probes.py`` (peak memory in fresh
processes) and ``rows.py`` (one typed row per kind of result, rendered once for the terminal and the docs);
this file holds the sections and the command line.

Results go to ``benchmarks/results/<device>[-compile].json`` and, as a Markdown table, into
``docs/performance.md`` between the markers for that run. The language section (``--only language``) is not part
of the default run (its 20M-parameter steps take minutes on a CPU): it writes a table of its own,
``<device>[-compile]-language``.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from harness import Clock, Compiler, cpu_model, describe, inputs, machine, update_doc
from language import language
from probes import kernel_load_memory, peak_memory, probe_kernel_load, probe_memory
from rich.console import Console
from rows import Ratio, Recompiles, Row, markdown, terminal_table
from steps import (
    MODELS,
    QUICK,
    SCALES,
    SCHEDULE_POINTS,
    TARGETS,
    epoch_of,
    hat_model,
    hat_step,
    make_step,
    schedule_scales,
)
from torch import Tensor, nn

import hatnorm
from hatnorm.data import split_mnist
from hatnorm.training import HATMethod, TrainConfig, train_sequence

__all__ = ["cpu_model", "main"]  # cpu_model: the coverage scripts name the machine with it

ROOT = Path(__file__).resolve().parent.parent


def training_steps(args: argparse.Namespace, clock: Clock, compiler: Compiler) -> list[Row]:
    """Each HAT model's step at s = 1, 100 and s_max and its epoch mean, against the plain twin's step."""
    rows: list[Row] = []
    for arch, (options, _, norms) in MODELS.items():
        options = QUICK[arch] if args.quick else options
        x, y = inputs(args.batch, args.device)
        plain_spec = {"kind": "plain", "arch": arch, "options": options, "batch": args.batch}
        calls: dict[object, Any] = {"plain": make_step(plain_spec, args.device, compiler)}
        recompiles = {}
        for norm in norms:
            step, hat = hat_step(hat_model(arch, norm, options, 10, args.device, args.gate_floor), x, y, compiler)
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
                hat_spec = plain_spec | {"kind": "hat", "norm": norm, "gate_floor": args.gate_floor}
                memory[norm] = peak_memory(hat_spec, args.device)
            for s in (*SCALES, "epoch"):
                hat_time = times[norm, s] / (SCHEDULE_POINTS if s == "epoch" else 1)
                at = "epoch mean" if s == "epoch" else f"s = {s:g}"
                measured = args.memory and s == "epoch"
                rows.append(Ratio(
                    f"train step {arch} ({describe(options)}, batch {args.batch}), HAT {norm} {at} / plain",
                    1e3 * hat_time, 1e3 * times["plain"], TARGETS.get((arch, norm)),
                    memory[norm] if measured else None, memory["plain"] if measured else None,
                    recompiles[norm] if args.compile else None))
    if args.memory and args.device.type == "cpu":
        rows.append(kernel_load_memory())
    return rows


def _forward_backward(forward: Any, *args: Tensor, grad: Tensor) -> None:
    forward(*args).backward(grad)


def norm_layers(args: argparse.Namespace, clock: Clock, compiler: Compiler) -> list[Row]:
    """Forward and backward of masked BN against nn.BatchNorm2d and masked LN against nn.LayerNorm, training mode."""
    rows: list[Row] = []
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
                ours = hatnorm.norms.MaskedBatchNorm2d(channels, num_tasks=10).to(args.device)
                theirs = nn.BatchNorm2d(channels).to(args.device)
            else:
                ours = hatnorm.norms.MaskedLayerNorm(channels, num_tasks=10).to(args.device)
                theirs = nn.LayerNorm(channels).to(args.device)
            forward_ours = compiler(lambda x, m, ours=ours: ours(x, m, 1))
            forward_theirs = compiler(lambda x, theirs=theirs: theirs(x))
            calls: dict[object, Any] = {"theirs": partial(_forward_backward, forward_theirs, x, grad=grad)}
            for s in SCALES:  # the soft gate a task's training sees at s
                mask = hatnorm.functional.hat_gate(embedding, s, args.gate_floor).requires_grad_()
                calls[s] = partial(_forward_backward, forward_ours, x, mask, grad=grad)
            times = clock(calls)
            name = "masked BN / nn.BatchNorm2d" if kind == "bn" else "masked LN / nn.LayerNorm"
            target = 1.25 if kind == "bn" else 1.3 if args.compile else 2.0
            rows += [Ratio(f"{name} forward+backward {list(shape)}, gate at s = {s:g}", 1e3 * times[s],
                           1e3 * times["theirs"], target) for s in SCALES]
    return rows


def task_count(args: argparse.Namespace, clock: Clock, compiler: Compiler) -> list[Row]:
    """The same HAT steps (an epoch's schedule) with 2 and with 100 tasks."""
    options = QUICK["resnet18"] if args.quick else MODELS["resnet18"][0]
    spec = {"kind": "hat", "arch": "resnet18", "norm": "masked_bn", "options": options, "batch": args.batch,
            "gate_floor": args.gate_floor}
    times = clock({n: make_step(spec | {"num_tasks": n}, args.device, compiler) for n in (2, 100)})
    return [Ratio(f"train step resnet18 masked_bn ({describe(options)}, epoch mean), 100 tasks / 2 tasks",
                  1e3 * times[100], 1e3 * times[2], 1.05)]


def export_inference(args: argparse.Namespace, clock: Clock, compiler: Compiler) -> list[Row]:
    """Inference of task 1's export (after tasks 0 and 1 were learned) against the plain twin."""
    rows: list[Row] = []
    for arch, (options, plain, norms) in MODELS.items():
        options = QUICK[arch] if args.quick else options
        x, y = inputs(args.batch, args.device)
        model = hat_model(arch, norms[0], options, 10, args.device, args.gate_floor)
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
        rows.append(Ratio(f"inference {arch} {norms[0]} export of task 1 ({kept:.0%} of the HAT model's parameters) "
                          "/ plain", 1e3 * times["export"], 1e3 * times["plain"], 1.0))
    return rows


def precise_validation(args: argparse.Namespace, clock: Clock, compiler: Compiler) -> list[Row]:
    """One training epoch of the default ablation's models on a Split-MNIST task (720 training images, 80 for
    validation), with validation on statistics re-estimated for the current weights against without."""
    task = split_mnist(num_tasks=1)
    rows: list[Row] = []
    for arch, options in (("resnet18", {"base_width": 4, "in_channels": 1}),
                          ("alexnet", {"width": 0.125, "in_channels": 1, "size": 32})):
        def epoch(recalibrate: bool, arch: str = arch, options: dict[str, Any] = options) -> None:
            config = TrainConfig(epochs=1, recalibrate=recalibrate)
            train_sequence(lambda: hatnorm.build(arch, num_tasks=1, norm="masked_bn", num_classes=2, **options),
                           task, HATMethod(), config, console=Console(quiet=True))

        times = clock({"precise": partial(epoch, True), "plain": partial(epoch, False)})
        rows.append(Ratio(f"training epoch {arch} masked_bn ({describe(options)}, Split-MNIST task), validation on "
                          "precise statistics / on running averages", 1e3 * times["precise"], 1e3 * times["plain"]))
    return rows


def recompiles_during_a_task(args: argparse.Namespace) -> list[Row]:
    """Graphs compiled over 20 batches of one task, once the first batch compiled."""
    rows: list[Row] = []
    for arch, (_, _, norms) in MODELS.items():
        compiler = Compiler(True)
        x, y = inputs(8, args.device)
        # compile time grows with the model, recompiles do not: the quick sizes
        model = hat_model(arch, norms[0], QUICK[arch], 10, args.device, args.gate_floor)
        step, hat = hat_step(model, x, y, compiler)
        step(hat.scale(0, 21))
        first = compiler.graphs
        for batch in range(1, 21):
            step(hat.scale(batch, 21))
        rows.append(Recompiles(f"recompiles in 20 batches of task 1, {arch} {norms[0]}", compiler.graphs - first,
                               first))
    return rows


SECTIONS = {"training": training_steps, "norms": norm_layers, "tasks": task_count, "export": export_inference,
            "validation": precise_validation, "language": language}
OWN_TABLE = ("language",)  # sections run only when --only names them, each run writing a table of its own


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run the sections, print the table and write the JSON and the docs' table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--batch", type=int, default=32, help="batch size of the training steps")
    p.add_argument("--repeats", type=int, default=15, help="timed calls per figure (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    p.add_argument("--compile", action="store_true", help="run everything under torch.compile")
    p.add_argument("--quick", action="store_true", help="small models and 5 repeats, to try the script")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    p.add_argument("--plain-sigmoid", action="store_true",
                   help="gates without the floor (hatnorm.functional.GATE_FLOOR), as in Serrà et al.'s code, "
                        "to compare")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the JSON")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "performance.md", help="Markdown file to update")
    p.add_argument("--only", nargs="+", choices=list(SECTIONS),
                   help="run only these sections (training steps, norm layers, task count, export inference, "
                        "the cost of precise-BN validation, a converted LLaMA-style language model's step and "
                        "export); "
                        "the table is printed and no file is written, except for the language section alone, "
                        "which the default run leaves out and which writes its own table")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)
    p.add_argument("--kernel-probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.gate_floor = 0.0 if args.plain_sigmoid else hatnorm.functional.GATE_FLOOR
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
    rows: list[Row] = []
    own = args.only is not None and set(args.only) <= set(OWN_TABLE)
    for name, section in SECTIONS.items():
        if (args.only is None and name not in OWN_TABLE) or (args.only is not None and name in args.only):
            console.print(f"[bold]{name}[/bold] …")
            rows += section(args, clock, compiler)
    if args.compile and not own:
        console.print("[bold]recompiles[/bold] …")
        rows += recompiles_during_a_task(args)
    label = (args.device.type + ("-compile" if args.compile else "") + ("-sigmoid" if args.plain_sigmoid else "")
             + ("-quick" if args.quick else "") + ("".join(f"-{name}" for name in args.only) if own else ""))
    where = machine(args.device, args.gate_floor)
    console.print(terminal_table(rows, f"hatnorm benchmarks ({label}; {where}; median of {args.repeats})"))
    if args.only and not own:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{label}.json"
    batch = {} if own else {"batch": args.batch}  # the language section's batch is its own, in its rows' names
    path.write_text(json.dumps({"machine": where, "repeats": args.repeats, **batch,
                                "rows": [r.to_json() for r in rows]}, indent=2))
    update_doc(args.doc, label, markdown(rows, where))
    console.print(f"wrote {path} and the {label} table in {args.doc}")


if __name__ == "__main__":
    main()
