"""End-to-end fine-tuning of the shared encoder with a linear classification head, on cached features.

Unlike the LightCRL authors' code (which trains only the head on top of a frozen encoder), the default
here unfreezes the encoder: every model parameter gets gradients. ``freeze_encoder=True`` reproduces
the authors' head-only variant for comparison. The caller's model is deep-copied and never modified.
Test accuracy is recorded every ``eval_every`` epochs; ``top1`` is the accuracy after the last epoch.
"""

from __future__ import annotations

import copy
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from lightcrl.metrics.linear_probe import default_topk, mean_per_class_recall, topk_from_scores


@runtime_checkable
class FeatureSource(Protocol):
    """Cached frozen-encoder token features of a labelled dataset."""

    labels: np.ndarray  # [N] int class ids

    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens FloatTensor [B, T, D] and mask BoolTensor [B, T] (True = real token) for ``indices``
        (any order, as given)."""
        ...


class _Classifier(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module, modality: str, dim: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.modality = modality
        self.head = torch.nn.Linear(dim, num_classes)

    def embed(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode(self.modality, tokens, mask).float()

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens, mask))


def _embed_all(clf: _Classifier, source: FeatureSource, batch_size: int, device: str) -> torch.Tensor:
    clf.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(source), batch_size):
            tokens, mask = source.batch(np.arange(s, min(s + batch_size, len(source))))
            out.append(clf.embed(tokens.to(device), mask.to(device)).float())
    return torch.cat(out)


def _scores(clf: _Classifier, source: FeatureSource, batch_size: int, device: str) -> np.ndarray:
    clf.eval()
    with torch.no_grad():
        emb = _embed_all(clf, source, batch_size, device)
        return clf.head(emb).float().cpu().numpy()


def evaluate(
    model: torch.nn.Module,
    modality: str,
    train: FeatureSource,
    test: FeatureSource,
    num_classes: int,
    epochs: int = 100,
    eval_every: int = 20,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
    device: str = "cpu",
    freeze_encoder: bool = False,
    weight_decay: float = 0.0,
) -> dict[str, Any]:
    """Fine-tune a copy of ``model`` (``model.encode(modality, tokens, mask) -> [B, d]``) plus a linear head.

    AdamW on all parameters (head only with ``freeze_encoder=True``, where the encoder runs in eval mode
    and its embeddings are computed once). Returns ``acc@epoch{K}`` (percent), final ``top1``
    (+``top5`` when >5 classes), ``mean_per_class_recall``, ``train_loss`` (last epoch mean),
    ``trainable_params`` and ``freeze_encoder``.
    """
    if not hasattr(model, "encode"):
        raise TypeError("model must have an encode(modality, tokens, mask) method")
    ytr_np = np.asarray(train.labels, dtype=np.int64).reshape(-1)
    yte_np = np.asarray(test.labels, dtype=np.int64).reshape(-1)
    if len(ytr_np) != len(train) or len(yte_np) != len(test):
        raise ValueError("labels and feature source lengths differ")
    if min(ytr_np.min(), yte_np.min()) < 0 or max(ytr_np.max(), yte_np.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes})")

    gen = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        torch.manual_seed(seed)  # seeded head init and dropout, without touching the caller's RNG
        encoder = copy.deepcopy(model).to(device)
        probe_tokens, probe_mask = train.batch(np.arange(min(2, len(train))))
        with torch.no_grad():
            encoder.eval()
            dim = int(encoder.encode(modality, probe_tokens.to(device), probe_mask.to(device)).shape[-1])
        clf = _Classifier(encoder, modality, dim, num_classes).to(device)
        for p in clf.encoder.parameters():
            p.requires_grad_(not freeze_encoder)
        params = [p for p in clf.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        loss_fn = torch.nn.CrossEntropyLoss()
        ytr = torch.from_numpy(ytr_np).to(device)
        frozen_emb = _embed_all(clf, train, batch_size, device) if freeze_encoder else None
        ks = default_topk(num_classes)
        out: dict[str, Any] = {}
        epoch_loss = float("nan")
        for epoch in range(1, epochs + 1):
            clf.train()
            if freeze_encoder:
                clf.encoder.eval()
            loss_sum, seen = 0.0, 0
            for idx in torch.randperm(len(train), generator=gen).split(batch_size):
                if frozen_emb is not None:
                    logits = clf.head(frozen_emb[idx.to(device)])
                else:
                    tokens, mask = train.batch(idx.numpy())
                    logits = clf(tokens.to(device), mask.to(device))
                loss = loss_fn(logits, ytr[idx.to(device)])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(idx)
                seen += len(idx)
            epoch_loss = loss_sum / max(seen, 1)
            if epoch % eval_every == 0 or epoch == epochs:
                scores = _scores(clf, test, batch_size, device)
                acc = topk_from_scores(scores, np.arange(num_classes), yte_np, ks)
                out[f"acc@epoch{epoch}"] = acc["top1"]
                if epoch == epochs:
                    out.update(acc)
                    out["mean_per_class_recall"] = mean_per_class_recall(scores.argmax(1), yte_np)
    out["train_loss"] = float(epoch_loss)
    out["trainable_params"] = int(sum(p.numel() for p in params))
    out["freeze_encoder"] = bool(freeze_encoder)
    out.update(epochs=int(epochs), lr=float(lr), n_train=len(train), n_test=len(test))
    return out
