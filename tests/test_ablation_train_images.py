"""``--train-images N``: a low-data target, each task keeping a seeded subset of its training images."""

from __future__ import annotations

import json

import pytest
import torch

from ablations import norms
from ablations._cli import fewer_training_images
from hatnorm.data import permuted_mnist, split_mnist


def _rows(data: torch.utils.data.TensorDataset) -> set[bytes]:
    return {bytes(x.numpy().tobytes()) + bytes([int(y)]) for x, y in zip(*data.tensors, strict=True)}


@pytest.mark.parametrize("images", [2, 37, 100, 800])
def test_the_subset_keeps_each_class_share_of_the_training_images_and_every_test_image(images: int) -> None:
    task = split_mnist(num_tasks=2)[1]
    kept = fewer_training_images(task, images, seed=5)
    labels = kept.train.tensors[1]
    assert len(labels) == images and (kept.name, kept.classes) == (task.name, task.classes)
    shares = task.train.tensors[1].bincount() * images / len(task.train)
    assert ((labels.bincount(minlength=2) - shares).abs() < 1).all()
    assert _rows(kept.train) <= _rows(task.train)  # the images with their own labels
    assert all(torch.equal(a, b) for a, b in zip(kept.test.tensors, task.test.tensors, strict=True))


def test_the_subset_follows_the_seed() -> None:
    task = permuted_mnist(num_tasks=1, seed=0)[0]
    first, again, other = (fewer_training_images(task, 50, seed) for seed in (1, 1, 2))
    assert torch.equal(first.train.tensors[0], again.train.tensors[0])
    assert not torch.equal(first.train.tensors[0], other.train.tensors[0])


@pytest.mark.parametrize("images", [1, 801])
def test_a_subset_outside_the_task_is_refused_naming_the_task(images: int) -> None:
    task = split_mnist(num_tasks=1)[0]
    with pytest.raises(ValueError, match=rf"task 'mnist-0/1' has 800 training images in 2 classes; the subset must "
                                         rf"keep between 2 and 800, got {images}"):
        fewer_training_images(task, images, seed=0)


def test_the_option_is_in_the_title_and_the_recorded_options(tmp_path, capsys) -> None:
    argv = ["--tasks", "2", "--epochs", "1", "--seeds", "0", "1", "--archs", "alexnet", "--alexnet-width", "0.05",
            "--norms", "masked_bn", "--no-joint", "--train-images", "40", "--out", str(tmp_path)]
    norms.main(argv)
    assert "split_mnist, 40 training images per task" in capsys.readouterr().out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["options"]["train_images"] == 40
    assert saved["title"].startswith("Norms under HAT (split_mnist, 40 training images per task, 2 tasks")


def test_the_option_refuses_more_images_than_a_task_has(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        norms.main(["--tasks", "1", "--train-images", "5000", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "--train-images: task 'mnist-0/1' has 800 training images" in capsys.readouterr().err
