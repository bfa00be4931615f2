"""Zero-shot classification from embeddings, as in CLIP_benchmark.

The classifier is one normalised text embedding per class: the mean of the normalised embeddings of the
prompts (templates filled with the class name), normalised again. Images are assigned to the class of
highest cosine similarity. Ties are broken by class index (the lower index wins), like ``argmax`` and a
stable sort, so top-1, the confusion matrix and the per-class recalls always agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lightcrl.metrics.geometry import l2_normalize, to_numpy

#: A list of templates with a "{c}" (or "{}") slot, a function classname -> prompts, or a dict
#: classname -> prompts (CLIP_benchmark's per-class templates).
Templates = Sequence[str] | Callable[[str], Sequence[str]] | Mapping[str, Sequence[str]]

_CHUNK = 8192
#: When a dataset ships no templates (CLIP's single default prompt).
DEFAULT_TEMPLATES = ("a photo of a {c}.",)


def fill_template(template: str, classname: str) -> str:
    """``template`` with its "{c}" (CLIP_benchmark) or "{}" (OpenAI CLIP) slot filled."""
    if "{c}" in template:
        return template.replace("{c}", classname)
    if "{}" in template:
        return template.replace("{}", classname)
    raise ValueError(f"template has no '{{c}}' slot: {template!r}")


def prompts_for(classname: str, templates: Templates) -> list[str]:
    """The prompts of one class."""
    if isinstance(templates, Mapping):
        texts = list(templates[classname])
    elif callable(templates):
        texts = list(templates(classname))
    else:
        texts = [fill_template(t, classname) for t in templates]
    if not texts:
        raise ValueError(f"no prompts for class {classname!r}")
    return texts


def build_classifier(
    encode_text: Callable[[list[str]], Any], classnames: Sequence[str], templates: Templates
) -> np.ndarray:
    """Zero-shot weights [C, d]: per class, the normalised mean of the normalised prompt embeddings.

    ``encode_text`` is called once with all C x T prompts (it does its own batching) and returns a
    [C*T, d] numpy array or tensor.
    """
    per_class = [prompts_for(name, templates) for name in classnames]
    texts = [t for ps in per_class for t in ps]
    emb = l2_normalize(encode_text(texts)).astype(np.float64)
    if len(emb) != len(texts):
        raise ValueError(f"encode_text returned {len(emb)} embeddings for {len(texts)} prompts")
    bounds = np.cumsum([0] + [len(ps) for ps in per_class])
    means = np.add.reduceat(emb, bounds[:-1], axis=0) / np.diff(bounds)[:, None]
    return l2_normalize(means)


def class_ranks(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0-based rank of the true class in each row of ``scores`` (descending, ties by lower index)."""
    true = scores[np.arange(len(labels)), labels][:, None]
    idx = np.arange(scores.shape[1])[None, :]
    ahead = (scores > true) | ((scores == true) & (idx < labels[:, None]))
    return ahead.sum(1)


def evaluate(
    image_emb: Any,
    labels: Any,
    class_emb: Any,
    classnames: Sequence[str],
    topk: Sequence[int] = (1, 2, 3, 4, 5),
    class_bias: Any = None,
) -> dict[str, Any]:
    """Zero-shot accuracy of ``image_emb`` [N, d] against ``class_emb`` [C, d] (rows normalised here).

    Returns ``top{k}`` (percent, only for k <= C), ``mean_per_class_recall`` (percent, balanced
    accuracy over classes present in ``labels``), ``per_class_accuracy`` {classname: percent, or None
    for a class with no sample}, ``confusion_matrix`` (C x C ints, rows = true, columns = predicted)
    and ``n``. ``class_bias`` [C]: offsets added to every item's cosine scores (a model's per-class
    correction, e.g. ``LightCRLModel.zeroshot_bias``); None = plain cosine.
    """
    img = l2_normalize(image_emb)
    cls = l2_normalize(class_emb)
    y = to_numpy(labels, dtype=np.int64).reshape(-1)
    n_cls = len(classnames)
    if cls.shape[0] != n_cls:
        raise ValueError(f"{cls.shape[0]} class embeddings for {n_cls} class names")
    if img.shape[1] != cls.shape[1]:
        raise ValueError(f"image dim {img.shape[1]} != class dim {cls.shape[1]}")
    if len(y) != len(img) or len(y) == 0:
        raise ValueError(f"{len(y)} labels for {len(img)} images")
    if y.min() < 0 or y.max() >= n_cls:
        raise ValueError(f"labels must lie in [0, {n_cls}), got [{y.min()}, {y.max()}]")
    if len(set(classnames)) != n_cls:
        raise ValueError("class names must be unique")

    cls_t = torch.from_numpy(cls)
    ranks = np.empty(len(y), dtype=np.int64)
    preds = np.empty(len(y), dtype=np.int64)
    for s in range(0, len(y), _CHUNK):
        scores = (torch.from_numpy(img[s : s + _CHUNK]) @ cls_t.T).numpy()
        if class_bias is not None:
            scores = scores + np.asarray(class_bias, scores.dtype)[None, :]
        ranks[s : s + _CHUNK] = class_ranks(scores, y[s : s + _CHUNK])
        preds[s : s + _CHUNK] = scores.argmax(1)

    out: dict[str, Any] = {}
    for k in sorted({int(k) for k in topk}):
        if 1 <= k <= n_cls:
            out[f"top{k}"] = float(100.0 * np.mean(ranks < k))
    cm = np.zeros((n_cls, n_cls), dtype=np.int64)
    np.add.at(cm, (y, preds), 1)
    support = cm.sum(1)
    recall = np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)
    out["mean_per_class_recall"] = float(100.0 * np.nanmean(recall))
    out["per_class_accuracy"] = {
        str(name): (None if np.isnan(r) else float(100.0 * r)) for name, r in zip(classnames, recall)
    }
    out["confusion_matrix"] = cm.tolist()
    out["n"] = len(y)
    return out
