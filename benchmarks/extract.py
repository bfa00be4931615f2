"""Extraction throughput: the default path vs the eager path, end to end, against the machine's limit.

    .venv/bin/python benchmarks/extract.py            # 1,000 CIFAR-10 test images, efficientnet-lite0
    .venv/bin/python benchmarks/extract.py --encoder minilm-l6   # 1,000 Flickr8k dev images: 5,000 captions
    .venv/bin/python benchmarks/extract.py --encoder mpnet-base --bf16   # and the bf16 backend beside them
    .venv/bin/python benchmarks/extract.py --encoder aisfx --limit 200   # ESC-10 clips
    .venv/bin/python benchmarks/extract.py --limit 200 --max-load 99     # quick look on a busy machine
    .venv/bin/python benchmarks/extract.py --grid 0:2:1,1:2:1,0:1:2   # processes:ORT threads:streams

Paths compared, each ``lightcrl.embed.embed`` end to end into a fresh store with a fresh cache (only
exported ONNX graphs, keyed by identity, are reused; listing, decoding, forward, fp16 conversion, shard
write, manifest), same items, same batch size:

- ``default``: ``EmbedOptions()`` as shipped (``--encoder-backend auto``; text batches bucketed by length);
- ``eager``: the path before encoder backends, ``encoder_backend="eager"`` and no length bucketing;
- ``eager+buckets`` (text): the eager backend with length bucketing, to separate the two gains;
- ``no-dedupe`` (text): the default with every caption encoded, repeats too (``dedupe_text=False``);
- ``onnx``: for an encoder whose default is not ONNX but which has an ONNX path, measured too;
- ``bf16`` (``--bf16``): the PyTorch module in bfloat16 autocast, with its features' agreement with
  eager's (max abs diff, min cosine of the pooled vectors);
- ``wW:tT:sS`` (``--grid``): the default backend with W decoding processes and S forward streams of T
  ONNX Runtime threads each.

Also the default backend's forward pass alone on the same batches, decoded in advance, as extraction runs
it (``lightcrl.embed.encoded``: S streams of T threads, the defaults) and, where that is not already one
stream, as one stream on all of torch's threads. Every round times ``forward, default, eager[, onnx]``,
and a last forward pass closes the run, so a change of machine load shows. One untimed pass per path
first exports/loads what it needs.

speedup = eager s / default s per round; ratio = default embed items/s / the forward pass alone around it
(the mean of the passes before and after, of whichever forward configuration was faster over the run);
both the median over rounds. roofline_fraction = achieved GFLOP/s (FLOPs per item counted with
torch.utils.flop_counter on the eager module) / sustained float32 GEMM GFLOP/s of torch on the same
threads, measured in the same run. Last line: ``speedup=...``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import common

DEFAULT_DATA = {
    "image": ("cifar10", "imagefolder", "test"),
    "text": ("flickr8k", "flickr8k", "dev"),
    "audio": ("esc10", "esc10", None),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--encoder", default="efficientnet-lite0")
    p.add_argument("--data", default=None, help="dataset spec (default: one per modality, see the code)")
    p.add_argument("--split", default=None)
    p.add_argument("--limit", type=int, default=1000, help="items (default 1000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: embed's)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of forward, default, eager (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    p.add_argument(
        "--grid",
        default="",
        help="also time the default backend with these decoding processes x ONNX Runtime threads, "
        "e.g. 0:2,1:2,1:1,2:1 (workers:threads), in the same interleaved rounds",
    )
    p.add_argument("--bf16", action="store_true",
                   help="also time --encoder-backend bf16 (bfloat16 autocast) in the same rounds")
    common.add_load_args(p)
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from lightcrl.embed import (
        EmbedOptions,
        default_forward_streams,
        default_forward_threads,
        default_workers,
        embed,
        encoded,
        plan_batches,
        plan_store,
        shard_repeats,
    )
    from lightcrl.encoders import get_encoder

    common.quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp_ctx = tempfile.TemporaryDirectory(prefix="lightcrl-bench-extract-")
    tmp = Path(tmp_ctx.name)
    from lightcrl.paths import cache_dir

    graphs = sorted((cache_dir() / "onnx").glob("*.onnx"))  # exported graphs (keyed by identity): reused
    os.environ["LIGHTCRL_CACHE"] = str(tmp / "cache")  # no store reused from an earlier run
    (tmp / "cache" / "onnx").mkdir(parents=True)
    for g in graphs:
        (tmp / "cache" / "onnx" / g.name).symlink_to(g)
    fast = get_encoder(args.encoder, device="cpu")
    folder, kind, split = DEFAULT_DATA[fast.modality]
    spec = args.data or f"{kind}:{common.data_root() / folder}"
    split = args.split or split
    base = EmbedOptions(
        limit=args.limit, batch_size=args.batch_size, num_workers=args.workers, progress=False, device="cpu"
    )
    paths = {
        "default": (fast, base),
        "eager": (
            get_encoder(args.encoder, device="cpu", backend="eager"),
            replace(base, encoder_backend="eager", bucket_by_length=False),
        ),
    }
    if fast.modality == "text":  # the eager backend with today's length bucketing, to tell the two apart
        paths["eager+buckets"] = (paths["eager"][0], replace(base, encoder_backend="eager"))
        # and the default without encoding a shard's repeated captions once (label captions repeat)
        paths["no-dedupe"] = (fast, replace(base, dedupe_text=False))
    if args.bf16:  # bfloat16 autocast (opt-in: not float error; its agreement with eager is printed)
        paths["bf16"] = (
            get_encoder(args.encoder, device="cpu", backend="bf16"),
            replace(base, encoder_backend="bf16"),
        )
    if fast.backend != "onnx" and fast.graph_inputs:
        paths["onnx"] = (
            get_encoder(args.encoder, device="cpu", backend="onnx"),
            replace(base, encoder_backend="onnx"),
        )

    for cell in filter(None, args.grid.split(",")):  # how the decoding and the forward share the cores
        w, t, *rest = (int(x) for x in cell.split(":"))
        st = rest[0] if rest else 1
        paths[f"w{w}:t{t}:s{st}"] = (get_encoder(args.encoder, device="cpu"),
                                     replace(base, num_workers=w, forward_threads=t, forward_streams=st))

    # The default path's batches, decoded in advance, for its forward pass alone.
    plan = plan_store(fast, spec, split, base)
    records = plan["records"]
    items = [r["text"] if fast.modality == "text" else r["path"] for r in records]
    lengths = [len(x) for x in items] if fast.modality == "text" else None
    order = plan_batches(
        list(range(plan["n_shards"])), plan["shard_size"], args.batch_size, len(items), lengths
    )
    batches = [fast.collate([fast.transform(items[i]) for i in b]) for b in order]
    n = len(items)
    # Text paths with length buckets encode each distinct caption of a shard once (EmbedOptions.dedupe_text):
    # their roofline counts the captions they encode, not the store's rows.
    repeats = shard_repeats(items, list(range(plan["n_shards"])), plan["shard_size"]) if lengths else {}
    encoded_share = 1 - sum(len(v) for v in repeats.values()) / n

    # The forward alone as extraction runs it (streams x threads), and as one stream on every thread; each
    # configuration keeps its own encoder, so no session is rebuilt inside a timing.
    streams = default_forward_streams(fast)
    threads = default_forward_threads(fast, streams) or torch.get_num_threads()
    forward_cfgs = {f"{streams}x{threads}": (fast, streams, threads)}
    if streams > 1:
        one = get_encoder(args.encoder, device="cpu")
        forward_cfgs[f"1x{torch.get_num_threads()}"] = (one, 1, torch.get_num_threads())

    def forward_only(cfg: str) -> float:
        enc, st, th = forward_cfgs[cfg]
        enc.set_forward_threads(th)
        with common.timer() as t:
            for _ in encoded(((None, b, None) for b in batches), enc, st):
                pass
        return t[0]

    def forward_passes() -> dict[str, float]:
        return {cfg: forward_only(cfg) for cfg in forward_cfgs}

    def run(name: str, tag: str) -> float:
        enc, opts = paths[name]
        with common.timer() as t:
            store = embed(enc, spec, split, tmp / f"{name}-{tag}", opts)
        assert len(store) + len(store.skipped()) == n, (len(store), n)
        return t[0]

    with common.timer() as t_setup:  # weights, ONNX export (cached afterwards), kernel selection
        forward_passes()
        for name in paths:
            run(name, "warmup")
    flops = common.encoder_flops_per_item(
        paths["eager"][0], batches if fast.modality == "text" else batches[:1]
    )
    common.wait_for_quiet(args.max_load, args.wait)
    common.gemm_gflops(remeasure=True)  # the limit, measured just before and just after the timings
    fwds, times = [forward_passes()], {name: [] for name in paths}
    for r in range(args.rounds):
        for name in paths:
            times[name].append(run(name, str(r)))
        fwds.append(forward_passes())
    common.gemm_gflops(remeasure=True)
    common.report_load_after()
    store_mb = common.store_bytes(tmp / f"default-{args.rounds - 1}") / 2**20
    agreement = {}  # each path's pooled features against eager's, in the stores of the last round
    from lightcrl.store import FeatureStore

    ref = FeatureStore(tmp / f"eager-{args.rounds - 1}").pooled().astype("float64")
    for name in paths:
        if name.startswith("eager"):
            continue
        got = FeatureStore(tmp / f"{name}-{args.rounds - 1}").pooled().astype("float64")
        cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
        agreement[name] = (float(np.abs(ref - got).max()), float(cos.min()), float(np.abs(ref).max()))
    tmp_ctx.cleanup()

    workers = base.num_workers if base.num_workers is not None else f"default ({default_workers(fast)})"
    unit = {"image": "images", "text": "captions", "audio": "clips"}[fast.modality]
    print(
        f"encoder {args.encoder}, {n} {unit} of {spec} [{split}], batch {args.batch_size}, torch threads "
        f"{torch.get_num_threads()}, embed workers {workers}; default backend {fast.backend}"
        + (f" ({streams} streams x {threads} threads)" if fast.backend == "onnx" else "")
    )
    print(f"set-up (weights, ONNX export, warm-up passes; not timed): {t_setup[0]:.1f} s")
    rate = lambda ts: n * len(ts) / sum(ts)  # noqa: E731
    for cfg in forward_cfgs:
        ts = [f[cfg] for f in fwds]
        times_s = " / ".join(f"{t:.2f}" for t in ts)
        label = f"forward only ({fast.backend}, streams x threads {cfg})"
        print(f"{label}: {times_s} s -> {rate(ts):.1f} {unit}/s")
    best = min(forward_cfgs, key=lambda cfg: sum(f[cfg] for f in fwds))  # the faster forward: the denominator
    fwd = [f[best] for f in fwds]
    print(f"ratio against the faster forward configuration: {best}")
    for name, ts in times.items():
        print(f"embed {name:8s}: {' / '.join(f'{t:.2f}' for t in ts)} s -> {rate(ts):.1f} {unit}/s")
    print(f"store {store_mb:.0f} MiB")
    for name, (diff, cos, scale) in agreement.items():
        print(f"features {name} vs eager: pooled max abs diff {diff:.2e} (scale {scale:.2f}), "
              f"min cosine {cos:.6f}")
    if encoded_share < 1:
        print(f"distinct captions per shard: {encoded_share * n:.0f} of {n} ({100 * encoded_share:.1f} %), "
              "what the paths with length buckets encode (all but eager and no-dedupe); the forward "
              "alone encodes all")
    common.print_roofline(f"forward only ({fast.backend})", rate(fwd), flops, unit)
    for name, ts in times.items():  # bf16 against the bf16 GEMM limit
        dt = "bf16" if name == "bf16" else "fp32"
        share = 1.0 if name in ("eager", "no-dedupe") else encoded_share
        label = f"embed {name}" + (" (captions encoded)" if share < 1 else "")
        common.print_roofline(label, rate(ts) * share, flops, unit, dtype=dt)
    ratios = [(fwd[r] + fwd[r + 1]) / 2 / times["default"][r] for r in range(args.rounds)]
    speedups = [times["eager"][r] / times["default"][r] for r in range(args.rounds)]
    print(
        "ratio per round (default embed vs the forward passes around it): "
        + ", ".join(f"{x:.3f}" for x in ratios)
    )
    print(f"ratio={statistics.median(ratios):.3f}")
    print(f"speedup per round (eager s / default s): {', '.join(f'{x:.2f}' for x in speedups)}")
    before, after = rate(times["eager"]), rate(times["default"])
    print(
        f"before/after: eager {before:.1f} {unit}/s (roofline_fraction={common.roofline(before, flops):.3f})"
        f" -> default {after:.1f} {unit}/s (roofline_fraction={common.roofline(after, flops):.3f})"
    )
    common.headline("speedup", statistics.median(speedups), ".2f")


if __name__ == "__main__":
    main()
