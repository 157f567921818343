"""Progress: a rich progress bar on a terminal, plain log lines elsewhere."""

from __future__ import annotations

from hatnorm._extras import missing

try:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
except ModuleNotFoundError as error:
    raise missing("hatnorm.training (its progress bars and log)", "rich", "progress") from error


class Display:
    """A rich progress bar on a terminal, plain log lines elsewhere (CI, files, pipes)."""

    def __init__(self, console: Console, title: str) -> None:
        self.console, self.title = console, title
        self.progress: Progress | None = None

    def __enter__(self) -> Display:
        if self.console.is_terminal:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=self.console, transient=True)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def start_task(self, name: str, epochs: int, completed: int = 0) -> None:
        if self.progress is not None:
            self.bar = self.progress.add_task(f"{self.title} {name}", total=epochs, completed=completed)

    def epoch(self, name: str, epoch: int, loss: float, accuracy: float, lr: float, s: float, skipped: int) -> None:
        text = (f"{self.title} {name} epoch {epoch + 1}: train loss {loss:.4f}  val acc {accuracy:.4f}  "
                f"lr {lr:.2g}  s {s:.4g}")
        if skipped:
            text += f"  skipped {skipped} non-finite batches"
        if self.progress is not None:
            self.progress.update(self.bar, advance=1, description=text)
        else:
            self.console.print(text, highlight=False, soft_wrap=True)

    def finish_task(self, epochs: int) -> None:
        if self.progress is not None:
            self.progress.update(self.bar, completed=epochs, total=epochs)


