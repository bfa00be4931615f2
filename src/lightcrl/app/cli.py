"""The `lightcrl` command line: embed, train, eval, report and friends.

Each command is a thin shell over a library function; errors meant for the user print as one line.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from lightcrl.errors import LightCRLError

#: What to do after Ctrl-C, per command: one line printed with "interrupted" (exit code 130).
RESUME_HINTS = {
    "embed": "run the same command again to resume (finished shards are kept)",
    "index": "run the same command again to resume (finished shards and chunks are kept)",
    "train": "run the same command again to resume from the last checkpoint",
    "experiment": "run the same command again to continue (finished cells are kept)",
    "quickstart": "run the same command again (the feature stores already built are reused)",
}


def _no_type(ctx: Any) -> None:
    return None


class _PlainFlags:
    """Help shows a boolean flag as ``--overwrite``, not ``--overwrite <bool>`` (as typer 0.29 does).

    A flag takes no value, so a type after it misleads; older typers never show one (harmless there).
    """

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            if getattr(p, "is_bool_flag", False):
                p.display_type_rich = _no_type
        return params


class _Command(_PlainFlags, TyperCommand):
    pass


class _Group(_PlainFlags, TyperGroup):
    def invoke(self, ctx):
        # Without this, typer turns Ctrl-C into a silent exit 130: say so, and how to pick up again.
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            hint = RESUME_HINTS.get(ctx.invoked_subcommand or "")
            typer.secho(f"interrupted: {hint}" if hint else "interrupted", err=True)
            raise typer.Exit(130) from None


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Lightweight cross-modal representation learning on frozen encoders.")


def setup_logging(level: int = logging.INFO) -> None:
    """The CLI's logging set-up (benchmarks share it): level lines, no transformers bars or warnings."""
    logging.basicConfig(level=level, format="%(levelname)s %(message)s")
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")):
    setup_logging(logging.DEBUG if verbose else logging.INFO)


@app.command(cls=_Command)
def embed(
    encoder: str = typer.Option(..., help="Encoder: efficientnet-lite0, minilm-l6, aisfx, hf-text:<id>, ...; "
                                "NAME@LAYER for an intermediate layer, e.g. minilm-l6@layer4"),
    data: str = typer.Option(..., help="Dataset spec KIND:PATH, e.g. flickr8k:../shared/data/flickr8k"),
    split: Optional[str] = typer.Option(None, help="Split (dataset-specific: train, dev, test, fold5...)"),
    out: Path = typer.Option(..., help="Store directory"),
    limit: Optional[int] = typer.Option(None, help="Seeded sample of N items spread over the dataset"),
    seed: int = typer.Option(0, help="Seed for --limit"),
    batch_size: int = typer.Option(64),
    shard_size: int = typer.Option(2048, help="Items per shard (the unit of resume)"),
    workers: Optional[int] = typer.Option(None, help="DataLoader workers (default: cores torch leaves free)"),
    device: str = typer.Option("auto"),
    encoder_backend: str = typer.Option(
        "auto", help="How the frozen encoder runs: auto (the measured-fastest: ONNX Runtime for "
        "efficientnet-lite0 on CPU), eager (PyTorch as written), onnx, or bf16 (PyTorch in bfloat16 "
        "autocast: ~2x for text encoders on AMX CPUs); per modality: text=bf16. Stores never mix backends."),
    strict: bool = typer.Option(False, help="Fail on the first bad input instead of skipping it"),
    overwrite: bool = typer.Option(False, help="Re-extract if OUT holds a store of other inputs"),
):
    """Extract frozen-encoder features of a dataset split into a feature store (resumable)."""
    from lightcrl import distributed as dist
    from lightcrl.embed import EmbedOptions
    from lightcrl.embed import embed as run_embed

    rank, world, _, dev = dist.init_distributed()
    opts = EmbedOptions(batch_size=batch_size, shard_size=shard_size, num_workers=workers, strict=strict,
                        limit=limit, seed=seed, overwrite=overwrite, encoder_backend=encoder_backend,
                        device=str(dev) if world > 1 else device)
    try:
        store = run_embed(encoder, data, split, out, opts, rank=rank, world=world)
    finally:
        dist.cleanup()
    if rank == 0:
        s = store.summary()
        typer.echo(f"stored {s['count']} items ({s['skipped']} skipped) of {s['dataset']} [{s['split']}] "
                   f"with {s['encoder']} in {s['dir']}")


def _names(values: Optional[list[str]]) -> Optional[list[str]]:
    """Repeatable and/or comma-separated names -> one list (None when not given)."""
    if not values:
        return None
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


@app.command("align-probe", cls=_Command)
def align_probe(
    pairs: str = typer.Option(..., help="Pairs dataset spec, e.g. flickr8k:../shared/data/flickr8k"),
    split: str = typer.Option("train", help="Split to sample (a training split: probe before training)"),
    sample: int = typer.Option(1000, help="Seeded sample of N media items, one caption each"),
    k: int = typer.Option(10, help="Neighbours per item"),
    seed: int = typer.Option(0, help="Seed of the sample and of the caption chosen per item"),
    media_encoders: Optional[list[str]] = typer.Option(
        None, help="Media encoders, comma-separated or repeated; NAME@LAYER for one layer (default: every "
        "registered offline encoder of the dataset's media)"),
    text_encoders: Optional[list[str]] = typer.Option(
        None, help="Text encoders, as --media-encoders (default: every registered offline text encoder)"),
    layers: bool = typer.Option(True, "--layers/--no-layers",
                                help="A plain NAME also brings its default probe layers"),
    out: Optional[Path] = typer.Option(None, help="Write the ranking as JSON here"),
    device: str = typer.Option("auto"),
    encoder_backend: str = typer.Option(
        "auto", help="How the frozen encoders run: auto | eager | onnx | bf16, or per modality: text=bf16"),
):
    """Rank (media layer, text layer) and encoder pairs by mutual-kNN alignment on training pairs."""
    from lightcrl.app.align_probe import ProbeOptions, print_probe
    from lightcrl.app.align_probe import align_probe as run_probe

    opts = ProbeOptions(pairs=pairs, split=split, sample=sample, k=k, seed=seed,
                        media_encoders=_names(media_encoders), text_encoders=_names(text_encoders),
                        layers=layers, device=device, encoder_backend=encoder_backend, out=out)
    res = run_probe(opts)
    print_probe(res.summary)
    if out:
        typer.echo(f"results: {out}")


@app.command(cls=_Command)
def train(
    config: Path = typer.Option(..., help="YAML config (see configs/)"),
    out: Path = typer.Option(..., help="Run directory"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override: key.path=value (repeatable)"),
    overwrite: bool = typer.Option(False, help="Start over in OUT instead of resuming"),
):
    """Train a DFE (or baseline heads) on cached features; resumes OUT if it holds a run."""
    from lightcrl.app.config import load_config
    from lightcrl.app.train import train as run_train

    cfg = load_config(config, set_)
    summary = run_train(cfg, out, overwrite=overwrite)
    typer.echo(json.dumps(summary, indent=2))


@app.command("eval", cls=_Command)
def eval_(
    run: str = typer.Option(..., help="Run directory, or 'raw' for the frozen encoders alone"),
    task: str = typer.Option(..., help="zeroshot | retrieval | linear_probe | finetune | geometry | sts"),
    data: str = typer.Option(..., help="Dataset spec (sts: stsb:DIR, sick:FILE, senteval:DIR)"),
    split: Optional[str] = typer.Option(None, help="Evaluation split (default: the dataset's test split)"),
    output: Optional[Path] = typer.Option(None, help="Results JSON (default: RUN/results/<task>-...json)"),
    limit: Optional[int] = typer.Option(None, help="Seeded sample of N items spread over the dataset"),
    seed: int = typer.Option(0),
    untrained: bool = typer.Option(False, help="Evaluate the run's architecture at initialisation"),
    classnames: Optional[Path] = typer.Option(None, help="zeroshot: class names file (one a line)"),
    templates: Optional[Path] = typer.Option(None, help="zeroshot: templates file ('{c}' = class name)"),
    probe_mode: str = typer.Option("logreg", help="linear_probe: logreg (C chosen on a train split) | sgd"),
    train_split: str = typer.Option("train", help="linear_probe/finetune: the training split"),
    train_limit: Optional[int] = typer.Option(None, help="linear_probe/finetune: sample of the train split"),
    epochs: Optional[int] = typer.Option(None, help="finetune / sgd probe epochs (default 100)"),
    device: str = typer.Option("auto"),
    image_encoder: str = typer.Option("efficientnet-lite0", help="--run raw: image encoder"),
    text_encoder: str = typer.Option("minilm-l6", help="--run raw: text encoder"),
    audio_encoder: str = typer.Option("aisfx", help="--run raw: audio encoder"),
):
    """Evaluate a run (or its untrained twin, or raw encoders) on one task; writes a results JSON."""
    from lightcrl.app.evaluate import EvalRequest, EvalTarget, headline, run_eval

    opts = {"probe_mode": probe_mode, "train_split": train_split, "train_limit": train_limit,
            "epochs": epochs}
    if classnames:
        opts["classnames"] = [ln.strip() for ln in classnames.read_text().splitlines() if ln.strip()]
    if templates:
        opts["templates"] = [ln.strip() for ln in templates.read_text().splitlines() if ln.strip()]
    target = EvalTarget.resolve(run, untrained=untrained, device=device, image_encoder=image_encoder,
                                text_encoder=text_encoder, audio_encoder=audio_encoder)
    result = run_eval(target, EvalRequest(task, data, split, limit, seed, device, output, opts))
    _print_table(f"{task} on {data} [{split or 'default'}] - {target.identity.get('name', target.kind)}",
                 headline(result))
    typer.echo(f"results: {result['output']}")


@app.command(cls=_Command)
def protocol(
    name: str = typer.Argument(..., help="class-disjoint | supervised-captions | transfer (docs/audio.md)"),
    config: Path = typer.Option(..., help="YAML config with a `captions: templates` source"),
    out: Path = typer.Option(..., help="Output folder: one run directory per fold and seed + protocol.json"),
    source: int = typer.Option(0, help="Index of the templates-captions source in data.sources"),
    spec: Optional[str] = typer.Option(None, help="Training dataset (default: the source's spec)"),
    test: Optional[str] = typer.Option(None, help="transfer: the test dataset, e.g. esc10:DIR"),
    groups: int = typer.Option(5, help="class-disjoint: number of class groups"),
    group_seed: int = typer.Option(0, help="class-disjoint: seed of the class groups"),
    fold: Optional[list[int]] = typer.Option(None, "--fold", help="class-disjoint: only this fold "
                                             "(repeatable)"),
    seed: Optional[list[int]] = typer.Option(None, "--seed", help="Train every fold once per seed "
                                             "(repeatable; default: the config's seed)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override: key.path=value (repeatable)"),
):
    """Run an evaluation protocol for captions made from class names: train each fold, test zero-shot."""
    from lightcrl.app.config import load_config
    from lightcrl.app.protocols import PROTOCOLS, protocol_lines, run_protocol

    if name not in PROTOCOLS:
        raise LightCRLError(f"unknown protocol {name!r}: {' | '.join(PROTOCOLS)}")
    cfg = load_config(config, set_)
    res = run_protocol(cfg, source, name, out, spec=spec, test_spec=test, groups=groups,
                       group_seed=group_seed, folds=fold or None, seeds=seed or None)
    for line in protocol_lines(res):
        typer.echo(line)
    typer.echo(f"results: {out / 'protocol.json'}")


@app.command(cls=_Command)
def report(run_dir: Path = typer.Argument(..., help="Run directory")):
    """Gather a run's curves and results files into report.md and a self-contained report.html."""
    from lightcrl.app.report import build_report

    md, html = build_report(run_dir)
    typer.echo(f"report: {html}\nmarkdown: {md}")


def _print_table(title: str, values: dict):
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    # the title on a line of its own: as a table title it was wrapped to the table's width, mid-name
    console.print(f"[bold]{escape(title)}[/bold]")
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in values.items():
        table.add_row(k, f"{v:.2f}" if isinstance(v, float) else str(v))
    console.print(table)


@app.command(cls=_Command)
def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), help="Output folder (a run directory + summary.json)"),
    data: Optional[str] = typer.Option(None, help="Real pairs data, e.g. flickr8k:../shared/data/flickr8k "
                                       "(default: a synthetic shapes dataset rendered on the fly)"),
    zeroshot: Optional[str] = typer.Option(None, help="Zero-shot classification data, e.g. "
                                           "imagefolder:../shared/data/cifar10"),
    limit: Optional[int] = typer.Option(None, help="Training images (synthetic: 720; real data: 1000)"),
    eval_limit: Optional[int] = typer.Option(None, help="Images per real-data evaluation (default 500)"),
    epochs: Optional[int] = typer.Option(None, help="Training epochs (synthetic: 20; real data: 10)"),
    device: str = typer.Option("auto"),
    seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: the cores left idle by others)"),
):
    """Run the whole pipeline (data, embed, train, zero-shot + retrieval eval, report) in minutes."""
    from lightcrl.app.quickstart import QuickstartOptions, headline_lines
    from lightcrl.app.quickstart import quickstart as run_quickstart

    opts = QuickstartOptions(out=out, data=data, zeroshot=zeroshot, limit=limit, eval_limit=eval_limit,
                             epochs=epochs, device=device, seed=seed, threads=threads)
    summary = run_quickstart(opts)
    for line in headline_lines(summary):
        typer.echo(line)
    typer.echo(f"report: {summary['report']}\nsummary: {out / 'summary.json'}")


@app.command(cls=_Command)
def search(
    run: Path = typer.Option(..., help="Run directory"),
    images: Path = typer.Option(..., help="Folder of images (indexed once, then updated incrementally)"),
    query: str = typer.Option(..., help="Text query"),
    top: int = typer.Option(8, help="Number of matches"),
    out: Optional[Path] = typer.Option(None, help="HTML gallery (default: RUN/search/<query>.html)"),
    device: str = typer.Option("auto"),
):
    """Find the images of a folder that best match a text query; writes an HTML gallery."""
    from lightcrl.app.search import default_html
    from lightcrl.app.search import search as run_search

    res = run_search(run, images, query, top=top, out_html=out or default_html(run, query), device=device,
                     progress=True)
    s = res.stats
    typer.echo(f"index: {res.n_images} images ({s.embedded} embedded, {s.reused} reused, "
               f"{s.removed} removed, {s.skipped} unreadable)")
    for h in res.hits:
        typer.echo(f"{h.rank:3d}  {h.score:6.3f}  {h.path}")
    for n in res.notes:
        typer.echo(n)
    typer.echo(f"gallery: {res.html}")


@app.command("index", cls=_Command)
def index_(
    # torchrun's argument parser takes "--run" for an abbreviation of its own --run-path: write --run-dir
    run: Path = typer.Option(..., "--run", "--run-dir", help="Run directory (under torchrun: --run-dir)"),
    data: str = typer.Option(..., help="Dataset spec KIND:PATH (e.g. flickr8k:DIR) or a folder of "
                             "images or audio clips"),
    out: Path = typer.Option(..., help="Index directory"),
    split: Optional[str] = typer.Option(None, help="Dataset split (default: the dataset's test split)"),
    modality: Optional[str] = typer.Option(None, help="image | audio | text (default: the dataset's media; "
                                           "text indexes its captions)"),
    limit: Optional[int] = typer.Option(None, help="Seeded sample of N items spread over the dataset"),
    seed: int = typer.Option(0),
    exact_max: int = typer.Option(100_000, help="Exact search up to this many items, approximate above"),
    structure: str = typer.Option("auto", help="auto (exact, IVF-PQ above --exact-max) | exact | ivfpq | "
                                  "hnsw"),
    max_memory_mb: int = typer.Option(4096, help="Memory bound: exact search keeps the embeddings in RAM "
                                      "up to it, an HNSW graph must fit in it"),
    export: Optional[tuple[str, Path]] = typer.Option(None, help="Also write another tool's layout: "
                                                      "clip-retrieval DIR", show_default=False),
    chunk_size: int = typer.Option(8192, help="Items per chunk through the run's model (the unit of "
                                   "resume and of the split across torchrun ranks)"),
    shard_size: Optional[int] = typer.Option(None, help="Items per feature-store shard when the frozen "
                                             "features are extracted (default 2048; split across ranks)"),
    device: str = typer.Option("auto"),
):
    """Embed a collection through a run into a searchable index (exact, or FAISS HNSW / IVF-PQ).

    Under torchrun each rank embeds its part (resumable), the approximate index is trained once."""
    from lightcrl import distributed as dist
    from lightcrl.app.index import build_index

    rank, world, _, dev = dist.init_distributed()
    try:
        res = build_index(run, data, out, split=split, modality=modality, limit=limit, seed=seed,
                          exact_max=exact_max, memory_mb=max_memory_mb,
                          device=str(dev) if world > 1 else device, progress=True,
                          export=export if export and export[0] else None, structure=structure,
                          chunk=chunk_size, rank=rank, world=world, shard_size=shard_size)
    finally:
        dist.cleanup()
    if rank != 0:
        return
    typer.echo(f"indexed {res.count} {res.modality} items ({res.structure} search) in {res.dir}")
    if res.export:
        typer.echo(f"clip-retrieval layout: {res.export}")
    typer.echo(f"serve it: lightcrl serve {res.dir}")


@app.command(cls=_Command)
def serve(
    index: list[Path] = typer.Argument(..., metavar="INDEX_DIR...", help="Index directory (made by "
                                       "`lightcrl index`); several: the parts of a collection, searched "
                                       "as one"),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (default: this machine only)"),
    port: int = typer.Option(8000),
    device: str = typer.Option("auto"),
    max_k: int = typer.Option(100, help="Largest k a request may ask for"),
    max_upload_mb: float = typer.Option(16.0, help="Largest request body (uploads), in MB"),
):
    """Serve an index (or its parts) over HTTP: a search page, a JSON API (text or query by example) and
    its media."""
    from lightcrl.app.serve import Limits
    from lightcrl.app.serve import serve as run_serve

    run_serve(list(index), host=host, port=port, device=device,
              limits=Limits(max_k=max_k, max_body_bytes=int(max_upload_mb * 2**20)))


@app.command(cls=_Command)
def export(
    run: Path = typer.Option(..., help="Run directory"),
    format: str = typer.Option("onnx", help="Export format (onnx)"),
    out: Optional[Path] = typer.Option(None, help="FILE.onnx (-> FILE.<modality>.onnx) or a folder "
                                       "(default: RUN/export/<modality>.onnx; with --full a folder, "
                                       "default RUN/export/full)"),
    modality: Optional[list[str]] = typer.Option(None, help="Modality to export (repeatable; default all)"),
    atol: float = typer.Option(1e-4, help="Largest accepted |ONNX - PyTorch| difference"),
    full: bool = typer.Option(False, "--full", help="The whole pipeline: frozen encoder + trained model in "
                              "one graph per modality (preprocessed image / token ids -> embedding), with "
                              "the tokenizer and pipeline.json (preprocessing); checked against PyTorch"),
    min_cosine: float = typer.Option(0.999, help="--full: smallest accepted cosine to the PyTorch pipeline"),
):
    """Export the trainable part (projection + DFE per modality) and check it against PyTorch."""
    from lightcrl.export import export_full, export_onnx

    if format.lower() != "onnx":
        raise LightCRLError(f"unknown export format {format!r}: only onnx is supported")
    if full:
        res = export_full(run, out, modalities=modality or None, min_cosine=min_cosine)
        for d in res.modalities:
            typer.echo(f"{d.modality}: {d.path} (raw input -> embedding); vs PyTorch pipeline: "
                       f"min cosine {res.min_cosine[d.modality]:.6f}, max abs diff {d.max_abs_diff:.2e}")
        for mod, reason in res.skipped.items():
            typer.echo(f"{mod}: not exported: {reason}")
        typer.echo(f"preprocessing and inputs: {res.folder / 'pipeline.json'}")
        return
    for d in export_onnx(run, out, modalities=modality or None, atol=atol):
        typer.echo(f"{d.modality}: {d.path} (tokens [B, T, {d.input_dim}] + mask [B, T] -> embedding); "
                   f"max abs diff vs PyTorch {d.max_abs_diff:.2e}")


@app.command(cls=_Command)
def experiment(
    config: Path = typer.Argument(..., help="Experiment YAML (see configs/experiments/)"),
    only: Optional[list[str]] = typer.Option(None, "--only", help="Run only cells matching this glob "
                                             "(repeatable), e.g. 'dfe-add-*' or asif"),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: runs/experiments/<name>)"),
    results_md: Optional[Path] = typer.Option(None, "--results-md", help="Also write the results table "
                                              "here (e.g. docs/results.md), with this command at its top"),
    list_cells: bool = typer.Option(False, "--list", help="Validate, list the cells and their status; "
                                    "run nothing"),
):
    """Run a grid of trainings and baselines with every evaluation (resumable); writes a results table."""
    import shlex

    from lightcrl.app.experiment import cell_status, load_experiment, run_experiment

    if list_cells:
        exp = load_experiment(config)
        folder = out or Path("runs") / "experiments" / exp.cfg.name
        for cell in exp.select(only):
            typer.echo(f"{cell.name:40s} {cell.kind:8s} {cell_status(exp, cell, folder)}")
        return
    command = shlex.join(["lightcrl", *sys.argv[1:]]) if "experiment" in sys.argv[1:] else None
    res = run_experiment(config, only=only, out=out, results_md=results_md, command=command)
    typer.echo(res.markdown.read_text())
    typer.echo(f"ran {len(res.ran)}, skipped {len(res.skipped)} (finished), failed {len(res.failed)}; "
               f"table: {res.markdown} and {res.csv}")
    for name, err in res.failed.items():
        typer.secho(f"failed: {name}: {err}", err=True, fg=typer.colors.RED)
    if res.failed:
        raise typer.Exit(1)


def _click_classes(name: str) -> tuple[type[BaseException], ...]:
    """Exception class ``name`` of click and of typer's vendored copy of click (typer._click).

    Older typers raise click's classes, newer ones their own copy (click need not even be installed):
    catching both keeps usage errors a clean message on every typer that pyproject allows.
    """
    found = []
    for module in ("click.exceptions", "typer._click.exceptions"):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def main(argv: list[str] | None = None) -> int:
    usage_errors, aborts = _click_classes("ClickException"), _click_classes("Abort")
    try:
        # standalone_mode=False: typer returns the exit code (of typer.Exit, 130 after Ctrl-C)
        code = app(args=argv, prog_name="lightcrl", standalone_mode=False)
    except LightCRLError as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        return 2
    except usage_errors as e:  # mistyped command or option, missing option: usage + error, as click does
        e.show()
        return e.exit_code
    except (KeyboardInterrupt, *aborts):  # Ctrl-C outside a command (older click: Abort)
        typer.secho("interrupted", err=True)
        return 130
    except typer.Exit as e:
        return e.exit_code
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
