"""Where the trainer computes: ``TrainConfig(device=...)`` and ``--device`` move the model, and every batch goes to
the model's device as it is read."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console
from toys import toy_tasks

import hatnorm
from ablations import norms
from hatnorm._inputs import device_of, split_batch
from hatnorm.data import NamedTensorDataset
from hatnorm.training import HATMethod, TrainConfig, train_sequence

CONFIG = dict(epochs=2, batch_size=32, lr=0.1)


def mlp():
    return lambda: hatnorm.build("mlp", num_tasks=2, norm="masked_bn", num_classes=2, in_features=16, hidden=(32, 32))


def run(**options):
    return train_sequence(mlp(), toy_tasks(), HATMethod(), TrainConfig(**CONFIG, **options),
                          console=Console(file=io.StringIO()))


def test_training_on_the_cpu_named_is_the_run_without_a_device() -> None:
    plain, named = run(), run(device="cpu")
    assert named.accuracy == plain.accuracy and named.loss == plain.loss


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda_gives_the_cpu_results_and_forgets_nothing() -> None:
    on_cpu, on_gpu = run(), run(device="cuda")
    assert on_gpu.accuracy[1][0] == on_gpu.accuracy[0][0]
    assert on_gpu.accuracy == pytest.approx(on_cpu.accuracy, abs=0.05)


def test_batches_go_to_the_device_asked_for() -> None:
    meta = torch.device("meta")
    x, y = split_batch((torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)), meta)
    assert x.device == meta and y.device == meta
    data = NamedTensorDataset(input_ids=torch.zeros(2, 4, dtype=torch.long), labels=torch.zeros(2, dtype=torch.long))
    named, labels = split_batch(data[:2], meta)
    assert named["input_ids"].device == meta and labels.device == meta and "labels" not in named
    assert device_of(torch.nn.Linear(2, 2, device=meta)) == meta
    assert device_of(torch.nn.ReLU()) == torch.device("cpu")


@pytest.mark.parametrize(("device", "message"), [
    ("toaster", "device must be a device name torch knows"),
    (3, "device must be a device name such as 'cpu' or 'cuda', got 3"),
    (f"cuda:{torch.cuda.device_count()}", f"this machine has {torch.cuda.device_count()} CUDA device"),
])
def test_a_device_this_machine_lacks_is_refused(device: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(device=device)


def test_the_ablation_cli_refuses_a_device_it_lacks_and_writes_nothing(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        norms.main(["--device", f"cuda:{torch.cuda.device_count()}", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "CUDA device" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
