"""Device choice and mixed precision: CUDA with bf16/fp16 autocast when present, CPU otherwise.

``precision`` (a training option, ``optim.precision``) picks the autocast dtype:

- ``auto``: bf16 on GPUs that support it, else fp16; full precision on CPU (the default, so CPU runs keep
  their bit-exact resumes and published numbers);
- ``bf16``: bfloat16 autocast on any device. On CPUs with AMX (``amx_bf16`` in /proc/cpuinfo) the cached
  training step runs ~1.5x faster than float32 (docs/benchmarks.md, ``benchmarks/train_step.py
  --precisions fp32,bf16``); on CPUs without it bf16 is emulated and slower;
- ``fp16``: float16 autocast, CUDA only;
- ``fp32``: no autocast anywhere.
"""

from __future__ import annotations

import contextlib

import torch

from lightcrl.errors import LightCRLError


def resolve_device(name: str | None = "auto") -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``; None = full precision (see the module's text)."""
    if precision not in PRECISIONS:
        raise LightCRLError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise LightCRLError("precision fp16 needs a CUDA device; on a CPU use bf16 (or fp32)")
        return torch.float16
    if device.type != "cuda":  # auto on CPU: full precision
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX bf16 tiles (where bf16 matrix multiplications run several times fp32's)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def autocast(device: torch.device, enabled: bool = True, precision: str = "auto"):
    dtype = autocast_dtype(device, precision) if enabled else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
