"""Task sequences: Split-, Permuted- and Rotated-MNIST from the embedded digits, Serrà's CIFAR from a fake folder."""

from __future__ import annotations

import dataclasses
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_cifar import CIFAR10_FOLDER, CIFAR100_FOLDER, write_fake_cifar

from hatnorm import data
from hatnorm.data import (
    CIFAR10_FILES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_FILES,
    CIFAR100_MEAN,
    CIFAR100_STD,
    MNIST_MEAN,
    MNIST_STD,
    Task,
    cifar_sequence,
    fingerprint,
    permuted_mnist,
    rotate,
    rotated_mnist,
    split_mnist,
)

# --- Split-MNIST ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist() -> list[Task]:
    return split_mnist()


def test_split_mnist_has_five_pair_tasks(mnist: list[Task]) -> None:
    assert [t.name for t in mnist] == ["mnist-0/1", "mnist-2/3", "mnist-4/5", "mnist-6/7", "mnist-8/9"]
    for k, task in enumerate(mnist):
        assert task.classes == (2 * k, 2 * k + 1)
        assert task.num_classes == 2
        assert (len(task.train), len(task.test)) == (800, 200)
        for part in (task.train, task.test):
            images, labels = part.tensors
            assert images.shape[1:] == (1, 32, 32)
            assert images.dtype == torch.float32
            assert labels.dtype == torch.int64
            assert labels.bincount().tolist() == [len(part) // 2] * 2  # stratified: each class half


def test_split_mnist_is_normalised_and_padded(mnist: list[Task]) -> None:
    images = mnist[0].train.tensors[0]
    background = -MNIST_MEAN / MNIST_STD
    border = torch.cat([images[..., :2, :].flatten(), images[..., -2:, :].flatten(),
                        images[..., :, :2].flatten(), images[..., :, -2:].flatten()])
    assert torch.allclose(border, torch.tensor(background))
    assert images.max() > 2  # ink is far above the mean


def test_split_mnist_split_is_the_same_across_calls(mnist: list[Task]) -> None:
    again = split_mnist(num_tasks=2)
    assert len(again) == 2
    for a, b in zip(mnist, again, strict=False):
        for pa, pb in ((a.train, b.train), (a.test, b.test)):
            assert all(torch.equal(x, y) for x, y in zip(pa.tensors, pb.tensors, strict=True))


def test_split_mnist_train_and_test_do_not_overlap(mnist: list[Task]) -> None:
    train = {tuple(x.flatten().tolist()) for x in mnist[0].train.tensors[0]}
    assert not any(tuple(x.flatten().tolist()) in train for x in mnist[0].test.tensors[0])


def test_split_mnist_rgb_repeats_the_gray_channel(mnist: list[Task]) -> None:
    rgb = split_mnist(num_tasks=1, channels=3, size=28)
    images = rgb[0].train.tensors[0]
    assert images.shape[1:] == (3, 28, 28)
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    assert torch.equal(images[:, :1], mnist[0].train.tensors[0][:, :, 2:-2, 2:-2])


@pytest.mark.parametrize("make", [split_mnist, permuted_mnist], ids=["split", "permuted"])
@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"num_tasks": 0}, "num_tasks"),
        ({"num_tasks": 2.0}, "num_tasks"),
        ({"size": 27}, "size"),
        ({"size": True}, "size"),
        ({"channels": 2}, "channels"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"test_fraction": 0}, "test_fraction"),
    ],
)
def test_mnist_bad_arguments_raise_naming_the_argument(make, kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=rf"^{argument} must"):
        make(**kwargs)


def test_split_mnist_has_at_most_five_tasks() -> None:
    with pytest.raises(ValueError, match=r"num_tasks must be in \[1, 5\].*got 6"):
        split_mnist(num_tasks=6)


# --- Permuted-MNIST ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pmnist() -> list[Task]:
    return permuted_mnist(num_tasks=3, seed=0)


def test_permuted_mnist_tasks_hold_all_ten_classes(pmnist: list[Task], mnist: list[Task]) -> None:
    assert [t.name for t in pmnist] == ["pmnist-0", "pmnist-1", "pmnist-2"]
    for task in pmnist:
        assert task.classes == tuple(range(10))
        assert (len(task.train), len(task.test)) == (4000, 1000)
        assert task.train.tensors[0].shape[1:] == (1, 32, 32)
        assert task.train.tensors[1].bincount().tolist() == [400] * 10
    # the same stratified split as Split-MNIST: its digits 0/1 are Permuted-MNIST's, permuted
    labels = pmnist[0].train.tensors[1]
    assert len(pmnist[0].train.tensors[0][labels < 2]) == len(mnist[0].train)


def test_permuted_mnist_permutes_the_pixels_of_every_task(pmnist: list[Task], mnist: list[Task]) -> None:
    # Split-MNIST's task 0 holds the same digits 0/1, in the same order, unpermuted
    plain = mnist[0].train.tensors[0].flatten(1)
    for task in pmnist:
        images, labels = task.train.tensors
        permuted = images[labels < 2].flatten(1)
        assert torch.equal(permuted.sort(dim=1).values, plain.sort(dim=1).values)  # each image's pixel multiset
        assert not torch.equal(permuted, plain)  # task 0 included: no task is the identity


def test_permuted_mnist_permutations_differ_between_tasks(pmnist: list[Task]) -> None:
    images = [t.train.tensors[0] for t in pmnist]
    assert not torch.equal(images[0], images[1])
    assert not torch.equal(images[1], images[2])
    assert not torch.equal(images[0], images[2])


def test_permuted_mnist_is_fixed_by_the_seed(pmnist: list[Task]) -> None:
    again = permuted_mnist(num_tasks=4, seed=0)  # task k does not depend on num_tasks
    for a, b in zip(pmnist, again, strict=False):
        for pa, pb in ((a.train, b.train), (a.test, b.test)):
            assert all(torch.equal(x, y) for x, y in zip(pa.tensors, pb.tensors, strict=True))
    (other,) = permuted_mnist(num_tasks=1, seed=1, channels=3)
    images, labels = other.train.tensors
    assert images.shape[1:] == (3, 32, 32)
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])  # channels alike
    assert not torch.equal(images[:, :1], pmnist[0].train.tensors[0])
    assert torch.equal(labels, pmnist[0].train.tensors[1])  # same split, same labels


def test_permuted_mnist_rejects_a_non_int_seed() -> None:
    with pytest.raises(ValueError, match=r"^seed must be an int, got 'a'"):
        permuted_mnist(seed="a")


# --- Rotated-MNIST ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rmnist() -> list[Task]:
    return rotated_mnist(num_tasks=3, seed=0)


def test_rotated_mnist_tasks_hold_all_ten_classes_under_their_own_angle(rmnist: list[Task], pmnist: list[Task]) -> None:
    angles = torch.rand(3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 180
    assert [t.name for t in rmnist] == [f"rmnist-{k}-{a:.0f}deg" for k, a in enumerate(angles.tolist())]
    for task in rmnist:
        assert task.classes == tuple(range(10))
        assert (len(task.train), len(task.test)) == (4000, 1000)
        assert task.train.tensors[0].shape[1:] == (1, 32, 32)
        # the same stratified split and labels as Permuted-MNIST
        assert torch.equal(task.train.tensors[1], pmnist[0].train.tensors[1])
        assert torch.equal(task.test.tensors[1], pmnist[0].test.tensors[1])
    images = [t.train.tensors[0] for t in rmnist]
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])


def test_rotated_mnist_turns_the_digits_and_keeps_the_background(rmnist: list[Task]) -> None:
    background = -MNIST_MEAN / MNIST_STD
    (upright,) = rotated_mnist(num_tasks=1, seed=0, max_angle=1e-9)  # an angle of ~0: the plain digits
    plain = upright.train.tensors[0]
    assert plain.min() == pytest.approx(background, abs=1e-6)
    for task in rmnist:
        turned = task.train.tensors[0]
        degrees = float(task.name.split("-")[2][:-3])
        back = rotate(turned, -degrees, fill=background)
        centre = (slice(None), slice(None), slice(10, 22), slice(10, 22))
        # rotating back restores the centre of every digit up to the two interpolations' blur
        err = (back[centre] - plain[centre]).abs().mean()
        assert err < 0.25 * (plain[centre] - background).abs().mean()
        assert turned.min() >= background - 1e-5  # corners filled with the background, not zeros
        assert torch.isclose(turned[:, :, 0, 0], torch.tensor(background)).all()


def test_rotate_by_a_quarter_turn_is_rot90() -> None:
    x = torch.randn(2, 3, 6, 6)
    assert torch.allclose(rotate(x, 90.0), torch.rot90(x, 1, dims=(2, 3)), atol=1e-5)
    assert torch.allclose(rotate(x, 180.0, fill=0.5), torch.rot90(x, 2, dims=(2, 3)), atol=1e-5)


def test_rotated_mnist_is_fixed_by_the_seed(rmnist: list[Task]) -> None:
    again = rotated_mnist(num_tasks=4, seed=0)  # task k does not depend on num_tasks
    for a, b in zip(rmnist, again, strict=False):
        assert a.name == b.name
        assert all(torch.equal(x, y) for x, y in zip(a.test.tensors, b.test.tensors, strict=True))
    (other,) = rotated_mnist(num_tasks=1, seed=1, channels=3)
    assert other.name != rmnist[0].name and other.train.tensors[0].shape[1:] == (3, 32, 32)


@pytest.mark.parametrize("max_angle", [0, -10, 361, True, "90"])
def test_rotated_mnist_rejects_a_bad_max_angle(max_angle) -> None:
    with pytest.raises(ValueError, match=r"^max_angle must be a number of degrees in \(0, 360\], got "):
        rotated_mnist(max_angle=max_angle)


# --- Serrà's CIFAR sequence -------------------------------------------------------------------------------

TRAIN_PER_CLASS, TEST_PER_CLASS = 6, 3


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("cifar")
    written = write_fake_cifar(root, train_per_class=TRAIN_PER_CLASS, test_per_class=TEST_PER_CLASS)
    return root, written


@pytest.fixture(scope="module")
def cifar(fake_root: tuple[Path, dict]) -> list[Task]:
    return cifar_sequence(fake_root[0], seed=0, verify_checksums=False)


def _unshuffled_index(task: Task) -> int:
    return task.classes[0] // 2 if task.num_classes == 2 else 5 + task.classes[0] // 20


def test_cifar_sequence_has_serra_tasks(cifar: list[Task]) -> None:
    assert len(cifar) == 10
    by_index = {_unshuffled_index(t): t for t in cifar}
    assert sorted(by_index) == list(range(10))
    for k in range(5):
        assert by_index[k].classes == (2 * k, 2 * k + 1)
        assert by_index[k].name == f"cifar10-{2 * k}/{2 * k + 1}"
        assert by_index[5 + k].classes == tuple(range(20 * k, 20 * k + 20))
        assert by_index[5 + k].name == f"cifar100-{20 * k}..{20 * k + 19}"
    assert sorted(t.num_classes for t in cifar) == [2] * 5 + [20] * 5


def test_cifar_sequence_labels_are_local_and_shapes_are_images(cifar: list[Task]) -> None:
    for task in cifar:
        for part, per_class in ((task.train, TRAIN_PER_CLASS), (task.test, TEST_PER_CLASS)):
            images, labels = part.tensors
            assert images.shape == (task.num_classes * per_class, 3, 32, 32)
            assert images.dtype == torch.float32
            assert labels.dtype == torch.int64
            assert labels.bincount(minlength=task.num_classes).tolist() == [per_class] * task.num_classes


def test_cifar_sequence_order_is_shuffled_by_the_seed(fake_root: tuple[Path, dict], cifar: list[Task]) -> None:
    order = [_unshuffled_index(t) for t in cifar]
    assert order == torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()
    assert order != list(range(10))
    assert [t.name for t in cifar_sequence(fake_root[0], seed=0, verify_checksums=False)] == [t.name for t in cifar]
    assert [_unshuffled_index(t) for t in cifar_sequence(fake_root[0], seed=1, verify_checksums=False)] != order


def test_cifar_sequence_num_tasks_takes_the_first_of_the_order(
    fake_root: tuple[Path, dict], cifar: list[Task]
) -> None:
    first = cifar_sequence(fake_root[0], seed=0, num_tasks=3, verify_checksums=False)
    assert [t.name for t in first] == [t.name for t in cifar[:3]]
    for a, b in zip(first, cifar, strict=False):
        assert torch.equal(a.train.tensors[0], b.train.tensors[0])


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_sequence_images_are_the_files_normalised(
    fake_root: tuple[Path, dict], cifar: list[Task], dataset: str
) -> None:
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if dataset == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    task = next(t for t in cifar if t.name.startswith(f"{dataset}-"))
    for split, part in (("train", task.train), ("test", task.test)):
        data, labels = fake_root[1][dataset, split]
        keep = np.isin(labels, task.classes)
        raw = torch.from_numpy(data[keep]).reshape(-1, 3, 32, 32).float() / 255
        expected = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        assert torch.allclose(part.tensors[0], expected, atol=1e-6)
        assert torch.equal(part.tensors[1], torch.from_numpy(labels[keep]) - task.classes[0])


def test_the_published_checksums_are_torchvisions() -> None:
    from torchvision.datasets import CIFAR10, CIFAR100

    for ours, theirs in ((CIFAR10_FILES, CIFAR10), (CIFAR100_FILES, CIFAR100)):
        assert ours.folder == theirs.base_folder and ours.archive == theirs.filename
        assert [list(f) for f in ours.train] == theirs.train_list
        assert [list(f) for f in ours.test] == theirs.test_list
        assert list(ours.meta) == [theirs.meta["filename"], theirs.meta["md5"]]


def test_cifar_sequence_refuses_files_that_are_not_the_published_ones(fake_root: tuple[Path, dict]) -> None:
    with pytest.raises(ValueError, match=r"cifar-10-batches-py/data_batch_1 has MD5 [0-9a-f]{32}, not the published "
                                         r"c99cafc152244af753f735de768cd75f; .*verify_checksums=False"):
        cifar_sequence(fake_root[0])


def test_cifar_sequence_reads_files_whose_checksums_match(
    fake_root: tuple[Path, dict], cifar: list[Task], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The verified path reads what the unverified one reads (the fake files' MD5s stand in for the published)."""
    for name in ("CIFAR10_FILES", "CIFAR100_FILES"):
        source = getattr(data, name)
        folder = fake_root[0] / source.folder

        def published(files, folder=folder):
            return tuple((f, data._md5(folder / f)) for f, _ in files)

        monkeypatch.setattr(data, name, dataclasses.replace(
            source, train=published(source.train), test=published(source.test), meta=published([source.meta])[0]))
    verified = cifar_sequence(fake_root[0], seed=0)
    for a, b in zip(verified, cifar, strict=True):
        assert a.name == b.name and torch.equal(a.train.tensors[0], b.train.tensors[0])


class _RunsCode:
    """A pickle payload that, when loaded by ``pickle.load``, creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("verify_checksums", [True, False])
def test_a_crafted_batch_runs_no_code(
    fake_root: tuple[Path, dict], tmp_path: Path, verify_checksums: bool
) -> None:
    shutil.copytree(fake_root[0], tmp_path / "data")
    marker = tmp_path / "ran"
    with (tmp_path / "data" / CIFAR10_FOLDER / "data_batch_1").open("wb") as f:
        pickle.dump({"data": _RunsCode(marker), "labels": [0]}, f, protocol=2)
    with pytest.raises(ValueError, match="data_batch_1") as raised:
        cifar_sequence(tmp_path / "data", verify_checksums=verify_checksums)
    if not verify_checksums:
        # the global the pickle names (Path.touch, or getattr reaching it) is refused before it is called
        assert "refused without calling it" in str(raised.value)
    assert not marker.exists()
    with pytest.raises(TypeError, match=r"^verify_checksums must be a bool, got 'no'$"):
        cifar_sequence(tmp_path / "data", verify_checksums="no")


def test_cifar_sequence_missing_folder_raises_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"data_root '{tmp_path}' must hold the folder '{CIFAR10_FOLDER}'"):
        cifar_sequence(tmp_path)


@pytest.mark.parametrize(("folder", "file"), [(CIFAR10_FOLDER, "data_batch_3"), (CIFAR100_FOLDER, "meta")])
def test_cifar_sequence_missing_file_is_named(fake_root: tuple[Path, dict], tmp_path: Path, folder, file) -> None:
    shutil.copytree(fake_root[0], tmp_path, dirs_exist_ok=True)
    (tmp_path / folder / file).unlink()
    with pytest.raises(FileNotFoundError, match=rf"must hold the folder '{folder}'.*missing under .*: {file}$"):
        cifar_sequence(tmp_path, verify_checksums=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_tasks": 0}, r"^num_tasks must be an int ≥ 1, got 0"),
        ({"num_tasks": 11}, r"^num_tasks must be in \[1, 10\] for the CIFAR sequence, got 11"),
        ({"seed": 1.5}, r"^seed must be an int, got 1.5"),
    ],
)
def test_cifar_sequence_bad_arguments_raise_naming_the_argument(
    fake_root: tuple[Path, dict], kwargs: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        cifar_sequence(fake_root[0], verify_checksums=False, **kwargs)


def test_fingerprint_tells_data_apart() -> None:
    first, again, other = permuted_mnist(num_tasks=2, seed=0), permuted_mnist(num_tasks=2, seed=0), \
        permuted_mnist(num_tasks=2, seed=1)
    assert fingerprint(first[1].train) == fingerprint(again[1].train)
    assert fingerprint(first[1].train) != fingerprint(other[1].train)  # another permutation
    assert fingerprint(first[0].train) != fingerprint(first[0].test)
    changed = permuted_mnist(num_tasks=1, seed=0)[0].test
    changed.tensors[0][3, 0, 5, 5] += 1e-3
    assert fingerprint(changed) != fingerprint(first[0].test)
    # any dataset, sample by sample
    subset = torch.utils.data.Subset(first[0].test, range(10))
    assert fingerprint(subset) == fingerprint(torch.utils.data.Subset(again[0].test, range(10)))
    assert fingerprint(subset) != fingerprint(torch.utils.data.Subset(first[0].test, range(1, 11)))
