"""Print the README's results table from an experiment's results.csv (the full table is docs/results.md).

    .venv/bin/python scripts/readme_results.py runs/experiments/offline/results.csv
"""

from __future__ import annotations

import csv
import sys

COLUMNS = [
    ("zs-cifar10/top1", "zero-shot CIFAR-10 top-1"),
    ("zs-cifar10/top5", "top-5"),
    ("flickr-dev/t2i_R@1", "Flickr8k t2i R@1"),
    ("flickr-dev/i2t_R@1", "i2t R@1"),
    ("probe-cifar10/top1", "CIFAR-10 probe"),
    ("probe-tiny/top1", "Tiny IN probe"),
    ("ft-tiny/top1", "Tiny IN fine-tune"),
    ("stsb/spearman", "STS-B"),
    ("trainable_params", "trainable params"),
    ("train_time_s", "train s"),
]
ROWS = [
    "offline-best",
    "push-anchors",
    "push-linear-proj",
    "dfe-add-clip",
    "dfe-add-lightcrl",
    "dfe-add-lightcrl-frozen",
    "dfe-attention-clip",
    "dfe-add-cyclip",
    "dfe-add-clip+simcse",
    "two_tower-clip",
    "asif",
    "asif-centered",
    "asif-centered-k200",
    "convirt",
    "raw",
]


def _fmt(key: str, value: str) -> str:
    if value in ("", "n/a"):
        return value or "-"
    if key == "trainable_params":
        return f"{int(float(value)) / 1e6:.2f}M"
    return f"{float(value):.1f}" if key == "train_time_s" else f"{float(value):.2f}"


def main(path: str) -> None:
    with open(path, newline="") as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    print("| model | " + " | ".join(label for _, label in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for name in ROWS:
        if name in rows:
            print(f"| {name} | " + " | ".join(_fmt(k, rows[name].get(k, "")) for k, _ in COLUMNS) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/experiments/offline/results.csv")
