"""A small fake CIFAR-10 and CIFAR-100 in the on-disk format of the official ``*-python.tar.gz`` archives.

The folders, file names and pickled dicts are those ``torchvision.datasets.CIFAR10`` / ``CIFAR100`` read:
``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and ``cifar-100-python/{train, test,
meta}``; each batch a dict with ``data`` (uint8 ``[N, 3072]``, rows are R, G, B planes of 32×32) and
``labels`` (CIFAR-10) or ``fine_labels`` + ``coarse_labels`` (CIFAR-100). The official pickles were written
by Python 2, whose ``str`` keys load as ``str`` under torchvision's ``encoding="latin1"``; the keys here are
``str`` too, so torchvision's loader reads both alike. Only the md5s differ from the published files.

Every class has its own mean colour plus noise, so a model can learn the fake data.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

CIFAR10_FOLDER, CIFAR100_FOLDER = "cifar-10-batches-py", "cifar-100-python"


def _images(labels: np.ndarray, colours: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[N, 3072]``: each image its class colour (per channel) plus noise."""
    planes = colours[labels][:, :, None] + rng.normal(0, 30, size=(len(labels), 3, 1024))
    return np.clip(planes, 0, 255).astype(np.uint8).reshape(len(labels), 3072)


def _labels(num_classes: int, per_class: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(num_classes), per_class))


def _dump(path: Path, obj: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_fake_cifar(
    root: str | Path, *, train_per_class: int = 10, test_per_class: int = 4, seed: int = 0
) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """Write a fake CIFAR-10 and CIFAR-100 under ``root``.

    Args:
        root: the folder to write ``cifar-10-batches-py`` and ``cifar-100-python`` into.
        train_per_class: training images per class.
        test_per_class: test images per class.
        seed: the seed of the images and of the label order.

    Returns:
        ``{(dataset, split): (data, labels)}`` with dataset ``"cifar10"`` / ``"cifar100"`` and split
        ``"train"`` / ``"test"``: what was written, in file order (data uint8 ``[N, 3072]``).
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    written = {}

    folder = root / CIFAR10_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    colours = rng.uniform(30, 225, size=(10, 3))
    train_labels = _labels(10, train_per_class, rng)
    train_data = _images(train_labels, colours, rng)
    batches = np.array_split(np.arange(len(train_labels)), 5)
    for i, idx in enumerate(batches, start=1):
        _dump(folder / f"data_batch_{i}", {
            "batch_label": f"training batch {i} of 5",
            "labels": train_labels[idx].tolist(),
            "data": train_data[idx],
            "filenames": [f"fake_{j}.png" for j in idx],
        })
    test_labels = _labels(10, test_per_class, rng)
    test_data = _images(test_labels, colours, rng)
    _dump(folder / "test_batch", {
        "batch_label": "testing batch 1 of 1",
        "labels": test_labels.tolist(),
        "data": test_data,
        "filenames": [f"fake_test_{j}.png" for j in range(len(test_labels))],
    })
    _dump(folder / "batches.meta", {
        "num_cases_per_batch": len(batches[0]),
        "label_names": [f"class_{c}" for c in range(10)],
        "num_vis": 3072,
    })
    written["cifar10", "train"] = (train_data, train_labels)
    written["cifar10", "test"] = (test_data, test_labels)

    folder = root / CIFAR100_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    colours = rng.uniform(30, 225, size=(100, 3))
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = _labels(100, per_class, rng)
        data = _images(labels, colours, rng)
        _dump(folder / split, {
            "filenames": [f"fake_{split}_{j}.png" for j in range(len(labels))],
            "batch_label": f"{split}ing batch 1 of 1",
            "fine_labels": labels.tolist(),
            "coarse_labels": (labels // 5).tolist(),
            "data": data,
        })
        written["cifar100", split] = (data, labels)
    _dump(folder / "meta", {
        "fine_label_names": [f"fine_{c}" for c in range(100)],
        "coarse_label_names": [f"coarse_{c}" for c in range(20)],
    })
    return written
