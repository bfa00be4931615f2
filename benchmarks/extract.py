"""Extraction throughput: `lightcrl embed` end to end vs the encoder's forward pass alone.

    .venv/bin/python benchmarks/extract.py            # 1,000 CIFAR-10 test images, efficientnet-lite0
    .venv/bin/python benchmarks/extract.py --limit 200 --max-load 99   # quick look on a busy machine

In one run: the same images are decoded once into tensors (not timed) and pushed through
``encoder.encode_batch`` batch by batch (forward only; one untimed pass first primes every batch shape).
Then, ``--rounds`` times, ``lightcrl.embed.embed`` extracts them into a fresh store with a fresh cache
(listing, decoding, forward, fp16 conversion, shard write, manifest), each embed run between two timed
forward passes, so a change of machine load shows and each embed run is compared with the forward passes
around it. The encoder weights are loaded once before timing (a fixed cost per process that `lightcrl
embed` on the command line adds, printed).

ratio = embed images/s / forward-only images/s, the median over rounds (target >= 0.9). Last line:
``ratio=...``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import common


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--data", default=None, help="dataset spec (default imagefolder:<data>/cifar10)")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=1000, help="images (default 1000)")
    p.add_argument("--encoder", default="efficientnet-lite0")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers for embed (default: embed's)"
    )
    p.add_argument("--rounds", type=int, default=2, help="embed runs, each between two forward passes")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    common.add_load_args(p)
    args = p.parse_args(argv)

    import torch

    from lightcrl.embed import EmbedOptions, default_workers, embed, plan_store
    from lightcrl.encoders import get_encoder

    common.quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = args.data or f"imagefolder:{common.data_root() / 'cifar10'}"
    with tempfile.TemporaryDirectory(prefix="lightcrl-bench-extract-") as tmp:
        os.environ["LIGHTCRL_CACHE"] = str(Path(tmp) / "cache")  # nothing reused from an earlier run
        enc = get_encoder(args.encoder, device="cpu")
        with common.timer() as t_load:
            enc.model  # noqa: B018 -- load the weights once, outside the timings
        opts = EmbedOptions(
            limit=args.limit,
            batch_size=args.batch_size,
            num_workers=args.workers,
            progress=False,
            device="cpu",
        )
        records = plan_store(enc, spec, args.split, opts)["records"]
        items = [r["path"] if enc.modality != "text" else r["text"] for r in records]
        bs = args.batch_size
        batches = [
            enc.collate([enc.transform(x) for x in items[i : i + bs]]) for i in range(0, len(items), bs)
        ]
        n = len(items)

        def forward_only() -> float:
            with common.timer() as t:
                for b in batches:
                    enc.encode_batch(b)
            return t[0]

        forward_only()  # warm-up: kernel selection for every batch shape
        common.wait_for_quiet(args.max_load, args.wait)
        # F E F E F ...: each embed run is compared with the forward passes just before and after it
        fwd, emb = [forward_only()], []
        for r in range(args.rounds):
            with common.timer() as t_embed:
                store = embed(enc, spec, args.split, Path(tmp) / f"store{r}", opts)
            emb.append(t_embed[0])
            fwd.append(forward_only())
        common.report_load_after()
        n_stored = len(store)
        assert n_stored + len(store.skipped()) == n, (n_stored, n)
        size_mb = common.store_bytes(store.dir) / 2**20

    ratios = [(fwd[r] + fwd[r + 1]) / 2 / emb[r] for r in range(args.rounds)]
    workers = opts.num_workers if opts.num_workers is not None else f"default ({default_workers(enc)})"
    print(
        f"encoder {args.encoder}, {n} images of {spec} [{args.split}], batch {bs}, "
        f"torch threads {torch.get_num_threads()}, embed workers {workers}"
    )
    print(f"weights load (once per process, not timed): {t_load[0]:.2f} s")
    print(f"forward only : {' / '.join(f'{t:.2f}' for t in fwd)} s -> {n * len(fwd) / sum(fwd):.1f} images/s")
    print(
        f"embed        : {' / '.join(f'{t:.2f}' for t in emb)} s -> {n * len(emb) / sum(emb):.1f} images/s "
        f"({n_stored} stored, store {size_mb:.0f} MiB)"
    )
    print(f"ratio per round (embed vs the forward passes around it): {', '.join(f'{x:.3f}' for x in ratios)}")
    common.headline("ratio", statistics.median(ratios), ".3f")


if __name__ == "__main__":
    main()
