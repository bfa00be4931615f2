"""Run reports from a fake run directory: valid, self-contained HTML naming every results file."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

from lightcrl.app import plots
from lightcrl.app.report import build_report, compare_table

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _Checker(HTMLParser):
    """Collects text and tags, and checks that every non-void element is closed in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(html_text: str) -> _Checker:
    c = _Checker()
    c.feed(html_text)
    c.close()
    return c


def _fake_run(run: Path) -> list[str]:
    """A run dir with curves, config, model info, results of several tasks; returns results file names."""
    (run / "results").mkdir(parents=True)
    (run / "config.yaml").write_text(
        "model:\n  arch: dfe\n  fusion: early\n  dim: 256\nloss: infonce\ntrain:\n  epochs: 3\n  lr: 0.001\n",
        encoding="utf-8",
    )
    (run / "model_info.json").write_text(
        json.dumps({"total_params": 3_400_000, "trainable_params": 1_200_000})
    )
    rows = [{"step": s, "epoch": s // 10, "train/loss": 3.0 / (s + 1)} for s in range(30)]
    rows += [
        {"step": s, "val/loss": 2.0 / (s + 1), "val/image_retrieval_recall@1": 10.0 + s} for s in (9, 19, 29)
    ]
    (run / "metrics.jsonl").write_text(
        "\n".join(json.dumps(r) for r in rows) + '\n{"step": 30, "tra', encoding="utf-8"
    )  # a torn last line, as after a kill
    plots.bar_table({"a": 1.0, "b": 2.0}, run / "plots" / "extra.png")
    model = {"arch": "dfe", "checkpoint": "ckpt/last.pt"}
    results = {
        "zeroshot_cifar10_test.json": {
            "task": "zeroshot",
            "dataset": "cifar10",
            "split": "test",
            "model": model,
            "metrics": {
                "top1": 41.5,
                "top5": 88.25,
                "mean_per_class_recall": 41.2,
                "per_class_accuracy": {"cat": 40.0, "dog": 43.0},
                "confusion_matrix": [[40, 60], [57, 43]],
            },
            "plots": ["plots/extra.png"],
        },
        "retrieval_flickr8k_dev.json": {
            "task": "retrieval",
            "dataset": "flickr8k",
            "split": "dev",
            "model": model,
            "metrics": {
                "image_retrieval_recall@1": 12.0,
                "text_retrieval_recall@1": 15.5,
                "image_retrieval_median_rank": 18.0,
                "text_retrieval_median_rank": 11.0,
            },
        },
        "linear_probe_<odd> & name.json": {
            "task": "linear_probe",
            "dataset": "tinyimagenet",
            "split": "test",
            "model": {"name": "<script>alert(1)</script>"},
            "metrics": {f"acc@epoch{e}": 20.0 + e / 10 for e in (20, 40, 60, 80, 100)}
            | {
                "top1": 30.0,
                "top5": 55.0,
                "mean_per_class_recall": 29.0,
                "train_loss": 1.2,
                "epochs": 100,
                "lr": 0.1,
                "weight_decay": 0.0,
                "mode": "sgd",
            },
        },
        "sts_stsb_test.json": {
            "task": "sts",
            "dataset": "stsb",
            "split": "test",
            "model": model,
            "metrics": {"spearman": 61.0, "pearson": 60.2, "n": 1379},
        },
    }
    for name, data in results.items():
        (run / "results" / name).write_text(json.dumps(data), encoding="utf-8")
    (run / "results" / "broken.json").write_text("{not json", encoding="utf-8")
    return list(results)


def test_report_from_fake_run(tmp_path: Path):
    run = tmp_path / "run1"
    names = _fake_run(run)
    md_path, html_path = build_report(run)
    assert md_path == run / "report.md" and html_path == run / "report.html"

    page = html_path.read_text(encoding="utf-8")
    c = _parse(page)
    assert not c.errors and not c.stack, (c.errors, c.stack)
    assert page.startswith("<!DOCTYPE html>")
    text = "".join(c.text)
    for name in names:
        assert name in text, name
    assert "broken.json" in text  # reported as a problem, not a crash
    assert not any(tag == "script" for tag, _ in c.tags)  # model names are escaped
    assert "<script>alert(1)</script>" in text
    for word in ("dfe", "early", "infonce", "3.40 M", "train/loss", "val/image_retrieval_recall@1"):
        assert word in text, word
    imgs = [a for tag, a in c.tags if tag == "img"]
    # training curves + the results file's own plot + a confusion matrix, all inline
    assert len(imgs) == 3 and all((a.get("src") or "").startswith("data:image/png;base64,") for a in imgs)
    assert "1 unreadable line" in text

    md = md_path.read_text(encoding="utf-8")
    for name in names:
        assert name in md
    assert "](report_files/training_curves.png)" in md and "](plots/extra.png)" in md
    assert (run / "report_files" / "training_curves.png").is_file()


def test_report_of_empty_run_dir(tmp_path: Path):
    """A run that has only just started: its config, nothing trained or evaluated yet."""
    (tmp_path / "config.yaml").write_text("model:\n  arch: dfe\n", encoding="utf-8")
    md_path, html_path = build_report(tmp_path)
    c = _parse(html_path.read_text(encoding="utf-8"))
    assert not c.errors and not c.stack
    assert "No results" in "".join(c.text) and md_path.is_file()


def test_compare_table():
    rows = [
        {
            "task": "retrieval",
            "dataset": "flickr8k",
            "split": "dev",
            "model": {"name": "a|b"},
            "metrics": {"image_retrieval_recall@1": 10.0, "image_retrieval_median_rank": 20.0},
        },
        {
            "task": "retrieval",
            "dataset": "flickr8k",
            "split": "dev",
            "model": {"arch": "dfe", "size": 2},
            "metrics": {"image_retrieval_recall@1": 12.5, "image_retrieval_median_rank": 25.0},
        },
        {"task": "retrieval", "dataset": "flickr8k", "split": "dev", "model": {"name": "c"}, "metrics": {}},
    ]
    md = compare_table(rows, ["image_retrieval_recall@1", "image_retrieval_median_rank"])
    lines = md.strip().splitlines()
    assert len(lines) == 5 and lines[1].count("---") == 6
    assert "a\\|b" in lines[2] and "**20.00**" in lines[2]  # lower median rank is better
    assert "arch=dfe, size=2" in lines[3] and "**12.50**" in lines[3]
    assert lines[4].count("–") == 2


def _section(md: str, heading: str) -> str:
    """The markdown from ``heading`` up to the next level-2 heading."""
    start = md.index(f"\n## {heading}\n")
    end = md.find("\n## ", start + 1)
    return md[start : end if end >= 0 else len(md)]


def test_report_opens_with_the_results_and_ends_with_the_configuration(tmp_path: Path):
    run = tmp_path / "run1"
    _fake_run(run)
    md_path, html_path = build_report(run)
    md = md_path.read_text(encoding="utf-8")
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings[0] == "## Summary" and headings[-1] == "## Configuration", headings
    summary = _section(md, "Summary")
    for headline in ("41.50", "88.25", "12.00", "61.00", "](report_files/training_curves.png)"):
        assert headline in summary, headline
    assert "loss: infonce" not in summary and "loss: infonce" in _section(md, "Configuration")

    page = html_path.read_text(encoding="utf-8")
    c = _parse(page)
    assert not c.errors and not c.stack, (c.errors, c.stack)
    # the configuration is collapsed, after everything else
    details = page.index("<details><summary>Configuration</summary>")
    assert page.index("<h2>Summary</h2>") < page.index("<h2>Results</h2>") < details
    assert details < page.index("loss: infonce") < page.index("</details>") < page.index("</body>")


def test_report_summary_puts_the_untrained_model_beside_the_run(tmp_path: Path):
    run = tmp_path / "run1"
    (run / "results").mkdir(parents=True)
    for prefix, kind, top1 in (("untrained-", "untrained", 12.5), ("", "run", 75.0)):
        (run / "results" / f"{prefix}zeroshot-shapes.json").write_text(json.dumps({
            "task": "zeroshot", "dataset": "imagefolder:shapes", "split": "test",
            "model": {"kind": kind, "name": "run1"}, "metrics": {"top1": top1, "chance": 16.67},
        }))
    md = build_report(run)[0].read_text(encoding="utf-8")
    rows = [line for line in _section(md, "Summary").splitlines() if line.startswith("| imagefolder")]
    assert rows == ["| imagefolder:shapes | test | run1 | 75.00 | 16.67 |",
                    "| imagefolder:shapes | test | run1 (untrained) | 12.50 | 16.67 |"], rows


def test_report_shows_the_default_split_and_no_repeated_model_config(tmp_path: Path):
    run = tmp_path / "run1"
    (run / "results").mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  arch: dfe\n  width: 64\n  proj_hidden: null\n")
    (run / "model_info.json").write_text(json.dumps({
        "model_config": {"arch": "dfe", "width": 64, "proj_hidden": None},
        "parameter_counts": {"total_trainable": 156_417},
    }))
    (run / "results" / "zeroshot-cifar10-default.json").write_text(json.dumps({
        "task": "zeroshot", "dataset": "imagefolder:cifar10", "split": None, "model": {"name": "run1"},
        "metrics": {"top1": 40.0},
    }))
    md_path, html_path = build_report(run)
    md, text = md_path.read_text(encoding="utf-8"), "".join(_parse(html_path.read_text()).text)
    assert "None" not in md and "None" not in text
    assert "| imagefolder:cifar10 | default | run1 | 40.00 |" in _section(md, "Summary")
    assert "model_config." not in md  # model.arch, model.width say it already
    assert "**model.width**: 64" in md and "**parameter_counts.total_trainable**: 156.42 k" in md
    assert "trainable parameters `156.42 k (156,417)`" in md  # in the first lines too
