"""The continual trainer: determinism, files after every task, the schedule, the baselines."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
from rich.console import Console
from torch.utils.data import TensorDataset

import hatnorm
from hatnorm.data import Task
from hatnorm.training import EWC, FineTune, HATMethod, TrainConfig, recalibrate_norms, train_joint, train_sequence


def toy_tasks(n: int = 2, samples: int = 320) -> list[Task]:
    """Linearly separable 2-class tasks on 16 features, one direction per task."""
    generator = torch.Generator().manual_seed(0)
    tasks = []
    for k in range(n):
        x = torch.randn(samples + 40, 16, generator=generator)
        y = (x[:, k] > 0).long()
        tasks.append(Task(f"toy-{k}", (0, 1), TensorDataset(x[:samples], y[:samples]),
                          TensorDataset(x[samples:], y[samples:])))
    return tasks


def mlp(norm: str = "masked_bn", n: int = 2):
    return lambda: hatnorm.build("mlp", num_tasks=n, norm=norm, num_classes=2, in_features=16, hidden=(32, 32))


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


CONFIG = TrainConfig(epochs=4, batch_size=32, lr=0.1)


def test_hat_sequence_writes_results_after_every_task_and_forgets_nothing(tmp_path) -> None:
    console = quiet()
    result = train_sequence(mlp(), toy_tasks(), HATMethod(), CONFIG, out_dir=tmp_path, console=console,
                            info={"arch": "mlp"})
    assert len(result.accuracy) == 2 and result.epochs == [4, 4]
    assert result.accuracy[1][0] == result.accuracy[0][0]
    assert result.accuracy[0][0] > 0.8 and result.accuracy[1][1] > 0.8
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["accuracy"] == result.accuracy and saved["arch"] == "mlp" and saved["method"] == "hat"
    rows = list(csv.reader((tmp_path / "accuracy.csv").open()))
    assert rows[0] == ["after_task", "toy-0", "toy-1"] and len(rows) == 3
    # not a terminal: one plain log line per epoch with loss, accuracy, lr and s
    log = console.file.getvalue()
    assert log.count("epoch") == 8 and "val acc" in log and "lr 0.1" in log and "s 400" in log


def test_runs_are_deterministic_with_a_seed() -> None:
    first = train_sequence(mlp(), toy_tasks(), HATMethod(), CONFIG, console=quiet())
    second = train_sequence(mlp(), toy_tasks(), HATMethod(), CONFIG, console=quiet())
    assert first.accuracy == second.accuracy and first.loss == second.loss
    other = train_sequence(mlp(), toy_tasks(), HATMethod(), TrainConfig(epochs=4, batch_size=32, lr=0.1, seed=1),
                           console=quiet())
    assert other.loss != first.loss


def test_plateau_divides_the_learning_rate_and_stops_below_the_minimum() -> None:
    # lr 1e-3 ÷ 10 after each epoch without improvement: below lr_min 2e-5 after two plateaus
    config = TrainConfig(epochs=50, batch_size=16, lr=1e-3, lr_min=2e-5, lr_factor=10, patience=1)
    console = quiet()
    result = train_sequence(mlp(), toy_tasks(1), HATMethod(), config, console=console)
    assert result.epochs[0] < 50
    log = console.file.getvalue()
    assert "lr 0.0001 " in log or "lr 0.0001\n" in log or "lr 1e-04" in log


def test_sgd_baseline_opens_the_gates_and_forgets() -> None:
    result = train_sequence(mlp("shared_bn"), toy_tasks(), FineTune(), CONFIG, console=quiet())
    assert result.accuracy[1][1] > 0.8
    assert result.accuracy[1][0] != result.accuracy[0][0]


def test_ewc_keeps_the_weights_near_the_first_task() -> None:
    def moved(method) -> float:
        models = []

        def build():
            models.append(mlp("shared_bn")())
            return models[-1]

        snapshots = []

        class Recording(type(method)):
            def end_task(self, task, data):
                super().end_task(task, data)
                snapshots.append(models[0].fcs[0].weight.detach().clone())

        recording = Recording.__new__(Recording)
        recording.__dict__.update(method.__dict__)
        train_sequence(build, toy_tasks(), recording, CONFIG, console=quiet())
        return (snapshots[1] - snapshots[0]).norm().item()

    assert moved(EWC(lam=100.0)) < 0.6 * moved(FineTune())


def test_joint_training_learns_every_task() -> None:
    joint = train_joint(mlp("shared_bn"), toy_tasks(), CONFIG, console=quiet())
    assert joint[0][0] > 0.7 and min(joint[1]) > 0.7
    assert joint[0][1] != joint[0][1]  # NaN above the diagonal


def test_recalibration_moves_only_the_tasks_selected_statistics() -> None:
    torch.manual_seed(0)
    model = mlp()()
    norm = model.norms[0]
    before = norm.running_mean.clone()
    recalibrate_norms(model, [(1, toy_tasks()[1].train)])
    selected = model.gates[0].selection(1)
    assert torch.equal(norm.running_mean[0], before[0])
    assert torch.equal(norm.running_mean[1][~selected], before[1][~selected])
    assert not torch.equal(norm.running_mean[1][selected], before[1][selected])
    assert norm.momentum == 0.1


@pytest.mark.parametrize(("field", "value", "message"), [
    ("epochs", 0, "epochs must be an int ≥ 1, got 0"),
    ("lr", 0.0, "lr must be a finite number > 0"),
    ("batch_size", 1, "batch_size must be ≥ 2"),
    ("lr_factor", 1.0, "lr_factor must be > 1"),
    ("validation_fraction", 1.0, r"validation_fraction must be in \(0, 1\)"),
])
def test_config_rejects_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_empty_sequence_is_refused() -> None:
    with pytest.raises(ValueError, match="tasks must hold at least one task"):
        train_sequence(mlp(), [], HATMethod(), CONFIG, console=quiet())
