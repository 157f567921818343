"""The two-rank launcher of the multi-process tests runs again after a rank's native crash, and only then: a
worker that raises, or crashes on both attempts, fails with every attempt's output."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch.distributed as dist
from torchrun import died_of_a_native_crash, launch

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not built into this torch")

WORKER = '''
import os, signal, sys
from pathlib import Path

out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
crashes = out.parent.parent / "crashes"
if rank == 1 and "{mode}" != "raise" and ("{mode}" == "always" or not crashes.exists()):
    crashes.touch()
    os.kill(os.getpid(), signal.SIGSEGV)
if "{mode}" == "raise":
    raise RuntimeError("the worker failed")
(out / f"rank{{rank}}.txt").write_text("done")
'''


def worker(tmp_path: Path, mode: str) -> Path:
    path = tmp_path / f"{mode}_worker.py"
    path.write_text(WORKER.format(mode=mode))
    (tmp_path / "out").mkdir()
    return path


@needs_gloo
def test_a_native_crash_on_the_first_attempt_is_run_again(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="second attempt after a native crash"):
        folder = launch(worker(tmp_path, "once"), tmp_path / "out", timeout=120)
    assert folder.name == "attempt1"
    assert sorted(p.name for p in folder.iterdir()) == ["rank0.txt", "rank1.txt"]


@needs_gloo
@pytest.mark.parametrize("mode", ["raise", "always"])
def test_a_failing_worker_fails_with_its_output(tmp_path: Path, mode: str) -> None:
    with pytest.raises(AssertionError, match="torchrun failed") as failed:
        launch(worker(tmp_path, mode), tmp_path / "out", timeout=120)
    attempts = sorted(p.name for p in (tmp_path / "out").iterdir())
    # an exception is not run again; a crash is, once
    assert attempts == (["attempt0"] if mode == "raise" else ["attempt0", "attempt1"])
    assert ("the worker failed" in str(failed.value)) == (mode == "raise")


def test_only_native_signals_count_as_crashes() -> None:
    assert died_of_a_native_crash(f"exitcode  : -{int(signal.SIGSEGV)} (pid: 1096)")
    assert died_of_a_native_crash("exitcode  : -6 (pid: 12)")
    assert not died_of_a_native_crash("exitcode  : -15 (pid: 1095)")  # SIGTERM: torchrun stopping the other rank
    assert not died_of_a_native_crash("exitcode  : 1 (pid: 1095)")
