"""Decoding of one media item or caption; runs inside DataLoader workers.

Everything here is a plain module-level function (picklable). A bad input raises
:class:`~lightcrl.errors.SkipItem` with a short reason, so the caller can skip and count it:

- ``load_image(path)``: RGB ``PIL.Image``; ``missing_file`` / ``corrupt_image``.
- ``load_audio(path, target_sr)``: float32 waveform; ``missing_file`` / ``corrupt_audio`` / ``silent_audio``.
- ``clean_caption(text)``: stripped str; ``invalid_text`` / ``empty_caption``.

Paths may point inside a container: ``"<file.tar>::<member name>"`` (webdataset shards) or
``"<cifar pickle>::<row index>"`` (official CIFAR python batches). Opened containers are cached per process.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import io
import os
import pickle
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps

from lightcrl.errors import LightCRLError, SkipItem

CONTAINER_SEP = "::"
SILENCE_PEAK = 1e-6

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")

# Per-process caches of opened containers. A forked worker must not reuse its parent's file offsets,
# so the caches are reset when the process id changes.
_lock = threading.Lock()
_cache_pid: int | None = None
_tars: dict = {}
_pickles: dict[str, np.ndarray] = {}
_MAX_OPEN_TARS = 32


def _caches() -> tuple[dict, dict]:
    global _cache_pid, _tars, _pickles
    if _cache_pid != os.getpid():
        _cache_pid, _tars, _pickles = os.getpid(), {}, {}
    return _tars, _pickles


def split_container(path: str) -> tuple[str, str | None]:
    """``"a.tar::x.jpg"`` -> ``("a.tar", "x.jpg")``; a plain path -> ``(path, None)``."""
    if CONTAINER_SEP in path:
        container, member = path.rsplit(CONTAINER_SEP, 1)
        return container, member
    return path, None


def _tar_member_bytes(tar_path: str, member: str) -> bytes:
    import tarfile

    with _lock:
        tars, _ = _caches()
        tf = tars.get(tar_path)
        if tf is None:
            if len(tars) >= _MAX_OPEN_TARS:
                tars.pop(next(iter(tars))).close()
            tf = tars[tar_path] = tarfile.open(tar_path, "r:")  # noqa: SIM115 (kept open: per-process cache)
        try:
            f = tf.extractfile(member)
        except KeyError:
            raise SkipItem(
                "missing_file", f"no member {member!r} in {tar_path}", f"{tar_path}::{member}"
            ) from None
        if f is None:
            raise SkipItem("missing_file", f"member {member!r} is not a file", f"{tar_path}::{member}")
        return f.read()


# The only globals a CIFAR python batch refers to: numpy array reconstruction (the official batches were
# pickled by Python 2 with numpy 1.x: ``numpy.core.multiarray._reconstruct``; numpy 2 writes
# ``numpy._core...``), and ``_codecs.encode``, with which Python 3 writes bytes at protocol 2 (batches
# re-pickled that way, as the test suite does). Lists, ints and strings need no global.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): np.empty(0).__reduce__()[0],
    ("numpy._core.multiarray", "_reconstruct"): np.empty(0).__reduce__()[0],
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR batch only: any global outside :data:`_CIFAR_GLOBALS` is refused before it is
    imported, so a file that would run code (``os.system``, ``eval``...) fails instead."""

    def __init__(self, file, path: str) -> None:
        super().__init__(file, encoding="latin1")  # Python 2 str -> str; numpy restores array bytes
        self.path = path

    def find_class(self, module: str, name: str):
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            shown = _compat_pickle.IMPORT_MAPPING.get(module, module)  # Python 2's __builtin__ -> builtins
            raise LightCRLError(
                f"refusing to load {self.path}: it references {shown}.{name}, which a CIFAR batch never "
                "contains"
            ) from None

    def persistent_load(self, pid):
        raise LightCRLError(f"refusing to load {self.path}: it holds a persistent id, which a CIFAR batch "
                            "never contains")


def read_cifar_batch(path: str) -> dict:
    """Load one official CIFAR python batch (pickled by Python 2); keys are returned as str.

    The pickle is read by a restricted unpickler that builds nothing but numpy arrays, lists, numbers and
    strings: a file referring to anything else raises :class:`LightCRLError` and no code of it runs.
    """
    with open(path, "rb") as f:
        batch = _CifarUnpickler(f, path).load()
    if not isinstance(batch, dict):
        raise LightCRLError(f"{path} is not a CIFAR batch (a {type(batch).__name__}, not a dict)")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in batch.items()}


def _cifar_row(pickle_path: str, row: str) -> Image.Image:
    with _lock:
        _, pickles = _caches()
        data = pickles.get(pickle_path)
        if data is None:
            data = pickles[pickle_path] = np.asarray(read_cifar_batch(pickle_path)["data"], dtype=np.uint8)
    index = int(row)
    if not 0 <= index < len(data):
        raise SkipItem("missing_file", f"row {index} out of range in {pickle_path}", f"{pickle_path}::{row}")
    return Image.fromarray(data[index].reshape(3, 32, 32).transpose(1, 2, 0), "RGB")


def _read_bytes(path: str, corrupt_reason: str) -> bytes:
    """Bytes of a file or tar member; missing -> SkipItem('missing_file'), unreadable -> corrupt_reason."""
    container, member = split_container(path)
    if not os.path.isfile(container):
        raise SkipItem("missing_file", f"no such file: {path}", path)
    try:
        if member is not None:
            return _tar_member_bytes(container, member)
        with open(path, "rb") as f:
            return f.read()
    except SkipItem:
        raise
    except Exception as exc:  # unreadable file, not a tar archive...
        raise SkipItem(corrupt_reason, f"cannot read {path}: {type(exc).__name__}: {exc}", path) from exc


def _gray_to_8bit(img: Image.Image, fmt: str | None) -> np.ndarray:
    """A 16-bit, 32-bit integer or float grayscale image rescaled (not clipped) to uint8."""
    arr = np.asarray(img, dtype=np.float64)
    peak = float(arr.max(initial=0))
    if img.mode == "F" and peak <= 1.0:
        full_scale = 1.0
    elif img.mode in _SIXTEEN_BIT_MODES or fmt == "PNG" or 255 < peak <= 65535:
        full_scale = 65535.0
    else:
        full_scale = max(peak, 255.0)
    return np.clip(np.rint(arr * (255.0 / full_scale)), 0, 255).astype(np.uint8)


def _to_rgb(img: Image.Image, fmt: str | None) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: alpha composited over white, 16-bit and float rescaled (not clipped).

    ``fmt`` is the file format: a PNG in mode ``I`` is 16-bit grayscale (PNG has no 32-bit integers).
    """
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        return Image.fromarray(_gray_to_8bit(img, fmt), "L").convert("RGB")
    if img.mode in ("P", "PA"):  # palette (with its transparency, if any)
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, ...


def load_image(path: str) -> Image.Image:
    """Decode an image file (format detected by content, not extension) into an RGB image.

    Raises ``SkipItem("missing_file")`` or ``SkipItem("corrupt_image")`` (zero-byte, truncated, not an image).
    """
    container, member = split_container(path)
    if member is not None and not container.endswith(".tar") and member.isdigit():
        if not os.path.isfile(container):
            raise SkipItem("missing_file", f"no such file: {container}", path)
        try:
            return _cifar_row(container, member)
        except SkipItem:
            raise
        except Exception as exc:
            raise SkipItem("corrupt_image", f"unreadable CIFAR batch {path}: {exc}", path) from exc
    # the messages name the file: decoding reads from memory, so PIL's own do not
    data = _read_bytes(path, "corrupt_image")
    if not data:
        raise SkipItem("corrupt_image", f"empty file: {path}", path)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode now, so truncation is caught here
            return _to_rgb(ImageOps.exif_transpose(img), img.format)
    except Exception as exc:  # PIL raises many types for bad input (OSError, SyntaxError, ValueError...)
        raise SkipItem("corrupt_image", f"cannot decode {path}: {type(exc).__name__}: {exc}", path) from exc


def _decode_audio(data: bytes, path: str) -> tuple[np.ndarray, int]:
    """-> (channels, samples) float32 and the sample rate; soundfile first, librosa as fallback."""
    import soundfile as sf

    try:
        wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        return wav.T, int(sr)
    except Exception as sf_exc:
        if split_container(path)[1] is not None:  # librosa/audioread need a real file name
            raise SkipItem("corrupt_audio", f"{type(sf_exc).__name__}: {sf_exc}", path) from sf_exc
        try:
            import librosa

            with warnings.catch_warnings():  # "PySoundFile failed. Trying audioread instead." etc.
                warnings.simplefilter("ignore")
                wav, sr = librosa.load(path, sr=None, mono=False)
        except Exception as exc:
            raise SkipItem("corrupt_audio", f"{type(sf_exc).__name__}: {sf_exc}; {exc}", path) from exc
        return np.atleast_2d(np.asarray(wav, dtype=np.float32)), int(sr)


def load_audio(path: str, target_sr: int, mono: bool = True) -> np.ndarray:
    """Decode audio to float32 at ``target_sr``: shape ``(samples,)`` if mono, else ``(channels, samples)``.

    Raises ``SkipItem`` with ``missing_file``, ``corrupt_audio`` (unreadable, NaN) or ``silent_audio``
    (no samples, or peak below 1e-6).
    """
    data = _read_bytes(path, "corrupt_audio")
    if not data:
        raise SkipItem("corrupt_audio", "empty file", path)
    wav, sr = _decode_audio(data, path)
    if wav.size == 0:
        raise SkipItem("silent_audio", "no samples", path)
    if not np.isfinite(wav).all():
        raise SkipItem("corrupt_audio", "non-finite samples", path)
    if float(np.abs(wav).max()) < SILENCE_PEAK:
        raise SkipItem("silent_audio", "all samples are (near) zero", path)
    if mono:
        wav = wav.mean(axis=0)
    if sr != target_sr:
        import librosa

        wav = librosa.resample(wav, orig_sr=sr, target_sr=target_sr, res_type="soxr_hq", axis=-1)
    return np.ascontiguousarray(wav, dtype=np.float32)


def clean_caption(text: str | bytes) -> str:
    """Validate and normalise one caption: UTF-8 (bytes decoded strictly), surrounding whitespace stripped.

    Raises ``SkipItem("invalid_text")`` for undecodable text (also a str holding lone surrogates, e.g. from
    ``errors="surrogateescape"``) and ``SkipItem("empty_caption")`` for an empty or whitespace-only caption.
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SkipItem("invalid_text", f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    elif not isinstance(text, str):
        raise SkipItem("invalid_text", f"expected text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SkipItem("invalid_text", f"not valid UTF-8 (undecodable byte at {exc.start})") from exc
    text = text.lstrip("\ufeff").strip()
    if not text:
        raise SkipItem("empty_caption", "empty or whitespace-only caption")
    return text
