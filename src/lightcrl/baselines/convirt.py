"""ConVIRT (Zhang et al. 2020): both encoders trained end-to-end on raw images and captions.

Unlike LightCRL nothing is cached: every step decodes and augments images (random resized crop,
horizontal flip, colour jitter; :mod:`lightcrl.augment`), runs both pretrained encoders with their top
layers unfrozen (``unfreeze_image``/``unfreeze_text``: the last N repeated blocks plus everything after
them, e.g. EfficientNet's last N MBConv blocks + conv head, or a BERT/MiniLM's last N layers; ``"all"``
or 0), projects each pooled output with a one-hidden-layer MLP and minimises ConVIRT's bidirectional
InfoNCE (:class:`lightcrl.losses.ConVIRTLoss`, tau = 0.1, lambda = 0.75).

Training lives in :mod:`lightcrl.app.train_convirt` (``train_convirt(cfg, run_dir)``); it writes
``model.json`` (kind "convirt") and ``convirt.safetensors`` (the trained parameters and the batch-norm
statistics of trained layers only). :class:`ConVIRTPipeline` loads such a run and offers
``encode_image``/``encode_text`` on raw inputs and ``encode_store`` on the items of a feature store
(their images are re-read, not the cached features), which is what evaluation tasks call.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from lightcrl.augment import ConVIRTAugment
from lightcrl.data.sources import PairSource
from lightcrl.devices import resolve_device
from lightcrl.encoders import FrozenEncoder, get_encoder
from lightcrl.errors import LightCRLError
from lightcrl.io import read_json
from lightcrl.rundir import RunDir

log = logging.getLogger(__name__)
__all__ = ["ConVIRTConfig", "ConVIRTModel", "ConVIRTPipeline", "Tower", "load_config",
           "trainable_parameter_names"]

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


# -- evaluation target -----------------------------------------------------------------------------------
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
        info_path = RunDir(run_dir).model_info
        if not info_path.exists():
            raise LightCRLError(f"{run_dir} is not a finished ConVIRT run (no model.json)")
        info = read_json(info_path)
        if info.get("kind") != "convirt":
            raise LightCRLError(f"{run_dir} is not a ConVIRT run (model.json kind {info.get('kind')!r})")
        dev = resolve_device(device)
        model = ConVIRTModel(load_config(dict(info["config"], device=device)))
        model.load_trained_state(load_file(str(RunDir(run_dir).convirt_weights)))
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
    from lightcrl.store import read_plan

    plan = read_plan(store.dir)
    if plan is not None:
        return {r["id"]: r["path"] for r in plan["records"]}
    from lightcrl.data.datasets import open_dataset

    ds = store.manifest["dataset"]
    return {r.id: r.path for r in open_dataset(ds["spec"], ds["split"]).media_records()}
