"""Training checkpoints: everything `--resume` needs to continue exactly, as safetensors and JSON.

    run_dir/checkpoints/step-000050/
        trainable.safetensors   every trainable parameter, under its model name
        optimizer.safetensors   the optimizer's per-parameter state: "<name>/<key>" (AdamW: step,
                                exp_avg, exp_avg_sq)
        rng.safetensors         torch's CPU generator state (and each CUDA device's), uint8; under
                                torchrun also each process's ("torch.rank1", ...)
        state.json              step, data position, tokens seen, scheduler state, the optimizer's
                                hyperparameters, Python's and NumPy's RNG states; written last

Nothing is pickled, so a checkpoint from anywhere loads without running code. A checkpoint directory
is written under a temporary name and renamed into place, so a crash or SIGKILL at any moment leaves
every earlier checkpoint intact and never a half-written one under a `step-*` name.
`latest_checkpoint` returns the newest complete one; `save_checkpoint` keeps the newest `keep`.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lorakit.io import _fsync_dir, read_json, read_safetensors, temp_dir_beside, write_json, write_safetensors

PREFIX = "step-"


class CheckpointMismatch(ValueError):
    """A sound checkpoint that does not fit this model (the run's config was changed): no older one would."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step:06d}"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's complete checkpoints (those whose state.json exists), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
            and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, state: dict, keep: int = 2, rng_states: list[torch.Tensor] | None = None) -> Path:
    """Write checkpoint `step` atomically; return its directory. `state`: JSON-able training position;
    `rng_states`: every process's torch generator state in rank order (default: this process's)."""
    params = trainable_parameters(model)
    names = {id(p): name for name, p in params.items()}
    opt = optimizer.state_dict()
    index_to_name = {}
    for group, saved in zip(optimizer.param_groups, opt["param_groups"]):
        for p, index in zip(group["params"], saved["params"]):
            index_to_name[index] = names[id(p)]
    tensors = {}
    for index, per_param in opt["state"].items():
        for key, value in per_param.items():
            value = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{index_to_name[index]}/{key}"] = value.detach().cpu()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
              | {"params": [index_to_name[i] for i in g["params"]]} for g in opt["param_groups"]]
    rng = {"torch" if rank == 0 else f"torch.rank{rank}": rank_state
           for rank, rank_state in enumerate(rng_states or [torch.get_rng_state()])}
    if torch.cuda.is_available():
        rng |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    np_state = np.random.get_state()
    full_state = {
        **state,
        "step": step,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "optimizer_groups": groups,
        "python_rng": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy_rng": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    target = checkpoint_dir(Path(run_dir), step)
    tmp = temp_dir_beside(target)
    try:
        write_safetensors(tmp / "trainable.safetensors", {n: p.detach() for n, p in params.items()})
        write_safetensors(tmp / "optimizer.safetensors", tensors)
        write_safetensors(tmp / "rng.safetensors", rng)
        write_json(tmp / "state.json", full_state)  # last: its presence marks the checkpoint complete
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted((p for p in target.parent.iterdir() if p.name.startswith(PREFIX)),
                      key=lambda p: int(p.name[len(PREFIX):]))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in target.parent.glob(f".{PREFIX}*.tmp-*"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    return target


def load_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    rank: int = 0) -> dict:
    """Restore parameters, optimizer, scheduler and RNG states from `directory`; return its state.json.
    `rank`: this process's rank under torchrun. A rank the checkpoint has no generator state for (it was
    written by fewer processes) seeds from (step, rank): its dropout masks then differ from any earlier run."""
    directory = Path(directory)
    state = read_json(directory / "state.json", "checkpoint state")
    params = trainable_parameters(model)
    saved = read_safetensors(directory / "trainable.safetensors", "checkpoint parameters", fix="")
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise CheckpointMismatch(f"checkpoint {directory} does not fit this model's trainable parameters (missing "
                         f"{missing[:3]}, unexpected {extra[:3]}): resume with the run's own config.yaml")
    with torch.no_grad():
        for name, p in params.items():
            if saved[name].shape != p.shape:
                raise CheckpointMismatch(f"checkpoint {directory}: {name} has shape {tuple(saved[name].shape)}, the model "
                                 f"{tuple(p.shape)}: resume with the run's own config.yaml")
            p.copy_(saved[name])
    tensors = read_safetensors(directory / "optimizer.safetensors", "checkpoint optimizer state", fix="")
    index = {}
    groups = []
    for group, saved_group in zip(optimizer.param_groups, state["optimizer_groups"]):
        names = {id(p): n for n, p in params.items()}
        ids = []
        for p in group["params"]:
            index[names[id(p)]] = len(index)
            ids.append(index[names[id(p)]])
        groups.append({k: (tuple(v) if k == "betas" else v) for k, v in saved_group.items() if k != "params"}
                      | {"params": ids})
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition("/")
        per_param.setdefault(index[name], {})[field] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    rng = read_safetensors(directory / "rng.safetensors", "checkpoint RNG state", fix="")
    key = "torch" if rank == 0 else f"torch.rank{rank}"
    if key in rng:
        torch.set_rng_state(rng[key])
    else:
        torch.manual_seed(int(state["step"]) * 1_000_003 + rank)
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
    version, values, gauss = state["python_rng"]
    random.setstate((version, tuple(values), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return state
