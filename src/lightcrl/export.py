"""`lightcrl export`: the trainable part of a run (projection + context + DFE per modality) as ONNX, or
with ``--full`` (:func:`export_full`) the whole pipeline, frozen encoder included, per modality.

Each modality becomes one graph: inputs ``tokens`` [B, T, D] float32 (the frozen encoder's token
features) and ``mask`` [B, T] bool (True = real token), output ``embedding`` [B, width], L2-normalised.
B and T are dynamic. The graph is checked against PyTorch with onnxruntime right after export.

The graph is the model's OWN forward (:meth:`LightCRLModel.encode` behind the run's
:class:`~lightcrl.features.FeatureAdapter`), captured with ``torch.export`` (the dynamo exporter), whose
symbolic shapes keep B and T dynamic through ``nn.MultiheadAttention``; the older TorchScript tracer baked
them into its reshapes, which is why an earlier version kept a hand-written copy of the DFE here.

The full export composes the frozen encoder's own forward (:class:`~lightcrl.encoders.backends.ForwardGraph`,
what the encoder's ONNX backend exports) with :class:`ModalityEncoder` in one graph: raw encoder inputs
(image: preprocessed pixels; text: token ids + attention mask) -> embedding. What happens before the graph
(image resize/crop/normalisation, the tokenizer) is written as data into ``pipeline.json`` beside the graphs,
with the tokenizer's files, so onnxruntime + tokenizers + numpy + PIL reproduce ``lightcrl.load(run)``.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from dataclasses import dataclass, field
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
MIN_COSINE = 0.999  # the full graphs vs the PyTorch pipeline (lightcrl.load(run).encode_*), every row
MANIFEST = "pipeline.json"
# The full graphs' output ("embedding" collides with a value of the same name inside transformers' graphs).
OUTPUT = "shared_embedding"


class ModalityEncoder(nn.Module):
    """One modality of a model as ``(tokens, mask) -> embedding``: the run's feature adapter (text cut to
    ``max_text_tokens``; a run trained on pooled features gets the masked mean as its one token) followed by
    ``model.encode``. Nothing of the model is re-implemented here."""

    def __init__(self, model: nn.Module, modality: str, adapter: FeatureAdapter | None = None):
        super().__init__()
        if modality not in model.input_dims:
            raise LightCRLError(f"the model has no {modality} input (it has: {', '.join(model.input_dims)})")
        self.model, self.modality, self.adapter = model, modality, adapter or FeatureAdapter()

    def forward(self, tokens: Tensor, mask: Tensor, pooled: Tensor | None = None) -> Tensor:
        inputs = self.adapter.from_encoder(self.modality, tokens, mask, pooled)
        return self.model.encode(self.modality, *inputs)


class FullModalityEncoder(nn.Module):
    """Raw encoder inputs -> embedding: the frozen encoder's own forward, then :class:`ModalityEncoder`
    (the frozen outputs cast as :meth:`FrozenEncoder.encode_batch` casts them)."""

    def __init__(self, frozen: nn.Module, head: ModalityEncoder):
        super().__init__()
        self.frozen, self.head = frozen, head

    def forward(self, *inputs: Tensor) -> Tensor:
        tokens, mask, pooled = self.frozen(*inputs)
        return self.head(tokens.float(), mask.bool(), pooled.float())


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


# -- the whole pipeline ---------------------------------------------------------------------------------


@dataclass
class FullExport:
    """What :func:`export_full` wrote: one graph per exported modality, and why the others were not."""

    folder: Path
    modalities: list[ExportedModality] = field(default_factory=list)
    min_cosine: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _image_samples(seed: int = 0) -> list:
    """Smooth random pictures of several aspect ratios (the crop and resize both matter)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for w, h in ((256, 256), (320, 240), (230, 300), (224, 224)):
        small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), "RGB")
        out.append(small.resize((w, h), Image.BICUBIC))
    return out


TEXT_SAMPLES = [
    "a dog",
    "two children are playing football on a sandy beach near the sea",
    "  A red circle.  ",
    " ".join(["a very long caption that runs past the tokenizer's limit"] * 30),
]


def _samples(modality: str) -> list:
    return _image_samples() if modality == "image" else TEXT_SAMPLES


def _check_out(out: Path) -> None:
    """``out`` must be new, empty or a previous full export (which is replaced): nothing else is deleted."""
    if out.suffix.lower() == ".onnx":
        raise LightCRLError(f"--full writes a folder (graphs, tokenizer, {MANIFEST}); "
                            f"--out {out} is a file name")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / MANIFEST).is_file())):
        raise LightCRLError(f"{out} exists and is not a full export (no {MANIFEST}): choose another --out")


def _replace_folder(tmp: Path, out: Path) -> None:
    """Put the finished ``tmp`` at ``out`` (checked by :func:`_check_out`), replacing what was there."""
    _check_out(out)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, out)


def export_full(run_dir: str | Path, out: str | Path | None = None, modalities: list[str] | None = None,
                min_cosine: float = MIN_COSINE, checkpoint: str | None = None) -> FullExport:
    """Export raw input -> embedding graphs (frozen encoder + trained model) into the folder ``out``
    (default ``RUN/export/full``) with ``pipeline.json`` (preprocessing, inputs, checks) and the tokenizer.

    Each graph is checked against the PyTorch pipeline (eager frozen encoder, ``encode_image`` /
    ``encode_text``) on sample inputs of other batch sizes than the export's: it raises below
    ``min_cosine``. A modality whose encoder has no ONNX path is skipped with its reason when no modality
    was asked for, and refused when it was. The folder appears only when complete.
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise LightCRLError("ONNX export needs onnx and onnxruntime: pip install 'lightcrl[export]'") from e
    from lightcrl.api import LightCRLPipeline
    from lightcrl.encoders.backends import ForwardGraph, export_module
    from lightcrl.encoders.base import FrozenEncoder

    run_dir = Path(run_dir)
    pipe = LightCRLPipeline.from_run(run_dir, device="cpu", checkpoint=checkpoint, encoder_backend="eager")
    model = pipe.model.eval()
    mods = modalities or list(model.input_dims)
    unknown = [m for m in mods if m not in model.input_dims]
    if unknown:
        raise LightCRLError(f"unknown modality {', '.join(unknown)}; "
                            f"the run has {', '.join(model.input_dims)}")
    out = Path(out) if out else RunDir(run_dir).export / "full"
    _check_out(out)
    result = FullExport(out)
    encoders = {}
    for mod in mods:
        enc = pipe.encoder(mod)
        # an encoder exports end to end when it has a graph AND describes, as data, how raw inputs reach it
        if not enc.graph_inputs or type(enc).graph_preprocessing is FrozenEncoder.graph_preprocessing:
            reason = f"encoder {enc.name} has no ONNX path from raw inputs: {enc.no_graph_reason}"
            if modalities:
                raise LightCRLError(f"cannot export {mod} end to end: {reason}")
            result.skipped[mod] = reason
            continue
        encoders[mod] = enc
    if not encoders:
        raise LightCRLError(f"nothing to export end to end: {'; '.join(result.skipped.values())}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        described = {}
        for mod, enc in encoders.items():
            preprocessing = enc.graph_preprocessing(tmp)
            if preprocessing is None:
                raise LightCRLError(f"encoder {enc.name} cannot describe its preprocessing: "
                                    f"{mod} not exported")
            items = _samples(mod)
            path = tmp / f"{mod}.onnx"
            head = ModalityEncoder(model, mod, pipe.adapter)
            module = FullModalityEncoder(ForwardGraph(enc, enc.model), head)
            export_module(module, enc, enc.collate([enc.transform(x) for x in items[:2]]), path, (OUTPUT,))
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            diff, cos = 0.0, 1.0
            for chunk in (items[2:3], items[1:]):  # other batch sizes than the export sample's
                batch = enc.collate([enc.transform(x) for x in chunk])
                got = sess.run(None, {n: batch[n].numpy() for n in enc.graph_inputs})[0]
                ref = getattr(pipe, f"encode_{mod}")(chunk, batch_size=len(chunk), progress=False)
                if got.shape != ref.shape or not np.isfinite(got).all():
                    raise LightCRLError(f"{mod}: ONNX output {got.shape} does not match PyTorch {ref.shape} "
                                        "or is not finite")
                diff = max(diff, float(np.abs(got - ref).max()))
                norms = np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1)
                cos = min(cos, float(((got * ref).sum(1) / norms).min()))
            if cos < min_cosine:
                raise LightCRLError(f"{mod}: the ONNX pipeline and PyTorch differ (cosine {cos:.6f} < "
                                    f"{min_cosine}, max abs diff {diff:.2e})")
            result.modalities.append(ExportedModality(mod, out / path.name, model.input_dims[mod], diff))
            result.min_cosine[mod] = cos
            described[mod] = {
                "file": path.name, "encoder": enc.name, "inputs": list(enc.graph_inputs),
                "output": f"{OUTPUT} [batch, {model.embed_dim}] float32, L2-normalised",
                "preprocessing": preprocessing, "max_abs_diff": diff, "min_cosine": cos,
            }
        write_json(tmp / MANIFEST, {
            "run": str(run_dir), "opset": OPSET, "embed_dim": int(model.embed_dim),
            "logit_scale": pipe.logit_scale, **pipe.adapter.describe(),
            "checked_against": "lightcrl.load(run).encode_<modality> with the eager frozen encoders",
            "modalities": described,
            "not_exported": result.skipped,
        })
        _replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result
