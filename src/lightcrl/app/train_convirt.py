"""Training of the ConVIRT baseline (:mod:`lightcrl.baselines.convirt` holds its model and pipeline).

``train_convirt(cfg, run_dir)`` writes a run directory: ``model.json`` (kind "convirt"),
``convirt.safetensors`` (the trained parameters and the batch-norm statistics of trained layers only;
the frozen rest is the pretrained encoder), ``metrics.jsonl``, ``train_summary.json``. It resumes at an
epoch boundary from ``checkpoints/last.json`` (a :mod:`lightcrl.checkpoint` folder: safetensors + JSON,
never unpickled). A ``checkpoints/last.pt`` of an older lightcrl is a pickle: it is refused, not loaded.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lightcrl.augment import ConVIRTAugment
from lightcrl.baselines.convirt import ConVIRTConfig, ConVIRTModel, ConVIRTPipeline
from lightcrl.checkpoint import checkpoint_folder, load_checkpoint, save_checkpoint, unflatten_optimizer
from lightcrl.devices import resolve_device
from lightcrl.errors import LightCRLError, SkipItem
from lightcrl.io import read_json, write_bytes, write_json, write_text
from lightcrl.losses import ConVIRTLoss
from lightcrl.rundir import RunDir

log = logging.getLogger(__name__)
__all__ = ["train_convirt", "train_step"]


class _PairItems(torch.utils.data.Dataset):
    """Epoch view of the training images: item i -> (augmented pixels, one random caption), seeded."""

    def __init__(self, paths: list[str], captions: list[list[str]], augment: ConVIRTAugment, seed: int,
                 epoch: int) -> None:
        self.paths, self.captions, self.augment = paths, captions, augment
        self.seed, self.epoch = seed, epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, str] | None:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        caption = self.captions[i][int(rng.integers(len(self.captions[i])))]
        try:
            return self.augment(self.paths[i], rng), caption
        except SkipItem as e:  # an unreadable image is left out of its batch
            log.warning("skipping %s: %s", self.paths[i], e)
            return None


def _keep_good(rows: list[tuple[Tensor, str] | None]) -> list[tuple[Tensor, str]]:
    return [r for r in rows if r is not None]


def _training_pairs(cfg: ConVIRTConfig, split: str, limit: int | None) -> tuple[list[str], list[list[str]]]:
    """Image paths and their captions of a pairs split, sampled like the feature stores (same seed)."""
    from lightcrl.data.datasets import open_dataset

    ds = open_dataset(cfg.data.spec, split)
    if limit:
        ds = ds.subsample(limit, seed=cfg.seed)
    caps: dict[str, list[str]] = defaultdict(list)
    for r in ds.text_records():
        caps[r.group].append(r.text)
    media = [r for r in ds.media_records() if caps.get(r.id)]
    if not media:
        raise LightCRLError(f"no (image, caption) pairs in {cfg.data.spec} split {split}")
    return [r.path for r in media], [caps[r.id] for r in media]


# -- evaluation-side pipeline -------------------------------------------------------------------------------


# -- training -------------------------------------------------------------------------------------------
def train_step(model: ConVIRTModel, rows: list[tuple[Tensor, str]], loss_fn: ConVIRTLoss,
               opt: torch.optim.Optimizer, device: torch.device) -> dict[str, float]:
    """One optimisation step on a batch of (augmented pixels, caption); the model must be in train mode."""
    pixels = model.collate_images([r[0] for r in rows])
    text = model.collate_texts([r[1] for r in rows])
    a = model.image({k: v.to(device) for k, v in pixels.items()})
    b = model.text({k: v.to(device) for k, v in text.items()})
    losses = loss_fn(a, b)
    opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    if model.cfg.grad_clip:
        trained = [p for p in model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(trained, model.cfg.grad_clip)
    opt.step()
    return {f"train/{k}": float(v.detach()) for k, v in losses.items()}


def _validate(pipe: ConVIRTPipeline, paths: list[str], captions: list[list[str]]) -> dict[str, float]:
    from lightcrl.metrics import retrieval

    texts = [c for cs in captions for c in cs]
    owner = np.repeat(np.arange(len(paths)), [len(cs) for cs in captions])
    r = retrieval.evaluate(pipe.encode_image(paths), pipe.encode_text(texts), owner)
    return {"val/image_retrieval_recall@1": r["image_retrieval_recall@1"],
            "val/text_retrieval_recall@1": r["text_retrieval_recall@1"],
            "val/mean_recall@1": (r["image_retrieval_recall@1"] + r["text_retrieval_recall@1"]) / 2}


def train_convirt(cfg: ConVIRTConfig, run_dir: str | Path, overwrite: bool = False) -> dict:
    """Train ConVIRT into ``run_dir`` (resuming at the last finished epoch); returns the train summary."""
    from safetensors.torch import save
    from tqdm.auto import tqdm

    run = RunDir(run_dir)
    run_dir = run.path
    summary_path = run.train_summary
    ckpt_root = run.checkpoints
    legacy_ckpt = ckpt_root / "last.pt"  # pickled by older versions: removed or refused, never loaded
    if overwrite:
        for p in (summary_path, legacy_ckpt, ckpt_root / "last.json", run.metrics, run.model_info):
            p.unlink(missing_ok=True)
        for old in ckpt_root.glob("last-*"):
            if old.is_dir():
                shutil.rmtree(old)
    cfg_json = cfg.model_dump(mode="json")
    if summary_path.exists():
        done = read_json(summary_path)
        if done.get("config") == cfg_json:
            return done
        raise LightCRLError(f"{run_dir} holds a ConVIRT run of another configuration: use another directory "
                            "or overwrite=True")
    if legacy_ckpt.exists():
        raise LightCRLError(
            f"{legacy_ckpt} is a ConVIRT checkpoint pickled by an older lightcrl; it is not loaded, since "
            "unpickling a file can run code. Delete it to train this run from its first epoch again (or "
            "call train_convirt(..., overwrite=True) to start over)")
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = ConVIRTModel(cfg).to(device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                           weight_decay=cfg.weight_decay)
    loss_fn = ConVIRTLoss(gather=False, temperature=cfg.temperature, lam=cfg.lam)
    paths, captions = _training_pairs(cfg, cfg.data.split, cfg.data.limit)
    val = _training_pairs(cfg, cfg.data.val_split, cfg.data.val_limit) if cfg.data.val_split else None
    pipe = ConVIRTPipeline(model, {}, device)

    state = {"epoch": 0, "step": 0, "train_time_s": 0.0, "best": None, "best_epoch": None}
    folder = checkpoint_folder(run_dir, "last")
    if folder is not None:
        ck = load_checkpoint(folder)
        if ck["state"].get("config") != cfg_json:
            raise LightCRLError(f"{run_dir} holds a ConVIRT checkpoint of another configuration")
        model.load_trained_state(ck["model"])
        opt.load_state_dict(unflatten_optimizer(ck["trainer"], ck["state"]["optimizer"]))
        state = {k: ck["state"][k] for k in state}
        run.truncate_metrics(state["step"])  # rows of a killed epoch are logged again
        log.info("resumed ConVIRT from epoch %d", state["epoch"])
    write_text(run_dir / "convirt.yaml", json.dumps(cfg_json, indent=2) + "\n")

    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        torch.manual_seed(cfg.seed * 100003 + epoch)
        order = np.random.default_rng([cfg.seed, epoch, 17]).permutation(len(paths))
        items = _PairItems([paths[i] for i in order], [captions[i] for i in order], model.augment, cfg.seed,
                           epoch)
        loader = torch.utils.data.DataLoader(items, batch_size=cfg.batch_size, shuffle=False, drop_last=True,
                                             num_workers=cfg.num_workers, collate_fn=_keep_good)
        model.train()
        t0 = time.time()
        for rows in tqdm(loader, desc=f"convirt epoch {epoch + 1}/{cfg.epochs}", leave=False,
                         disable=not cfg.progress):
            if len(rows) < 2:
                continue
            losses = train_step(model, rows, loss_fn, opt, device)
            state["step"] += 1
            if state["step"] % cfg.log_every == 0:
                run.append_metrics({"step": state["step"], "epoch": epoch + 1, **losses})
        epoch_time = time.time() - t0
        state["train_time_s"] += epoch_time
        state["epoch"] = epoch + 1
        row = {"step": state["step"], "epoch": epoch + 1, "time/epoch_s": epoch_time}
        if val is not None:
            row.update(_validate(pipe, *val))
            model.train()
        run.append_metrics(row)
        improved = val is None or state["best"] is None or row["val/mean_recall@1"] > state["best"]
        if improved:  # without a validation split the last epoch is published
            if val is not None:
                state.update(best=row["val/mean_recall@1"], best_epoch=epoch + 1)
            write_bytes(run.convirt_weights, save(model.trained_state()))
            run.write_info({"kind": "convirt", "config": cfg_json, "epoch": epoch + 1,
                            "encoders": pipe.encoder_names, "parameter_counts": model.parameter_counts()})
        save_checkpoint(run_dir, "last", model.trained_state(), {**state, "config": cfg_json}, opt)
    summary = {"epochs": state["epoch"], "steps": state["step"], "train_time_s": state["train_time_s"],
               "best": state["best"], "best_epoch": state["best_epoch"], "n_train": len(paths),
               "parameter_counts": model.parameter_counts(), "config": cfg_json}
    write_json(summary_path, summary)
    return summary
