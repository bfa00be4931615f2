"""One-page run reports (Markdown + self-contained HTML) and side-by-side comparison tables.

A run directory may hold:

* ``metrics.jsonl`` -- one JSON object per line with "step" and/or "epoch" and metric keys
  ("train/loss", "val/loss", "val/image_retrieval_recall@1", ...);
* ``config.yaml`` or ``config.json`` -- the run's configuration;
* ``model_info.json`` -- e.g. parameter counts;
* ``results/*.json`` -- evaluation results, each {"task", "dataset", "split", "model": {...},
  "metrics": {flat}, optionally "plots": [png paths relative to the run dir]}.

:func:`build_report` turns whatever of these exists into ``report.md`` and ``report.html`` (plots
embedded as base64, so the HTML file stands alone). Generated figures go to ``report_files/``.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightcrl import rundir
from lightcrl.app.tasks import metric_direction
from lightcrl.errors import LightCRLError
from lightcrl.io import write_text

#: Folder (inside the run dir) for figures made by the report itself.
FILES_DIR = "report_files"
#: A task table with more scalar metrics than this is transposed (metrics as rows).
MAX_WIDE_COLUMNS = 10
#: What makes a folder a run (any one of them): a report of anything else would be empty and misplaced.
RUN_MARKERS = (rundir.CONFIG, "config.yml", "config.json", rundir.METRICS, rundir.MODEL_INFO,
               rundir.MODEL_INFO_STARTED, rundir.RESULTS)
#: Metrics of a task shown in the summary when its results have none of the headline metrics.
SUMMARY_FALLBACK_METRICS = 4

TASK_DESCRIPTIONS = {
    "zeroshot": (
        "Zero-shot classification: each image is assigned the class whose prompt embedding is most "
        "similar. top-k accuracy and mean per-class recall in percent."
    ),
    "retrieval": (
        "Image-text retrieval. Image retrieval = caption query finds its image; text retrieval = image "
        "query finds any of its captions. Recall@K in percent (higher is better); median rank is 1-based "
        "(lower is better)."
    ),
    "linear_probe": (
        "Linear probe on frozen embeddings (logistic regression with C chosen on a validation split of "
        "train, or the paper's 100-epoch SGD protocol). Test accuracy in percent."
    ),
    "finetune": (
        "Fine-tuning: the shared encoder plus a linear head trained end to end (unless freeze_encoder is "
        "true). Test accuracy in percent."
    ),
    "geometry": (
        "Embedding geometry of matched pairs: alignment (mean squared distance of pairs, lower = closer), "
        "uniformity (log mean exp(-2 d^2), lower = more spread), modality gap (distance of the "
        "centroids), cosine statistics."
    ),
    "sts": (
        "Semantic textual similarity: Spearman/Pearson correlation x100 between cosine similarity and "
        "human scores."
    ),
}
_TASK_ALIASES = {
    "zeroshot_classification": "zeroshot",
    "zero_shot": "zeroshot",
    "zeroshot_retrieval": "retrieval",
    "linear_probing": "linear_probe",
    "linearprobe": "linear_probe",
    "fine_tune": "finetune",
}
#: Config keys (last component of the dotted path) worth showing in the header.
_CONFIG_HIGHLIGHTS = (
    "name",
    "arch",
    "architecture",
    "fusion",
    "loss",
    "modalities",
    "dataset",
    "datasets",
    "train_data",
    "dim",
    "width",
    "embed_dim",
    "depth",
    "layers",
    "heads",
    "epochs",
    "max_steps",
    "steps",
    "batch_size",
    "lr",
    "learning_rate",
    "weight_decay",
    "temperature",
    "seed",
    "image_encoder",
    "text_encoder",
    "audio_encoder",
)


# --------------------------------------------------------------------------------------------------- blocks
@dataclass
class _Block:
    kind: str  # "h2" | "h3" | "p" | "ul" | "table" | "code" | "img" | "details" | "end_details"
    text: str = ""
    items: list[str] = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    path: Path | None = None


def _md_text(s: str) -> str:
    """Markdown text with "<" and ">" outside `code` spans as entities, so no inline HTML gets through."""
    parts = s.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _md_cell(s: str) -> str:
    return _md_text(s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " "))


def _render_md(title: str, blocks: Sequence[_Block], run_dir: Path) -> str:
    out = [f"# {_md_text(title)}", ""]
    for b in blocks:
        if b.kind in ("h2", "h3", "details"):  # markdown cannot collapse: a section like any other
            out += [("### " if b.kind == "h3" else "## ") + _md_text(b.text), ""]
        elif b.kind == "p":
            out += [_md_text(b.text), ""]
        elif b.kind == "ul":
            out += [f"- {_md_text(item)}" for item in b.items] + [""]
        elif b.kind == "table":
            out.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
            out.append("|" + "|".join("---" for _ in b.header) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("")
        elif b.kind == "code":
            fence = "````" if "```" in b.text else "```"
            out += [fence, b.text.rstrip("\n"), fence, ""]
        elif b.kind == "img" and b.path is not None:
            rel = (
                b.path.relative_to(run_dir).as_posix()
                if b.path.is_relative_to(run_dir)
                else b.path.as_posix()
            )
            out += [f"![{_md_text(b.text)}]({rel.replace(' ', '%20')})", ""]
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #ddd;padding-bottom:.2em}h2{border-bottom:1px solid #eee;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em;display:block;overflow-x:auto}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right;white-space:nowrap}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}
figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}figcaption{color:#666;font-size:.85em}
.muted{color:#666}
details>summary{cursor:pointer;font-size:1.5em;font-weight:bold;margin-top:1.6em;
border-bottom:1px solid #eee}
""".strip()


def _inline_md_to_html(s: str) -> str:
    """Escape text, then turn `code` and **bold** spans into tags."""
    out: list[str] = []
    bold = False
    for i, part in enumerate(s.split("`")):
        if i % 2 == 1:
            out.append(f"<code>{html.escape(part)}</code>")
            continue
        chunks = part.split("**")
        for j, chunk in enumerate(chunks):
            if j > 0:
                out.append("</strong>" if bold else "<strong>")
                bold = not bold
            out.append(html.escape(chunk))
    if bold:
        out.append("</strong>")
    return "".join(out)


def _render_html(title: str, blocks: Sequence[_Block]) -> str:
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for b in blocks:
        if b.kind in ("h2", "h3"):
            out.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "details":  # collapsed until clicked, up to the next end_details
            out.append(f"<details><summary>{html.escape(b.text)}</summary>")
        elif b.kind == "end_details":
            out.append("</details>")
        elif b.kind == "p":
            out.append(f"<p>{_inline_md_to_html(b.text)}</p>")
        elif b.kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline_md_to_html(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "table":
            head = "".join(f"<th>{_inline_md_to_html(h)}</th>" for h in b.header)
            body = "".join(
                "<tr>" + "".join(f"<td>{_inline_md_to_html(c)}</td>" for c in row) + "</tr>" for row in b.rows
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b.kind == "code":
            out.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
        elif b.kind == "img" and b.path is not None:
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            mime = "image/svg+xml" if b.path.suffix.lower() == ".svg" else "image/png"
            if b.path.suffix.lower() in (".jpg", ".jpeg"):
                mime = "image/jpeg"
            out.append(
                f'<figure><img src="data:{mime};base64,{data}" alt="{html.escape(b.text, quote=True)}">'
                f"<figcaption>{html.escape(b.text)}</figcaption></figure>"
            )
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------- values
def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, bool, int, float))


def fmt_value(v: Any) -> str:
    """Compact, human-readable rendering of a metric value."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        if abs(v) >= 1e-3:
            return f"{v:.4f}"
        return f"{v:.2e}"
    return str(v)


def _human_count(n: Any) -> str:
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        return str(n)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return (
                f"{n / scale:.2f} {unit} ({int(n):,})" if float(n).is_integer() else f"{n / scale:.2f} {unit}"
            )
    return fmt_value(n)


def model_label(model: Any) -> str:
    """Short name of a results file's "model" entry (its "name", else key=value pairs)."""
    if isinstance(model, Mapping):
        for key in ("name", "id", "label"):
            if isinstance(model.get(key), str) and model[key]:
                # an untrained twin carries its run's name: tell the two apart
                return f"{model[key]} (untrained)" if model.get("kind") == "untrained" else model[key]
        if model.get("kind") == "raw":
            return "raw encoders"
        parts = [f"{k}={v}" for k, v in model.items() if _is_scalar(v) and v is not None]
        text = ", ".join(parts) or "?"
        return text if len(text) <= 80 else text[:77] + "..."
    return str(model) if model is not None else "?"


def split_label(result: Mapping[str, Any]) -> str:
    """The split a results file names; "default" when the evaluation used the dataset's default split."""
    split = result.get("split")
    return "default" if split in (None, "") else str(split)


def compare_table(results: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> str:
    """Markdown table, one row per results dict (model, task, dataset, split) and one column per metric.

    Missing metrics show as "–"; the best value of a column is bold when its direction is known
    (recall/accuracy/correlation higher, rank/loss lower).
    """
    header = ["model", "task", "dataset", "split", *metrics]
    cells: list[list[str]] = []
    best: dict[str, float] = {}
    for m in metrics:
        d = metric_direction(m)
        vals = [r.get("metrics", {}).get(m) for r in results]
        nums = [
            v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ]
        if d and len(nums) > 1:
            best[m] = max(nums) if d > 0 else min(nums)
    for r in results:
        row = [
            model_label(r.get("model")),
            str(r.get("task", "")),
            str(r.get("dataset", "")),
            split_label(r),
        ]
        for m in metrics:
            v = r.get("metrics", {}).get(m)
            text = fmt_value(v) if _is_scalar(v) else "…"
            row.append(f"**{text}**" if m in best and v == best[m] else text)
        cells.append(row)
    lines = [
        "| " + " | ".join(_md_cell(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- loading
@dataclass
class _Result:
    path: Path
    data: dict[str, Any]

    @property
    def task(self) -> str:
        t = str(self.data.get("task") or "unknown")
        return _TASK_ALIASES.get(t, t)

    @property
    def metrics(self) -> dict[str, Any]:
        m = self.data.get("metrics")
        return m if isinstance(m, dict) else {}


@dataclass
class _Run:
    run_dir: Path
    config: dict[str, Any] | None = None
    config_text: str | None = None
    config_file: str | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: int = 0
    model_info: dict[str, Any] | None = None
    results: list[_Result] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _load_run(run_dir: Path) -> _Run:
    run = _Run(run_dir)
    for name in (rundir.CONFIG, "config.yml", "config.json"):
        p = run_dir / name
        if not p.is_file():
            continue
        run.config_file, run.config_text = name, p.read_text(encoding="utf-8", errors="replace")
        try:
            cfg = json.loads(run.config_text) if name.endswith(".json") else yaml.safe_load(run.config_text)
            run.config = cfg if isinstance(cfg, dict) else None
        except (ValueError, yaml.YAMLError) as e:  # still shown as text below
            run.problems.append(f"could not parse {name}: {e}")
        break
    mpath = run_dir / rundir.METRICS
    if mpath.is_file():
        for line in mpath.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                run.bad_lines += 1
                continue
            if isinstance(row, dict):
                run.rows.append(row)
            else:
                run.bad_lines += 1
    ipath = run_dir / rundir.MODEL_INFO_STARTED
    if ipath.is_file():
        try:
            info = json.loads(ipath.read_text(encoding="utf-8"))
            run.model_info = info if isinstance(info, dict) else None
        except json.JSONDecodeError as e:
            run.problems.append(f"could not parse {rundir.MODEL_INFO_STARTED}: {e}")
    for p in sorted((run_dir / rundir.RESULTS).glob("*.json")):
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            run.problems.append(f"could not parse results/{p.name}: {e}")
            continue
        if not isinstance(data, dict):
            run.problems.append(f"results/{p.name} is not a JSON object")
            continue
        run.results.append(_Result(p, data))
    return run


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


# --------------------------------------------------------------------------------------------------- sections
#: Order of a run's results in a summary table: the run, then what it is compared with.
_REFERENCE_ORDER = {"run": 0, "untrained": 1, "raw": 2}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _by_task(run: _Run) -> dict[str, list[_Result]]:
    """Results grouped by task, tasks in the order of TASK_DESCRIPTIONS (unknown ones last)."""
    by_task: dict[str, list[_Result]] = {}
    for r in run.results:
        by_task.setdefault(r.task, []).append(r)
    order = list(TASK_DESCRIPTIONS)
    ranked = sorted(by_task, key=lambda t: (order.index(t) if t in order else len(order), t))
    return {t: by_task[t] for t in ranked}


def _intro_blocks(run: _Run) -> list[_Block]:
    tasks = list(_by_task(run))
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    intro = (
        f"This page summarises the run in `{run.run_dir}`: "
        f"{len(run.rows)} training-log rows, {len(run.results)} evaluation result file(s)"
        + (f" ({', '.join(tasks)})" if tasks else "")
        + f". Generated {when} by lightcrl's report builder."
    )
    blocks = [_Block("p", intro)]
    flat = dict(_flatten(run.config)) if run.config else {}
    found = {}
    for want in ("arch", "architecture", "fusion", "loss", "modalities", "dataset", "datasets"):
        for key, value in flat.items():
            if key.rsplit(".", 1)[-1] == want and value not in (None, "", []):
                found.setdefault(want.replace("architecture", "arch"), value)
    # parameter_counts.total_trainable (a training run), trainable_params (other writers)
    info = _flatten(run.model_info or {})
    trainable = next((v for k, v in info if "trainable" in k and _is_number(v)), None)
    if trainable is not None:
        found["trainable parameters"] = _human_count(trainable)
    if found:
        parts = [f"{k} `{', '.join(map(str, v)) if isinstance(v, list) else v}`" for k, v in found.items()]
        blocks.append(_Block("p", "In short: " + "; ".join(parts) + "."))
    return blocks


def _summary_blocks(run: _Run, curves: _Block) -> list[_Block]:
    """Headline metrics of every result, the untrained model / raw encoders beside the run; the curves."""
    from lightcrl.app.evaluate import TASKS

    blocks = [_Block("h2", "Summary")]
    if not run.results:
        blocks.append(
            _Block(
                "p",
                "No results/*.json files in this run directory yet: evaluate it with "
                f"`lightcrl eval --run {run.run_dir} --task TASK --data SPEC`.",
            )
        )
    else:
        blocks.append(
            _Block(
                "p",
                "Headline numbers of each evaluation (accuracies, recalls and correlations in percent), "
                "with the untrained model and the raw encoders where they were measured. Every metric "
                "is under Results below.",
            )
        )
    for task, results in _by_task(run).items():
        printed = TASKS[task].printed if task in TASKS else ()
        keys = [k for k in printed if any(k in r.metrics for r in results)]
        if not keys:  # a task without headline metrics: its first few numbers
            for r in results:
                keys += [k for k, v in r.metrics.items() if _is_number(v) and k not in keys]
            keys = keys[:SUMMARY_FALLBACK_METRICS]
        rows = [
            [str(r.data.get("dataset", "")), split_label(r.data), model_label(r.data.get("model")),
             *(fmt_value(r.metrics.get(k)) for k in keys)]
            for r in sorted(results, key=_summary_order)
        ]
        blocks.append(_Block("p", f"**{task}**"))
        blocks.append(_Block("table", header=["dataset", "split", "model", *keys], rows=rows))
    blocks.append(curves)
    return blocks


def _summary_order(r: _Result) -> tuple[str, str, int]:
    """By dataset and split; within them the run first, then its untrained twin, then raw encoders."""
    model = r.data.get("model")
    kind = model.get("kind") if isinstance(model, Mapping) else None
    rank = _REFERENCE_ORDER.get(kind, len(_REFERENCE_ORDER))
    return str(r.data.get("dataset", "")), split_label(r.data), rank


def _curves_block(run: _Run, files_dir: Path) -> _Block:
    from lightcrl.app import plots

    if not run.rows:
        return _Block("p", "No training curves: no metrics.jsonl in this run directory (or it is empty).")
    try:
        png = files_dir / "training_curves.png"
        plots.training_curves(run.rows, png)
        return _Block("img", "Training curves from metrics.jsonl", path=png)
    except ValueError as e:
        return _Block("p", f"No curves drawn: {e}.")


def _best(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[Any, Any, Any]:
    """(last value, best value, step/epoch of best) of ``key``."""
    pts = [
        (r.get("step", r.get("epoch")), r[key])
        for r in rows
        if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])
    ]
    if not pts:
        return None, None, None
    d = metric_direction(key)
    if not d:
        return pts[-1][1], None, None
    at, val = max(pts, key=lambda p: d * p[1])
    return pts[-1][1], val, at


def _training_blocks(run: _Run) -> list[_Block]:
    from lightcrl.app import plots

    if not run.rows:
        return []
    blocks = [_Block("h2", "Training log")]
    if run.bad_lines:
        blocks.append(_Block("p", f"{run.bad_lines} unreadable line(s) of metrics.jsonl were skipped."))
    keys: list[str] = []
    for r in run.rows:
        keys += [k for k, v in r.items() if k not in plots.NON_METRIC_KEYS
                 and k not in keys and _is_number(v)]
    xname = "step" if any("step" in r for r in run.rows) else "epoch"
    table = []
    for k in keys:
        last, best, at = _best(run.rows, k)
        if last is not None:
            table.append([k, fmt_value(last), fmt_value(best), fmt_value(at)])
    if table:
        blocks.append(
            _Block(
                "p",
                f"Last and best value of each logged metric (best = lowest for losses and ranks, "
                f"highest for accuracies, recalls and correlations; {xname} of the best).",
            )
        )
        blocks.append(_Block("table", header=["metric", "last", "best", f"at {xname}"], rows=table))
    return blocks


def _plot_path(run: _Run, rel: str) -> Path | None:
    for base in (run.run_dir, run.run_dir / rundir.RESULTS):
        p = (base / rel).resolve()
        if p.is_file():
            return p
    return None


def _result_blocks(run: _Run, files_dir: Path) -> list[_Block]:
    from lightcrl.app import plots

    if not run.results:
        return []  # the summary says so
    blocks = [_Block("h2", "Results")]
    blocks.append(
        _Block(
            "p",
            "Accuracies, recalls and correlations are percentages. Per-class details and "
            "confusion matrices are kept in the results files named in the tables.",
        )
    )
    for task, results in _by_task(run).items():
        blocks.append(_Block("h3", task))
        if task in TASK_DESCRIPTIONS:
            blocks.append(_Block("p", TASK_DESCRIPTIONS[task]))
        cols: list[str] = []
        for r in results:
            cols += [k for k, v in r.metrics.items() if _is_scalar(v) and k not in cols]
        ids = [
            [
                r.path.name,
                str(r.data.get("dataset", "")),
                split_label(r.data),
                model_label(r.data.get("model")),
            ]
            for r in results
        ]
        if len(cols) <= MAX_WIDE_COLUMNS or len(results) > 6:
            rows = [idr + [fmt_value(r.metrics.get(c)) for c in cols] for idr, r in zip(ids, results)]
            blocks.append(_Block("table", header=["file", "dataset", "split", "model", *cols], rows=rows))
        else:  # many metrics, few files: metrics as rows
            header = ["metric"] + [f"{i[0]} ({i[1]} {i[2]}, {i[3]})" for i in ids]
            rows = [[c] + [fmt_value(r.metrics.get(c)) for r in results] for c in cols]
            blocks.append(_Block("table", header=header, rows=rows))
        for r in results:
            for rel in r.data.get("plots") or []:
                p = _plot_path(run, str(rel))
                if p is None:
                    blocks.append(_Block("p", f"Plot `{rel}` of {r.path.name} is missing."))
                else:
                    blocks.append(_Block("img", f"{r.path.name}: {rel}", path=p))
            cm = r.metrics.get("confusion_matrix")
            names = r.metrics.get("per_class_accuracy")
            has_own = any("confusion" in str(rel) for rel in r.data.get("plots") or [])
            if (
                not has_own
                and isinstance(cm, list)
                and cm
                and isinstance(names, dict)
                and len(names) == len(cm)
            ):
                png = files_dir / f"confusion_{r.path.stem}.png"
                try:
                    plots.confusion_matrix(
                        cm,
                        list(names),
                        png,
                        title=f"{r.data.get('dataset', '')} "
                        f"{split_label(r.data)}: {model_label(r.data.get('model'))}",
                    )
                    blocks.append(
                        _Block("img", f"{r.path.name}: confusion matrix (row-normalised)", path=png)
                    )
                except ValueError as e:
                    blocks.append(_Block("p", f"No confusion matrix for {r.path.name}: {e}."))
    return blocks




def _config_blocks(run: _Run) -> list[_Block]:
    """What was run: config highlights, model facts not already in the config, the config file itself."""
    flat = dict(_flatten(run.config)) if run.config else {}
    items: list[str] = []
    for key, value in flat.items():
        if key.rsplit(".", 1)[-1] in _CONFIG_HIGHLIGHTS and (_is_scalar(value) or isinstance(value, list)):
            shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
            items.append(f"**{key}**: {shown}")
    # model_info.json repeats the config (model_config.width = model.width...): show only what it adds
    in_config = {(key.rsplit(".", 1)[-1], value) for key, value in flat.items() if _is_scalar(value)}
    for key, value in _flatten(run.model_info or {}):
        if not _is_scalar(value) or (key.rsplit(".", 1)[-1], value) in in_config:
            continue
        shown = _human_count(value) if _is_number(value) and "param" in key.lower() else fmt_value(value)
        items.append(f"**{key}**: {shown}")
    blocks = [_Block("details", "Configuration")]
    if items:
        blocks.append(_Block("ul", items=items[:60]))
    if run.config_text is not None:
        blocks.append(_Block("p", f"Contents of `{run.config_file}`:"))
        blocks.append(_Block("code", run.config_text))
    elif not items:
        blocks.append(_Block("p", "No config.yaml/config.json or model_info.json in the run directory."))
    blocks.append(_Block("end_details"))
    return blocks


def _require_run(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise LightCRLError(f"run directory not found: {run_dir}")
    if not any((run_dir / marker).exists() for marker in RUN_MARKERS):
        raise LightCRLError(
            f"{run_dir} is not a lightcrl run (none of {', '.join(RUN_MARKERS)}): nothing to report"
        )


def build_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``run_dir/report.md`` and a self-contained ``run_dir/report.html``; return their paths.

    Order: the headline results (with their untrained / raw-encoder references) and curves first, then
    every metric, the training log, and the configuration last (collapsed in HTML).
    """
    run_dir = Path(run_dir).resolve()
    _require_run(run_dir)
    run = _load_run(run_dir)
    files_dir = run_dir / FILES_DIR
    blocks = (
        _intro_blocks(run)
        + _summary_blocks(run, _curves_block(run, files_dir))
        + _result_blocks(run, files_dir)
        + _training_blocks(run)
    )
    if run.results:
        blocks.append(_Block("h2", "Files"))
        blocks.append(
            _Block(
                "ul",
                items=[
                    f"`results/{r.path.name}`: {r.task}, {r.data.get('dataset', '?')} / "
                    f"{split_label(r.data)}, {model_label(r.data.get('model'))}"
                    for r in run.results
                ],
            )
        )
    if run.problems:
        blocks.append(_Block("h2", "Problems"))
        blocks.append(_Block("ul", items=run.problems))
    blocks += _config_blocks(run)
    title = f"Run report: {run_dir.name}"
    md_path, html_path = run_dir / rundir.REPORT_MD, run_dir / rundir.REPORT_HTML
    write_text(md_path, _render_md(title, blocks, run_dir))
    write_text(html_path, _render_html(title, blocks))
    return md_path, html_path
