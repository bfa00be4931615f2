"""Where a shard's token rows are written: during the forward (streamed, the default) or when the shard is
complete, A/B in one process on 1,000 CIFAR-10 test images with efficientnet-lite0's default (ONNX Runtime)
path, the two orders alternating by round, the forward alone (2 streams x 1 thread) timed around each round.

    .venv/bin/python benchmarks/extract_writes.py --rounds 6

Prints each variant's seconds and its ratio to the mean of the forward passes around it (median of rounds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--limit", type=int, default=1000)
    common.add_load_args(p)
    args = p.parse_args(argv)

    import lightcrl.embed as E
    from lightcrl.encoders import get_encoder
    from lightcrl.paths import cache_dir

    common.quiet()
    graphs = sorted((cache_dir() / "onnx").glob("*.onnx"))  # exported graphs: reused
    tmp_ctx = tempfile.TemporaryDirectory(prefix="lightcrl-bench-writes-")
    tmp = Path(tmp_ctx.name)
    os.environ["LIGHTCRL_CACHE"] = str(tmp / "cache")
    (tmp / "cache" / "onnx").mkdir(parents=True)
    for g in graphs:
        (tmp / "cache" / "onnx" / g.name).symlink_to(g)
    enc = get_encoder("efficientnet-lite0", device="cpu")
    spec = f"imagefolder:{common.data_root() / 'cifar10'}"
    opts = E.EmbedOptions(limit=args.limit, batch_size=64, progress=False, device="cpu")
    plan = E.plan_store(enc, spec, "test", opts)
    items = [r["path"] for r in plan["records"]]
    order = E.plan_batches(list(range(plan["n_shards"])), plan["shard_size"], 64, len(items))
    batches = [enc.collate([enc.transform(items[i]) for i in b]) for b in order]
    streams = E.default_forward_streams(enc)

    def forward() -> float:
        t = time.perf_counter()
        for _ in E.encoded(((None, b, None) for b in batches), enc, streams):
            pass
        return time.perf_counter() - t

    def run(streamed: bool, tag: str) -> float:
        E.STREAM_SHARD_ROWS = streamed
        t = time.perf_counter()
        E.embed(enc, spec, "test", tmp / tag, opts)
        return time.perf_counter() - t

    run(True, "warm-1"), run(False, "warm-2"), forward()  # ONNX session, page cache, kernels
    common.wait_for_quiet(args.max_load, args.wait)
    variants = {"streamed": True, "at shard end": False}
    times: dict[str, list[float]] = {k: [] for k in variants}
    fwd = [forward()]
    for r in range(args.rounds):
        names = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in names:
            times[name].append(run(variants[name], f"{r}-{name}"))
        fwd.append(forward())
    common.report_load_after()
    E.STREAM_SHARD_ROWS = True
    tmp_ctx.cleanup()
    print(f"{len(items)} images, batch 64, {streams} forward streams")
    print("forward alone: " + " / ".join(f"{t:.2f}" for t in fwd) + " s")
    for name, ts in times.items():
        ratios = [(fwd[i] + fwd[i + 1]) / 2 / t for i, t in enumerate(ts)]
        secs = " / ".join(f"{t:.2f}" for t in ts)
        per_round = ", ".join(f"{x:.3f}" for x in ratios)
        print(f"embed, rows written {name:12s}: {secs} s; ratio per round {per_round}; "
              f"median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
