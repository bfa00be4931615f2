"""Mean ± sample standard deviation over seeds of an experiment's results.csv, as a markdown table.

``lightcrl experiment`` summarises seeds as mean ± half-range; docs/results.md's generalisation table
(issue 14, part 5) gives mean ± std (ddof 1) instead, computed here from the per-seed rows:

    python scripts/seed_table.py runs/experiments/generalisation/results.csv

Only cells with status "done" count; a method with one finished seed shows its value and "n=1".
"""

from __future__ import annotations

import csv
import statistics
import sys
from collections import OrderedDict

#: (header, column of results.csv, scale) in table order; scale 100 turns fractions into percent.
COLUMNS = [
    ("zs CIFAR-10 top-1", "zs-cifar10/top1", 1),
    ("top-5", "zs-cifar10/top5", 1),
    ("zs Tiny top-1", "zs-tiny/top1", 1),
    ("top-5", "zs-tiny/top5", 1),
    ("dev t2i R@1", "flickr-dev/t2i_R@1", 1),
    ("i2t R@1", "flickr-dev/i2t_R@1", 1),
    ("STS-B model", "stsb/spearman", 1),
    ("model - raw", None, 1),  # computed per seed below
    ("kNN@10 image", "geometry/knn_overlap_a@10", 100),
    ("kNN@10 text", "geometry/knn_overlap_b@10", 100),
    ("params", "trainable_params", 1),
    ("train s", "train_time_s", 1),
]
#: the tasks of the issue's "mean of those tasks" goal
GOAL_TASKS = ["zs-cifar10/top1", "zs-tiny/top1", "flickr-dev/t2i_R@1", "stsb/spearman"]


def _num(v: str) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _cell(values: list[float], digits: int = 2) -> str:
    if not values:
        return "not measured"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f} (n=1)"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(path: str) -> str:
    groups: OrderedDict[str, list[dict]] = OrderedDict()
    for row in csv.DictReader(open(path, newline="")):
        name = row["cell"].removesuffix(f"-s{row['seed']}")
        groups.setdefault(name, [])
        if row["status"] == "done":
            row["model - raw"] = None
            s, raw = _num(row.get("stsb/spearman")), _num(row.get("stsb/raw_encoder/spearman"))
            if s is not None and raw is not None:
                row["model - raw"] = s - raw
            tasks = [_num(row.get(c)) for c in GOAL_TASKS]
            row["goal mean"] = sum(tasks) / len(tasks) if None not in tasks else None
            groups[name].append(row)
    heads = ["method", "seeds"] + [h for h, _, _ in COLUMNS] + ["mean of 4 goal tasks"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for name, rows in groups.items():
        out = [name, ",".join(r["seed"] for r in rows) or "none"]
        for head, col, scale in COLUMNS + [("goal mean", None, 1)]:
            key = col or head
            vals = [_num(r.get(key)) if col else r.get(key) for r in rows]
            vals = [v * scale for v in vals if v is not None]
            if key == "trainable_params":
                big = vals and vals[0] >= 1e4
                out.append("" if not vals else f"{vals[0] / 1e6:.2f} M" if big else f"{vals[0]:.0f}")
            elif key == "train_time_s":
                out.append(f"{min(vals):.0f}-{max(vals):.0f}" if vals else "")
            else:
                out.append(_cell(vals))
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1] if len(sys.argv) > 1 else "runs/experiments/generalisation/results.csv"))
