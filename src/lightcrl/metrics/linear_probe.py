"""Linear probes on frozen embeddings.

Two protocols:

* ``"logreg"`` (CLIP-style): scikit-learn L2 logistic regression; its strength C is chosen on a
  stratified validation split carved from TRAIN only, then the model is refit on all of train with the
  best C and scored once on test. The test set never takes part in any choice.
* ``"sgd"`` (the LightCRL paper's protocol): one linear layer trained for a fixed number of epochs with
  SGD + momentum and cross-entropy on all of train; test accuracy is recorded every ``eval_every``
  epochs for the curve, and ``top1`` is the accuracy after the LAST epoch (not the best one, which would
  be a choice made on test).

Features are standardised with the mean/std of the training data only. Accuracies are in percent.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lightcrl.metrics.geometry import to_numpy
from lightcrl.metrics.zeroshot import class_ranks

#: Default grid of inverse L2 strengths for "logreg" (8 values, log-spaced).
DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 3, 8))


def _standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(0)
    std = x.std(0)
    return mean, np.where(std > 1e-8, std, 1.0)


def topk_from_scores(scores: np.ndarray, classes: np.ndarray, y: np.ndarray, ks: Sequence[int]) -> dict:
    """Top-k accuracy (percent) of ``scores`` [n, len(classes)]; labels not among ``classes`` never count."""
    col = {int(c): i for i, c in enumerate(classes)}
    known = np.array([int(v) in col for v in y], dtype=bool)
    ranks = np.full(len(y), np.iinfo(np.int64).max, dtype=np.int64)
    if known.any():
        cols = np.array([col[int(v)] for v in y[known]], dtype=np.int64)
        ranks[known] = class_ranks(scores[known], cols)
    return {f"top{k}": float(100.0 * np.mean(ranks < k)) for k in ks}


def default_topk(n_classes: int) -> tuple[int, ...]:
    return (1, 5) if n_classes > 5 else (1,)


def mean_per_class_recall(pred: np.ndarray, y: np.ndarray) -> float:
    recalls = [np.mean(pred[y == c] == c) for c in np.unique(y)]
    return float(100.0 * np.mean(recalls))


def _split_train_val(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/val indices; falls back to a plain random split when stratifying is impossible."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    try:
        tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=y)
    except ValueError:  # a class with a single sample, or fewer val slots than classes
        tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed)
    return np.sort(tr), np.sort(va)


def _fit_logreg(x: np.ndarray, y: np.ndarray, c: float, max_iter: int, seed: int, model: Any = None) -> Any:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if model is None:
        model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed, warm_start=True)
    model.set_params(C=c)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model


def _logreg(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    val_fraction: float,
    seed: int,
    cs: Sequence[float],
    max_iter: int,
) -> dict[str, Any]:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError("val_fraction must be in (0, 1)")
    tr, va = _split_train_val(train_y, val_fraction, seed)
    mean, std = _standardizer(train_x[tr])
    xtr, xva = (train_x[tr] - mean) / std, (train_x[va] - mean) / std
    val_acc: dict[float, float] = {}
    model = None
    for c in sorted(float(c) for c in cs):  # increasing C: each fit warm-starts from the previous one
        model = _fit_logreg(xtr, train_y[tr], c, max_iter, seed, model)
        val_acc[c] = float(100.0 * np.mean(model.predict(xva) == train_y[va]))
    best_c = max(val_acc, key=lambda c: (val_acc[c], -c))  # ties -> the stronger regularisation

    mean, std = _standardizer(train_x)
    final = _fit_logreg((train_x - mean) / std, train_y, best_c, max_iter, seed)
    xte = (test_x - mean) / std
    proba = final.predict_proba(xte)
    out = topk_from_scores(proba, final.classes_, test_y, default_topk(len(final.classes_)))
    out["mean_per_class_recall"] = mean_per_class_recall(final.classes_[proba.argmax(1)], test_y)
    out["C"] = best_c
    out["val_top1"] = val_acc[best_c]
    out["val_top1_by_C"] = {f"{c:.3g}": a for c, a in val_acc.items()}
    out.update(n_train=len(tr), n_val=len(va))
    return out


def _sgd(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    seed: int,
    epochs: int,
    eval_every: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    batch_size: int,
    device: str,
) -> dict[str, Any]:
    n_classes = int(max(train_y.max(), test_y.max())) + 1  # output size only; no label is looked at
    mean, std = _standardizer(train_x)
    xtr = torch.from_numpy(((train_x - mean) / std).astype(np.float32)).to(device)
    xte = torch.from_numpy(((test_x - mean) / std).astype(np.float32)).to(device)
    ytr = torch.from_numpy(train_y).to(device)
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(xtr.shape[1], n_classes)
    with torch.no_grad():  # seeded init, independent of the global RNG
        bound = 1.0 / np.sqrt(xtr.shape[1])
        head.weight.copy_(torch.rand(head.weight.shape, generator=gen) * 2 * bound - bound)
        head.bias.zero_()
    head.to(device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    ks = default_topk(n_classes)
    out: dict[str, Any] = {}
    loss_sum = 0.0
    for epoch in range(1, epochs + 1):
        loss_sum, seen = 0.0, 0
        for idx in torch.randperm(len(xtr), generator=gen).split(batch_size):
            idx = idx.to(device)
            loss = loss_fn(head(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)
            seen += len(idx)
        if epoch % eval_every == 0 or epoch == epochs:
            with torch.no_grad():
                scores = head(xte).float().cpu().numpy()
            acc = topk_from_scores(scores, np.arange(n_classes), test_y, ks)
            out[f"acc@epoch{epoch}"] = acc["top1"]
            if epoch == epochs:
                out.update(acc)
                out["mean_per_class_recall"] = mean_per_class_recall(scores.argmax(1), test_y)
        loss_sum /= max(seen, 1)
    out["train_loss"] = float(loss_sum)
    out.update(epochs=int(epochs), lr=float(lr), weight_decay=float(weight_decay), n_train=len(xtr))
    return out


def evaluate(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    mode: str = "logreg",
    val_fraction: float = 0.2,
    seed: int = 0,
    *,
    cs: Sequence[float] = DEFAULT_CS,
    max_iter: int = 1000,
    epochs: int = 100,
    eval_every: int = 20,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    device: str = "cpu",
) -> dict[str, Any]:
    """Linear-probe test accuracy of frozen features (percent).

    ``mode="logreg"``: ``top1`` (+``top5`` when >5 classes), ``mean_per_class_recall``, the chosen
    ``C``, ``val_top1`` and ``val_top1_by_C`` (validation = ``val_fraction`` of train, stratified).
    ``mode="sgd"``: ``acc@epoch{K}`` every ``eval_every`` epochs, final ``top1`` (+``top5``),
    ``mean_per_class_recall`` and ``train_loss``; ``val_fraction`` is unused (nothing is selected).
    """
    xtr = to_numpy(train_x, dtype=np.float64)
    xte = to_numpy(test_x, dtype=np.float64)
    ytr = to_numpy(train_y, dtype=np.int64).reshape(-1)
    yte = to_numpy(test_y, dtype=np.int64).reshape(-1)
    if xtr.ndim != 2 or xte.ndim != 2 or xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"features must be [n, d] with the same d, got {xtr.shape} and {xte.shape}")
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise ValueError("features and labels differ in length")
    if len(np.unique(ytr)) < 2:
        raise ValueError("train needs at least 2 classes")
    if min(ytr.min(), yte.min()) < 0:
        raise ValueError("labels must be non-negative integers")
    if mode == "logreg":
        out = _logreg(xtr, ytr, xte, yte, val_fraction, seed, cs, max_iter)
    elif mode == "sgd":
        out = _sgd(
            xtr, ytr, xte, yte, seed, epochs, eval_every, lr, momentum, weight_decay, batch_size, device
        )
    else:
        raise ValueError(f"unknown linear probe mode {mode!r} (use 'logreg' or 'sgd')")
    out["mode"] = mode
    out["n_test"] = len(yte)
    return out
