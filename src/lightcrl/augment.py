"""ConVIRT-style image augmentation with PIL and numpy (no torchvision).

Random resized crop, horizontal flip and colour jitter follow torchvision's definitions (its PIL backend:
``RandomResizedCrop.get_params``, ``ImageEnhance`` for brightness/contrast/saturation, an HSV shift for
hue, the four jitter ops in random order), then the image is scaled to [0, 1] and normalised like the
frozen encoder's own preprocessing. Every draw comes from the ``numpy.random.Generator`` passed in, so an
augmentation is a pure function of (image, rng): seed the rng with (seed, epoch, item) to replay an epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance

__all__ = ["ConVIRTAugment", "color_jitter", "horizontal_flip", "random_resized_crop", "to_tensor"]


def _as_rgb(item: Any) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    from lightcrl.data.media import load_image

    return load_image(str(item))


def random_resized_crop(img: Image.Image, size: int, scale: tuple[float, float], ratio: tuple[float, float],
                        rng: np.random.Generator) -> Image.Image:
    """A crop of random area (``scale`` of the image) and aspect ``ratio``, resized to size x size."""
    w, h = img.size
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box = None
    for _ in range(10):  # torchvision's rejection sampling, then its central-crop fallback
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            box = (left, top, left + cw, top + ch)
            break
    if box is None:
        in_ratio = w / h
        if in_ratio < ratio[0]:
            cw, ch = w, round(w / ratio[0])
        elif in_ratio > ratio[1]:
            cw, ch = round(h * ratio[1]), h
        else:
            cw, ch = w, h
        left, top = (w - cw) // 2, (h - ch) // 2
        box = (left, top, left + cw, top + ch)
    return img.resize((size, size), Image.BILINEAR, box=box)


def horizontal_flip(img: Image.Image, p: float, rng: np.random.Generator) -> Image.Image:
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < p else img


def _adjust_hue(img: Image.Image, shift: float) -> Image.Image:
    h, s, v = img.convert("HSV").split()
    hue = (np.asarray(h, np.int16) + int(round(shift * 255))) % 256  # uint8 wrap-around, as torchvision
    return Image.merge("HSV", (Image.fromarray(hue.astype(np.uint8), "L"), s, v)).convert("RGB")


def color_jitter(img: Image.Image, brightness: float, contrast: float, saturation: float, hue: float,
                 rng: np.random.Generator) -> Image.Image:
    """torchvision ColorJitter: factors in [1 - x, 1 + x] (hue shift in [-hue, hue]), ops in random order."""
    ops = []
    for strength, enhancer in ((brightness, ImageEnhance.Brightness), (contrast, ImageEnhance.Contrast),
                               (saturation, ImageEnhance.Color)):
        if strength > 0:
            factor = rng.uniform(max(0.0, 1 - strength), 1 + strength)
            ops.append(lambda im, e=enhancer, f=factor: e(im).enhance(f))
        else:
            ops.append(None)
    if hue > 0:
        shift = rng.uniform(-hue, hue)
        ops.append(lambda im, s=shift: _adjust_hue(im, s))
    else:
        ops.append(None)
    for i in rng.permutation(len(ops)):
        if ops[i] is not None:
            img = ops[i](img)
    return img


def to_tensor(img: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """[3, H, W] float32, scaled to [0, 1] then normalised per channel."""
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


@dataclass(frozen=True)
class ConVIRTAugment:
    """The training-time image augmentation of ConVIRT (Zhang et al. 2020), picklable for DataLoader workers.

    Defaults are ConVIRT's: crop scale [0.6, 1.0], flip p = 0.5, brightness and contrast jitter 0.4
    (factors in [0.6, 1.4]). ``mean``/``std`` must match the encoder's normalisation
    (:meth:`for_encoder` reads them from an ``ImageTransform``).
    """

    size: int = 224
    scale: tuple[float, float] = (0.6, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.0
    hue: float = 0.0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def pil(self, item: Any, rng: np.random.Generator) -> Image.Image:
        """A path or PIL image -> the augmented size x size RGB image."""
        img = random_resized_crop(_as_rgb(item), self.size, self.scale, self.ratio, rng)
        img = horizontal_flip(img, self.flip_p, rng)
        return color_jitter(img, self.brightness, self.contrast, self.saturation, self.hue, rng)

    def __call__(self, item: Any, rng: np.random.Generator) -> torch.Tensor:
        """A path or PIL image -> augmented, normalised [3, size, size] tensor."""
        return to_tensor(self.pil(item, rng), self.mean, self.std)

    @classmethod
    def for_encoder(cls, transform: Any, size: int | None = None, **kw: Any) -> ConVIRTAugment:
        """Take size (its crop) and normalisation from an encoder's ``ImageTransform`` when it has them."""
        mean = tuple(getattr(transform, "mean", cls.mean))
        std = tuple(getattr(transform, "std", cls.std))
        return cls(size=size or int(getattr(transform, "crop", cls.size)), mean=mean, std=std, **kw)
