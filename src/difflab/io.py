"""Safe, atomic reading and writing of weights and JSON.

Weights are only ever written as safetensors. Writes go to a temporary file in the same folder,
are fsync'ed, then renamed over the target, so a kill at any moment leaves either the old file
or the new one, never a torn one. Nothing here unpickles anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from difflab.errors import CheckpointError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    with _atomic_target(Path(path)) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    """Save a flat dict of tensors as safetensors, atomically."""
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with _atomic_target(Path(path)) as tmp:
        save_file(clean, str(tmp), metadata=metadata)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing or corrupt file is a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def model_dir(folder: str | Path) -> Path:
    """The model folder a command was pointed at: a run folder's ``model/`` (what ``difflab
    train`` writes beside its report and checkpoint), or ``folder`` itself."""
    folder = Path(folder)
    return folder / "model" if (folder / "model" / "config.json").is_file() else folder


_fault_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Test hook for kill tests: with ``DIFFLAB_TEST_PAUSE=<name>:<n>`` in the environment, the
    n-th time (default 1st) the writer passes point ``name`` it says so on stderr and sleeps,
    so that a test can SIGKILL it exactly there. A no-op otherwise. Points:
    ``checkpoint-partial`` (temp checkpoint folder half written) and ``checkpoint-swap`` (old
    checkpoint moved aside, the new one not yet renamed into place)."""
    want = os.environ.get("DIFFLAB_TEST_PAUSE")
    if not want or want.split(":")[0] != name:
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] == int(want.partition(":")[2] or 1):
        print(f"difflab: test pause at {name}", file=sys.stderr, flush=True)
        time.sleep(600)


def replace_dir(src: Path, dst: Path) -> None:
    """Move the complete folder ``src`` to ``dst``; the old ``dst`` is removed only afterwards.

    A kill between the two renames leaves the old folder as ``.<dst>.old``;
    :func:`recover_dir` puts it back.
    """
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
        fault_point(f"{dst.name}-swap")
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_dir(dst: Path, complete_marker: str) -> None:
    """Undo what a writer killed inside :func:`replace_dir` (or while filling its temp folder)
    left behind: if ``dst`` is missing or incomplete (no ``complete_marker`` file) and the
    moved-aside previous folder is complete, put it back; then delete the temp folders
    ``.<dst>.*`` (half-written or superseded)."""
    dst = Path(dst)
    old = dst.with_name(f".{dst.name}.old")
    if not (dst / complete_marker).is_file() and (old / complete_marker).is_file():
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(old, dst)
        _fsync_dir(dst.parent)
    for leftover in dst.parent.glob(f".{dst.name}.*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "int"


def load_state_dict_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                         *, dtype: torch.dtype | None = None, assign: bool = False) -> None:
    """Load ``state`` into ``module`` strictly: the key sets must be equal and every shape must
    match, otherwise a CheckpointError names the key(s) and both shapes (no partial load).

    ``dtype`` casts floating-point tensors first; ``assign`` hands the tensors over instead of
    copying (for a module built on the ``meta`` device).
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the model: {len(missing)} missing "
            f"{missing[:4]}{'…' if len(missing) > 4 else ''}, {len(unexpected)} unexpected "
            f"{unexpected[:4]}{'…' if len(unexpected) > 4 else ''}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(own[key].shape)}")
        if _dtype_kind(tensor.dtype) != _dtype_kind(own[key].dtype):
            # float16/bfloat16/float64 weights for a float32 model are fine (cast on load);
            # integers, booleans or complex numbers in place of floats (or back) are not.
            raise CheckpointError(f"{source}: tensor {key!r} has dtype {tensor.dtype}, the "
                                  f"model expects {own[key].dtype}")
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=assign)
