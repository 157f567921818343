"""Nothing silent in training, round 2: uneven batches under torchrun, resume identity, damaged indexes,
heads too small for a task, tasks too small to train."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from reliability_worker import SAMPLES, run
from rich.console import Console
from torch.utils.data import TensorDataset
from torchrun import launch
from toys import toy_tasks

import hatnorm
from hatnorm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from hatnorm.data import Task
from hatnorm.distributed import share_weight
from hatnorm.training import HATMethod, TrainConfig, train_joint, train_sequence

WORKER = Path(__file__).with_name("reliability_worker.py")
CONFIG = TrainConfig(epochs=1, batch_size=32)

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not built into this torch")


def quiet() -> Console:
    return Console(file=io.StringIO())


def mlp(num_classes: int | list[int] = 2, tasks: int = 2):
    return lambda: hatnorm.build("mlp", num_tasks=tasks, norm="masked_bn", num_classes=num_classes, in_features=16,
                                 hidden=(32, 32))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What each rank of a 2-process gloo run under torchrun ended with, one file per case and rank."""
    return launch(WORKER, tmp_path_factory.mktemp("uneven"), threads=1)


@needs_gloo
def test_a_last_batch_shared_unevenly_ends_where_one_process_ends(two_ranks: Path) -> None:
    # a last batch of 5 goes 3 / 2: each rank's loss counts its samples as a share of the whole batch
    ranks = [torch.load(two_ranks / f"uneven.rank{r}.pt") for r in range(2)]
    single = run("uneven")
    assert ranks[0]["result"] == ranks[1]["result"]
    for key, value in single["state"].items():
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
        torch.testing.assert_close(ranks[0]["state"][key], value, atol=1e-6, rtol=0, msg=key)
    assert ranks[0]["result"]["accuracy"] == single["result"]["accuracy"]


@needs_gloo
def test_a_last_batch_too_small_to_share_is_dropped_on_every_rank(two_ranks: Path) -> None:
    # a last batch of 3 cannot give 2 ranks 2 samples each: every rank leaves it out (one process trains on it)
    ranks = [torch.load(two_ranks / f"small.rank{r}.pt") for r in range(2)]
    assert ranks[0]["result"] == ranks[1]["result"]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    assert ranks[0]["result"]["accuracy"][1][0] > 0.8
    assert SAMPLES["small"] - 5 == 43  # the case really ends in a last batch of 3


def test_resume_with_other_policy_options_is_refused(tmp_path: Path) -> None:
    tasks = toy_tasks(1, samples=64)
    train_sequence(mlp(tasks=1), tasks, HATMethod(policy=hatnorm.policies.AdaHATPolicy(alpha=0.1)), CONFIG,
                   console=quiet(), checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"method\.policy\.alpha: 0\.1 in the checkpoint, 50\.0 in this run"):
        train_sequence(mlp(tasks=1), tasks, HATMethod(policy=hatnorm.policies.AdaHATPolicy(alpha=50.0)), CONFIG,
                       console=quiet(), checkpoint_dir=tmp_path, resume=True)
    # the same options resume (the finished run's results come back)
    again = train_sequence(mlp(tasks=1), tasks, HATMethod(policy=hatnorm.policies.AdaHATPolicy(alpha=0.1)), CONFIG,
                           console=quiet(), checkpoint_dir=tmp_path, resume=True)
    assert len(again.accuracy) == 1


def test_a_flipped_bit_in_the_index_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, {"w": torch.zeros(3), "patience": 5, "lr": 0.05}, identity={"run": "test"})
    index = tmp_path / "checkpoint.json"
    data = bytearray(index.read_bytes())
    where = data.index(b'"patience": 5') + len(b'"patience": ')
    data[where] ^= 0x01  # 5 becomes 4: still JSON, another value
    index.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checkpoint\.json does not match the SHA-256 it records for itself"):
        load_checkpoint(tmp_path)


def test_a_joint_run_resumed_from_other_starting_weights_is_refused(tmp_path: Path) -> None:
    tasks = toy_tasks(1, samples=64)

    def pretrained(value: float):
        def build() -> torch.nn.Module:
            model = mlp(tasks=1)()
            with torch.no_grad():
                model.fcs[0].weight.fill_(value)
            return model
        return build

    train_joint(pretrained(0.01), tasks, CONFIG, console=quiet(), checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"initial_sha256: '[0-9a-f]{64}' in the checkpoint, '[0-9a-f]{64}' in"):
        train_joint(pretrained(0.02), tasks, CONFIG, console=quiet(), checkpoint_dir=tmp_path, resume=True)
    assert train_joint(pretrained(0.01), tasks, CONFIG, console=quiet(), checkpoint_dir=tmp_path, resume=True)


def test_a_head_smaller_than_the_task_is_named() -> None:
    x = torch.randn(64, 16)
    y = torch.arange(64) % 4
    task = Task("four", (0, 1, 2, 3), TensorDataset(x[:48], y[:48]), TensorDataset(x[48:], y[48:]))
    with pytest.raises(ValueError, match=r"task 0 \(four\): the model's head gives 2 outputs, but the task has 4 "
                                         r"classes \(labels up to 3\)"):
        train_sequence(mlp(num_classes=2, tasks=1), [task], HATMethod(), CONFIG, console=quiet())


def test_a_task_too_small_to_train_is_named_before_training() -> None:
    tasks = toy_tasks(2, samples=64)
    tasks[1] = toy_tasks(2, samples=2)[1]
    log = io.StringIO()
    with pytest.raises(ValueError, match=r"task 1 \(toy-1\): its training split holds 1 sample \(1 of 2 is held "
                                         r"out for validation; validation_fraction=0\.1\); training needs at least 2"):
        train_sequence(mlp(), tasks, HATMethod(), CONFIG, console=Console(file=log))
    assert "train loss" not in log.getvalue()  # refused before task 0 trained


def test_a_share_weighs_one_in_a_single_process() -> None:
    assert share_weight(5) == 1.0
    with pytest.raises(ValueError, match=r"batch_size must be an int ≥ the number of ranks \(1\), got 0"):
        share_weight(0)
