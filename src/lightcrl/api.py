"""Python API in the style of OpenCLIP: ``lightcrl.load(run_dir)`` -> a model that encodes raw inputs.

    model = lightcrl.load("runs/quick")
    img = model.encode_image(["a.jpg", "b.jpg"])          # frozen image encoder -> DFE, L2-normalised
    txt = model.encode_text(["a dog", "a cat"])
    probs = model.classify(["a.jpg"], ["dog", "cat"])

Feature-store inputs go through ``encode_store`` so evaluation reuses cached frozen features.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from lightcrl.checkpoint import checkpoint_folder
from lightcrl.devices import autocast, resolve_device
from lightcrl.encoders import get_encoder
from lightcrl.errors import LightCRLError
from lightcrl.features import FeatureAdapter
from lightcrl.model import create_model
from lightcrl.rundir import WEIGHTS, RunDir
from lightcrl.store import FeatureStore


class LightCRLPipeline:
    """Frozen encoders + the trained projections/DFE, as one object."""

    def __init__(self, model: torch.nn.Module, info: dict, device: str = "auto", run_dir: Path | None = None,
                 encoder_backend: str = "auto"):
        self.device = resolve_device(device)
        self.encoder_backend = encoder_backend  # how the frozen encoders run (lightcrl.encoders.backends)
        self.model = model.to(self.device).eval()
        self.info = info
        self.run_dir = run_dir
        self.encoder_names: dict[str, str] = dict(info["encoders"])
        self.adapter = FeatureAdapter.from_info(info)
        self._encoders: dict[str, Any] = {}

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        device: str = "auto",
        checkpoint: str | None = None,
        untrained: bool = False,
        seed: int = 0,
        encoder_backend: str = "auto",
    ) -> LightCRLPipeline:
        run = RunDir(run_dir)
        info = run.info()
        if "model_config" not in info:
            raise LightCRLError(f"{run.path} is a {info.get('kind')} run: load it with lightcrl.load")
        torch.manual_seed(seed)
        model = create_model(info["model_config"], info["input_dims"])
        if not untrained:
            weights = run.weights
            if checkpoint is not None:
                folder = checkpoint_folder(run.path, checkpoint)
                if folder is None:
                    raise LightCRLError(f"{run.path} has no {checkpoint!r} checkpoint")
                weights = folder / WEIGHTS
            if not weights.exists():
                raise LightCRLError(f"{run.path} has no trained weights yet ({weights.name} missing)")
            try:
                model.load_state_dict(load_file(str(weights)))
            except RuntimeError as e:
                raise LightCRLError(
                    f"{weights} does not match the model described in {run.model_info.name}: {e}"
                ) from e
        return cls(model, info, device, run.path, encoder_backend)

    def encoder(self, modality: str):
        if modality not in self.encoder_names:
            raise LightCRLError(
                f"this model has no {modality} encoder (it has: {', '.join(self.encoder_names)})"
            )
        if modality not in self._encoders:
            self._encoders[modality] = get_encoder(self.encoder_names[modality], device=self.device,
                                                   backend=self.encoder_backend)
        return self._encoders[modality]

    # -- features -> embeddings -----------------------------------------------------------------
    @property
    def logit_scale(self) -> float:
        """The trained temperature's scale (exp of the clamped log-scale), as the losses used it."""
        with torch.no_grad():  # a trained parameter: its value only (float() of a graph warns)
            return float(self.model.get_logit_scale())

    @torch.no_grad()
    def encode_features(self, modality: str, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Model inputs (see :class:`lightcrl.features.FeatureAdapter`) -> embeddings [B, d] on the CPU."""
        return encode_inputs(self.model, modality, tokens, mask, self.device)

    def encode_store(self, store: FeatureStore, batch_size: int = 512, indices=None) -> np.ndarray:
        """Embeddings [N, d] of (some) items of a feature store made with this model's encoder."""
        expected = self.encoder_names.get(store.modality)
        if store.manifest["encoder"]["name"] != expected:
            raise LightCRLError(
                f"store {store.dir} was made with {store.manifest['encoder']['name']}, "
                f"this model expects {expected}"
            )
        return encode_store(self.model, self.adapter, store, self.device, batch_size, indices)

    # -- raw inputs -----------------------------------------------------------------------------
    def _encode_raw(
        self, modality: str, items: Sequence[Any], batch_size: int, progress: bool, raw: bool = False
    ) -> np.ndarray:
        from tqdm.auto import tqdm

        enc = self.encoder(modality)
        outs = []
        steps = range(0, len(items), batch_size)
        for s in tqdm(steps, desc=f"encode {modality}", disable=not progress or len(items) <= 4 * batch_size):
            chunk = [enc.transform(x) for x in items[s : s + batch_size]]
            o = enc.encode_batch(enc.collate(chunk))
            if raw:
                outs.append(torch.nn.functional.normalize(o.pooled.float(), dim=-1).cpu())
            else:
                tokens, mask = self.adapter.from_encoder(modality, o.tokens, o.mask, o.pooled)
                outs.append(self.encode_features(modality, tokens, mask))
        return torch.cat(outs).numpy()

    def encode_text(
        self, texts: Sequence[str], batch_size: int = 256, progress: bool = True, raw: bool = False
    ) -> np.ndarray:
        """Captions -> [N, d] L2-normalised (``raw=True``: the frozen encoder's pooled vector instead)."""
        return self._encode_raw("text", list(texts), batch_size, progress, raw)

    def encode_image(
        self, images: Sequence[Any], batch_size: int = 64, progress: bool = True, raw: bool = False
    ) -> np.ndarray:
        """PIL images or paths -> [N, d] L2-normalised."""
        return self._encode_raw("image", list(images), batch_size, progress, raw)

    def encode_audio(
        self, clips: Sequence[Any], batch_size: int = 32, progress: bool = True, raw: bool = False
    ) -> np.ndarray:
        """Audio file paths (or float arrays at the encoder's rate) -> [N, d] L2-normalised."""
        return self._encode_raw("audio", list(clips), batch_size, progress, raw)

    def class_embeddings(
        self, classnames: Sequence[str], templates: Sequence[str] | None = None, modality: str = "text"
    ) -> np.ndarray:
        """Zero-shot classifier: per class, the normalised mean of its normalised prompt embeddings
        (the same rule as evaluation, :func:`lightcrl.metrics.zeroshot.build_classifier`)."""
        from lightcrl.metrics import zeroshot

        def encode(texts: list[str]) -> np.ndarray:
            return self.encode_text(texts, progress=False)

        try:
            chosen = list(templates or zeroshot.DEFAULT_TEMPLATES)
            return zeroshot.build_classifier(encode, classnames, chosen).astype(np.float32)
        except ValueError as e:  # a template without a class-name slot
            raise LightCRLError(str(e)) from None

    def classify(
        self,
        images: Sequence[Any],
        classnames: Sequence[str],
        templates: Sequence[str] | None = None,
        modality: str = "image",
    ) -> np.ndarray:
        """Class probabilities [N, C] (softmax of scaled cosine similarities)."""
        cls = self.class_embeddings(classnames, templates)
        emb = self._encode_raw(modality, list(images), 64, True)
        logits = self.logit_scale * emb @ cls.T
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(1, keepdims=True)


@torch.no_grad()
def encode_inputs(model: torch.nn.Module, modality: str, tokens: torch.Tensor, mask: torch.Tensor,
                  device: torch.device) -> torch.Tensor:
    """One batch of model inputs through ``model.encode`` in eval mode -> float32 embeddings on the CPU."""
    model.eval()
    with autocast(device):
        return model.encode(modality, tokens.to(device).float(), mask.to(device)).float().cpu()


def encode_store(model: torch.nn.Module, adapter: FeatureAdapter, store: FeatureStore, device: torch.device,
                 batch_size: int = 512, indices=None) -> np.ndarray:
    """Every (or the given) item of a feature store through the trainable model: [N, d] float32, unit norm.

    The one loop over a store that evaluation, validation during training and search share.
    """
    idx_all = np.arange(len(store)) if indices is None else np.asarray(indices)
    out = []
    for s in range(0, len(idx_all), batch_size):
        tokens, mask = adapter.from_store(store, idx_all[s : s + batch_size])
        out.append(encode_inputs(model, store.modality, tokens, mask, device))
    return torch.cat(out).numpy() if out else np.zeros((0, model.embed_dim), np.float32)


def load(run_dir: str | Path, device: str = "auto", checkpoint: str | None = None):
    """Load a run of any kind (see :mod:`lightcrl.rundir`): a trained model's <run>/model.safetensors (the
    best checkpoint; ``checkpoint='last'`` for the last), an ASIF anchor space or a ConVIRT run."""
    from lightcrl.rundir import load_pipeline

    pipe = load_pipeline(run_dir, device=device, checkpoint=checkpoint)
    if pipe is None:
        raise LightCRLError(f"{run_dir} holds the raw frozen encoders: there is no shared space to load")
    return pipe
