"""Tiny deterministic encoders for fast tests of the real extraction/training pipeline.

``toy-image``: an image becomes 4 tokens (2x2 grid of mean colours, projected by a fixed random matrix).
``toy-image-b``: the same with another projection and width (a second image encoder, for joins).
``toy-text``: each word becomes one token (a fixed random vector per hashed word). Importing this
module registers them in the encoder registry.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from lightcrl.encoders import register
from lightcrl.encoders.base import EncoderOutput, FrozenEncoder, masked_mean


class _ToyImageTransform:
    def __call__(self, item):
        from PIL import Image

        from lightcrl.data.media import load_image

        img = item.convert("RGB") if isinstance(item, Image.Image) else load_image(str(item))
        img = img.resize((2, 2))
        return torch.from_numpy(np.asarray(img, np.float32).reshape(4, 3) / 255.0)


def _stack(items):
    return {"pixels": torch.stack(items)}


class ToyImage(FrozenEncoder):
    name, modality, dim = "toy-image", "image", 16
    graph_inputs = {"pixels": {0: "batch"}}  # an ONNX path, for the backend tests (auto stays eager)
    seed = 0

    def _load(self):
        g = torch.Generator().manual_seed(self.seed)
        lin = torch.nn.Linear(3, self.dim)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(self.dim, 3, generator=g))
            lin.bias.zero_()
        return lin

    def _forward(self, model, batch):
        tok = model(batch["pixels"])
        mask = torch.ones(tok.shape[:2], dtype=torch.bool)
        return EncoderOutput(tok, mask, tok.mean(1))

    @property
    def transform(self):
        return _ToyImageTransform()

    @property
    def collate(self):
        return _stack

    def identity(self):
        return {"encoder": self.name, "v": 1}


class ToyImageB(ToyImage):
    name, dim, seed = "toy-image-b", 8, 1


def _word_vec(word: str, dim: int) -> np.ndarray:
    seed = int(hashlib.md5(word.lower().encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


class _ToyTextCollate:
    dim = 12

    def __call__(self, texts):
        toks = [[_word_vec(w, self.dim) for w in t.split()][:16] or [np.zeros(self.dim, np.float32)]
                for t in texts]
        T = max(len(t) for t in toks)
        x = np.zeros((len(toks), T, self.dim), np.float32)
        m = np.zeros((len(toks), T), bool)
        for i, t in enumerate(toks):
            x[i, : len(t)] = t
            m[i, : len(t)] = True
        return {"tokens": torch.from_numpy(x), "mask": torch.from_numpy(m)}


def _clean(text):
    from lightcrl.data.media import clean_caption

    return clean_caption(text)


class ToyText(FrozenEncoder):
    name, modality, dim = "toy-text", "text", 12

    def _load(self):
        return torch.nn.Identity()

    def _forward(self, model, batch):
        return EncoderOutput(batch["tokens"], batch["mask"], masked_mean(batch["tokens"], batch["mask"]))

    @property
    def transform(self):
        return _clean

    @property
    def collate(self):
        return _ToyTextCollate()

    def identity(self):
        return {"encoder": self.name, "v": 1}


register("toy-image")(lambda device="auto", **kw: ToyImage(device=device))
register("toy-image-b")(lambda device="auto", **kw: ToyImageB(device=device))
register("toy-text")(lambda device="auto", **kw: ToyText(device=device))
