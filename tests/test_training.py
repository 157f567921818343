"""The continual trainer: determinism, files after every task, the schedule, the baselines."""

from __future__ import annotations

import csv
import io
import json
import math
import re

import pytest
import torch
from rich.console import Console
from toys import toy_tasks

import hatnorm
from hatnorm.training import (
    EWC,
    FineTune,
    HATMethod,
    TrainConfig,
    evaluate,
    precise_statistics,
    recalibrate_norms,
    split_validation,
    train_joint,
    train_sequence,
)


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
    # a learning check, not a guarantee: the toy tasks have a gap between classes, and every seed and
    # machine we measured reaches 0.95-1.0; 0.8 fails only a trainer that does not learn
    assert result.accuracy[0][0] > 0.8 and result.accuracy[1][1] > 0.8
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["accuracy"] == result.accuracy and saved["arch"] == "mlp" and saved["method"] == "hat"
    rows = list(csv.reader((tmp_path / "accuracy.csv").open()))
    assert rows[0] == ["after_task", "toy-0", "toy-1"] and len(rows) == 3
    # not a terminal: one plain log line per epoch with loss, accuracy, lr and s
    log = console.file.getvalue()
    assert log.count("epoch") == 8 and "val acc" in log and "lr 0.1" in log and "s 400" in log
    # the learning curve: each task's validation accuracy after every epoch, as logged, and in the file
    logged = [float(a) for a in re.findall(r"val acc (\S+)", log)]
    assert [len(c) for c in result.validation] == result.epochs
    assert [round(a, 4) for c in result.validation for a in c] == logged
    assert saved["validation"] == result.validation


def test_runs_are_deterministic_with_a_seed() -> None:
    first = train_sequence(mlp(), toy_tasks(), HATMethod(), CONFIG, console=quiet())
    second = train_sequence(mlp(), toy_tasks(), HATMethod(), CONFIG, console=quiet())
    assert first.accuracy == second.accuracy and first.loss == second.loss
    other = train_sequence(mlp(), toy_tasks(), HATMethod(), TrainConfig(epochs=4, batch_size=32, lr=0.1, seed=1),
                           console=quiet())
    assert other.loss != first.loss


def test_plateau_divides_the_learning_rate_and_stops_below_the_minimum() -> None:
    # at lr 1e-30 every update is below half an ulp of its weight, and no norm keeps running statistics,
    # so the validation loss repeats exactly: epoch 1 improves on the untrained model, every later epoch
    # is a plateau (patience 1) that divides lr by 10, and after the third division lr < lr_min stops
    config = TrainConfig(epochs=50, batch_size=16, lr=1e-30, lr_min=5e-33, lr_factor=10, patience=1)
    console = quiet()
    result = train_sequence(mlp("none"), toy_tasks(1), HATMethod(), config, console=console)
    assert result.epochs == [4]
    assert re.findall(r"lr (\S+)", console.file.getvalue()) == ["1e-30", "1e-30", "1e-31", "1e-32"]


def test_sgd_baseline_opens_the_gates_and_forgets() -> None:
    result = train_sequence(mlp("shared_bn"), toy_tasks(), FineTune(), CONFIG, console=quiet())
    assert result.accuracy[1][1] > 0.8  # a learning check with a wide margin, as above
    # fine-tuning moves what task 0 uses: its test loss changes (its accuracy may happen not to)
    assert result.loss[1][0] != result.loss[0][0]


def test_ewc_anchors_each_task_and_penalises_the_fisher_weighted_distance() -> None:
    # what EWC computes, checked by hand; how far its weights then move is a training outcome that
    # depends on how well task 0 is fitted (a fitted task has a small empirical Fisher), not a guarantee
    models, ends = [], []

    def build():
        models.append(mlp("shared_bn")())
        return models[-1]

    class Recording(EWC):
        def end_task(self, task, data):
            ends.append({n: t.clone() for n, t in models[0].state_dict().items()})
            super().end_task(task, data)

    method = Recording(lam=100.0, fisher_batches=4)
    tasks = toy_tasks()
    train_sequence(build, tasks, method, CONFIG, console=quiet())
    model = models[0]
    params = dict(model.named_parameters())
    assert len(method.anchors) == 2
    for k, (fisher, anchor) in enumerate(method.anchors):
        assert all(torch.equal(anchor[n], ends[k][n]) for n in anchor)
        # the Fisher: squared gradients of the summed log-likelihood of each of the first 4 batches of 32,
        # divided by the samples seen (of the 288 the seeded validation split leaves for training)
        model.load_state_dict(ends[k])
        model.eval()
        train = torch.utils.data.DataLoader(split_validation(tasks[k].train, 0.1, k)[0], batch_size=32)
        expected = {n: torch.zeros_like(p) for n, p in params.items()}
        for _, (x, y) in zip(range(4), train, strict=False):
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x, task=k), y, reduction="sum").backward()
            for n, p in params.items():
                if p.grad is not None:
                    expected[n] += p.grad.square()
        for n in fisher:
            torch.testing.assert_close(fisher[n], expected[n] / 128, rtol=1e-5, atol=1e-9)
    # the penalty on any weights: λ/2 Σ_k Σ F_k (θ − θ*_k)², and its gradient λ Σ_k F_k (θ − θ*_k)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn_like(p), alpha=0.1)
    model.zero_grad()
    penalty = method.loss(torch.tensor(0.0), 1.0)
    penalty.backward()
    by_hand = sum((f[n] * (params[n] - a[n]).square()).sum() for f, a in method.anchors for n in f)
    torch.testing.assert_close(penalty, 50.0 * by_hand)
    for n in method.anchors[0][0]:
        grad = sum(100.0 * f[n] * (params[n] - a[n]) for f, a in method.anchors)
        torch.testing.assert_close(params[n].grad, grad.detach(), rtol=1e-5, atol=1e-8)


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


STATISTICS_NORMS = [n for n in hatnorm.list_norms("batch") if hatnorm.get_norm(n).batch_statistics]


@pytest.mark.parametrize("name", STATISTICS_NORMS)
def test_every_norm_with_running_statistics_recalibrates_as_it_declares(name: str) -> None:
    # built-in and plug-in norms alike: re-estimation moves the slot the norm names for the task, to the
    # mean of the batch statistics (one pass with momentum 1/k), and precise validation restores it all
    torch.manual_seed(0)
    model = mlp(name)()
    norm = model.norms[0]
    assert norm.running_statistics(), f"{name} declares batch statistics but no running statistics"
    data = toy_tasks()[1].train
    slot = norm.statistics_slot(1)
    before = [b.clone() for b in norm.running_statistics()]
    with precise_statistics(model, [(1, data)], 32, nonfinite="raise"):
        inside = [b.clone() for b in norm.running_statistics()]
    assert all(torch.equal(b, old) for b, old in zip(norm.running_statistics(), before, strict=True))
    recalibrate_norms(model, [(1, data)], 32)
    after = norm.running_statistics()
    assert all(torch.equal(b, c) for b, c in zip(after, inside, strict=True))
    assert norm.momentum == 0.1  # put back after the pass
    if slot is not None:  # per-task statistics: every other task's slot untouched
        assert all(torch.equal(b[0], old[0]) for b, old in zip(after, before, strict=True))
    # the mean of the batch statistics over the pass: the training batches' per-unit means, averaged
    model.eval()
    features = []
    hook = model.norms[0].register_forward_pre_hook(lambda m, args: features.append(args[0]))
    with torch.no_grad():
        for x, _ in torch.utils.data.DataLoader(data, batch_size=32, drop_last=len(data) > 32):
            model(x, task=1)
    hook.remove()
    expected = torch.stack([f.mean(0) for f in features]).mean(0)
    moved = (after[0][1] if slot is not None else after[0]) != (before[0][1] if slot is not None else before[0])
    assert moved.any()
    got = after[0][1] if slot is not None else after[0]
    torch.testing.assert_close(got[moved], expected[moved], rtol=1e-5, atol=1e-6)


def test_precise_statistics_leave_no_trace() -> None:
    torch.manual_seed(0)
    model = mlp()()
    task = toy_tasks()[0]
    model.train()
    model(task.train.tensors[0][:64], task=0, s=400.0)  # statistics from one momentum step
    before = {n: b.clone() for n, b in model.named_buffers()}
    with precise_statistics(model, [(0, task.train)], 64, nonfinite="raise"):
        inside = {n: b.clone() for n, b in model.named_buffers()}
    assert any(not torch.equal(inside[n], before[n]) for n in before)
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())


def test_validation_and_the_kept_weights_see_statistics_of_the_current_weights() -> None:
    models = []

    def build():
        models.append(mlp()())
        return models[-1]

    tasks = toy_tasks(1)
    train_sequence(build, tasks, HATMethod(), CONFIG, console=quiet())
    model = models[0]
    kept = {n: b.clone() for n, b in model.named_buffers()}
    # the statistics the run ended with are exactly those one recalibration pass gives the kept weights
    recalibrate_norms(model, [(0, split_validation(tasks[0].train, 0.1, 0)[0])], CONFIG.batch_size)
    assert all(torch.equal(b, kept[n]) for n, b in model.named_buffers())


def test_adamw_with_warmup_and_cosine_decays_per_batch_and_forgets_nothing() -> None:
    config = TrainConfig(epochs=3, batch_size=32, lr=3e-3, optimizer="adamw", schedule="cosine", warmup_epochs=1,
                         weight_decay=0.05)
    console = quiet()
    result = train_sequence(mlp(), toy_tasks(), HATMethod(), config, console=console)
    assert result.epochs == [3, 3]  # the cosine schedule runs every epoch
    assert result.accuracy[1][0] == result.accuracy[0][0] and result.loss[1][0] == result.loss[0][0]
    assert result.accuracy[0][0] > 0.8 and result.accuracy[1][1] > 0.8  # a learning check, as above
    # 9 batches per epoch: the first 9 warm up to the peak, the last 18 decay along the cosine to 0
    lrs = [float(v) for v in re.findall(r"lr (\S+)", console.file.getvalue())[:3]]
    assert lrs[0] == pytest.approx(3e-3, rel=1e-6)
    assert lrs[1] == pytest.approx(3e-3 * (1 + math.cos(math.pi * 9 / 18)) / 2, rel=1e-3)
    assert lrs[2] == pytest.approx(0.0, abs=1e-12)


def test_constant_schedule_keeps_the_rate_for_every_epoch_and_forgets_nothing() -> None:
    # the FG-AdaHAT paper's setting: Adam at a fixed rate for exactly `epochs` epochs, whatever validation says
    config = TrainConfig(epochs=4, batch_size=32, lr=1e-3, optimizer="adamw", schedule="constant", weight_decay=0.0,
                         patience=1)
    console = quiet()
    result = train_sequence(mlp(), toy_tasks(), HATMethod(), config, console=console)
    assert result.epochs == [4, 4]
    assert result.accuracy[1][0] == result.accuracy[0][0] and result.loss[1][0] == result.loss[0][0]
    lrs = [float(v) for v in re.findall(r"lr (\S+)", console.file.getvalue())]
    assert len(lrs) == 8 and all(lr == pytest.approx(1e-3, rel=1e-9) for lr in lrs)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("epochs", 0, "epochs must be an int ≥ 1, got 0"),
    ("lr", 0.0, "lr must be a finite number > 0"),
    ("batch_size", 1, "batch_size must be ≥ 2"),
    ("lr_factor", 1.0, "lr_factor must be > 1"),
    ("validation_fraction", 1.0, r"validation_fraction must be in \(0, 1\)"),
    ("optimizer", "adam", "optimizer must be one of 'sgd', 'adamw', got 'adam'"),
    ("schedule", "step", "schedule must be one of 'plateau', 'cosine', 'constant', got 'step'"),
    ("warmup_epochs", -1, "warmup_epochs must be an int ≥ 0, got -1"),
])
def test_config_rejects_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_empty_sequence_is_refused() -> None:
    with pytest.raises(ValueError, match="tasks must hold at least one task"):
        train_sequence(mlp(), [], HATMethod(), CONFIG, console=quiet())


# --- non-finite values anywhere, divergence ---------------------------------------------------------------


def _poisoned(split: str) -> list:
    """Toy tasks with one NaN pixel in task 0's validation or test split."""
    tasks = toy_tasks(1)
    if split == "validation":
        _, valid = split_validation(tasks[0].train, 0.1, 0)
        tasks[0].train.tensors[0][valid.indices[0], 3] = math.nan
    else:
        tasks[0].test.tensors[0][5, 3] = math.nan
    return tasks


@pytest.mark.parametrize(("split", "message"), [
    ("validation", r"task 0 \(toy-0\), epoch 1, validation, batch 1 of 1: the inputs hold NaN or inf"),
    ("test", r"after task 0 \(toy-0\), test split of task 0 \(toy-0\), batch 1 of 1: the inputs hold NaN or inf"),
])
def test_nonfinite_validation_or_test_inputs_follow_the_training_rule(split: str, message: str) -> None:
    with pytest.raises(ValueError, match=message + r"; clean the data, or pass TrainConfig\(nonfinite='skip'\)"):
        train_sequence(mlp(n=1), _poisoned(split), HATMethod(), CONFIG, console=quiet())
    skipping = TrainConfig(epochs=4, batch_size=32, lr=0.1, nonfinite="skip")
    result = train_sequence(mlp(n=1), _poisoned(split), HATMethod(), skipping, console=quiet())
    # the task is learnt (a NaN validation loss used to restore the untrained weights), its loss is finite
    assert result.accuracy[0][0] > 0.8 and math.isfinite(result.loss[0][0])


def test_evaluate_with_every_sample_left_out_says_so() -> None:
    data = toy_tasks(1)[0].test
    data.tensors[0][:, 0] = math.inf
    with pytest.raises(ValueError, match=r"^task 0: every sample holds NaN or inf inputs; nothing left to evaluate$"):
        evaluate(mlp(n=1)(), data, 0, nonfinite="skip")


@pytest.mark.parametrize(("method", "norm", "lr"), [(HATMethod, "masked_bn", 1e8), (FineTune, "shared_bn", 1e15),
                                                   (lambda: EWC(lam=10.0), "shared_bn", 1e15)])
def test_a_diverging_run_stops_naming_task_and_epoch(method, norm: str, lr: float, tmp_path) -> None:
    config = TrainConfig(epochs=4, batch_size=32, lr=lr)
    # caught where it shows: a training loss, a validation loss, or the test loss after the task (the
    # best-validation weights can still overflow once their statistics are re-estimated)
    where = r"(task 0 \(toy-0\), epoch \d+, (batch \d+ of 9|validation)|after task 0 \(toy-0\), test split of task 0)"
    with pytest.raises(FloatingPointError, match=where + r".*: the (training loss|loss) is (nan|inf|-inf) with finite "
                                                         r"inputs: training diverged"):
        train_sequence(mlp(norm), toy_tasks(), method(), config, console=quiet(), out_dir=tmp_path)
    assert not (tmp_path / "results.json").exists()  # no accuracy is reported for a diverged task


class _TaskBlind(torch.nn.Module):
    """One shared classifier that ignores the task: every task's loss is on the same scale."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(16, 2)

    def forward(self, x: torch.Tensor, task: int, s: float | None = None) -> torch.Tensor:
        return self.fc(x)


def test_joint_training_steps_on_the_mean_of_the_task_losses() -> None:
    """Tasks 0..1 are one task twice (each with its own validation split): the mean of their losses is on one
    task's scale, where their sum would be twice it."""
    task = toy_tasks(1)[0]
    console = quiet()
    train_joint(_TaskBlind, [task, task], TrainConfig(epochs=1, batch_size=32, lr=0.1), console=console)
    once, twice = (float(loss) for loss in re.findall(r"epoch 1: train loss (\S+)", console.file.getvalue()))
    assert 0.8 < twice / once < 1.25
