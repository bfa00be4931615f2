"""Image-text retrieval recall@K and median rank, as in CLIP_benchmark (zeroshot_retrieval).

Naming follows CLIP_benchmark: "image retrieval" = text query -> images (each caption has exactly one
correct image); "text retrieval" = image query -> captions (an image is found at K when ANY of its
captions is in its top K). Recalls are in percent. The rank of a query is the 1-based rank of its first
correct item; ties in similarity are broken by item index (the lower index ranks first), as a stable
sort would, so a collapsed model scores at chance level rather than 100.

Similarities are computed in query chunks, so 25k captions x 5k images never sit in memory at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lightcrl.metrics.geometry import l2_normalize, to_numpy

#: Query rows per similarity chunk (a few chunk x items temporaries, e.g. 512 x 25k x 4 B = 50 MB each).
CHUNK = 512


def _first_positive_ranks(
    queries: np.ndarray,
    items: np.ndarray,
    positive: np.ndarray | None,
    item_of: np.ndarray | None,
    chunk: int,
    item_offsets: np.ndarray | None = None,
) -> np.ndarray:
    """1-based rank of the best-ranked positive item of each query.

    Either ``positive`` gives each query's single positive item, or ``item_of`` gives, per item, the
    query it belongs to (a query's positives are all items j with ``item_of[j] == query``).
    ``item_offsets`` [n_items]: added to every query's score of that item (e.g. a hubness correction).
    """
    items_t = torch.from_numpy(items)
    offsets = None if item_offsets is None else torch.from_numpy(np.asarray(item_offsets, np.float32))
    n_items = len(items)
    owner = None if item_of is None else torch.from_numpy(item_of)
    ranks = np.empty(len(queries), dtype=np.int64)
    for s in range(0, len(queries), chunk):
        scores = torch.from_numpy(queries[s : s + chunk]) @ items_t.T  # [b, n_items]
        if offsets is not None:
            scores = scores + offsets[None, :]
        b = len(scores)
        if owner is None:
            best_idx = torch.from_numpy(positive[s : s + b])[:, None]
        else:
            pos_mask = owner[None, :] == torch.arange(s, s + b)[:, None]
            # argmax returns the first (lowest-index) maximum: the best-ranked positive under index ties
            best_idx = scores.masked_fill(~pos_mask, float("-inf")).argmax(1, keepdim=True)
        best = scores.gather(1, best_idx)
        # Items strictly above the best positive are negatives (it is the best); then index tie-breaks.
        ahead = (scores > best).sum(1)
        ties = scores == best
        tied_rows = torch.nonzero(ties.sum(1) > 1).flatten()
        if len(tied_rows):
            idx = torch.arange(n_items)[None, :]
            ahead[tied_rows] += (ties[tied_rows] & (idx < best_idx[tied_rows])).sum(1)
        ranks[s : s + b] = ahead.numpy() + 1
    return ranks


def evaluate(
    image_emb: Any,
    text_emb: Any,
    text_to_image: Any,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = CHUNK,
    image_offsets: Any = None,
    text_offsets: Any = None,
) -> dict[str, float]:
    """Recall@K (percent) and median rank in both directions.

    ``image_emb`` [N_img, d], ``text_emb`` [N_txt, d] (normalised here), ``text_to_image`` [N_txt] ints:
    the image each caption describes. Images without any caption are left out of text retrieval (their
    count is reported as ``n_images_without_captions``). ``image_offsets`` [N_img] / ``text_offsets``
    [N_txt]: added to the cosine of every query with that gallery item (a model's hubness correction,
    ``LightCRLModel.retrieval_offsets``); None = plain cosine.
    """
    img = l2_normalize(image_emb)
    txt = l2_normalize(text_emb)
    t2i = to_numpy(text_to_image, dtype=np.int64).reshape(-1)
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"image dim {img.shape[1]} != text dim {txt.shape[1]}")
    if len(t2i) != len(txt):
        raise ValueError(f"text_to_image has {len(t2i)} entries for {len(txt)} captions")
    if len(t2i) == 0 or len(img) == 0:
        raise ValueError("need at least one image and one caption")
    if t2i.min() < 0 or t2i.max() >= len(img):
        raise ValueError(f"text_to_image must lie in [0, {len(img)})")

    for name, off, n in (("image_offsets", image_offsets, len(img)),
                         ("text_offsets", text_offsets, len(txt))):
        if off is not None and np.shape(off) != (n,):
            raise ValueError(f"{name} has shape {np.shape(off)}, expected ({n},)")
    img_ranks = _first_positive_ranks(txt, img, t2i, None, chunk, image_offsets)
    has_caption = np.bincount(t2i, minlength=len(img)) > 0
    txt_ranks = _first_positive_ranks(img, txt, None, t2i, chunk, text_offsets)[has_caption]

    out: dict[str, float] = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = float(100.0 * np.mean(img_ranks <= k))
        out[f"text_retrieval_recall@{k}"] = float(100.0 * np.mean(txt_ranks <= k))
    out["image_retrieval_median_rank"] = float(np.median(img_ranks))
    out["text_retrieval_median_rank"] = float(np.median(txt_ranks))
    out["image_retrieval_mean_rank"] = float(np.mean(img_ranks))
    out["text_retrieval_mean_rank"] = float(np.mean(txt_ranks))
    out["n_images"] = len(img)
    out["n_texts"] = len(txt)
    out["n_images_without_captions"] = int((~has_caption).sum())
    return out


def evaluate_by_class(
    media_emb: Any,
    query_emb: Any,
    media_labels: Any,
    query_labels: Any,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Text -> media retrieval where every item of the query's class is relevant (percent).

    For caption sets made from class names (e.g. ``labelcaptions:esc10``) instance retrieval is capped
    at 1 / (items per class), since many items share one caption; class relevance is the meaningful
    measure there. Returns ``class_precision@k`` (relevant share of the top k, mean over queries) and
    ``class_map`` (mean average precision over the full ranking); ties are broken by item index.
    """
    media = l2_normalize(media_emb)
    queries = l2_normalize(query_emb)
    ml = to_numpy(media_labels, dtype=np.int64).reshape(-1)
    ql = to_numpy(query_labels, dtype=np.int64).reshape(-1)
    if len(ml) != len(media) or len(ql) != len(queries):
        raise ValueError("one label per media item and per query is needed")
    scores = queries @ media.T
    order = np.argsort(-scores, axis=1, kind="stable")
    relevant = ml[order] == ql[:, None]  # [Q, N] in rank order
    n_rel = relevant.sum(1)
    if (n_rel == 0).any():
        raise ValueError("a query's class has no media item: class retrieval is undefined")
    out = {f"class_precision@{k}": float(relevant[:, :k].mean(1).mean() * 100) for k in ks if k <= len(ml)}
    hits = np.cumsum(relevant, axis=1)
    precision_at_hit = hits / np.arange(1, len(ml) + 1)[None, :]
    ap = (precision_at_hit * relevant).sum(1) / n_rel
    out["class_map"] = float(ap.mean() * 100)
    return out
