"""`lightcrl export`: the trainable part of a run (projection + context + DFE per modality) as ONNX.

Each modality becomes one graph: inputs ``tokens`` [B, T, D] float32 (the frozen encoder's token
features) and ``mask`` [B, T] bool (True = real token), output ``embedding`` [B, width], L2-normalised.
B and T are dynamic. The graph is checked against PyTorch with onnxruntime right after export.

The graph is the model's OWN forward (:meth:`LightCRLModel.encode` behind the run's
:class:`~lightcrl.features.FeatureAdapter`), captured with ``torch.export`` (the dynamo exporter), whose
symbolic shapes keep B and T dynamic through ``nn.MultiheadAttention``; the older TorchScript tracer baked
them into its reshapes, which is why an earlier version kept a hand-written copy of the DFE here.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lightcrl.errors import LightCRLError
from lightcrl.features import FeatureAdapter
from lightcrl.io import write_json
from lightcrl.rundir import RunDir

log = logging.getLogger(__name__)
DEFAULT_ATOL = 1e-4
OPSET = 18


class ModalityEncoder(nn.Module):
    """One modality of a model as ``(tokens, mask) -> embedding``: the run's feature adapter (text cut to
    ``max_text_tokens``; a run trained on pooled features gets the masked mean as its one token) followed by
    ``model.encode``. Nothing of the model is re-implemented here."""

    def __init__(self, model: nn.Module, modality: str, adapter: FeatureAdapter | None = None):
        super().__init__()
        if modality not in model.input_dims:
            raise LightCRLError(f"the model has no {modality} input (it has: {', '.join(model.input_dims)})")
        self.model, self.modality, self.adapter = model, modality, adapter or FeatureAdapter()

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.model.encode(self.modality, *self.adapter.from_encoder(self.modality, tokens, mask))


@dataclass
class ExportedModality:
    modality: str
    path: Path
    input_dim: int
    max_abs_diff: float


def _out_paths(run_dir: Path, out: Path | None, modalities: list[str]) -> dict[str, Path]:
    if out is None:
        return {m: RunDir(run_dir).export / f"{m}.onnx" for m in modalities}
    out = Path(out)
    if out.suffix.lower() == ".onnx":
        if len(modalities) == 1:
            return {modalities[0]: out}
        return {m: out.with_name(f"{out.stem}.{m}.onnx") for m in modalities}
    return {m: out / f"{m}.onnx" for m in modalities}


def _export(module: nn.Module, sample: tuple[Tensor, Tensor], path: Path, opset: int) -> None:
    """``torch.export`` -> ONNX with dynamic batch and token axes."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's back end)
    except ImportError as e:
        raise LightCRLError("ONNX export needs onnxscript: pip install 'lightcrl[export]'") from e
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # exporter chatter (e.g. optional torchvision ops)
        program = torch.onnx.export(
            module, sample, input_names=["tokens", "mask"], output_names=["embedding"],
            dynamic_shapes={"tokens": {0: batch, 1: tokens}, "mask": {0: batch, 1: tokens}},
            opset_version=opset, dynamo=True, verbose=False,
        )
    program.save(str(path))


def _reference(pipe, modality: str, tokens: Tensor, mask: Tensor) -> np.ndarray:
    """What lightcrl itself computes for these features (the pipeline path used by search and eval)."""
    return pipe.encode_features(modality, *pipe.adapter.from_encoder(modality, tokens, mask)).numpy()


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
        wrapper = ModalityEncoder(model, mod, pipe.adapter).eval()
        sample = (torch.randn(2, 7, dim), torch.tensor([[True] * 7, [True] * 4 + [False] * 3]))
        path = paths[mod]
        path.parent.mkdir(parents=True, exist_ok=True)
        _export(wrapper, sample, path, opset)
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
        "encoders": pipe.encoder_names, **pipe.adapter.describe(),
        "inputs": {"tokens": "[batch, tokens, input_dim] float32 frozen-encoder token features",
                   "mask": "[batch, tokens] bool, True = real token"},
        "output": "embedding [batch, width] float32, L2-normalised",
        "modalities": {d.modality: {"file": d.path.name, "input_dim": d.input_dim,
                                    "max_abs_diff": d.max_abs_diff} for d in done},
    })
    return done
