"""One typed row per kind of benchmark result, each rendered once: the same cells go to the terminal table and
to the Markdown table in the docs, and the same fields to the JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from rich.table import Table

COLUMNS = ("benchmark", "HAT / export (ms)", "baseline (ms)", "ratio", "target", "peak memory ratio", "recompiles")


@dataclass(frozen=True)
class Ratio:
    """A HAT (or exported) call against its baseline on the same input.

    Args:
        benchmark: What was timed, as the table names it.
        hat_ms: The HAT call's median time.
        base_ms: The baseline's median time.
        target: The ratio SPEC asks for at most, if any.
        hat_mib: The HAT step's peak memory, where measured.
        base_mib: The baseline step's peak memory, where measured.
        recompiles: Graphs compiled again when the scale changed (under ``--compile``).
    """

    benchmark: str
    hat_ms: float
    base_ms: float
    target: float | None = None
    hat_mib: float | None = None
    base_mib: float | None = None
    recompiles: int | None = None

    @property
    def ratio(self) -> float:
        return self.hat_ms / self.base_ms

    @property
    def memory_ratio(self) -> float | None:
        return None if self.hat_mib is None or self.base_mib is None else self.hat_mib / self.base_mib

    def cells(self) -> tuple[str, ...]:
        target = "" if self.target is None else f"≤ {self.target:.2f}"
        memory = ("" if self.memory_ratio is None
                  else f"{self.memory_ratio:.2f} ({self.hat_mib:.0f} / {self.base_mib:.0f} MiB)")
        recompiles = "" if self.recompiles is None else str(self.recompiles)
        return (self.benchmark, f"{self.hat_ms:.2f}", f"{self.base_ms:.2f}", f"{self.ratio:.3f}", target, memory,
                recompiles)

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"ratio": self.ratio, "memory_ratio": self.memory_ratio}


@dataclass(frozen=True)
class FixedMemory:
    """Memory a process pays once, whatever the model.

    Args:
        benchmark: What was measured.
        fixed_mib: The resident memory it adds.
    """

    benchmark: str
    fixed_mib: float

    def cells(self) -> tuple[str, ...]:
        return self.benchmark, "", "", "", "", f"{self.fixed_mib:.0f} MiB", ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Recompiles:
    """Graphs compiled during a task under ``torch.compile`` (the target is none).

    Args:
        benchmark: The model and the batches counted.
        recompiles: Graphs compiled after the first batch.
        graphs: Graphs the first batch compiled.
    """

    benchmark: str
    recompiles: int
    graphs: int

    def cells(self) -> tuple[str, ...]:
        return self.benchmark, "", "", "", "0", "", str(self.recompiles)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


Row = Ratio | FixedMemory | Recompiles


def _columns(rows: list[Row]) -> list[int]:
    """The columns to show: all but the recompile count where no row has one."""
    keep = range(len(COLUMNS))
    return [i for i in keep if i != COLUMNS.index("recompiles") or any(r.cells()[i] for r in rows)]


def terminal_table(rows: list[Row], title: str) -> Table:
    """The rows as a rich table."""
    columns = _columns(rows)
    table = Table(title=title)
    for i in columns:
        table.add_column(COLUMNS[i], justify="left" if i == 0 else "right")
    for r in rows:
        cells = r.cells()
        table.add_row(*(cells[i] for i in columns))
    return table


def markdown(rows: list[Row], machine: str) -> str:
    """The rows as the Markdown table the docs hold, under the machine line."""
    columns = _columns(rows)
    lines = [f"Measured on {machine}.", "", "| " + " | ".join(COLUMNS[i] for i in columns) + " |",
             "|---" + "|---:" * (len(columns) - 1) + "|"]
    for r in rows:
        cells = r.cells()
        lines.append("| " + " | ".join(cells[i] for i in columns) + " |")
    return "\n".join(lines)
