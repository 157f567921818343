"""Checkpoints: a killed run resumes to the same bits, atomic files, refusal of another run's checkpoint, NaN/inf."""

from __future__ import annotations

import functools
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import toys
from rich.console import Console
from safetensors.torch import load_file

import hatnorm
from ablations import _cli, layernorm
from hatnorm.checkpoint import CheckpointError, load_checkpoint, lock_folder, save_checkpoint
from hatnorm.training import EWC, HATMethod, TrainConfig, split_validation, train_joint, train_sequence

WORKER = Path(__file__).with_name("checkpoint_worker.py")
ROOT = WORKER.parent.parent


# 160 training samples a task: 5 batches of 32, so a killed run has several epochs to be killed in
toy_tasks = functools.partial(toys.toy_tasks, samples=160)


def mlp(norm: str = "masked_bn", n: int = 2, in_features: int = 16):
    return lambda: hatnorm.build("mlp", num_tasks=n, norm=norm, num_classes=2, in_features=in_features,
                                 hidden=(32, 32), dropout=0.1)


CONFIG = TrainConfig(epochs=3, batch_size=32, lr=0.1, momentum=0.5, patience=1)


class Interrupted(Exception):
    """Stands for Ctrl-C: raised from the log after a number of epoch lines."""


class Log(io.StringIO):
    """A log that interrupts the run when its ``stop``-th epoch line arrives (before that epoch's checkpoint)."""

    def __init__(self, stop: int | None = None) -> None:
        super().__init__()
        self.stop, self.epochs = stop, 0

    def write(self, text: str) -> int:
        self.epochs += text.count("train loss")
        if self.stop is not None and self.epochs >= self.stop:
            raise Interrupted
        return super().write(text)


def console(stop: int | None = None) -> Console:
    return Console(file=Log(stop), width=200)


def step(out: Path) -> int:
    try:
        return json.loads((out / "checkpoint" / "checkpoint.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def worker(out: Path, *extra: str) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, str(WORKER), str(out), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def test_a_run_killed_at_several_points_resumes_to_the_same_bits(tmp_path) -> None:
    reference = worker(tmp_path / "reference")
    # checkpoints 1-3 are task 0's epochs and 4 its end, 5-8 task 1's (a plateau after its epoch 2: lr ÷ 3,
    # best weights back, a fresh optimizer), 9-12 task 2's; each kill lands just after the one awaited
    logs = []
    for kill_after in (2, 6, 8):
        run = worker(tmp_path / "killed", *(["--resume"] if logs else []))
        while run.poll() is None and step(tmp_path / "killed") < kill_after:
            time.sleep(0.005)
        run.send_signal(signal.SIGKILL)
        logs.append(run.communicate()[0])
        assert run.returncode == -signal.SIGKILL, logs[-1]
        assert not (tmp_path / "killed" / "result.json").exists()
    last = worker(tmp_path / "killed", "--resume")
    logs.append(last.communicate()[0])
    assert last.returncode == 0 and reference.wait() == 0, logs[-1] + reference.communicate()[0]
    for log in logs[1:]:
        assert "worker: resumed from checkpoint" in log
    assert "continues after epoch" in "".join(logs)  # at least one resume was mid-task
    # a resumed run does not start over, and each kill costs at most the epoch after the last checkpoint
    assert all("mnist-0/1 epoch 1:" not in log for log in logs[1:])
    assert sum(log.count("train loss") for log in logs) <= 9 + 3

    expected = json.loads((tmp_path / "reference" / "result.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "result.json").read_text())
    assert resumed == expected
    want = load_file(tmp_path / "reference" / "model.safetensors")
    got = load_file(tmp_path / "killed" / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


HOLDER = """
import sys
from hatnorm.checkpoint import lock_folder
with lock_folder(sys.argv[1]):
    print("holding", flush=True)
    sys.stdin.read()  # until the test closes stdin
"""


def holder(folder: Path) -> subprocess.Popen:
    """A process holding ``folder``'s lock, as a run writing there does, until its stdin closes."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout.readline().strip() == "holding"
    return process


@pytest.mark.parametrize("end", ["exits", "is killed"])
def test_a_second_writer_is_refused_naming_the_holder(tmp_path, end: str) -> None:
    train_sequence(mlp(), toy_tasks(), HATMethod(), CONFIG, console=console(), checkpoint_dir=tmp_path / "checkpoint")
    before = files(tmp_path / "checkpoint")
    first = holder(tmp_path / "checkpoint")
    # a fresh run would delete the holder's checkpoint when it starts, a resumed one would write beside it
    for extra in ([], ["--resume"]):
        second = worker(tmp_path, *extra)
        refused = second.communicate()[0]
        assert second.returncode != 0
        assert f"is in use by another run (process {first.pid} on " in refused, refused
    assert files(tmp_path / "checkpoint") == before
    if end == "exits":
        first.communicate("")
    else:  # a killed run's lock is not stale: the OS released it with the process
        first.kill()
        first.wait()
    third = worker(tmp_path)
    out = third.communicate()[0]
    assert third.returncode == 0, out


def test_the_folder_lock_is_exclusive_and_released(tmp_path) -> None:
    with lock_folder(tmp_path):
        assert "process" in (tmp_path / "checkpoint.lock").read_text()
        with pytest.raises(CheckpointError, match=r"is in use by another run \(process \d+ on .*, since "), \
                lock_folder(tmp_path):
            pass
    with lock_folder(tmp_path):  # released on exit; a killed holder's lock is released by the OS
        pass


def test_ewc_and_joint_runs_interrupted_mid_task_resume_exactly(tmp_path) -> None:
    tasks = toy_tasks()
    expected = train_sequence(mlp("shared_bn"), tasks, EWC(lam=10.0), CONFIG, console=console())
    # epoch lines 1-3 are task 0; the 5th is task 1's epoch 2, before its checkpoint
    with pytest.raises(Interrupted):
        train_sequence(mlp("shared_bn"), tasks, EWC(lam=10.0), CONFIG, console=console(stop=5),
                       checkpoint_dir=tmp_path / "ewc", checkpoint_every=1)
    saved = load_checkpoint(tmp_path / "ewc")
    assert saved.state["fit"]["epoch"] == 1 and len(saved.state["method"]["anchors"]) == 1
    log = console()
    resumed = train_sequence(mlp("shared_bn"), tasks, EWC(lam=10.0), CONFIG, console=log,
                             checkpoint_dir=tmp_path / "ewc", checkpoint_every=1, resume=True)
    assert resumed.accuracy == expected.accuracy and resumed.loss == expected.loss
    assert resumed.epochs == expected.epochs
    assert resumed.validation == expected.validation  # the learning curve of task 1 spans the interruption
    assert log.file.getvalue().count("train loss") == 2  # only task 1's epochs 2 and 3 ran again

    joint = train_joint(mlp("shared_bn"), tasks, CONFIG, console=console())
    with pytest.raises(Interrupted):
        train_joint(mlp("shared_bn"), tasks, CONFIG, console=console(stop=6), checkpoint_dir=tmp_path / "joint",
                    checkpoint_every=2)
    again = train_joint(mlp("shared_bn"), tasks, CONFIG, console=console(), checkpoint_dir=tmp_path / "joint",
                        resume=True)
    assert again[1] == joint[1] and again[0][0] == joint[0][0] and math.isnan(again[0][1])


def test_an_adamw_cosine_run_interrupted_mid_task_resumes_exactly(tmp_path) -> None:
    # the optimizer's moments and the schedule's position travel in the checkpoint
    config = TrainConfig(epochs=3, batch_size=32, lr=3e-3, optimizer="adamw", schedule="cosine", warmup_epochs=1,
                         weight_decay=0.05)
    tasks = toy_tasks()
    expected = train_sequence(mlp(), tasks, HATMethod(), config, console=console())
    with pytest.raises(Interrupted):
        train_sequence(mlp(), tasks, HATMethod(), config, console=console(stop=5), checkpoint_dir=tmp_path,
                       checkpoint_every=1)
    assert load_checkpoint(tmp_path).state["fit"]["scheduler"] is not None
    resumed = train_sequence(mlp(), tasks, HATMethod(), config, console=console(), checkpoint_dir=tmp_path,
                             checkpoint_every=1, resume=True)
    assert resumed.accuracy == expected.accuracy and resumed.loss == expected.loss


def test_a_finished_run_resumes_to_its_results_without_training(tmp_path) -> None:
    tasks = toy_tasks()
    first = train_sequence(mlp(), tasks, HATMethod(), CONFIG, console=console(), checkpoint_dir=tmp_path)
    log = console()
    again = train_sequence(mlp(), tasks, HATMethod(), CONFIG, console=log, checkpoint_dir=tmp_path, resume=True)
    assert again == first
    assert "train loss" not in log.file.getvalue() and "2 of 2 tasks done" in log.file.getvalue()


def test_a_killed_save_leaves_the_last_complete_checkpoint(tmp_path) -> None:
    identity = {"run": "test"}
    save_checkpoint(tmp_path, {"w": torch.zeros(3), "epoch": 1}, identity=identity)
    save_checkpoint(tmp_path, {"w": torch.ones(3), "epoch": 2}, identity=identity)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["checkpoint-000002.safetensors", "checkpoint.json"]
    # what a save killed at any moment can leave: half-written temporary files, a tensor file the index
    # does not name yet
    (tmp_path / "checkpoint-000003.safetensors.4242.tmp").write_bytes(b"\x00" * 10)
    (tmp_path / "checkpoint-000003.safetensors").write_bytes(b"truncated")
    (tmp_path / "checkpoint.json.4242.tmp").write_text('{"format": ')
    saved = load_checkpoint(tmp_path, identity=identity)
    assert saved.step == 2 and saved.state["epoch"] == 2 and torch.equal(saved.state["w"], torch.ones(3))
    # the next save takes a fresh name and removes the leftovers
    save_checkpoint(tmp_path, {"w": torch.full((3,), 3.0), "epoch": 3}, identity=identity)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["checkpoint-000004.safetensors", "checkpoint.json"]
    assert load_checkpoint(tmp_path).state["epoch"] == 3
    (tmp_path / "checkpoint-000004.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"names the tensor file checkpoint-000004\.safetensors, which is "):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path / "empty") is None


def test_a_flipped_bit_in_the_tensor_file_is_refused(tmp_path) -> None:
    tasks = toy_tasks()
    train_sequence(mlp(), tasks, HATMethod(), CONFIG, console=console(), checkpoint_dir=tmp_path, checkpoint_every=1)
    tensor_file = next(tmp_path.glob("checkpoint-*.safetensors"))
    data = bytearray(tensor_file.read_bytes())
    data[-5] ^= 0x10  # one bit of the last tensor's values
    tensor_file.write_bytes(bytes(data))
    before = files(tmp_path)
    match = rf"{tensor_file.name} does not match the SHA-256 that .*checkpoint\.json recorded for it"
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path)
    # the finished run's stored results are not returned beside corrupted weights
    with pytest.raises(CheckpointError, match=match):
        train_sequence(mlp(), tasks, HATMethod(), CONFIG, console=console(), checkpoint_dir=tmp_path, resume=True)
    assert files(tmp_path) == before


def files(folder: Path) -> dict[str, bytes]:
    """The checkpoint's files; ``checkpoint.lock`` only names the last run that held the folder."""
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.name != "checkpoint.lock"}


@pytest.mark.parametrize(("change", "message"), [
    ("arch", "arch: 'mlp' in the checkpoint, 'alexnet' in this run"),
    ("norm", "norm: 'masked_bn' in the checkpoint, 'task_bn' in this run"),
    ("tasks", "num_tasks: 2 in the checkpoint, 3 in this run"),
    ("seed", "config.seed: 0 in the checkpoint, 1 in this run"),
    ("data", "tasks.1.test_sha256: "),  # one changed pixel: another seed's data, say
])
def test_a_checkpoint_of_another_run_is_refused_and_left_as_it_is(tmp_path, change: str, message: str) -> None:
    tasks = toy_tasks(3, samples=64, shape=(1, 32, 32))
    config = TrainConfig(epochs=1, batch_size=32)
    first = train_sequence(mlp(in_features=1024), tasks[:2], HATMethod(), config, console=console(),
                           info={"arch": "mlp", "norm": "masked_bn"}, checkpoint_dir=tmp_path)
    before = files(tmp_path)
    build, info, n, run_tasks = mlp(in_features=1024), {"arch": "mlp", "norm": "masked_bn"}, 2, tasks
    if change == "arch":
        info["arch"] = "alexnet"
        build = lambda: hatnorm.build("alexnet", num_tasks=2, norm="masked_bn", num_classes=2,  # noqa: E731
                                      width=0.05, in_channels=1, size=32)
    elif change == "norm":
        info["norm"], build = "task_bn", mlp("task_bn", in_features=1024)
    elif change == "tasks":
        build, n = mlp(n=3, in_features=1024), 3
    elif change == "data":
        run_tasks = toy_tasks(3, samples=64, shape=(1, 32, 32))
        run_tasks[1].test.tensors[0][0, 0, 0, 0] += 1
    else:
        config = TrainConfig(epochs=1, batch_size=32, seed=1)
    with pytest.raises(CheckpointError, match="written by a different run") as refused:
        train_sequence(build, run_tasks[:n], HATMethod(), config, console=console(), info=info, checkpoint_dir=tmp_path,
                       resume=True)
    assert message in str(refused.value)
    assert files(tmp_path) == before
    again = train_sequence(mlp(in_features=1024), tasks[:2], HATMethod(), TrainConfig(epochs=1, batch_size=32),
                           console=console(), info={"arch": "mlp", "norm": "masked_bn"}, checkpoint_dir=tmp_path,
                           resume=True)
    assert again == first


def test_without_architecture_info_the_modules_and_shapes_name_the_difference(tmp_path) -> None:
    config = TrainConfig(epochs=1, batch_size=32)
    train_sequence(mlp("masked_bn"), toy_tasks(samples=64), HATMethod(), config, console=console(),
                   checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"modules\.norms\.0: 'MaskedBatchNorm' in the checkpoint, "
                                              r"'PostGateBatchNorm' in this run"):
        train_sequence(mlp("post_gate_bn"), toy_tasks(samples=64), HATMethod(), config, console=console(),
                       checkpoint_dir=tmp_path, resume=True)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_inputs_raise_or_are_skipped(bad: float) -> None:
    tasks = toy_tasks(1, samples=320)
    train, _ = split_validation(tasks[0].train, 0.1, seed=0)
    tasks[0].train.tensors[0][train.indices[0], 3] = bad
    config = TrainConfig(epochs=2, batch_size=32, lr=0.1)
    with pytest.raises(ValueError, match=r"task 0 \(toy-0\), epoch 1, batch \d+ of 9: the inputs hold NaN or inf; "
                                         r".*TrainConfig\(nonfinite='skip'\)"):
        train_sequence(mlp(n=1), tasks, HATMethod(), config, console=console())
    log = console()
    skipping = TrainConfig(epochs=2, batch_size=32, lr=0.1, nonfinite="skip")
    result = train_sequence(mlp(n=1), tasks, HATMethod(), skipping, console=log)
    assert result.skipped == [2] and log.file.getvalue().count("skipped 1 non-finite batches") == 2
    assert result.accuracy[0][0] >= 0.75  # learnt without the skipped batch (the toy classes have a gap)
    assert all(torch.isfinite(torch.tensor(loss)) for loss in result.loss[0])


def test_hat_state_round_trips_and_bad_state_changes_nothing() -> None:
    model = mlp(n=3)()
    hat = hatnorm.HAT(model)
    hat.begin_task(0)
    hat.end_task()
    hat.begin_task(1)
    other = hatnorm.HAT(model)
    other.load_state_dict(hat.state_dict())
    assert other.state_dict() == {"learned_tasks": [0], "task": 1}
    assert other.gradient_multipliers().keys() == hat.gradient_multipliers().keys()
    assert all(torch.equal(a, b) for a, b in zip(other.gradient_multipliers().values(),
                                                 hat.gradient_multipliers().values(), strict=True))
    for bad, message in [({"learned_tasks": [0, 0], "task": None}, "must be a list of distinct tasks"),
                         ({"learned_tasks": [3], "task": None}, r"must be in \[0, 3\), got 3"),
                         ({"learned_tasks": [0], "task": 0}, "must be a task not learned yet, got 0")]:
        with pytest.raises(ValueError, match=message):
            other.load_state_dict(bad)
        assert other.state_dict() == {"learned_tasks": [0], "task": 1}


def _trained_on_task_0() -> tuple[dict, dict]:
    """A model's and its HAT's state after task 0, with task 1 begun."""
    model = mlp(n=3)()
    hat = hatnorm.HAT(model)
    hat.begin_task(0)
    with torch.no_grad():
        for gate in hat.gates:
            gate.embedding[0].uniform_(-1, 1)  # task 0 selects about half of every layer's units
    hat.end_task()
    hat.begin_task(1)
    return {k: v.clone() for k, v in model.state_dict().items()}, hat.state_dict()


def step_task_1(model, hat) -> None:
    model.train()
    x, y = torch.randn(8, 16), torch.randint(0, 2, (8,))
    hat.loss(torch.nn.functional.cross_entropy(model(x, task=1, s=10.0), y), 10.0).backward()
    hat.protect(10.0)


def test_hat_state_loaded_before_the_model_state_is_refused() -> None:
    model_state, hat_state = _trained_on_task_0()
    # the documented order: model first, then HAT, which begins task 1 from the loaded masks
    model = mlp(n=3)()
    hat = hatnorm.HAT(model)
    model.load_state_dict(model_state)
    hat.load_state_dict(hat_state)
    step_task_1(model, hat)
    # reloading the same state during the task (the trainer's restore of its best weights) is fine
    model.load_state_dict(model_state)
    step_task_1(model, hat)
    # HAT first: its multipliers come from the fresh model's empty masks, then the masks change under them
    model = mlp(n=3)()
    hat = hatnorm.HAT(model)
    hat.load_state_dict(hat_state)
    model.load_state_dict(model_state)
    with pytest.raises(RuntimeError, match=r"the masks of gate gates\.0 changed after begin_task\(1\), so the "
                                           r"gradient multipliers no longer match them.*Load the model's state first"):
        step_task_1(model, hat)


def test_checkpoint_options_are_checked_before_anything_runs(tmp_path) -> None:
    with pytest.raises(ValueError, match="nonfinite must be 'raise' or 'skip', got 'ignore'"):
        TrainConfig(nonfinite="ignore")
    with pytest.raises(ValueError, match="checkpoint_every must be an int ≥ 1, got 0"):
        train_sequence(mlp(), toy_tasks(), HATMethod(), CONFIG, checkpoint_dir=tmp_path, checkpoint_every=0)
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        train_sequence(mlp(), toy_tasks(), HATMethod(), CONFIG, resume=True)
    with pytest.raises(ValueError, match="checkpoint_every=2 needs checkpoint_dir"):
        train_joint(mlp(), toy_tasks(), CONFIG, checkpoint_every=2)
    assert not any(tmp_path.iterdir())


LAYERNORM = ["--tasks", "2", "--epochs", "1", "--seeds", "0", "--dim", "8", "--depth", "1", "--patch-size", "8",
             "--norms", "masked_ln", "--no-converted", "--positions", "pre", "--c", "0.75"]


def test_the_ablation_resumes_a_killed_run(tmp_path, monkeypatch, capsys) -> None:
    expected = layernorm.main([*LAYERNORM, "--out", str(tmp_path / "reference")])
    # joint training writes epoch lines 1-2, the HAT run 3-4: stop at its task 1, before that task's checkpoint
    monkeypatch.setattr(_cli, "console", lambda: console(stop=4))
    with pytest.raises(Interrupted):
        layernorm.main([*LAYERNORM, "--out", str(tmp_path / "killed"), "--checkpoint-every", "1"])
    monkeypatch.undo()
    capsys.readouterr()
    resumed = layernorm.main([*LAYERNORM, "--out", str(tmp_path / "killed"), "--resume"])
    out = capsys.readouterr().out
    assert "vit_micro joint s0: resumed from checkpoint" in out and "2 of 2 joint models trained" in out
    assert "vit_micro HAT masked LN s0: resumed from checkpoint" in out and "1 of 2 tasks done" in out
    assert out.count("train loss") == 1 + 2  # the HAT run's task 1, then the SGD run
    assert resumed["variants"].keys() == expected["variants"].keys()
    untimed = {"seconds": 0, "joint_seconds": 0}
    for label, r in expected["variants"].items():
        # json: NaN (joint accuracy above the diagonal) compares equal to NaN
        assert json.dumps(resumed["variants"][label]["runs"]["0"] | untimed) == json.dumps(r["runs"]["0"] | untimed)
        assert resumed["variants"][label]["summary"] == r["summary"]
    # other options than the killed run's: refused, with the difference named
    with pytest.raises(SystemExit, match=r"config\.patience: 5 in the checkpoint, 2 in this run"):
        layernorm.main([*LAYERNORM, "--out", str(tmp_path / "killed"), "--resume", "--patience", "2"])


def test_the_ablation_options(capsys) -> None:
    with pytest.raises(SystemExit):
        layernorm.main(["--checkpoint-every", "0"])
    assert "--checkpoint-every: must be an int ≥ 1, got 0" in capsys.readouterr().err
    budget = _cli.Budget(smoke=4, converged=100)
    usage = _cli.parser("python -m ablations.norms", "", budget=budget, out="runs/norms").format_help()
    assert "--resume" in usage and "--checkpoint-every N" in usage


def test_resume_says_when_it_starts_afresh_and_writes_results_where_asked(tmp_path) -> None:
    tasks = toy_tasks()
    log = console()
    first = train_sequence(mlp(), tasks, HATMethod(), CONFIG, console=log, checkpoint_dir=tmp_path / "typo",
                           resume=True)
    assert f"resume asked, but {tmp_path / 'typo'} holds no checkpoint: starting afresh" in log.file.getvalue()
    # a finished run resumed into another results folder writes its results there
    again = train_sequence(mlp(), tasks, HATMethod(), CONFIG, console=console(), checkpoint_dir=tmp_path / "typo",
                           resume=True, out_dir=tmp_path / "results")
    assert again == first
    assert json.loads((tmp_path / "results" / "results.json").read_text())["accuracy"] == first.accuracy


def test_an_unwritable_results_folder_is_refused_before_training(tmp_path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    log = console()
    with pytest.raises(PermissionError, match=rf"^out_dir: {blocker / 'out'} is not a folder this run can write to"):
        train_sequence(mlp(), toy_tasks(), HATMethod(), CONFIG, console=log, out_dir=blocker / "out")
    assert "train loss" not in log.file.getvalue()
    with pytest.raises(SystemExit) as exit_:
        layernorm.main([*LAYERNORM, "--out", str(blocker / "out")])
    assert exit_.value.code == 2
    assert f"--out: {blocker / 'out'} is not a folder this run can write to" in capsys.readouterr().err


def test_an_index_missing_a_key_is_refused_naming_it(tmp_path) -> None:
    save_checkpoint(tmp_path, {"w": torch.zeros(3)}, identity={"run": "test"})
    index = json.loads((tmp_path / "checkpoint.json").read_text())
    del index["sha256"], index["state"]
    (tmp_path / "checkpoint.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"checkpoint\.json lacks sha256, state: it is not a complete checkpoint "
                                              r"index$"):
        load_checkpoint(tmp_path)
