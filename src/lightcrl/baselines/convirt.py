"""ConVIRT (Zhang et al. 2020): both encoders trained end-to-end on raw images and captions.

Unlike LightCRL nothing is cached: every step decodes and augments images (random resized crop,
horizontal flip, colour jitter; :mod:`lightcrl.augment`), runs both pretrained encoders with their top
layers unfrozen (``unfreeze_image``/``unfreeze_text``: the last N repeated blocks plus everything after
them, e.g. EfficientNet's last N MBConv blocks + conv head, or a BERT/MiniLM's last N layers; ``"all"``
or 0), projects each pooled output with a one-hidden-layer MLP and minimises ConVIRT's bidirectional
InfoNCE (:class:`lightcrl.losses.ConVIRTLoss`, tau = 0.1, lambda = 0.75).

``train_convirt(cfg, run_dir)`` writes a run directory: ``model.json`` (kind "convirt"),
``convirt.safetensors`` (the trained parameters and the batch-norm statistics of trained layers only;
the frozen rest is the pretrained encoder), ``metrics.jsonl``, ``train_summary.json``. It resumes at an
epoch boundary. :class:`ConVIRTPipeline` loads it and offers ``encode_image``/``encode_text`` on raw
inputs and ``encode_store`` on the items of a feature store (their images are re-read, not the cached
features), which is what ``lightcrl.evaluate`` tasks call.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from ..augment import ConVIRTAugment
from ..config import PairSource
from ..devices import resolve_device
from ..encoders import FrozenEncoder, get_encoder
from ..errors import LightCRLError, SkipItem
from ..io import read_json, write_bytes, write_json, write_text
from ..losses import ConVIRTLoss

log = logging.getLogger(__name__)
__all__ = ["ConVIRTConfig", "ConVIRTModel", "ConVIRTPipeline", "Tower", "load_config", "train_convirt",
           "train_step", "trainable_parameter_names"]

Unfreeze = int | Literal["all"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentOptions(_Strict):
    """ConVIRT's augmentation (see :class:`lightcrl.augment.ConVIRTAugment`)."""

    scale: tuple[float, float] = (0.6, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.0
    hue: float = 0.0


class ConVIRTConfig(_Strict):
    """A ConVIRT run. ``data`` is a pairs source (its media_encoder/text_encoder are the encoders trained)."""

    name: str = "convirt"
    seed: int = 0
    device: str = "auto"
    data: PairSource
    unfreeze_image: Unfreeze = 1
    unfreeze_text: Unfreeze = 1
    proj_dim: int = Field(512, ge=1)
    proj_hidden: int = Field(512, ge=1)
    temperature: float = Field(0.1, gt=0)
    lam: float = Field(0.75, ge=0, le=1)
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=2)
    lr: float = 1e-4
    weight_decay: float = 1e-6
    grad_clip: float | None = None
    image_size: int | None = None  # training crop size; None: the encoder's own crop (224)
    augment: AugmentOptions = Field(default_factory=AugmentOptions)
    num_workers: int = 0
    log_every: int = 10
    progress: bool = True


def load_config(raw: dict | str | Path) -> ConVIRTConfig:
    """A ConVIRTConfig from a dict or a YAML file, with errors naming the field."""
    import yaml
    from pydantic import ValidationError

    if not isinstance(raw, dict):
        p = Path(raw)
        if not p.exists():
            raise LightCRLError(f"ConVIRT config not found: {p}")
        raw = yaml.safe_load(p.read_text()) or {}
    try:
        return ConVIRTConfig(**raw)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise LightCRLError("invalid ConVIRT config:\n" + "\n".join(lines)) from None


# -- which layers train --------------------------------------------------------------------------------
def _blocks(module: nn.Module) -> tuple[str, int] | None:
    """The longest ModuleList (the encoder's repeated blocks/layers): its name and length."""
    best = None
    for name, m in module.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1 and (best is None or len(m) > best[1]):
            best = (name, len(m))
    return best


def trainable_parameter_names(module: nn.Module, unfreeze: Unfreeze) -> set[str]:
    """Parameters of the last ``unfreeze`` blocks and of everything after the blocks (head, final norm)."""
    names = [n for n, _ in module.named_parameters()]
    if unfreeze == "all":
        return set(names)
    if unfreeze < 0:
        raise LightCRLError(f"unfreeze must be 'all' or a number >= 0, got {unfreeze}")
    if unfreeze == 0:
        return set()
    blocks = _blocks(module)
    if blocks is None:  # no repeated blocks: the whole model is one block
        return set(names)
    prefix, n_blocks = blocks[0] + ".", blocks[1]
    block_of = {n: int(n[len(prefix):].split(".")[0]) for n in names if n.startswith(prefix)}
    last = max(i for i, n in enumerate(names) if n in block_of)
    # Parameters registered after the last block (conv head, final LayerNorm) sit above the blocks.
    return {n for n in names if block_of.get(n, -1) >= n_blocks - unfreeze} | set(names[last + 1:])


def _set_frozen_eval(module: nn.Module) -> None:
    """Put every fully frozen submodule in eval mode: its batch-norm statistics, dropout and drop-connect
    then behave as in the pretrained network, and only trained layers adapt."""
    for m in module.modules():
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()


class Tower(nn.Module):
    """One pretrained encoder (top layers trainable) + ConVIRT's projection: Linear-ReLU-Linear."""

    def __init__(self, encoder: FrozenEncoder, unfreeze: Unfreeze, proj_hidden: int, proj_dim: int,
                 probe_batch: dict[str, Tensor]) -> None:
        super().__init__()
        self.encoder = encoder  # a plain attribute: provides the forward recipe, not the weights
        # A copy of the pretrained network (loaded once per process by the encoder, which keeps its own
        # frozen module untouched for feature extraction).
        self.backbone = copy.deepcopy(encoder.model).cpu()
        keep = trainable_parameter_names(self.backbone, unfreeze)
        for n, p in self.backbone.named_parameters():
            p.requires_grad_(n in keep)
        self.head = nn.Sequential(nn.Linear(encoder.dim, proj_hidden), nn.ReLU(),
                                  nn.Linear(proj_hidden, proj_dim))
        self._drop_unused(probe_batch)

    def _drop_unused(self, batch: dict[str, Tensor]) -> None:
        """Freeze selected parameters that the forward never uses (a classifier after the conv head, a
        BERT pooler), so they are neither counted nor saved as trained."""
        if not any(p.requires_grad for p in self.backbone.parameters()):
            return
        self.eval()
        self(batch).sum().backward()
        for p in self.backbone.parameters():
            if p.requires_grad and p.grad is None:
                p.requires_grad_(False)
        self.zero_grad(set_to_none=True)

    def train(self, mode: bool = True) -> Tower:
        super().train(mode)
        if mode:
            _set_frozen_eval(self.backbone)
        return self

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        # The encoder's forward recipe (token map -> pooled vector) on the trainable copy.
        out = self.encoder._forward(self.backbone, batch)
        return self.head(out.pooled.float())


class ConVIRTModel(nn.Module):
    """The image and text towers of a ConVIRT run."""

    def __init__(self, cfg: ConVIRTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Same registry key as feature extraction (cfg.device, usually "auto"): the pretrained weights are
        # loaded once per process; the towers are copies moved to ``device`` by the caller.
        self.encoders = {"image": get_encoder(cfg.data.media_encoder, device=cfg.device),
                         "text": get_encoder(cfg.data.text_encoder, device=cfg.device)}
        if self.encoders["image"].modality != "image" or self.encoders["text"].modality != "text":
            raise LightCRLError("ConVIRT pairs an image encoder (data.media_encoder) with a text encoder")
        self.eval_transform = self.encoders["image"].transform
        if not hasattr(self.eval_transform, "mean"):
            raise LightCRLError(f"ConVIRT augments pixels itself: {cfg.data.media_encoder} has no "
                                "ImageTransform (resize, crop, normalise) to take the normalisation from")
        self.augment = ConVIRTAugment.for_encoder(self.eval_transform, cfg.image_size,
                                                  **cfg.augment.model_dump())
        from PIL import Image

        probe_img = self.collate_images([self.augment(Image.new("RGB", (32, 32)), np.random.default_rng(0))])
        probe_txt = self.collate_texts(["a photo"])
        head = (cfg.proj_hidden, cfg.proj_dim)
        self.image = Tower(self.encoders["image"], cfg.unfreeze_image, *head, probe_img)
        self.text = Tower(self.encoders["text"], cfg.unfreeze_text, *head, probe_txt)

    def collate_images(self, pixels: list[Tensor]) -> dict[str, Tensor]:
        return self.encoders["image"].collate(pixels)

    def collate_texts(self, captions: Sequence[str]) -> dict[str, Tensor]:
        enc = self.encoders["text"]
        return enc.collate([enc.transform(c) for c in captions])

    def parameter_counts(self) -> dict[str, int]:
        def count(m: nn.Module) -> int:
            return sum(p.numel() for p in m.parameters() if p.requires_grad)

        counts = {"image_encoder": count(self.image.backbone), "image_head": count(self.image.head),
                  "text_encoder": count(self.text.backbone), "text_head": count(self.text.head)}
        counts["total_trainable"] = sum(counts.values())
        return counts

    def trained_state(self) -> dict[str, Tensor]:
        """What training changed: trainable parameters and the buffers (BN statistics) of trained modules."""
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        for name, m in self.named_modules():
            if any(p.requires_grad for p in m.parameters(recurse=False)):
                keep |= {f"{name}.{b}" for b, _ in m.named_buffers(recurse=False)}
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if k in keep}

    def load_trained_state(self, state: dict[str, Tensor]) -> None:
        expected = set(self.trained_state())
        if set(state) != expected:
            raise LightCRLError("ConVIRT weights do not match the configured model "
                                f"({len(set(state) ^ expected)} tensors differ): was the config changed?")
        self.load_state_dict(state, strict=False)


# -- data ------------------------------------------------------------------------------------------------
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
    from ..data.datasets import open_dataset

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
class ConVIRTPipeline:
    """A trained ConVIRT model as an evaluation target: raw images/captions -> L2-normalised embeddings."""

    input = "raw"

    def __init__(self, model: ConVIRTModel, info: dict, device: str | torch.device = "auto") -> None:
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        self.model = model.to(self.device)
        self.info = info
        self.encoder_names = {"image": model.cfg.data.media_encoder, "text": model.cfg.data.text_encoder}

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto") -> ConVIRTPipeline:
        from safetensors.torch import load_file

        run_dir = Path(run_dir)
        info_path = run_dir / "model.json"
        if not info_path.exists():
            raise LightCRLError(f"{run_dir} is not a finished ConVIRT run (no model.json)")
        info = read_json(info_path)
        if info.get("kind") != "convirt":
            raise LightCRLError(f"{run_dir} is not a ConVIRT run (model.json kind {info.get('kind')!r})")
        dev = resolve_device(device)
        model = ConVIRTModel(load_config(dict(info["config"], device=device)))
        model.load_trained_state(load_file(str(run_dir / "convirt.safetensors")))
        return cls(model, info, dev)

    @torch.no_grad()
    def _encode(self, tower: Tower, batches: Any) -> np.ndarray:
        tower.eval()
        out = [F.normalize(tower({k: v.to(self.device) for k, v in b.items()}).float(), dim=-1).cpu()
               for b in batches]
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.cfg.proj_dim), np.float32)

    def encode_image(self, images: Sequence[Any], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Paths or PIL images, preprocessed like the frozen encoder (resize, centre crop)."""
        items = list(images)
        tf, m = self.model.eval_transform, self.model
        return self._encode(m.image, (m.collate_images([tf(x) for x in items[s : s + batch_size]])
                                      for s in range(0, len(items), batch_size)))

    def encode_text(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        items = list(texts)
        m = self.model
        return self._encode(m.text, (m.collate_texts(items[s : s + batch_size])
                                     for s in range(0, len(items), batch_size)))

    def encode_store(self, store: Any, batch_size: int = 64, indices: Any = None) -> np.ndarray:
        """Embed the items of a feature store from their raw inputs (captions, or the images' files)."""
        idx = np.arange(len(store)) if indices is None else np.asarray(indices)
        if store.modality == "text":
            return self.encode_text([store.items.texts[i] for i in idx])
        if store.modality != "image":
            raise LightCRLError(f"ConVIRT has no {store.modality} tower")
        paths = _store_paths(store)
        return self.encode_image([paths[store.items.ids[i]] for i in idx], batch_size)


def _store_paths(store: Any) -> dict[str, str]:
    """id -> media file of a store's items, from its extraction plan (or by listing its dataset again)."""
    from ..store import read_plan

    plan = read_plan(store.dir)
    if plan is not None:
        return {r["id"]: r["path"] for r in plan["records"]}
    from ..data.datasets import open_dataset

    ds = store.manifest["dataset"]
    return {r.id: r.path for r in open_dataset(ds["spec"], ds["split"]).media_records()}


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
    from ..metrics import retrieval

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

    run_dir = Path(run_dir)
    summary_path = run_dir / "train_summary.json"
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    if overwrite:
        for p in (summary_path, ckpt_path, run_dir / "metrics.jsonl", run_dir / "model.json"):
            p.unlink(missing_ok=True)
    cfg_json = cfg.model_dump(mode="json")
    if summary_path.exists():
        done = read_json(summary_path)
        if done.get("config") == cfg_json:
            return done
        raise LightCRLError(f"{run_dir} holds a ConVIRT run of another configuration: use another directory "
                            "or overwrite=True")
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
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ck["config"] != cfg_json:
            raise LightCRLError(f"{run_dir} holds a ConVIRT checkpoint of another configuration")
        model.load_trained_state(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        state = ck["state"]
        log.info("resumed ConVIRT from epoch %d", state["epoch"])
    write_text(run_dir / "convirt.yaml", json.dumps(cfg_json, indent=2) + "\n")

    def log_row(row: dict) -> None:
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

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
                log_row({"step": state["step"], "epoch": epoch + 1, **losses})
        epoch_time = time.time() - t0
        state["train_time_s"] += epoch_time
        state["epoch"] = epoch + 1
        row = {"step": state["step"], "epoch": epoch + 1, "time/epoch_s": epoch_time}
        if val is not None:
            row.update(_validate(pipe, *val))
            model.train()
        log_row(row)
        improved = val is None or state["best"] is None or row["val/mean_recall@1"] > state["best"]
        if improved:  # without a validation split the last epoch is published
            if val is not None:
                state.update(best=row["val/mean_recall@1"], best_epoch=epoch + 1)
            write_bytes(run_dir / "convirt.safetensors", save(model.trained_state()))
            write_json(run_dir / "model.json", {"kind": "convirt", "config": cfg_json, "epoch": epoch + 1,
                                                "encoders": pipe.encoder_names,
                                                "parameter_counts": model.parameter_counts()})
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"config": cfg_json, "model": model.trained_state(), "optimizer": opt.state_dict(),
                    "state": state}, ckpt_path)
    summary = {"epochs": state["epoch"], "steps": state["step"], "train_time_s": state["train_time_s"],
               "best": state["best"], "best_epoch": state["best_epoch"], "n_train": len(paths),
               "parameter_counts": model.parameter_counts(), "config": cfg_json}
    write_json(summary_path, summary)
    return summary
