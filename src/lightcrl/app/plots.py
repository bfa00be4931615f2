"""PNG plots for evaluation results and training runs.

Figures are built with the object-oriented Agg API (no pyplot, no global backend switch, safe in
threads and headless machines) and written atomically through :func:`lightcrl.io.write_bytes`.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightcrl.io import write_bytes

#: Up to this many classes every cell gets its count and every tick its class name.
ANNOTATE_MAX_CLASSES = 20
#: Up to this many classes the axes still carry every class name (small font).
TICKS_MAX_CLASSES = 60
#: Keys of a metrics row that are x-axes or bookkeeping, never plotted as curves.
NON_METRIC_KEYS = frozenset({"step", "epoch", "global_step", "time", "timestamp", "wall_s", "elapsed_s"})


def new_figure(width: float, height: float, dpi: int = 110) -> Figure:
    """A Figure bound to an Agg canvas."""
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | os.PathLike) -> None:
    """Render ``fig`` to PNG in memory, then write it atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes(path, buf.getvalue())


def confusion_matrix(
    cm: Any, classnames: Sequence[str], path: str | os.PathLike, normalize: bool = True, title: str = ""
) -> None:
    """Confusion matrix heat map (rows = true class, columns = predicted), row-normalised by default.

    Cells carry counts up to ``ANNOTATE_MAX_CLASSES`` classes; beyond ``TICKS_MAX_CLASSES`` class names
    are left off the axes (a 200-class matrix reads as a diagonal pattern).
    """
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.shape[0]
    if cm.shape != (n, n) or len(classnames) != n:
        raise ValueError(f"confusion matrix {cm.shape} does not match {len(classnames)} class names")
    shown = cm / np.maximum(cm.sum(1, keepdims=True), 1) if normalize else cm
    side = float(np.clip(0.35 * n + 2.5, 5.0, 14.0))
    fig = new_figure(side + 1.0, side)
    ax = fig.add_subplot(1, 1, 1)
    # Many classes: scale colours to the largest cell, so a weak diagonal still shows.
    vmax = 1.0 if normalize and n <= ANNOTATE_MAX_CLASSES else float(shown.max() or 1.0)
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=vmax, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="row fraction" if normalize else "count")
    if n <= TICKS_MAX_CLASSES:
        fs = 9 if n <= ANNOTATE_MAX_CLASSES else 5
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels([str(c) for c in classnames], rotation=90, fontsize=fs)
        ax.set_yticklabels([str(c) for c in classnames], fontsize=fs)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if n <= ANNOTATE_MAX_CLASSES:
        top = vmax
        fs = 9 if n <= 10 else 7
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    color = "white" if shown[i, j] > 0.55 * top else "black"
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=fs, color=color)
    order = "" if n <= TICKS_MAX_CLASSES else " (classes in label order)"
    ax.set_xlabel("predicted" + order)
    ax.set_ylabel("true" + order)
    ax.set_title(title or f"Confusion matrix ({n} classes)")
    fig.tight_layout()
    save_png(fig, path)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _metric_groups(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Metric keys grouped by name without their split prefix ("train/loss", "val/loss" -> "loss")."""
    groups: dict[str, list[str]] = {}
    for row in rows:
        for key, value in row.items():
            if key in NON_METRIC_KEYS or not _is_num(value):
                continue
            name = key.split("/", 1)[1] if "/" in key else key
            if key not in groups.setdefault(name, []):
                groups[name].append(key)
    # Losses first, then the rest in order of first appearance.
    return dict(sorted(groups.items(), key=lambda kv: "loss" not in kv[0]))


def training_curves(
    metrics_rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, max_panels: int = 12
) -> list[str]:
    """One panel per metric (train/val lines together) against "step" (else "epoch", else row index).

    With a "step" axis, rows without "step" are left out of the curves.

    Returns the panel names drawn; raises ValueError when the rows hold no numeric metric.
    """
    rows = list(metrics_rows)
    groups = _metric_groups(rows)
    if not groups:
        raise ValueError("no numeric metrics to plot")
    names = list(groups)[:max_panels]
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = new_figure(4.6 * ncols, 3.2 * nrows)
    xlabel = (
        "step" if any("step" in r for r in rows) else "epoch" if any("epoch" in r for r in rows) else "row"
    )
    for p, name in enumerate(names):
        ax = fig.add_subplot(nrows, ncols, p + 1)
        all_ys: list[float] = []
        for key in groups[name]:
            xs, ys = [], []
            for i, row in enumerate(rows):
                y = row.get(key)
                x = i if xlabel == "row" else row.get(xlabel)
                if _is_num(y) and math.isfinite(y) and _is_num(x):
                    xs.append(x)
                    ys.append(float(y))
            ax.plot(xs, ys, marker=None if len(xs) > 30 else "o", markersize=3, label=key)
            all_ys += ys
        ax.set_xlabel(xlabel)
        ax.set_title(name, fontsize=10)
        if "loss" in name and all_ys and min(all_ys) > 0 and max(all_ys) / min(all_ys) > 20:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
    return names


def bar_table(
    values: Mapping[str, float], path: str | os.PathLike, title: str = "", xlabel: str = ""
) -> None:
    """Horizontal bar chart of one metric across models/datasets, with the value printed on each bar."""
    labels = [str(k) for k in values]
    vals = [float(v) for v in values.values()]
    if not vals:
        raise ValueError("nothing to plot")
    fig = new_figure(7.0, max(2.0, 0.35 * len(vals) + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(vals))
    ax.barh(y, vals, color="tab:blue")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    for yi, v in zip(y, vals):
        ax.text(v, yi, f" {v:.2f}", va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.margins(x=0.15)
    fig.tight_layout()
    save_png(fig, path)


def cosine_histogram(
    a: Any, b: Any, path: str | os.PathLike, title: str | None = None, seed: int = 0
) -> None:
    """Histogram of matched vs unmatched cosine similarity, saved as a PNG at ``path``."""
    from lightcrl.metrics.geometry import sample_cosines

    matched, unmatched = sample_cosines(a, b, seed=seed)
    fig = new_figure(6, 4)
    ax = fig.add_subplot(1, 1, 1)
    lo = float(min(matched.min(), unmatched.min()))
    hi = float(max(matched.max(), unmatched.max()))
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 60)
    ax.hist(unmatched, bins=bins, density=True, alpha=0.6, label=f"unmatched (n={len(unmatched)})")
    ax.hist(matched, bins=bins, density=True, alpha=0.6, label=f"matched (n={len(matched)})")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.set_title(title or "Matched vs unmatched cosine similarity")
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)
