"""Training checkpoints: everything needed to continue a run bit-exactly.

A checkpoint is a folder ``checkpoint/`` holding ``model.safetensors`` (the last iterate),
``ema.safetensors``, ``optimizer.safetensors`` (+ its param groups in ``state.json``),
``training_state.safetensors`` (RNG states, data permutation) and ``state.json`` (step,
loss history, config). It is assembled under a temporary name and renamed into place, so the
previous checkpoint survives until the new one is complete; :func:`recover_checkpoint` cleans
up after a writer that was killed half-way (called by ``--resume``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflab.config import Config
from difflab.errors import CheckpointError, DifflabError
from difflab.io import (
    atomic_write_json,
    fault_point,
    load_state_dict_into,
    load_tensors,
    read_json,
    recover_dir,
    replace_dir,
    save_tensors,
)
from difflab.training.ema import EMA

_TENSOR_KEYS = ("perm", "gen", "data_gen", "torch_rng")


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    # (the lazy guard's LR is a device tensor: a number in state.json; the loop sets it anew)
    groups = [{k: float(v) if torch.is_tensor(v) else v for k, v in g.items()}
              for g in sd["param_groups"]]
    return tensors, groups


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": groups}


def save_training_state(folder: Path, task: nn.Module, opt: torch.optim.Optimizer,
                        ema: EMA | None, meta: dict[str, Any]) -> None:
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    save_tensors(tmp / "model.safetensors", task.state_dict())
    fault_point(f"{folder.name}-partial")
    if ema is not None:
        save_tensors(tmp / "ema.safetensors", ema.state_dict())
    opt_tensors, groups = _flatten_optimizer(opt)
    save_tensors(tmp / "optimizer.safetensors", opt_tensors)
    save_tensors(tmp / "training_state.safetensors",
                 {k: meta[k] for k in _TENSOR_KEYS})
    plain = {k: v for k, v in meta.items() if k not in _TENSOR_KEYS}
    plain["optimizer_param_groups"] = groups
    plain["ema_num_updates"] = ema.num_updates if ema is not None else 0
    atomic_write_json(tmp / "state.json", plain)  # written last: marks the folder complete
    replace_dir(tmp, folder)


def recover_checkpoint(folder: Path) -> None:
    """After a kill: restore the previous checkpoint if the kill hit between the two renames of
    the swap, and delete half-written temp folders (``.checkpoint.*``)."""
    recover_dir(Path(folder), "state.json")


def _match_param_layout(opt: torch.optim.Optimizer) -> None:
    """Give each loaded moment the memory layout of its parameter (e.g. channels_last).

    Safetensors stores contiguous tensors; fused AdamW walks a parameter and its moments as
    flat memory, so a channels_last weight next to a contiguous ``exp_avg`` would be updated
    with the wrong elements (silently on CPU; CUDA refuses)."""
    inner = getattr(opt, "optimizer", opt)
    for group in inner.param_groups:
        for p in group["params"]:
            st = inner.state.get(p, {})
            for k, v in st.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def load_training_state(folder: Path, task: nn.Module, opt: torch.optim.Optimizer,
                        ema: EMA | None) -> dict[str, Any] | None:
    """Restore task/optimizer/EMA in place; returns the metadata, or None if no checkpoint."""
    folder = Path(folder)
    if not (folder / "state.json").is_file():
        return None
    meta = read_json(folder / "state.json")
    load_state_dict_into(task, load_tensors(folder / "model.safetensors"),
                         str(folder / "model.safetensors"))
    if ema is not None:
        load_state_dict_into(ema.model, load_tensors(folder / "ema.safetensors"),
                             str(folder / "ema.safetensors"))
        ema.num_updates = int(meta.get("ema_num_updates", 0))
    saved_groups = meta.pop("optimizer_param_groups")
    groups = len(getattr(opt, "optimizer", opt).param_groups)
    if len(saved_groups) != groups:
        raise CheckpointError(
            f"{folder}/optimizer.safetensors: {len(saved_groups)} parameter group(s), this run "
            f"has {groups} (weight decay switched on or off, or a checkpoint from before weight "
            "decay left biases and norm gains alone); resume with the run's own settings or "
            "train without --resume")
    opt.load_state_dict(_unflatten_optimizer(load_tensors(folder / "optimizer.safetensors"),
                                             saved_groups))
    _match_param_layout(opt)
    meta.update(load_tensors(folder / "training_state.safetensors"))
    return meta


# --- resuming: the same run or none ----------------------------------------------------------

def data_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Shape and float64 sums of the training data: a resumed run must see the same data."""
    return {"shape": list(images.shape),
            "sum": float(images.sum(dtype=torch.float64)),
            "sum_sq_strided": float(images.flatten()[::101].double().pow(2).sum()),
            "labels": int(labels.sum(dtype=torch.int64))}


# TrainConfig keys a resumed run may change: how it reports and saves, not what it computes.
RESUME_MAY_CHANGE = frozenset({"progress", "checkpoint_every", "checkpoint_minutes",
                               "max_nonfinite", "lazy_guard", "compile", "bf16_weights"})


def check_resume(state: dict[str, Any], cfg: Config, data: dict[str, Any],
                 out_dir: Path) -> None:
    """A checkpoint continues only the run that wrote it: same data, same training settings
    (budget included); otherwise a DifflabError names what differs."""
    saved = json.loads(json.dumps(state.get("config", {})))  # tuples → lists, as on disk
    now = json.loads(json.dumps(cfg.to_dict()))
    diff = [f"{k}={saved.get(k)!r} (now {now[k]!r})" for k in now
            if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != now[k]]
    if diff:
        raise DifflabError(f"{out_dir}: --resume continues the run as it was started, but "
                           f"this command changes {', '.join(diff)}; resume with the run's own "
                           "settings (checkpoint/state.json) or train into a new --out")
    old = state.get("data")
    if old is not None and old != json.loads(json.dumps(data)):
        raise DifflabError(f"{out_dir}: --resume with other data than the run was started on "
                           f"(images {old['shape']} vs {data['shape']}, or other values)")
