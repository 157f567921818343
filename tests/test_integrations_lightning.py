"""hatnorm.integrations.lightning: two tasks trained by Lightning keep task 0 bit-identical and give the hand loop's
weights; checkpoints resume a task; DDP over 2 CPU processes."""

from __future__ import annotations

import os
import subprocess
import sys
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
from torch.utils.data import DataLoader, DistributedSampler

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


def ddp_worker(out: Path) -> None:
    """Train both tasks under Lightning's DDP on 2 CPU processes (Lightning starts the second by running this file
    again) and save each rank's weights and task 0's outputs."""
    module = Classifier(tiny_model())
    outputs = []
    rank = int(os.environ.get("LOCAL_RANK", 0))  # Lightning sets it in the process it starts
    for task, data in enumerate(tiny_tasks()):
        # each process takes every other sample, in order (Lightning's own sampler would shuffle them)
        sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=False)
        shard = DataLoader(data, batch_size=4, sampler=sampler)
        trainer(task, out, strategy="ddp_find_unused_parameters_true", devices=2,
                use_distributed_sampler=False).fit(module, shard)
        outputs.append(task_zero(module.model))
    torch.save({"state": module.model.state_dict(), "outputs": outputs, "learned": module.hat.learned_tasks},
               out / f"rank{module.global_rank}.pt")


def test_ddp_on_two_cpu_processes_keeps_task_zero_and_matches_one_process(tmp_path: Path) -> None:
    subprocess.run([sys.executable, __file__, str(tmp_path)], check=True, timeout=600,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank in ranks:
        assert rank["learned"] == [0, 1]
        assert_kept_task_zero(rank["outputs"])
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name  # the processes stay equal
    # the global batch of 2 x 4 is the one-process batch of 8: the same weights up to the order of the sums
    # (measured: at most 1e-5 on the embeddings, 1.2e-7 elsewhere; the masks equal)
    reference = tiny_model()
    hand_loop(reference, tiny_tasks())
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)


if __name__ == "__main__":
    ddp_worker(Path(sys.argv[1]))
