"""Atomic checkpoints: the tensors of a state in safetensors, the rest in a small JSON that commits them.

A checkpoint folder holds two files::

    checkpoint.json                  the commit point: format, step, identity of the run, the state's
                                     JSON values, the name and SHA-256 of the tensor file, and the
                                     SHA-256 of its own content
    checkpoint-000007.safetensors    every tensor of the state (step 7), the JSON naming each by its path

:func:`save_checkpoint` writes the tensor file under a new name, then the JSON; each goes to a temporary
file in the same folder that is flushed, fsync'ed and renamed over its final name with ``os.replace``
(atomic on POSIX and Windows). Only then are the previous tensor file and leftover temporary files
removed. A kill at any moment therefore leaves ``checkpoint.json`` naming a complete tensor file: the
new one once the JSON's rename happened, the previous one before it.

:func:`load_checkpoint` compares the run's identity (architecture, norm, task count, settings,
parameter names and shapes, ...) with the saved one first and refuses a checkpoint of a different run
with a :class:`CheckpointError` that names every difference, before anything is loaded. Both files are
checked against SHA-256s: the index against the one it records for its own values (the learning rate,
patience and best loss of an interrupted task live there), the tensor file against the one the index
records for it, so a file changed or corrupted after it was written (a flipped bit included) is refused
rather than trained on.

:func:`describe_options` gives the options of an object (a gradient policy, say) for an identity: a
run is only resumed with the same options, not merely the same classes.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import random
import re
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as deserialize
from safetensors.torch import save as serialize
from torch import Tensor, nn

from hatnorm._shards import whole_state

FORMAT = "hatnorm-checkpoint"
VERSION = 3  # 2: the index records the tensor file's SHA-256; 3: and its own
#: the commit point of a checkpoint folder
INDEX = "checkpoint.json"
#: the file a writing run holds locked (see :func:`lock_folder`)
LOCK = "checkpoint.lock"
_TENSOR_FILE = re.compile(r"checkpoint-(\d+)\.safetensors")
_TEMPORARY = re.compile(r"checkpoint.*\.tmp")
_TENSOR_KEY = "__tensor__"
#: differences listed per identity entry before "and N more"
_SHOWN = 3


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: written by a different run, or damaged."""


@dataclass(frozen=True)
class Checkpoint:
    """The last complete checkpoint of a folder.

    Attributes:
        path: the folder.
        step: how many checkpoints the folder has seen (the tensor file's number).
        identity: what the run that wrote it was (see :func:`save_checkpoint`).
        state: the saved state, tensors restored in place (on the CPU).
    """

    path: Path
    step: int
    identity: dict[str, Any]
    state: dict[str, Any]


def save_checkpoint(directory: str | Path, state: Mapping[str, Any], *, identity: Mapping[str, Any]) -> Path:
    """Write ``state`` atomically as the folder's new checkpoint; returns the path of its ``checkpoint.json``.

    Call it from one process per folder.

    Args:
        directory: the checkpoint folder (created if missing).
        state: nested dicts (string keys), lists, tensors and JSON values; tensors are copied to the CPU
            and go to the safetensors file, everything else to the JSON.
        identity: JSON values describing the run; :func:`load_checkpoint` refuses to resume a run whose
            identity differs.

    Raises:
        TypeError: a key that is not a string, or a value that is neither a tensor nor a JSON value.
    """
    directory = Path(directory)
    tensors: dict[str, Tensor] = {}
    body = _split(state, (), tensors)
    index_identity = json.loads(json.dumps(identity))
    directory.mkdir(parents=True, exist_ok=True)
    numbers = [int(m[1]) for f in directory.iterdir() if (m := _TENSOR_FILE.fullmatch(f.name))]
    step = max(numbers, default=0) + 1
    name = f"checkpoint-{step:06d}.safetensors"
    data = serialize(tensors, metadata={"format": FORMAT, "step": str(step)})
    _write_atomic(directory / name, data)
    index = {"format": FORMAT, "version": VERSION, "step": step, "tensors": name,
             "sha256": hashlib.sha256(data).hexdigest(), "identity": index_identity, "state": body}
    index["index_sha256"] = _index_digest(index)
    _write_atomic(directory / INDEX, json.dumps(index, indent=1).encode())
    for f in directory.iterdir():
        if (_TENSOR_FILE.fullmatch(f.name) and f.name != name) or _TEMPORARY.fullmatch(f.name):
            f.unlink(missing_ok=True)
    return directory / INDEX


def load_checkpoint(directory: str | Path, *, identity: Mapping[str, Any] | None = None) -> Checkpoint | None:
    """The last complete checkpoint in ``directory``, or ``None`` when it holds none.

    Temporary files and tensor files that ``checkpoint.json`` does not name (left by a save that was
    killed) are ignored.

    Args:
        directory: the checkpoint folder.
        identity: the identity of the run about to resume; when given, a checkpoint whose saved identity
            differs is refused before anything is loaded.

    Raises:
        CheckpointError: the checkpoint belongs to a different run (the message lists what differs), or
            its files are damaged or missing.
    """
    directory = Path(directory)
    index_path = directory / INDEX
    if not index_path.is_file():
        return None
    try:
        index = json.loads(index_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{index_path} is not a readable checkpoint index: {error}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CheckpointError(f"{index_path} is not a hatnorm checkpoint (no \"format\": {FORMAT!r})")
    if index.get("version") != VERSION:
        raise CheckpointError(f"{index_path} has checkpoint format version {index.get('version')!r}; this hatnorm "
                              f"reads version {VERSION}")
    missing = [key for key in ("step", "tensors", "sha256", "identity", "state", "index_sha256") if key not in index]
    if missing:
        raise CheckpointError(f"{index_path} lacks {', '.join(missing)}: it is not a complete checkpoint index")
    if _index_digest(index) != index["index_sha256"]:
        raise CheckpointError(f"{index_path} does not match the SHA-256 it records for itself: the file was changed "
                              "or corrupted after it was written. Nothing was loaded; start afresh (resume=False, or "
                              "no --resume) to replace the checkpoint")
    if identity is not None:
        differences = identity_differences(index["identity"], json.loads(json.dumps(identity)))
        if differences:
            raise CheckpointError(f"{directory}: the checkpoint was written by a different run and cannot be "
                                  f"resumed; {'; '.join(differences)}. Resume with the run's settings, or start "
                                  "afresh (resume=False, or no --resume) to replace it")
    tensor_path = directory / index["tensors"]
    if not tensor_path.is_file():
        raise CheckpointError(f"{index_path} names the tensor file {index['tensors']}, which is missing")
    try:
        data = tensor_path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{tensor_path} cannot be read: {error}") from None
    if hashlib.sha256(data).hexdigest() != index.get("sha256"):
        raise CheckpointError(f"{tensor_path} does not match the SHA-256 that {index_path} recorded for it: the "
                              "file was changed or corrupted after it was written. Nothing was loaded; start "
                              "afresh (resume=False, or no --resume) to replace the checkpoint")
    try:
        tensors = deserialize(data)
        saved_step = _metadata(data).get("step")
    except (SafetensorError, ValueError) as error:
        raise CheckpointError(f"{tensor_path} is not a readable safetensors file: {error}") from None
    if saved_step != str(index["step"]):
        raise CheckpointError(f"{tensor_path} belongs to step {saved_step}, but {index_path} is step {index['step']}")
    return Checkpoint(path=directory, step=index["step"], identity=index["identity"],
                      state=_join(index["state"], tensors))


def _index_digest(index: Mapping[str, Any]) -> str:
    """The SHA-256 of an index's values (all but the digest itself), independent of layout and key order."""
    values = {key: value for key, value in index.items() if key != "index_sha256"}
    return hashlib.sha256(json.dumps(values, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a serialized safetensors file: its header is 8 bytes of length, then JSON."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]).get("__metadata__") or {}


@contextmanager
def lock_folder(directory: str | Path) -> Iterator[None]:
    """Hold ``directory`` for one writing run while the block runs; a second run is refused, naming the holder.

    The lock is an exclusive, non-blocking OS lock (``flock``) on ``checkpoint.lock``, which names its
    holder (host, process id, start time). The operating system releases it when the holder exits or is
    killed, so a killed run's lock is never stale: the file stays, unlocked, and the next run takes it.
    The file is never removed (removing a lock file others may have opened breaks exclusion).

    Raises:
        CheckpointError: another process holds the folder.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            os.lseek(fd, 0, os.SEEK_SET)
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "a process that has not said who it is"
            raise CheckpointError(f"{directory} is in use by another run ({holder}); checkpoints of one folder must "
                                  "come from one run at a time: wait for it to end, or give this run another folder")
        me = f"process {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, me.encode())
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _try_lock(fd: int) -> bool:
    if os.name == "posix":
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    import msvcrt

    try:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def remove_checkpoint(directory: str | Path) -> None:
    """Remove the checkpoint files of ``directory`` (its index, tensor files and leftovers); other files stay."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    (directory / INDEX).unlink(missing_ok=True)  # first: the folder holds no checkpoint from here on
    for f in directory.iterdir():
        if _TENSOR_FILE.fullmatch(f.name) or _TEMPORARY.fullmatch(f.name):
            f.unlink(missing_ok=True)


def describe_model(model: nn.Module) -> dict[str, Any]:
    """A model's identity: the class of every submodule and the shape and dtype of every state entry."""
    return {
        "modules": {name or "(model)": type(m).__qualname__ for name, m in model.named_modules()},
        "parameters": {name: [list(t.shape), str(t.dtype).removeprefix("torch.")]
                       for name, t in model.state_dict().items()},
    }


def state_sha256(model: nn.Module) -> str:
    """The SHA-256 of ``model``'s state (every entry's name, dtype, shape and values), as hex.

    In a run's identity it records the weights the run started from: pretrained weights from another
    file, or another initialisation, give another digest. A model sharded by FSDP2 is gathered whole first
    (a collective: every rank calls it).
    """
    return _sha256(whole_state(model.state_dict()))


def _sha256(tensors: Mapping[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{data.dtype}{tuple(data.shape)};".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def describe_options(value: Any) -> Any:
    """``value`` as JSON values for a run's identity, with every option of every object in it.

    JSON values stay as they are (a NaN becomes the string ``"nan"``, so that it equals itself); lists,
    tuples and string-keyed dicts are described item by item; a class or function becomes its module and
    qualified name; a tensor its shape, dtype and the SHA-256 of its values; any other object its class
    and the description of every attribute it holds (its ``vars``, or its ``__slots__``). A gradient
    policy is therefore described by its class and all its options, and two identities agree only when
    every option of every object does (``AdaHATPolicy(alpha=50)`` is not ``AdaHATPolicy(alpha=0.1)``).
    An object met again inside itself is described by its class alone.

    Args:
        value: the object to describe, typically a method's option read before training starts.

    Returns:
        JSON values: ``None``, bools, numbers, strings, lists and dicts.
    """
    return _describe(value, ())


def _describe(value: Any, inside: tuple[int, ...]) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, type) or inspect.isroutine(value):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, Tensor):
        return {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."),
                "sha256": _sha256({"": value})}
    if id(value) in inside:
        return {"class": _class_name(value)}
    inside = (*inside, id(value))
    if isinstance(value, list | tuple):
        return [_describe(v, inside) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _describe(v, inside) for k, v in value.items()}
    if hasattr(value, "__dict__"):
        attributes = vars(value)
    else:
        slots = [name for cls in type(value).__mro__ for name in getattr(cls, "__slots__", ())]
        attributes = {name: getattr(value, name) for name in slots if hasattr(value, name)}
    return {"class": _class_name(value)} | {k: _describe(v, inside) for k, v in attributes.items()}


def _class_name(value: Any) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def identity_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Readable differences between a saved and a current identity, a few per top-level entry."""
    out = []
    for key in dict.fromkeys([*saved, *current]):
        leaves = list(_leaf_differences(saved.get(key, _ABSENT), current.get(key, _ABSENT), key))
        out += leaves[:_SHOWN]
        if len(leaves) > _SHOWN:
            out.append(f"{key}: and {len(leaves) - _SHOWN} more differences")
    return out


def rng_state() -> dict[str, Any]:
    """The random states of torch (CPU, and every initialised CUDA device), numpy and Python."""
    kind, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
    version, internal, python_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": python_gauss},
    }
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore random states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss"]))
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class _Absent:
    def __repr__(self) -> str:
        return "absent"


_ABSENT = _Absent()


def _leaf_differences(saved: Any, current: Any, path: str) -> Iterator[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in dict.fromkeys([*saved, *current]):
            yield from _leaf_differences(saved.get(key, _ABSENT), current.get(key, _ABSENT), f"{path}.{key}")
    elif saved != current:
        yield f"{path}: {_short(saved)} in the checkpoint, {_short(current)} in this run"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _split(value: Any, path: tuple[str, ...], tensors: dict[str, Tensor]) -> Any:
    """``value`` with every tensor moved into ``tensors`` under its path and replaced by a reference."""
    if isinstance(value, Tensor):
        key = "/".join(path)
        if key in tensors:
            raise TypeError(f"state: two tensors share the path {key!r}; keys must not contain '/'")
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR_KEY: key}
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"state: keys must be strings, got {key!r} under {'/'.join(path) or 'the top level'}")
        return {key: _split(v, (*path, key), tensors) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return [_split(v, (*path, str(i)), tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"state: {'/'.join(path) or 'the state'} must be a tensor, a JSON value, a list or a dict, "
                    f"got {type(value).__name__}")


def _join(value: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR_KEY}:
            return tensors[value[_TENSOR_KEY]]
        return {key: _join(v, tensors) for key, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    if os.name == "posix":  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
