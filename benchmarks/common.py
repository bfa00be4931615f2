"""Shared helpers for the benchmarks: load checks, timers, memory readings, synthetic feature stores.

The benchmarks run on a 2-core machine shared with others: every script waits (up to ``--wait`` seconds)
for the 1-minute load average to drop below ``--max-load`` before measuring, prints the load before and
after, and measures every ratio within one run of the script.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing


def add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-load",
        type=float,
        default=1.5,
        help="wait until the 1-minute load average is below this before measuring (default 1.5)",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=600,
        help="longest wait for a quiet machine, seconds; then measure anyway, flagged (default 600)",
    )


def wait_for_quiet(max_load: float, wait: float) -> float:
    """Block until the 1-minute load is below ``max_load`` (at most ``wait`` s); returns the load then."""
    deadline = time.time() + wait
    load = os.getloadavg()[0]
    while load >= max_load and time.time() < deadline:
        print(f"# load {load:.2f} >= {max_load}: waiting...", flush=True)
        time.sleep(min(30.0, max(1.0, deadline - time.time())))
        load = os.getloadavg()[0]
    flag = "" if load < max_load else f"  (WARNING: above {max_load}: figures are noisy)"
    print(f"# load before: {load:.2f}{flag}  cores: {os.cpu_count()}", flush=True)
    return load


def report_load_after() -> None:
    print(f"# load after: {os.getloadavg()[0]:.2f}", flush=True)


@contextlib.contextmanager
def timer(clock=time.perf_counter) -> Iterator[list[float]]:
    """Seconds spent in the block, by ``clock``: wall time, or ``time.process_time`` (the CPU time of this
    process, all its threads), which other jobs' preemption does not inflate, an honest measure of work
    when torch runs one thread (with more, OpenMP's spinning threads count too)."""
    out = [0.0]
    t0 = clock()
    try:
        yield out
    finally:
        out[0] = clock() - t0


def peak_rss_mb() -> float:
    """Peak resident set of this process (MiB): anonymous memory plus mapped file pages that were resident."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def proc_status_mb(field: str) -> float:
    """A line of /proc/self/status (VmRSS, RssAnon, RssFile, VmHWM...) in MiB (0 where not available)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class AnonPeak:
    """Samples RssAnon (private memory, not the memmapped store pages) every ``interval`` s in a thread."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak = interval, proc_status_mb("RssAnon")
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, proc_status_mb("RssAnon"))
            time.sleep(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, proc_status_mb("RssAnon"))


def quiet() -> None:
    """The CLI's logging set-up at WARNING: no INFO lines, no transformers progress bars or warnings."""
    import logging

    from lightcrl.app.cli import setup_logging

    setup_logging(logging.WARNING)


def data_root() -> Path:
    from lightcrl.paths import data_root as _root

    return _root()


# ------------------------------------------------------------------------------- synthetic stores

IMAGE_SHAPE = (49, 1280)  # efficientnet-lite0: 7x7 map of the last conv
TEXT_DIM = 384  # minilm-l6


def write_synthetic_store(
    out: Path,
    modality: str,
    ids: list[str],
    groups: list[str],
    texts: list[str | None],
    tokens_per_item,
    dim: int,
    shard_size: int = 2048,
    seed: int = 0,
    drop_cache: bool = False,
) -> Path:
    """A finished feature store of random features with the real stores' shapes, written through
    lightcrl.store.write_shard + finalize (the writer the extraction uses).

    ``tokens_per_item``: an int, or a callable ``i -> n_tokens`` (ragged text). ``drop_cache``: evict the
    files from the page cache after writing (so a reader starts cold, e.g. inside a memory cgroup).
    """
    from lightcrl.store import STORE_VERSION, finalize, shard_name, write_shard

    out.mkdir(parents=True, exist_ok=True)
    n = len(ids)
    rng = np.random.default_rng(seed)
    n_shards = (n + shard_size - 1) // shard_size
    for s in range(n_shards):
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        toks = []
        for i in range(lo, hi):
            t = tokens_per_item(i) if callable(tokens_per_item) else tokens_per_item
            toks.append(rng.standard_normal((t, dim), dtype=np.float32).astype(np.float16))
        pooled = np.stack([t.astype(np.float32).mean(0) for t in toks])
        write_shard(out, s, toks, pooled, {"kept": list(range(lo, hi)), "skipped": [], "tokens": 0})
        if drop_cache:
            for p in out.glob(f"{shard_name(s)}.*"):
                evict(p)
    plan = {
        "version": STORE_VERSION,
        "fingerprint": f"synthetic-{modality}-{n}-{seed}",
        "encoder": {"name": f"synthetic-{modality}", "modality": modality, "identity": {}},
        "dataset": {
            "spec": f"synthetic:{n}",
            "kind": "synthetic",
            "split": "train",
            "task": "pairs",
            "media": "image",
            "classnames": None,
            "templates": None,
        },
        "dim": dim,
        "n_shards": n_shards,
        "records": [
            {"id": i, "path": None, "text": t, "group": g, "label": -1} for i, g, t in zip(ids, groups, texts)
        ],
        "listing_skipped": [],
    }
    finalize(out, plan)
    return out


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache (they were fsynced by the atomic writer)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def synthetic_pairs(
    root: Path, n_pairs: int, seed: int = 0, drop_cache: bool = False, shard_size: int = 2048
) -> tuple[Path, Path]:
    """An image store (49 x 1280 tokens an item), a caption store (8-24 x 384 tokens): 1 caption an image."""
    img_ids = [f"img{i:06d}.jpg" for i in range(n_pairs)]
    img = write_synthetic_store(
        root / "image",
        "image",
        img_ids,
        img_ids,
        [None] * n_pairs,
        IMAGE_SHAPE[0],
        IMAGE_SHAPE[1],
        shard_size,
        seed,
        drop_cache,
    )
    lengths = np.random.default_rng(seed + 1).integers(8, 25, n_pairs)
    txt = write_synthetic_store(
        root / "text",
        "text",
        [f"{i}#0" for i in img_ids],
        img_ids,
        [f"caption {i}" for i in range(n_pairs)],
        lambda i: int(lengths[i]),
        TEXT_DIM,
        shard_size,
        seed + 2,
        drop_cache,
    )
    return img, txt


def store_bytes(*dirs: Path) -> int:
    return sum(p.stat().st_size for d in dirs for p in Path(d).glob("shard_*.npy"))


def patch_stores(image_dir: Path, text_dir: Path) -> None:
    """Make the trainer read these stores for any source: media encoder -> image, text encoder -> text."""
    import lightcrl.app.train_data as train_data
    from lightcrl.store import FeatureStore

    stores = {"image": FeatureStore(image_dir), "text": FeatureStore(text_dir)}

    def cached_store(encoder, spec, split, opts=None):
        return stores["text" if str(encoder).startswith("synthetic-text") else "image"]

    train_data.cached_store = cached_store


def synthetic_config(epochs: int = 1, batch_size: int = 64, **model) -> dict:
    """The model of configs/image_text.yaml (width 256, depth 1, 4 heads) on the synthetic stores."""
    return {
        "name": "bench",
        "seed": 0,
        "progress": False,
        "tensorboard": False,
        "log_every": 1000,
        "eval_every": 0,
        "data": {
            "sources": [
                {
                    "spec": "synthetic:bench",
                    "split": "train",
                    "media_encoder": "synthetic-image",
                    "text_encoder": "synthetic-text",
                }
            ],
            "num_workers": 0,
        },
        "model": {"arch": "dfe", "fusion": "add", "width": 256, "depth": 1, "heads": 4, **model},
        "loss": {"lightcrl": 1.0},
        "optim": {"epochs": epochs, "batch_size": batch_size, "lr": 1e-3, "warmup_steps": 10},
    }


# ------------------------------------------------------------------------------- roofline

_GEMM_PEAK: dict[tuple[int, bool], float] = {}


def gemm_gflops(n: int = 2048, rounds: int = 5, remeasure: bool = False, cpu_time: bool = False,
                dtype: str = "fp32") -> float:
    """The machine's limit for these figures: sustained GEMM GFLOP/s of torch (an n^3 matmul, median of
    ``rounds``) on the threads torch uses now, in ``dtype`` (fp32, or bf16 for runs in bf16 autocast: on a
    CPU with AMX it is several times fp32's). Measured once per thread count and dtype, or again with
    ``remeasure`` (the best measurement is kept: other jobs on a shared machine only ever lower it).
    ``cpu_time``: per second of this process's CPU time (see ``timer``; meaningful with one thread)."""
    import torch

    key = (torch.get_num_threads(), cpu_time) + (() if dtype == "fp32" else (dtype,))
    if key not in _GEMM_PEAK or remeasure:
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        a, b = torch.randn(n, n, dtype=torch_dtype), torch.randn(n, n, dtype=torch_dtype)
        a @ b  # warm-up: thread pool and packing buffers
        times = []
        for _ in range(rounds):
            with timer(time.process_time if cpu_time else time.perf_counter) as t:
                a @ b
            times.append(t[0])
        gflops = 2 * n**3 / float(np.median(times)) / 1e9
        _GEMM_PEAK[key] = max(gflops, _GEMM_PEAK.get(key, 0.0))
    return _GEMM_PEAK[key]


def count_flops(fn, *args, **kwargs) -> float:
    """FLOPs of one call of ``fn`` (torch.utils.flop_counter: matmuls, convolutions, attention; a
    backward pass inside ``fn`` counts too)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return float(counter.get_total_flops())


def encoder_flops_per_item(enc, batches: list[dict]) -> float:
    """FLOPs per item of a frozen encoder's forward, counted on its eager module over ``batches`` (so
    padding that the batches carry counts, as the forward computes it)."""
    import torch

    # items per batch: the shortest leading dimension (aisfx also passes its clips' blocks, [blocks, ...])
    n = sum(min(len(v) for v in b.values()) for b in batches)
    with torch.inference_mode():
        return sum(count_flops(enc._forward, enc.model, b) for b in batches) / n


def epoch_batches(trainer, epoch: int = 0) -> list:
    """The (pair set, batch) steps of one epoch, as the Trainer's loop runs them."""
    from lightcrl.app.train_data import epoch_schedule

    return epoch_schedule(trainer.cfg, trainer.train_sets, epoch)


def train_step_flops(image_dir: Path, text_dir: Path, batch_size: int = 64) -> float:
    """FLOPs per pair of one training step (forward, loss, backward) of ``synthetic_config``'s model on
    these stores, as the benchmarks' children run it (counted in this process; not timed)."""
    import tempfile

    from lightcrl.app.config import validate_config
    from lightcrl.app.train import Trainer

    patch_stores(Path(image_dir), Path(text_dir))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(validate_config(synthetic_config(batch_size=batch_size)), Path(tmp) / "run")
        si, batch = epoch_batches(trainer)[0]
        return count_flops(trainer.train_step, si, batch) / len(batch)


def roofline(items_per_s: float, flops_per_item: float, cpu_time: bool = False, dtype: str = "fp32") -> float:
    """Fraction of the GEMM limit (in ``dtype``) that ``items_per_s`` items of ``flops_per_item`` FLOPs each
    sustain (``cpu_time``: both per second of CPU time)."""
    return items_per_s * flops_per_item / 1e9 / gemm_gflops(cpu_time=cpu_time, dtype=dtype)


def print_roofline(
    label: str, items_per_s: float, flops_per_item: float, unit: str = "items", cpu_time: bool = False,
    dtype: str = "fp32",
) -> float:
    frac = roofline(items_per_s, flops_per_item, cpu_time, dtype)
    per = " per CPU-second" if cpu_time else ""
    kind = "GEMM" if dtype == "fp32" else f"{dtype} GEMM"
    print(
        f"{label}: {items_per_s:.1f} {unit}/s{per} x {flops_per_item / 1e9:.3f} GFLOP = "
        f"{items_per_s * flops_per_item / 1e9:.1f} GFLOP/s; {kind} limit "
        f"{gemm_gflops(cpu_time=cpu_time, dtype=dtype):.0f} "
        f"GFLOP/s{per} ({_threads()} threads): roofline_fraction={frac:.3f}",
        flush=True,
    )
    return frac


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def headline(name: str, value: float, fmt: str = ".3g") -> None:
    """The last line of every benchmark: ``name=value``."""
    print(f"{name}={value:{fmt}}", flush=True)


def dump(obj) -> str:
    return json.dumps(obj, indent=None, default=str)
