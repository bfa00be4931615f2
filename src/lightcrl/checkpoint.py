"""Checkpoints as safetensors + JSON: loadable without unpickling, written so a kill never corrupts them.

A checkpoint is a folder ``<run>/checkpoints/<tag>-<step>/`` (model.safetensors, trainer.safetensors with
optimizer tensors and RNG states, state.json with everything else). The pointer file
``<run>/checkpoints/<tag>.json`` is replaced atomically only after the folder is complete, so readers
always find a whole checkpoint; older folders of the same tag are removed afterwards.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lightcrl.errors import LightCRLError, StoreMismatch
from lightcrl.io import read_json, write_json
from lightcrl.rundir import WEIGHTS, RunDir
from lightcrl.version import __version__

CHECKPOINT_VERSION = 1


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entries in state["state"].items():
        meta["state"][str(pid)] = {}
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{name}"] = value
                meta["state"][str(pid)][name] = {"tensor": f"optim.{pid}.{name}"}
            else:
                meta["state"][str(pid)][name] = {"value": value}
    return tensors, meta


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for pid, entries in meta["state"].items():
        state[int(pid)] = {
            name: tensors[e["tensor"]] if "tensor" in e else e["value"] for name, e in entries.items()
        }
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    run_dir: Path,
    tag: str,
    model: torch.nn.Module | dict[str, torch.Tensor],
    state: dict,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write ``<run>/checkpoints/<tag>-<step>/`` and point ``<tag>.json`` at it.

    ``model`` is a module (its whole state dict is saved) or the tensors to save as model.safetensors
    (e.g. only the trained part of a partly frozen model); ``state`` must be JSON-serialisable.
    """
    ckpt_root = RunDir(run_dir).checkpoints
    folder = ckpt_root / f"{tag}-{state['step']:08d}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    _save_tensors(folder / WEIGHTS, model if isinstance(model, dict) else model.state_dict())
    trainer_tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            trainer_tensors[f"rng.cuda.{i}"] = s
    optim_meta = None
    if optimizer is not None:
        t, optim_meta = flatten_optimizer(optimizer.state_dict())
        trainer_tensors.update(t)
    _save_tensors(folder / "trainer.safetensors", trainer_tensors)
    write_json(
        folder / "state.json",
        {
            "format_version": CHECKPOINT_VERSION,
            "lightcrl_version": __version__,
            **state,
            "optimizer": optim_meta,
        },
    )
    write_json(ckpt_root / f"{tag}.json", {"folder": folder.name, "step": state["step"]})
    for old in ckpt_root.glob(f"{tag}-*"):
        if old.is_dir() and old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def checkpoint_folder(run_dir: Path, tag: str) -> Path | None:
    pointer = RunDir(run_dir).checkpoints / f"{tag}.json"
    if not pointer.exists():
        return None
    folder = pointer.parent / read_json(pointer)["folder"]
    return folder if (folder / "state.json").exists() else None


def load_checkpoint(folder: Path, expected_fingerprint: str | None = None) -> dict:
    """Read a checkpoint folder: model weights, trainer tensors and state. Refuses other versions/inputs."""
    state = read_json(folder / "state.json")
    if state.get("format_version") != CHECKPOINT_VERSION:
        raise StoreMismatch(
            f"checkpoint {folder} has format {state.get('format_version')} (lightcrl "
            f"{state.get('lightcrl_version')}); this lightcrl {__version__} reads format {CHECKPOINT_VERSION}"
        )
    if expected_fingerprint and state.get("fingerprint") != expected_fingerprint:
        raise StoreMismatch(
            f"checkpoint {folder} was trained with another configuration or other feature stores "
            "(fingerprint differs): use a new --out directory, or --overwrite to start over"
        )
    try:
        model = load_file(str(folder / WEIGHTS))
        trainer = load_file(str(folder / "trainer.safetensors"))
    except Exception as e:
        raise LightCRLError(f"checkpoint {folder} is unreadable: {e}") from e
    return {"state": state, "model": model, "trainer": trainer}


def publish_checkpoint(run_dir: Path, tag: str, info: dict) -> None:
    """Make checkpoint ``tag`` the run's published model: its weights to <run>/model.safetensors (what
    ``lightcrl.load`` reads, replaced atomically) and ``info`` (+ the tag) to <run>/model.json."""
    from lightcrl.io import atomic_open

    run = RunDir(run_dir)
    folder = checkpoint_folder(run.path, tag)
    if folder is None:
        raise LightCRLError(f"{run.path} has no {tag!r} checkpoint to publish")
    with open(folder / WEIGHTS, "rb") as src, atomic_open(run.weights, "wb") as dst:
        shutil.copyfileobj(src, dst)
    run.write_info(dict(info, checkpoint=tag))

