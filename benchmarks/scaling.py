"""Epoch time and memory of training as the number of pairs doubles (default 1k, 2k, 4k, 8k pairs).

    .venv/bin/python benchmarks/scaling.py
    .venv/bin/python benchmarks/scaling.py --sizes 500 1000 2000 4000 --max-load 99

For each size a synthetic image store (49 x 1280 fp16 tokens an item, like efficientnet-lite0) and caption
store (8-24 x 384, like minilm-l6) are written with lightcrl.store.write_shard / finalize, then a fresh
child process trains one epoch on them with the real Trainer (DFE width 256, depth 1, batch 64; one
untimed warm-up step) and reports:

- epoch time and pairs/s;
- peak RSS (``getrusage().ru_maxrss``): this COUNTS the memmapped store pages the process touched, which
  are clean page cache the kernel can drop at any time (see memory_cap.py for a run under a hard cap);
- peak private memory (RssAnon, sampled every 20 ms): what the process itself holds; flat = the store is
  not loaded into memory.

Expect linear time and flat private memory. Last line: ``linearity=<(time per pair at the largest size) /
(time per pair at the smallest)>`` (1.0 = perfectly linear).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import common


def child(image_dir: str, text_dir: str, batch_size: int) -> None:
    """One epoch on the given stores in this (fresh) process; prints one JSON line."""
    import time

    from lightcrl.app.config import validate_config
    from lightcrl.app.train import Trainer

    rss0 = common.proc_status_mb("VmRSS")
    common.patch_stores(Path(image_dir), Path(text_dir))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(validate_config(common.synthetic_config(batch_size=batch_size)), Path(tmp) / "run")
        schedule = common.epoch_batches(trainer)
        trainer.train_step(*schedule[0])  # warm-up
        anon_before = common.proc_status_mb("RssAnon")
        with common.AnonPeak() as anon:
            t0 = time.perf_counter()
            for si, batch in schedule:
                trainer.train_step(si, batch)
            dt = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "pairs": int(sum(len(b) for _, b in schedule)),
                "steps": len(schedule),
                "epoch_s": dt,
                "peak_rss_mb": common.peak_rss_mb(),
                "peak_anon_mb": anon.peak,
                "anon_before_epoch_mb": anon_before,
                "rss_at_start_mb": rss0,
                "rss_file_end_mb": common.proc_status_mb("RssFile"),
            }
        )
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 4000, 8000], help="pairs per run")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--tmp", default=None, help="where to write the synthetic stores (default: system temp)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    common.add_load_args(p)
    args = p.parse_args(argv)
    if args.child:
        return child(*args.child, args.batch_size)

    rows = []
    with tempfile.TemporaryDirectory(prefix="lightcrl-bench-scaling-", dir=args.tmp) as tmp:
        stores = {}
        for n in args.sizes:
            stores[n] = common.synthetic_pairs(Path(tmp) / str(n), n)
            print(
                f"# wrote {n} pairs: {common.store_bytes(*stores[n]) / 2**20:.0f} MiB of stores", flush=True
            )
        common.wait_for_quiet(args.max_load, args.wait)
        for n in args.sizes:
            img, txt = stores[n]
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    str(img),
                    str(txt),
                    "--batch-size",
                    str(args.batch_size),
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            r["store_mb"] = common.store_bytes(img, txt) / 2**20
            rows.append(r)
            print(f"# {n} pairs: {r['epoch_s']:.2f} s", flush=True)
        common.report_load_after()
        flops = common.train_step_flops(*stores[args.sizes[0]], args.batch_size)  # not timed

    print(
        f"{'pairs':>6} {'store MiB':>9} {'epoch s':>8} {'pairs/s':>8} {'ms/pair':>8} {'peak RSS':>9} "
        f"{'peak anon':>9} {'anon pre':>9}"
    )
    for r in rows:
        print(
            f"{r['pairs']:6d} {r['store_mb']:9.0f} {r['epoch_s']:8.2f} {r['pairs'] / r['epoch_s']:8.1f} "
            f"{1000 * r['epoch_s'] / r['pairs']:8.3f} {r['peak_rss_mb']:8.0f}M {r['peak_anon_mb']:8.0f}M "
            f"{r['anon_before_epoch_mb']:8.0f}M"
        )
    for r in rows:
        common.print_roofline(f"{r['pairs']} pairs", r["pairs"] / r["epoch_s"], flops, "pairs")
    first, last = rows[0], rows[-1]
    lin = (last["epoch_s"] / last["pairs"]) / (first["epoch_s"] / first["pairs"])
    growth = last["pairs"] / first["pairs"]
    print(
        f"pairs x{growth:.0f}: epoch time x{last['epoch_s'] / first['epoch_s']:.2f}, "
        f"peak private memory x{last['peak_anon_mb'] / first['peak_anon_mb']:.2f} "
        f"({last['peak_anon_mb'] - first['peak_anon_mb']:+.0f} MiB), "
        f"peak RSS incl. mapped store pages x{last['peak_rss_mb'] / first['peak_rss_mb']:.2f}"
    )
    common.headline("linearity", lin, ".2f")


if __name__ == "__main__":
    main()
