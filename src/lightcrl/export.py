"""`lightcrl export`: the trainable part of a run (projection + context + DFE per modality) as ONNX.

Each modality becomes one graph: inputs ``tokens`` [B, T, D] float32 (the frozen encoder's token
features) and ``mask`` [B, T] bool (True = real token), output ``embedding`` [B, width], L2-normalised.
B and T are dynamic. The graph is checked against PyTorch with onnxruntime right after export.

nn.MultiheadAttention bakes the batch and sequence sizes into its reshapes when traced, so the DFE
layers are re-expressed here with shape-agnostic ops on the run's own weights; the numerical check
against ``LightCRLModel.encode`` is what guarantees the two agree.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightcrl.errors import LightCRLError
from lightcrl.io import write_json

log = logging.getLogger(__name__)
DEFAULT_ATOL = 1e-4
OPSET = 17


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def _self_attention(mha: nn.MultiheadAttention, x: Tensor, key_padding: Tensor) -> Tensor:
    """Batch-first self-attention with the weights of ``mha``; reshapes keep B and T symbolic."""
    heads = mha.num_heads
    head_dim = mha.embed_dim // heads
    q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)

    def split(t: Tensor) -> Tensor:  # [B, T, W] -> [B, H, T, hd]
        return t.unflatten(-1, (heads, head_dim)).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    scores = (q @ k.transpose(-2, -1)) * head_dim**-0.5
    scores = scores.masked_fill(key_padding[:, None, None, :], torch.finfo(scores.dtype).min)
    out = (scores.softmax(dim=-1) @ v).transpose(1, 2).flatten(2)
    return mha.out_proj(out)


def _encoder_layer(layer: nn.TransformerEncoderLayer, x: Tensor, key_padding: Tensor) -> Tensor:
    """nn.TransformerEncoderLayer.forward in eval mode (dropout off), pre- or post-norm."""
    def ff(t: Tensor) -> Tensor:
        return layer.linear2(layer.activation(layer.linear1(t)))

    if layer.norm_first:
        x = x + _self_attention(layer.self_attn, layer.norm1(x), key_padding)
        return x + ff(layer.norm2(x))
    x = layer.norm1(x + _self_attention(layer.self_attn, x, key_padding))
    return layer.norm2(x + ff(x))


class ModalityEncoder(nn.Module):
    """One modality of a LightCRLModel as a traceable module: (tokens, mask) -> normalised embedding.

    Mirrors ``LightCRLModel.encode`` plus the pipeline's input handling: text is cut to the run's
    ``max_text_tokens`` and a run trained on pooled features gets the masked mean as its one token.
    """

    def __init__(self, model: nn.Module, modality: str, input_mode: str = "tokens",
                 max_tokens: int | None = None):
        super().__init__()
        if modality not in model.input_dims:
            raise LightCRLError(f"the model has no {modality} input (it has: {', '.join(model.input_dims)})")
        self.model, self.modality = model, modality
        self.input_mode, self.max_tokens = input_mode, max_tokens

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        m = self.model
        if self.input_mode == "pooled":
            tokens = _masked_mean(tokens, mask).unsqueeze(1)
            mask = torch.ones_like(mask[:, :1])
        elif self.max_tokens:
            tokens, mask = tokens[:, : self.max_tokens], mask[:, : self.max_tokens]
        tokens = tokens.to(m.logit_scale.dtype).masked_fill(~mask.unsqueeze(-1), 0.0)
        z = self._encode_tokens(tokens, mask)
        if m.anchors is None:
            return z
        return m.anchors.join(z, m.anchors.embed(self.modality, _masked_mean(tokens, mask)))

    def _encode_tokens(self, tokens: Tensor, mask: Tensor) -> Tensor:
        from lightcrl.model import _prepend

        m = self.model
        if m.dfe is None:  # two_tower baseline
            return F.normalize(m.projections[self.modality](_masked_mean(tokens, mask)), dim=-1)
        x = m.projections[self.modality](tokens)
        x, mask = m._fuse(self.modality, x, mask)
        if m.cls_token is not None:
            x, mask = _prepend(m.cls_token.expand(x.shape[0], -1), x, mask)
        key_padding = ~mask & mask.any(dim=1, keepdim=True)
        for layer in m.dfe.layers:
            x = _encoder_layer(layer, x, key_padding)
        if m.dfe.norm is not None:
            x = m.dfe.norm(x)
        pooled = x[:, 0] if m.cfg.pool == "cls" else _masked_mean(x, mask)
        return F.normalize(pooled, dim=-1)


@dataclass
class ExportedModality:
    modality: str
    path: Path
    input_dim: int
    max_abs_diff: float


def _out_paths(run_dir: Path, out: Path | None, modalities: list[str]) -> dict[str, Path]:
    if out is None:
        return {m: run_dir / "export" / f"{m}.onnx" for m in modalities}
    out = Path(out)
    if out.suffix.lower() == ".onnx":
        if len(modalities) == 1:
            return {modalities[0]: out}
        return {m: out.with_name(f"{out.stem}.{m}.onnx") for m in modalities}
    return {m: out / f"{m}.onnx" for m in modalities}


def _reference(pipe, modality: str, tokens: Tensor, mask: Tensor) -> np.ndarray:
    """What lightcrl itself computes for these features (the pipeline path used by search and eval)."""
    with torch.no_grad():
        return pipe.encode_features(modality, tokens, mask).cpu().numpy()


def _check_inputs(dim: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """Batches of other sizes than the export sample, with ragged padding and one empty row."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for b, t in ((1, 1), (3, 5), (4, 23), (2, 70)):
        x = torch.randn(b, t, dim, generator=g)
        lengths = torch.randint(1, t + 1, (b,), generator=g)
        mask = torch.arange(t)[None, :] < lengths[:, None]
        if b >= 3:
            mask[-1] = False  # an all-padding row must stay finite
        cases.append((x, mask))
    return cases


def export_onnx(run_dir: str | Path, out: str | Path | None = None, modalities: list[str] | None = None,
                atol: float = DEFAULT_ATOL, opset: int = OPSET, checkpoint: str | None = None
                ) -> list[ExportedModality]:
    """Export each modality of the run to ONNX and check it against PyTorch (raises above ``atol``)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise LightCRLError("ONNX export needs onnx and onnxruntime: pip install 'lightcrl[export]'") from e
    from lightcrl.api import LightCRLPipeline

    run_dir = Path(run_dir)
    pipe = LightCRLPipeline.from_run(run_dir, device="cpu", checkpoint=checkpoint)
    model = pipe.model.eval()
    mods = modalities or list(model.input_dims)
    unknown = [m for m in mods if m not in model.input_dims]
    if unknown:
        raise LightCRLError(f"unknown modality {', '.join(unknown)}; "
                            f"the run has {', '.join(model.input_dims)}")
    paths = _out_paths(run_dir, Path(out) if out else None, mods)
    done: list[ExportedModality] = []
    for k, mod in enumerate(mods):
        dim = model.input_dims[mod]
        wrapper = ModalityEncoder(model, mod, pipe.input,
                                  pipe.max_text_tokens if mod == "text" else None).eval()
        sample = (torch.randn(2, 7, dim), torch.tensor([[True] * 7, [True] * 4 + [False] * 3]))
        path = paths[mod]
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            # The legacy TorchScript exporter is the one that needs no extra package (onnxscript).
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper, sample, str(path), input_names=["tokens", "mask"], output_names=["embedding"],
                dynamic_axes={"tokens": {0: "batch", 1: "tokens"}, "mask": {0: "batch", 1: "tokens"},
                              "embedding": {0: "batch"}},
                opset_version=opset, do_constant_folding=True, dynamo=False,
            )
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        diff = 0.0
        for x, mask in _check_inputs(dim, seed=k):
            got = sess.run(None, {"tokens": x.numpy(), "mask": mask.numpy()})[0]
            ref = _reference(pipe, mod, x, mask)
            if got.shape != ref.shape or not np.isfinite(got).all():
                raise LightCRLError(f"{path}: ONNX output {got.shape} does not match PyTorch {ref.shape} "
                                    "or is not finite")
            diff = max(diff, float(np.abs(got - ref).max()))
        if diff > atol:
            raise LightCRLError(f"{path}: ONNX and PyTorch differ by up to {diff:.2e} (> {atol:.0e})")
        done.append(ExportedModality(mod, path, dim, diff))
    write_json(next(iter(paths.values())).parent / "export.json", {
        "run": str(run_dir), "opset": opset, "logit_scale": float(model.get_logit_scale().detach()),
        "encoders": pipe.encoder_names, "input": pipe.input, "max_text_tokens": pipe.max_text_tokens,
        "inputs": {"tokens": "[batch, tokens, input_dim] float32 frozen-encoder token features",
                   "mask": "[batch, tokens] bool, True = real token"},
        "output": "embedding [batch, width] float32, L2-normalised",
        "modalities": {d.modality: {"file": d.path.name, "input_dim": d.input_dim,
                                    "max_abs_diff": d.max_abs_diff} for d in done},
    })
    return done
