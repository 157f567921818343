"""hatnorm.integrations.lightning: two tasks trained by Lightning keep task 0 bit-identical and give the hand loop's
weights; checkpoints resume a task; DDP over 2 CPU processes."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from test_integrations import (
    assert_kept_task_zero,
    assert_same_weights,
    hand_loop,
    sgd,
    task_zero,
    tiny_model,
    tiny_tasks,
)
from torch.utils.data import DataLoader

from hatnorm.integrations.lightning import HATCallback, HATLightningModule


class Classifier(HATLightningModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.hat_loss(F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return sgd(self.model)


def trainer(task: int, tmp_path: Path, **options) -> pl.Trainer:
    defaults = dict(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    return pl.Trainer(**defaults | {"callbacks": [HATCallback(task)]} | options)


def fit_tasks(module: Classifier, tmp_path: Path, **options) -> list[torch.Tensor]:
    outputs = []
    for task, data in enumerate(tiny_tasks()):
        trainer(task, tmp_path, **options).fit(module, DataLoader(data, batch_size=8))
        outputs.append(task_zero(module.model))
    return outputs


@pytest.mark.parametrize(("options", "loop"), [
    ({}, {}),
    ({"accumulate_grad_batches": 2}, {"accumulate": 2}),
    ({"gradient_clip_val": 0.05}, {"clip": 0.05}),  # Lightning clips after on_before_optimizer_step: Serrà's order
], ids=["plain", "accumulate", "clip"])
def test_two_tasks_keep_task_zero_and_match_the_hand_loop(tmp_path: Path, options: dict, loop: dict) -> None:
    module = Classifier(tiny_model())
    assert_kept_task_zero(fit_tasks(module, tmp_path, **options))
    assert module.hat.learned_tasks == [0, 1]
    reference = tiny_model()
    hand_loop(reference, tiny_tasks(), **loop)
    assert_same_weights(module.model, reference)


def test_a_checkpoint_resumes_the_task_to_the_same_weights(tmp_path: Path) -> None:
    data = tiny_tasks()
    straight = Classifier(tiny_model())
    fit_tasks(straight, tmp_path)

    module = Classifier(tiny_model())
    trainer(0, tmp_path).fit(module, DataLoader(data[0], batch_size=8))
    every_epoch = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    trainer(1, tmp_path, enable_checkpointing=True, callbacks=[HATCallback(1), every_epoch]).fit(
        module, DataLoader(data[1], batch_size=8))
    checkpoint = tmp_path / "epoch=0-step=3.ckpt"  # taken after task 1's first epoch, the task still active

    resumed = Classifier(tiny_model(seed=5))  # as in a fresh process: other weights, HAT at its start
    trainer(1, tmp_path).fit(resumed, DataLoader(data[1], batch_size=8), ckpt_path=checkpoint)
    assert resumed.hat.learned_tasks == [0, 1]
    assert_same_weights(resumed.model, straight.model)
