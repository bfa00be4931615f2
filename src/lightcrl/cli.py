"""The `lightcrl` command line: embed, train, eval, report and friends.

Each command is a thin shell over a library function; errors meant for the user print as one line.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import LightCRLError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Lightweight cross-modal representation learning on frozen encoders.")


def _setup_logging(verbose: bool = False):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s")
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
    _setup_logging(verbose)


@app.command()
def embed(
    encoder: str = typer.Option(..., help="Encoder name: efficientnet-lite0, minilm-l6, aisfx, hf-text:<id>, ..."),
    data: str = typer.Option(..., help="Dataset spec KIND:PATH, e.g. flickr8k:../shared/data/flickr8k"),
    split: Optional[str] = typer.Option(None, help="Split (dataset-specific: train, dev, test, fold5...)"),
    out: Path = typer.Option(..., help="Store directory"),
    limit: Optional[int] = typer.Option(None, help="Seeded sample of N items spread over the dataset"),
    seed: int = typer.Option(0, help="Seed for --limit"),
    batch_size: int = typer.Option(64),
    shard_size: int = typer.Option(2048, help="Items per shard (the unit of resume)"),
    workers: Optional[int] = typer.Option(None, help="DataLoader workers (default: cores - 1)"),
    device: str = typer.Option("auto"),
    strict: bool = typer.Option(False, help="Fail on the first bad input instead of skipping it"),
    overwrite: bool = typer.Option(False, help="Re-extract if OUT holds a store of other inputs"),
):
    """Extract frozen-encoder features of a dataset split into a feature store (resumable)."""
    from . import distributed as dist
    from .embed import EmbedOptions
    from .embed import embed as run_embed

    rank, world, _, dev = dist.init_distributed()
    opts = EmbedOptions(batch_size=batch_size, shard_size=shard_size, num_workers=workers, strict=strict,
                        limit=limit, seed=seed, overwrite=overwrite,
                        device=str(dev) if world > 1 else device)
    try:
        store = run_embed(encoder, data, split, out, opts, rank=rank, world=world)
    finally:
        dist.cleanup()
    if rank == 0:
        s = store.summary()
        typer.echo(f"stored {s['count']} items ({s['skipped']} skipped) of {s['dataset']} [{s['split']}] "
                   f"with {s['encoder']} in {s['dir']}")


@app.command()
def train(
    config: Path = typer.Option(..., help="YAML config (see configs/)"),
    out: Path = typer.Option(..., help="Run directory"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override: key.path=value (repeatable)"),
    overwrite: bool = typer.Option(False, help="Start over in OUT instead of resuming"),
):
    """Train a DFE (or baseline heads) on cached features; resumes OUT if it holds a run."""
    from .config import load_config
    from .train import train as run_train

    cfg = load_config(config, set_)
    summary = run_train(cfg, out, overwrite=overwrite)
    typer.echo(json.dumps(summary, indent=2))


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv, standalone_mode=False)
    except LightCRLError as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        return 2
    except (typer.Exit, SystemExit) as e:
        return int(getattr(e, "exit_code", getattr(e, "code", 0)) or 0)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        return 130
    except Exception as e:  # noqa: BLE001 -- click usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return e.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
