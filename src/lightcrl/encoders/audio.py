"""Frozen audio encoders: aiSFX (offline weights from PyPI) and any transformers audio model.

``aisfx`` is the X-Sequential-CE model of Ma & Lerch (ISMIR 2022), shipped by the ``aisfx`` package: a
9-layer CNN (DCASE cross-task baseline) over 44.1 kHz log-mel spectrograms (2048-sample window, 1024 hop,
96 HTK mel bands, ``log10(1 + 1e4 * power)`` / 9.4578). The package cuts the spectrogram into blocks of
100 frames (~2.3 s) with a 50-frame hop and embeds each block into 512-d; a block is our token. The
package defines no clip-level vector, so ``pooled`` is the masked mean of the block embeddings.

The package's weights are a pickle (``checkpoint.pth``). They are read ONCE, with ``torch.load``'s
weights-only unpickler allowing only the few numpy types that file holds (nothing in it can run code),
converted to a safetensors copy in ``<cache>/weights/aisfx-<digest>.safetensors``, and every normal run
loads that copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightcrl.encoders.base import EncoderOutput, FrozenEncoder, file_digest
from lightcrl.errors import LightCRLError, SkipItem
from lightcrl.features import masked_mean
from lightcrl.paths import cache_dir

# ------------------------------------------------------------------------------------------ waveforms


def load_waveform(item: Any, sample_rate: int) -> np.ndarray:
    """A path, a float array at ``sample_rate`` or ``(array, rate)`` -> mono float32 at ``sample_rate``.

    Files go through :func:`lightcrl.data.media.load_audio` (decoding, resampling, skip reasons). Arrays
    are ``(samples,)`` or ``(channels, samples)``; they get the same silence/NaN checks as files.
    """
    if isinstance(item, (str, os.PathLike)):
        from lightcrl.data.media import load_audio

        return load_audio(str(item), sample_rate)
    rate = sample_rate
    if isinstance(item, tuple) and len(item) == 2:
        item, rate = item
    wav = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
    wav = wav.astype(np.float32, copy=False)
    if wav.ndim == 2:
        wav = wav.mean(axis=0)
    if wav.ndim != 1:
        raise SkipItem("corrupt_audio", f"expected (samples,) or (channels, samples), got {wav.shape}")
    if wav.size == 0:
        raise SkipItem("silent_audio", "no samples")
    if not np.isfinite(wav).all():
        raise SkipItem("corrupt_audio", "non-finite samples")
    if float(np.abs(wav).max()) < 1e-6:
        raise SkipItem("silent_audio", "all samples are (near) zero")
    if int(rate) != sample_rate:
        import librosa

        wav = librosa.resample(wav, orig_sr=int(rate), target_sr=sample_rate, res_type="soxr_hq")
    return np.ascontiguousarray(wav, dtype=np.float32)


# ------------------------------------------------------------------------------------------ aiSFX


@lru_cache(maxsize=4)
def _mel_basis(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    import librosa

    # HTK mel scale with unit-area (L1) filters: the package's librosa path (Essentia's htkMel/unit_sum).
    return librosa.filters.mel(
        sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=f_min, fmax=f_max, htk=True, norm=1.0
    )


@dataclass(frozen=True)
class AisfxFrontEnd:
    """Waveform -> normalised log-mel blocks ``[n_blocks, block_frames, n_mels]`` (picklable).

    Defaults are aisfx.inference's constants (SAMPLE_RATE, SPEC_BLOCK_LENGTH, SPEC_HOP_LENGTH, MEL_BINS,
    F_MIN/F_MAX, EMB_BLOCK_LENGTH, emb_hop_size=0.5, drop_partial_block=True) and the 'original' min/max
    normalisation of aisfx.preprocessing.
    """

    sample_rate: int = 44100
    n_fft: int = 2048
    hop_length: int = 1024
    n_mels: int = 96
    f_min: float = 0.0
    f_max: float = 22050.0
    peak_normalize: bool = True  # the package's librosa front end scales each clip to peak 1
    norm_min: float = 0.0
    norm_max: float = 9.457798957824707
    block_frames: int = 100  # ~2.3 s per embedding
    block_hop: int = 50  # emb_hop_size 0.5
    drop_partial_block: bool = True

    def load(self, item: Any) -> np.ndarray:
        """The mono waveform at the model's rate (resampled from any input rate)."""
        return load_waveform(item, self.sample_rate)

    def spectrogram(self, wav: np.ndarray) -> np.ndarray:
        """``[frames, n_mels]`` float32 log-mel, normalised as the model was trained."""
        import librosa

        if self.peak_normalize:
            wav = wav / max(float(np.abs(wav).max()), 1e-12)
        stft = librosa.stft(
            wav,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            win_length=self.n_fft,
            center=True,
            pad_mode="constant",
        )
        mel = _mel_basis(self.sample_rate, self.n_fft, self.n_mels, self.f_min, self.f_max) @ (
            np.abs(stft) ** 2
        )
        spec = np.log10(mel * 1e4 + 1.0)
        # Time first: the model reads (time, freq). The package's librosa helper returns (freq, time),
        # which its own blocking would then cut along frequency; Essentia's output is (time, freq).
        return ((spec.T - self.norm_min) / (self.norm_max - self.norm_min)).astype(np.float32)

    def blocks(self, spec: np.ndarray) -> np.ndarray:
        """aisfx.preprocessing.blocking: zero-padded (= silence) blocks of ``block_frames`` frames."""
        n = spec.shape[0]
        count = int(np.ceil((n - self.block_frames) / self.block_hop + 1))
        if (n - self.block_frames) % self.block_hop != 0 and self.drop_partial_block:
            count -= 1
        count = max(count, 1)
        padded = np.concatenate([spec, np.zeros((self.block_frames, spec.shape[1]), spec.dtype)])
        starts = np.arange(count) * self.block_hop
        return np.stack([padded[s : s + self.block_frames] for s in starts])

    def __call__(self, item: Any) -> torch.Tensor:
        return torch.from_numpy(self.blocks(self.spectrogram(self.load(item))))


def collate_blocks(items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The clips' real blocks, concatenated (``blocks [N, frames, mels]``, clip by clip), and
    ``block_mask [B, T]`` marking each clip's real blocks, T the most blocks of a clip in the batch: only real
    blocks go through the CNN, and the graph has no data-dependent shape (ONNX-exportable)."""
    longest = max(x.shape[0] for x in items)
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for i, x in enumerate(items):
        mask[i, : x.shape[0]] = True
    blocks = torch.from_numpy(np.concatenate([np.asarray(x) for x in items]))
    return {"blocks": blocks, "block_mask": mask}


def _atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    from lightcrl.io import atomic_open

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    with atomic_open(path, "wb") as f:
        f.write(data)


def _aisfx_checkpoint_globals() -> list:
    """EXACTLY the non-torch types of aisfx's checkpoint.pth, for ``torch.serialization.safe_globals``.

    The file is ``(OrderedDict of tensors, {dataset: (numpy int64 index, int n_classes)})``: pickled numpy
    int64 scalars are ``numpy.core.multiarray.scalar(dtype, bytes)`` with ``numpy.dtype("i8")`` (whose
    state is set on an ``Int64DType``, the class of that dtype since numpy 1.25). The scalar function is
    named as in the file (numpy 2 moved it to ``numpy._core``). ``_codecs.encode``, ``OrderedDict`` and
    torch's tensor rebuilders are allowed by torch's weights-only unpickler itself.
    """
    scalar = np.int64(0).__reduce__()[0]  # numpy's own (un)pickling function for scalars, any version
    return [(scalar, "numpy.core.multiarray.scalar"), np.dtype, type(np.dtype(np.int64))]


def _load_aisfx_checkpoint(path: Path) -> tuple[dict, dict]:
    """The package's checkpoint: a pickle of (state_dict, {dataset: (index, n_classes)}), read weights-only.

    Anything else in the file (a global outside the allow-list, a hostile ``__reduce__``) is refused by
    torch's weights-only unpickler before it can run; that refusal is raised as :class:`LightCRLError`.
    """
    if not hasattr(torch.serialization, "safe_globals"):
        raise LightCRLError(f"converting the aisfx weights needs torch >= 2.6 (this is {torch.__version__})")
    try:
        with torch.serialization.safe_globals(_aisfx_checkpoint_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError (refused global), RuntimeError (not a checkpoint), ...
        # torch words a refused global "Unsupported global: GLOBAL x.y ..." or "unsupported GLOBAL x.y ..."
        refused = re.search(r"unsupported global(?:: GLOBAL)? ([\w.]+)", str(e), re.IGNORECASE)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("Check")]
        why = (f"it references {refused.group(1)}, which the aisfx checkpoint never contains" if refused
               else f"{type(e).__name__}: {lines[-1] if lines else ''}")
        raise LightCRLError(f"refusing to load aisfx weights {path}: {why}") from e
    ok = (isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], dict) and isinstance(obj[1], dict)
          and all(torch.is_tensor(v) for v in obj[0].values()))
    if not ok:
        raise LightCRLError(f"aisfx weights {path} are not a (state_dict, ds_dict) pair")
    return obj[0], obj[1]


#: The classifier heads of aiSFX's CrossNet, in the checkpoint's order (``fc.0`` .. ``fc.8``: one per
#: sound-effect library it was trained on; ``ds_dict`` in the checkpoint) and their numbers of classes.
AISFX_HEADS = (("prosfx", 78), ("soundlyTrain", 79), ("ucsMixed", 69), ("soundstormBalanced", 81),
               ("productionelementsBalanced", 10), ("cartoonexpressBalanced", 27), ("hpxdigitalBalanced", 3),
               ("series6000Balanced", 23), ("series9000Balanced", 8))
#: aisfx@LAYER: what each selectable layer outputs per block, and its width
AISFX_LAYERS = {
    "block3": ("conv block 3 (256 channels), mean over frequency, max over time", 256),
    "heads-hidden1": ("the 9 heads' first hidden layers (ReLU(fc.k.0)), concatenated", 9 * 256),
    "heads-hidden": ("the 9 heads' second hidden layers (ReLU(fc.k.2)), concatenated", 9 * 128),
    "heads-logits": ("the 9 heads' class logits (fc.k.4), concatenated", sum(n for _, n in AISFX_HEADS)),
}


def aisfx_heads(state: dict[str, torch.Tensor]) -> torch.nn.ModuleList:
    """CrossNet's 9 classifier heads (512 -> 256 -> 128 -> classes, ReLU between) from its state dict."""
    heads = torch.nn.ModuleList()
    for k, (_, n) in enumerate(AISFX_HEADS):
        head = torch.nn.Sequential(torch.nn.Linear(512, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128),
                                   torch.nn.ReLU(), torch.nn.Linear(128, n))
        head.load_state_dict({name[len(f"fc.{k}."):]: v for name, v in state.items()
                              if name.startswith(f"fc.{k}.")})  # strict
        heads.append(head)
    return heads


def aisfx_head_features(heads: torch.nn.ModuleList, emb: torch.Tensor, layer: str) -> torch.Tensor:
    """``emb`` [..., 512] (aiSFX block embeddings) -> the ``heads-*`` layer ``layer`` [..., width]."""
    depth = {"heads-hidden1": 2, "heads-hidden": 4, "heads-logits": 5}[layer]
    return torch.cat([head[:depth](emb) for head in heads], dim=-1)


class _AisfxLayerNet(torch.nn.Module):
    """The embedding CNN stopped at conv block 3, or followed by the heads: one ``aisfx@LAYER`` network."""

    def __init__(self, net: torch.nn.Module, heads: torch.nn.ModuleList | None, layer: str):
        super().__init__()
        self.net, self.heads, self.layer = net, heads, layer

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        if self.layer == "block3":
            n = self.net
            x = n.conv_block1(blocks.unsqueeze(1), pool_size=(2, 2), pool_type=n.pool_type)
            x = n.conv_block2(x, pool_size=(2, 2), pool_type=n.pool_type)
            x = n.conv_block3(x, pool_size=(2, 2), pool_type=n.pool_type)  # [N, 256, time, freq]
            return x.mean(dim=3).max(dim=2).values  # the final block's own pooling
        return aisfx_head_features(self.heads, self.net(blocks), self.layer)


class AisfxEncoder(FrozenEncoder):
    """aiSFX X-Sequential-CE: tokens = 512-d embeddings of ~2.3 s blocks (1.16 s hop), pooled = their mean.

    Intermediate and head layers: ``aisfx@LAYER`` (:data:`AISFX_LAYERS`): ``block3`` (the third conv block,
    pooled like the last), ``heads-hidden1`` / ``heads-hidden`` / ``heads-logits`` (CrossNet's 9 classifier
    heads, trained on sound-effect libraries, applied to each block's embedding and concatenated). Tokens
    stay one vector per block, pooled = their masked mean.
    """

    name = "aisfx"
    modality = "audio"
    dim = 512
    final_layer = "embedding"
    graph_inputs = {"blocks": {0: "blocks"}, "block_mask": {0: "batch", 1: "clip_blocks"}}
    fast_backend = "onnx"  # FAST_BACKEND_MEASURED
    # The ONNX graph (extraction's fast path) starts from log-mel blocks, not from a waveform.
    no_graph_reason = ("its log-mel front end (librosa STFT, soxr resampling) runs outside PyTorch, so its "
                       "ONNX graph starts from log-mel blocks that only librosa computes")

    def __init__(self, device="auto", frontend: AisfxFrontEnd | None = None):
        super().__init__(device)
        self.frontend = frontend or AisfxFrontEnd()

    @staticmethod
    def weights_path() -> Path:
        """The package's original (pickled) checkpoint."""
        try:
            from aisfx.inference import get_path_modelWeights
        except ImportError as e:
            raise LightCRLError(
                "encoder aisfx needs the `aisfx` package: pip install --no-deps aisfx "
                "(its pinned numpy/librosa are not needed)"
            ) from e
        return Path(get_path_modelWeights())

    def weights_digest(self) -> str:
        return file_digest([self.weights_path()])

    def safetensors_path(self) -> Path:
        return cache_dir() / "weights" / f"aisfx-{self.weights_digest()[:16]}.safetensors"

    def convert_weights(self) -> Path:
        """Read the original checkpoint (weights-only) once and write the safetensors copy (atomically)."""
        out = self.safetensors_path()
        state, ds_dict = _load_aisfx_checkpoint(self.weights_path())
        meta = {
            "source": "aisfx models/checkpoint.pth",
            "source_sha256": self.weights_digest(),
            "ds_dict": json.dumps({k: [int(a), int(b)] for k, (a, b) in ds_dict.items()}),
        }
        _atomic_save_safetensors(dict(state), out, meta)
        return out

    def state_dict_from_copy(self) -> dict[str, torch.Tensor]:
        """The full CrossNet state dict read from the safetensors copy (made on first use)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.safetensors_path()
        if not path.exists():
            self.convert_weights()
        try:
            return load_file(str(path))
        except (SafetensorError, OSError):  # a damaged copy (disk trouble): make it again
            self.convert_weights()
            return load_file(str(path))

    @staticmethod
    def build_network() -> torch.nn.Module:
        from aisfx.models.cnn2d import EmbeddingNet

        # The arguments of aisfx.inference.load_bestModel: max pooling, 3x3 kernels, stride 1, 64 channels.
        return EmbeddingNet("max", 3, 1, 64)

    def _load(self) -> torch.nn.Module:
        net = self.build_network()
        prefix = "embedding_net."
        full = self.state_dict_from_copy()
        state = {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
        net.load_state_dict(state)  # strict: every conv/bn tensor must be there
        if self.layer is None:
            return net
        heads = aisfx_heads(full) if self.layer.startswith("heads-") else None
        return _AisfxLayerNet(net, heads, self.layer)

    def layers(self) -> list[str]:
        return list(AISFX_LAYERS)

    def select_layer(self, layer: str) -> None:
        super().select_layer(layer)
        self.dim = AISFX_LAYERS[layer][1]

    def _forward(self, model, batch):
        mask = batch["block_mask"].bool()
        out = model(batch["blocks"].float())  # [N, dim]: the real blocks only, clip by clip
        # Block i of clip b is row (number of real blocks up to it) - 1: a gather, no data-dependent shape.
        flat = mask.flatten()
        rows = (torch.cumsum(flat.long(), 0) - 1).clamp(min=0)
        tokens = out[rows] * flat.unsqueeze(1).to(out.dtype)
        tokens = tokens.view(*mask.shape, out.shape[-1])
        return EncoderOutput(tokens, mask, masked_mean(tokens, mask))

    @property
    def transform(self) -> Callable[[Any], torch.Tensor]:
        return self.frontend

    @property
    def collate(self) -> Callable[[list[torch.Tensor]], dict[str, torch.Tensor]]:
        return collate_blocks

    def identity(self) -> dict:
        return {
            "encoder": self.name,
            "weights": self.weights_digest(),
            "frontend": asdict(self.frontend),
            "resample": "soxr_hq",
            "tokens": ("one 512-d embedding per spectrogram block, pooled = masked mean" if self.layer is None
                       else f"per spectrogram block: {AISFX_LAYERS[self.layer][0]}, pooled = masked mean"),
            **self._layer_identity(),
        }


# ------------------------------------------------------------------------------------- transformers


@dataclass(frozen=True)
class WaveformTransform:
    """Path or array -> mono float32 waveform at ``sample_rate`` (picklable; features are made in collate)."""

    sample_rate: int

    def __call__(self, item: Any) -> np.ndarray:
        return load_waveform(item, self.sample_rate)


class HFAudioCollator:
    """Waveforms -> the model's input tensors through its feature extractor (made lazily; picklable)."""

    def __init__(self, model_id: str, sample_rate: int):
        self.model_id, self.sample_rate = model_id, sample_rate
        self._fe = None

    def __getstate__(self):
        return {"model_id": self.model_id, "sample_rate": self.sample_rate, "_fe": None}

    @property
    def extractor(self):
        if self._fe is None:
            from transformers import AutoFeatureExtractor

            self._fe = AutoFeatureExtractor.from_pretrained(self.model_id)
        return self._fe

    def __call__(self, waves: list[np.ndarray]) -> dict[str, torch.Tensor]:
        kw = {"sampling_rate": self.sample_rate, "return_tensors": "pt"}
        try:
            out = self.extractor(list(waves), **kw)
        except ValueError:  # raw-waveform models (wav2vec2...) refuse ragged batches unless padded
            out = self.extractor(list(waves), padding="longest", return_attention_mask=True, **kw)
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


class HFAudioEncoder(FrozenEncoder):
    """Any transformers audio model (AST, CLAP's audio tower, wav2vec2/HuBERT, Whisper's encoder).

    tokens = last hidden state (4-D maps flattened), masked by the attention mask where the model has one;
    pooled = the model's pooler output when it has one of the token width, else the masked mean.
    """

    modality = "audio"

    def __init__(self, model_id: str, device="auto"):
        super().__init__(device)
        from transformers import AutoConfig, AutoFeatureExtractor

        self.model_id = str(model_id)
        self.name = f"hf-audio:{model_id}"
        self.config = AutoConfig.from_pretrained(self.model_id)
        audio_cfg = getattr(self.config, "audio_config", None) or self.config  # CLAP nests its audio tower
        hidden = getattr(audio_cfg, "hidden_size", None) or getattr(audio_cfg, "d_model", None)
        if not hidden:
            raise LightCRLError(f"{model_id}: cannot tell the hidden size of this audio model")
        self.dim = int(hidden)
        fe = AutoFeatureExtractor.from_pretrained(self.model_id)
        self.sample_rate = int(fe.sampling_rate)
        fe_blob = json.dumps(fe.to_dict(), sort_keys=True, default=str).encode()
        self._fe_hash = hashlib.sha256(fe_blob).hexdigest()
        self._transform = WaveformTransform(self.sample_rate)
        self._collate = HFAudioCollator(self.model_id, self.sample_rate)

    def _load(self) -> torch.nn.Module:
        from transformers import AutoModel

        model = AutoModel.from_pretrained(self.model_id)
        if hasattr(model, "audio_model"):  # CLAP: keep the audio tower only
            model = model.audio_model
        elif getattr(model.config, "is_encoder_decoder", False):  # Whisper: the encoder
            model = model.get_encoder()
        return model

    def _forward(self, model, batch):
        import inspect

        accepted = inspect.signature(model.forward).parameters
        out = model(**{k: v for k, v in batch.items() if k in accepted})
        h = out.last_hidden_state
        if h.dim() == 4:  # conv-like maps [B, C, H, W] -> tokens [B, H*W, C]
            h = h.flatten(2).transpose(1, 2)
        mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        am = batch.get("attention_mask")
        if am is not None and hasattr(model, "_get_feat_extract_output_lengths"):
            lengths = model._get_feat_extract_output_lengths(am.sum(-1))
            mask = torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None]
        pooler = getattr(out, "pooler_output", None)
        pooled = pooler if pooler is not None and pooler.shape[-1] == h.shape[-1] else masked_mean(h, mask)
        return EncoderOutput(h, mask, pooled)

    @property
    def transform(self) -> Callable[[Any], np.ndarray]:
        return self._transform

    @property
    def collate(self) -> Callable[[list[np.ndarray]], dict[str, torch.Tensor]]:
        return self._collate

    def identity(self) -> dict:
        from lightcrl.encoders.image import _hf_weights_identity

        return {
            "encoder": self.name,
            "weights": _hf_weights_identity(self.model_id, self.config),
            "sample_rate": self.sample_rate,
            "feature_extractor": self._fe_hash,
            "resample": "soxr_hq",
        }
