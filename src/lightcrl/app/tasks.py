"""What an evaluation task is: its declaration, and which way a metric is better.

The table itself (``lightcrl.app.evaluate.TASKS``) declares each task ONCE, next to its function: the
headline metric and its direction, the metrics ``lightcrl eval`` prints, the default columns of an
experiment table, and the kinds of run (``lightcrl.rundir.KINDS``) it applies to. ``evaluate`` dispatches
on it, ``experiment`` takes columns and applicability from it, ``report`` and early stopping take
directions from :func:`metric_direction`. This module stays import-light (no torch) for the config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Task", "metric_direction"]

# Substrings of metric names (lower case). Losses and ranks fall; recalls, accuracies, correlations rise.
_LOWER_BETTER = ("rank", "loss")
_HIGHER_BETTER = ("recall@", "top", "acc", "spearman", "pearson", "mean_per_class", "precision@", "class_map")


def metric_direction(metric: str) -> int:
    """+1 when higher is better, -1 when lower is better, 0 when unknown (e.g. ``val/loss`` -> -1)."""
    m = metric.lower()
    if any(s in m for s in _LOWER_BETTER):
        return -1
    if any(s in m for s in _HIGHER_BETTER):
        return 1
    return 0


@dataclass(frozen=True)
class Task:
    """One evaluation task, declared once."""

    name: str
    run: Callable[..., tuple[dict[str, Any], list[Any]]]  # (target, request, plots_dir) -> metrics, plots
    description: str
    headline: str  # the one number that stands for the task in summaries
    higher_is_better: bool
    printed: tuple[str, ...]  # what `lightcrl eval` shows
    columns: tuple[str, ...]  # default columns of an experiment table
    run_kinds: frozenset[str]  # kinds of run it applies to (lightcrl.rundir.KINDS)

    def applies_to(self, run_kind: str) -> bool:
        return run_kind in self.run_kinds

    def printed_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The metrics of a result that ``lightcrl eval`` prints, in the declared order."""
        shown = {k: metrics[k] for k in self.printed if k in metrics}
        # per-epoch accuracies of fine-tuning, and any per-subset rows a task adds under "rows/"
        shown.update({k: v for k, v in metrics.items()
                      if k.startswith(("acc@epoch", "rows/")) and isinstance(v, (int, float))})
        return shown
