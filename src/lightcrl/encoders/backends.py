"""How a frozen encoder's forward pass runs: eager PyTorch, or its exported ONNX graph in ONNX Runtime.

Frozen encoders never train, so their forward may run in an inference engine that folds batch norm into
the convolutions, fuses activations and picks faster kernels. The backends:

- ``eager``: the PyTorch module as written (``torch.inference_mode``): the reference.
- ``onnx``: the encoder's own ``_forward`` exported once with ``torch.onnx.export`` (dynamo) and run by
  ONNX Runtime on CPU. The graph is cached under ``<cache>/onnx/``, keyed by the encoder's identity
  (weights + preprocessing), the torch version and the opset, and written atomically.
- ``bf16``: the PyTorch module in bfloat16 autocast (what ``eager`` already does on a GPU). On a CPU with
  AMX the transformer text encoders run 2.1-2.6x faster than ``eager`` (MiniLM-L6, mpnet-base), features
  at cosine >= 0.9999 to eager's and STS-B unchanged to 0.01 (docs/benchmarks.md); on a CPU without AMX
  bf16 is emulated and slower (a warning says so). Opt-in: it is not float error, so ``auto`` never picks it.
- ``auto`` (default): the encoder's ``fast_backend``, the one measured faster for it on CPU
  (``benchmarks/extract.py``); eager on GPU, or where onnxruntime/onnxscript are not installed.

A backend spec may also choose per modality or per encoder after an optional default, comma-separated:
``text=bf16`` (text encoders in bf16, the rest auto), ``eager,audio=onnx``, ``minilm-l6=bf16``.

Features of eager and onnx differ only by float error (docs/benchmarks.md gives the measured max abs diff
and cosine); the backend is part of the encoder's store identity, so stores never mix them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lightcrl.errors import LightCRLError
from lightcrl.paths import cache_dir

if TYPE_CHECKING:
    from lightcrl.encoders.base import FrozenEncoder

log = logging.getLogger(__name__)

BACKENDS = ("auto", "eager", "onnx", "bf16")
OPSET = 18
OUTPUT_NAMES = ("tokens", "mask", "pooled")


def _check_one(backend: str) -> str:
    if backend not in BACKENDS:
        raise LightCRLError(
            f"unknown encoder backend {backend!r}; choose one of: {', '.join(BACKENDS)} (or per modality / "
            "encoder after an optional default, e.g. text=bf16 or eager,audio=onnx)"
        )
    return backend


def parse_backend_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"eager,text=bf16"`` -> ``("eager", {"text": "bf16"})``: the default and the per-key choices (a key
    is a modality or an encoder name)."""
    default, per = "auto", {}
    for token in (t.strip() for t in str(spec).split(",")):
        if not token:
            continue
        key, sep, value = token.rpartition("=")
        if not sep:
            default = _check_one(token)
        elif not key.strip():
            raise LightCRLError(f"encoder backend {token!r}: write KEY=BACKEND, e.g. text=bf16")
        else:
            per[key.strip()] = _check_one(value.strip())
    return default, per


def check_backend(spec: str) -> str:
    parse_backend_spec(spec)
    return spec


def backend_for(spec: str, name: str, modality: str) -> str:
    """The one backend ``spec`` gives the encoder ``name`` (e.g. ``minilm-l6@layer4``) of ``modality``:
    its full name, then its name without the layer, then its modality, then the default."""
    default, per = parse_backend_spec(spec)
    for key in (name, name.rpartition("@")[0] or name, modality):
        if key in per:
            return per[key]
    return default


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401  (the dynamo exporter's back end)
    except ImportError:
        return False
    return True


def resolve_backend(encoder: FrozenEncoder, requested: str) -> str:
    """``auto`` -> the encoder's measured-fastest backend where it can run; explicit choices are checked."""
    _check_one(requested)
    if requested == "bf16" and encoder.device.type == "cpu":
        from lightcrl.devices import cpu_has_amx

        if not cpu_has_amx():
            log.warning("encoder backend bf16 on a CPU without AMX: bf16 is emulated there and slower than "
                        "eager; use --encoder-backend auto")
    can_onnx = bool(encoder.graph_inputs) and encoder.device.type == "cpu"
    if requested == "auto":
        if encoder.fast_backend == "onnx" and can_onnx and onnx_available():
            return "onnx"
        return "eager"
    if requested == "onnx":
        if not encoder.graph_inputs:
            raise LightCRLError(f"encoder {encoder.name} has no ONNX path; use --encoder-backend eager")
        if encoder.device.type != "cpu":
            raise LightCRLError(
                f"the onnx encoder backend runs on CPU only (device is {encoder.device}); "
                "use --encoder-backend eager (or auto) on a GPU"
            )
        if not onnx_available():
            raise LightCRLError(
                "the onnx backend needs onnxruntime and onnxscript (pip install onnxruntime onnxscript)"
            )
    return requested


class ForwardGraph(torch.nn.Module):
    """The encoder's own ``_forward`` as a module of plain tensors, for export: nothing re-implemented.

    ``lightcrl.export`` composes it with a run's trained model into one raw-input -> embedding graph."""

    def __init__(self, encoder: FrozenEncoder, model: torch.nn.Module):
        super().__init__()
        self.encoder, self.model = encoder, model
        self.names = list(encoder.graph_inputs)

    def forward(self, *inputs: torch.Tensor):
        out = self.encoder._forward(self.model, dict(zip(self.names, inputs)))
        return out.tokens, out.mask, out.pooled


class ExtractionGraph(ForwardGraph):
    """The graph extraction runs: ``ForwardGraph`` with the tokens cast to float16, the feature store's
    dtype. ONNX Runtime's cast rounds exactly as numpy's does and costs next to nothing inside the graph,
    where a numpy pass over every batch's tokens took ~0.2 ms an image on the decoding core."""

    def forward(self, *inputs: torch.Tensor):
        tokens, mask, pooled = super().forward(*inputs)
        return tokens.to(torch.float16), mask, pooled


# Bump when export_graph changes what it writes. 3: images enter as uint8 HWC bytes, tokens leave as float16.
GRAPH_EXPORT_VERSION = 3


def graph_path(encoder: FrozenEncoder) -> Path:
    # The graph's inputs and how it is exported key it too: a graph cached before a change of either
    # (e.g. audio's block_mask, a batch axis exported at size 1) is never reused.
    what = {"identity": encoder.identity(), "torch": torch.__version__, "opset": OPSET,
            "inputs": encoder.graph_inputs, "export": GRAPH_EXPORT_VERSION}
    key = json.dumps(what, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    slug = encoder.name.replace("/", "_").replace(":", "_")
    return cache_dir() / "onnx" / f"{slug}-{digest}.onnx"


def export_graph(encoder: FrozenEncoder, sample: dict[str, torch.Tensor], path: Path) -> Path:
    """Export ``encoder._forward`` to ``path`` (atomically) with the encoder's dynamic axes."""
    log.info("exporting %s to ONNX (once; cached in %s)", encoder.name, path)
    return export_module(ExtractionGraph(encoder, encoder.model), encoder, sample, path, OUTPUT_NAMES)


def export_module(module: torch.nn.Module, encoder: FrozenEncoder, sample: dict[str, torch.Tensor],
                  path: Path, output_names: tuple[str, ...]) -> Path:
    """Export ``module``, whose ``forward(*inputs)`` takes the encoder's batch tensors in the order of its
    ``graph_inputs``, to ``path`` (atomically), with the encoder's dynamic axes (dynamo exporter)."""
    from lightcrl.io import atomic_open

    dims: dict[str, torch.export.Dim] = {}
    dynamic = {
        name: {axis: dims.setdefault(dim, torch.export.Dim(dim)) for axis, dim in axes.items()}
        for name, axes in encoder.graph_inputs.items()
    }
    args = tuple(_widened(sample[name].cpu(), axes) for name, axes in encoder.graph_inputs.items())
    with _quiet_exporter(), torch.inference_mode(False), torch.no_grad():
        with contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(
                module.eval(), args, input_names=list(encoder.graph_inputs), output_names=list(output_names),
                dynamic_shapes={"inputs": tuple(dynamic[n] for n in encoder.graph_inputs)},
                opset_version=OPSET, dynamo=True, verbose=False,
            )
    with atomic_open(path, "wb") as f:
        f.write(program.model_proto.SerializeToString())
    return path


def _widened(x: torch.Tensor, axes: dict[int, str]) -> torch.Tensor:
    """The sample with every dynamic axis of size 1 repeated to 2: torch.export specialises size-1 axes, so
    a first batch of one item (``encode_image(["one.jpg"])`` on a fresh cache) would fix the batch at 1."""
    for axis in axes:
        if x.shape[axis] == 1:
            x = torch.cat([x, x], dim=axis)
    return x


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's chatter (optional torchvision ops, deprecations, one INFO line per rewrite) hidden."""
    names = ("onnx_ir", "onnxscript", "torch.onnx", "torch._dynamo", "torch.export")
    levels = {n: logging.getLogger(n).level for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)


class OnnxForward:
    """An ONNX Runtime session of one encoder's graph: a batch dict in, ``(tokens, mask, pooled)`` out."""

    def __init__(self, encoder: FrozenEncoder, sample: dict[str, torch.Tensor]):
        import onnxruntime as ort

        path = graph_path(encoder)
        if not path.exists():
            export_graph(encoder, sample, path)
        so = ort.SessionOptions()
        # the same cores torch would use, unless the extraction chose (embed.default_forward_threads)
        so.intra_op_num_threads = getattr(encoder, "forward_threads", None) or torch.get_num_threads()
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Threads sleep instead of spinning between ops: decoding shares the cores (see embed.py).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 -- a damaged cache file (disk trouble): export again, once
            export_graph(encoder, sample, path)
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.names = list(encoder.graph_inputs)

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        feeds = {n: np.ascontiguousarray(batch[n].cpu().numpy()) for n in self.names}
        return tuple(torch.from_numpy(o) for o in self.session.run(list(OUTPUT_NAMES), feeds))
