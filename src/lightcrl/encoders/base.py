"""What every frozen encoder provides: preprocessing, an eval-mode model with no gradients, and outputs."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightcrl.devices import autocast, resolve_device
from lightcrl.errors import LightCRLError
from lightcrl.features import masked_mean  # noqa: F401  (re-exported: encoders pool with it)
from lightcrl.paths import cache_dir


@dataclass
class EncoderOutput:
    """tokens [B, T, D]; mask [B, T] (True = real token); pooled [B, D] (padding never counted)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


class FrozenEncoder:
    """A pretrained encoder used as a fixed feature extractor.

    Subclasses set ``name``, ``modality``, ``dim`` and implement ``_load`` (build the torch module),
    ``transform`` (a picklable per-item function run in DataLoader workers), ``collate`` (picklable,
    list of transformed items -> dict of tensors) and ``_forward``. The model is built lazily so that
    identity and fingerprint are cheap.
    """

    name: str = ""
    modality: str = ""
    dim: int = 0
    # The ONNX path (lightcrl.encoders.backends): the batch keys ``_forward`` reads, in order, each with
    # its dynamic axes ({axis: name}); empty = no ONNX path. ``fast_backend`` is what ``auto`` picks on
    # CPU, the backend measured faster for this encoder (benchmarks/extract.py).
    graph_inputs: dict[str, dict[int, str]] = {}
    fast_backend: str = "eager"
    # Why there is no ONNX path where ``graph_inputs`` is empty (`lightcrl export --full` says it).
    no_graph_reason: str = "it declares no ONNX graph inputs (graph_inputs)"
    # Intermediate layers (``NAME@LAYER``, see lightcrl.encoders.split_layer): ``layer`` is the selected
    # one (None = the encoder's default output, ``final_layer``); ``layers()`` the others it can output;
    # ``probe_layers`` the few that ``lightcrl align-probe`` tries by default.
    layer: str | None = None
    final_layer: str = ""
    probe_layers: tuple[str, ...] = ()

    def __init__(self, device: str | torch.device | None = "auto", backend: str = "auto"):
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        self._model: torch.nn.Module | None = None
        self.use_backend(backend)

    def use_backend(self, backend: str) -> None:
        """Run the forward with ``backend`` (auto, eager, onnx, bf16); ``self.backend``: the resolved one."""
        from lightcrl.encoders.backends import resolve_backend

        self.backend = resolve_backend(self, backend)
        self._onnx = None

    # Intra-op threads of the ONNX Runtime session; None: torch's thread count when the session starts.
    forward_threads: int | None = None

    def set_forward_threads(self, threads: int | None) -> None:
        """Use ``threads`` for the ONNX Runtime forward (None: torch's count); a new session if it changes."""
        if threads != self.forward_threads:
            self.forward_threads = threads
            self._onnx = None

    # -- to implement --------------------------------------------------------------------------
    def _load(self) -> torch.nn.Module:
        raise NotImplementedError

    def _forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> EncoderOutput:
        raise NotImplementedError

    @property
    def transform(self) -> Callable[[Any], Any]:
        raise NotImplementedError

    @property
    def collate(self) -> Callable[[list[Any]], dict[str, torch.Tensor]]:
        raise NotImplementedError

    def graph_preprocessing(self, folder: Path) -> dict | None:
        """How raw inputs become this encoder's graph inputs, as data for `lightcrl export --full`'s
        manifest; files it needs (a tokenizer) are written into ``folder``. None: not describable."""
        return None

    def identity(self) -> dict:
        """What decides the features: weights and preprocessing (not the backend). Keys the ONNX cache."""
        raise NotImplementedError

    def layers(self) -> list[str]:
        """The intermediate layers this encoder can output instead of its default one (none by default)."""
        return []

    def select_layer(self, layer: str) -> None:
        """Output ``layer`` instead of the default: the name becomes ``NAME@LAYER`` and the identity
        records the layer, so its stores (and ONNX graph) never mix with the default's or another layer's."""
        valid = self.layers()
        if self.final_layer and layer == self.final_layer:
            raise LightCRLError(
                f"{self.name}@{layer} is {self.name}'s default output: write {self.name!r} (one name per "
                "feature set, so the stores of the default stay shared)"
            )
        if layer not in valid:
            hint = f"valid layers: {', '.join(valid)}" if valid else "it has no selectable layers"
            raise LightCRLError(f"encoder {self.name} has no layer {layer!r}; {hint}")
        self.layer = layer
        self.name = f"{self.name}@{layer}"
        self._model, self._onnx = None, None

    def _layer_identity(self) -> dict:
        """The identity's layer entry: empty for the default output, so its identity (and every store made
        before layers existed) is unchanged."""
        return {"layer": self.layer} if self.layer else {}

    def store_identity(self) -> dict:
        """``identity()`` plus the backend that computes the features: recorded in (and hashed into) every
        store, so a store of one backend is never silently read as the other's."""
        return {**self.identity(), "backend": self.backend}

    # -- shared --------------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            model = self._load().eval().to(self.device)
            for p in model.parameters():
                p.requires_grad_(False)
            self._model = model
        return self._model

    def release(self) -> None:
        """Drop the loaded model and ONNX Runtime session (rebuilt on next use): for a process that runs
        many encoders in turn (``lightcrl align-probe``), which would otherwise hold them all."""
        self._model, self._onnx = None, None

    @torch.inference_mode()
    def encode_batch(
        self, batch: dict[str, torch.Tensor], tokens_dtype: torch.dtype = torch.float32
    ) -> EncoderOutput:
        """Tokens in ``tokens_dtype`` (extraction asks for the store's float16: the ONNX graph gives them
        so directly), mask as bool, pooled as float32."""
        if self.backend == "onnx":
            with _SESSION_LOCK:  # extraction's forward streams share one session: built once
                if self._onnx is None:
                    from lightcrl.encoders.backends import OnnxForward

                    self._onnx = OnnxForward(self, batch)
                session = self._onnx
            tokens, mask, pooled = session(batch)
            return EncoderOutput(tokens.to(tokens_dtype), mask.bool(), pooled.float())
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with autocast(self.device, precision="bf16" if self.backend == "bf16" else "auto"):
            out = self._forward(self.model, batch)
        return EncoderOutput(out.tokens.float().to(tokens_dtype), out.mask.bool(), out.pooled.float())

    def encode(self, items: list[Any]) -> EncoderOutput:
        """Convenience: transform + collate + forward in this process (for small inputs)."""
        return self.encode_batch(self.collate([self.transform(x) for x in items]))

    def fingerprint(self) -> str:
        blob = json.dumps(self.store_identity(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


_SESSION_LOCK = threading.Lock()


def file_digest(paths: list[Path]) -> str:
    """sha256 of weight files, memoised in the cache by (path, size, mtime) so large files hash once."""
    memo_path = cache_dir() / "weight_digests.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    h = hashlib.sha256()
    changed = False
    for p in sorted(Path(x) for x in paths):
        st = p.stat()
        key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        digest = memo.get(key)
        if digest is None:
            fh = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    fh.update(chunk)
            digest = memo[key] = fh.hexdigest()
            changed = True
        h.update(digest.encode())
    if changed:
        try:
            from lightcrl.io import write_json

            write_json(memo_path, memo)
        except OSError:
            pass  # a read-only cache only costs re-hashing next time
    return h.hexdigest()
