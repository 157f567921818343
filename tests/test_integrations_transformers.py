"""hatnorm.integrations.transformers: two tasks trained by the transformers Trainer (a converted ViT and a gated
MLP) keep task 0 bit-identical and give the hand loop's weights; the Trainer's own clip order, measured."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from test_integrations import (
    assert_kept_task_zero,
    assert_same_weights,
    hand_loop,
    sgd,
    task_zero,
    tiny_model,
    tiny_tasks,
)
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import hatnorm
from hatnorm.integrations.transformers import HATTrainer


class Items(Dataset):
    """A dataset of ``(x, y)`` pairs as the Trainer's ``{"pixel_values": x, "labels": y}`` items."""

    def __init__(self, pairs: TensorDataset) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.pairs[i]
        return {"pixel_values": x, "labels": y}


def tiny_vit(seed: int = 0) -> nn.Module:
    """hatnorm.convert of a small transformers ViTForImageClassification built from a config."""
    torch.manual_seed(seed)
    config = transformers.ViTConfig(image_size=4, patch_size=2, num_channels=2, hidden_size=8, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=16, num_labels=2)
    return hatnorm.convert(transformers.ViTForImageClassification(config), num_tasks=2, norm="masked_ln",
                           num_classes=2)


def as_images(tasks: list[TensorDataset]) -> list[TensorDataset]:
    """The tiny tasks' 8 features as images [2, 2, 2] for the ViT (32 values: the features, repeated)."""
    return [TensorDataset(x.repeat(1, 4).view(-1, 2, 4, 4), y) for x, y in (t.tensors for t in tasks)]


MODELS = {"vit": (tiny_vit, as_images), "mlp": (tiny_model, lambda tasks: tasks)}


def arguments(tmp_path: Path, **options) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(**dict(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=2, report_to="none",
        save_strategy="no", logging_strategy="no", use_cpu=True, train_sampling_strategy="sequential",
        lr_scheduler_type="constant", disable_tqdm=True, max_grad_norm=0.0) | options)


def train_tasks(model: nn.Module, tasks: list[TensorDataset], tmp_path: Path, *, trainer_clip: float = 0.0,
                **options) -> list[torch.Tensor]:
    hat = hatnorm.HAT(model)
    outputs = []
    for task, data in enumerate(tasks):
        trainer = HATTrainer(model=model, args=arguments(tmp_path, **options), train_dataset=Items(data),
                             optimizers=(sgd(model), None), hat=hat, task=task)
        if trainer_clip:  # the Trainer's own clip, before the callback's protection
            trainer.args.max_grad_norm = trainer_clip
        trainer.train()
        outputs.append(task_zero(model, data.tensors[0].shape[1:]))
    assert hat.learned_tasks == [0, 1]
    return outputs


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(("options", "loop"), [
    ({}, {}),
    # groups of 2 of the 4 batches of an epoch (the Trainer divides a short last group's losses by its own length)
    ({"gradient_accumulation_steps": 2, "per_device_train_batch_size": 6}, {"accumulate": 2, "batch_size": 6}),
    ({"max_grad_norm": 0.05}, {"clip": 0.05}),  # HATTrainer clips after protection: Serrà's order
], ids=["plain", "accumulate", "clip"])
def test_two_tasks_keep_task_zero_and_match_the_hand_loop(tmp_path: Path, name: str, options: dict,
                                                          loop: dict) -> None:
    make, data = MODELS[name]
    model = make()
    assert_kept_task_zero(train_tasks(model, data(tiny_tasks()), tmp_path, **options))
    reference = make()
    hand_loop(reference, data(tiny_tasks()), **loop)
    assert_same_weights(model, reference)


def test_the_trainers_own_clip_is_the_clip_before_protection(tmp_path: Path) -> None:
    model = tiny_model()
    assert_kept_task_zero(train_tasks(model, tiny_tasks(), tmp_path, trainer_clip=0.05))
    before, after = tiny_model(), tiny_model()
    hand_loop(before, tiny_tasks(), clip=0.05, clip_first=True)
    hand_loop(after, tiny_tasks(), clip=0.05)
    assert_same_weights(model, before)
    # the measured difference: the clip coefficient taken on the unprotected gradients
    head = "task_heads.heads.1.weight"
    assert not torch.equal(model.state_dict()[head], after.state_dict()[head])
