"""Training from a feature store about twice as large as a hard memory cap completes.

    .venv/bin/python benchmarks/memory_cap.py                  # cap 768 MiB, store ~1.5 GiB
    .venv/bin/python benchmarks/memory_cap.py --cap-mb 1024 --factor 2.5

A synthetic image+caption store of ``factor x cap`` bytes is written (efficientnet-lite0 / minilm-l6
shapes) and evicted from the page cache, then a child process trains one epoch over every pair with the
real Trainer (DFE width 256, batch 64) under the cap. How the cap is enforced, best first:

1. a memory cgroup (v2 ``memory.max``, or v1 ``memory.limit_in_bytes``; needs a writable /sys/fs/cgroup,
   e.g. root): the kernel charges the child's private memory AND the page cache of the store pages it
   reads to the cgroup, and must reclaim the cache to stay under the cap, as on a small machine.
2. otherwise ``RLIMIT_DATA`` (``--method rlimit``): caps the private (heap/anonymous) memory only; reading
   a memmap does not count, so it shows the store is never copied into the process.

``RLIMIT_AS`` (prlimit --as) is not used: it caps virtual address space, and memory-mapping a store larger
than the cap would fail on the mapping alone although no memory is used, so it measures nothing useful.
Last line: ``store_over_cap=<store bytes / cap>`` for a run that completed (exit status 1 otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

CG_ROOT = Path("/sys/fs/cgroup")


def child(image_dir: str, text_dir: str, batch_size: int) -> None:
    from lightcrl.app.config import validate_config
    from lightcrl.app.train import Trainer

    common.patch_stores(Path(image_dir), Path(text_dir))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(validate_config(common.synthetic_config(batch_size=batch_size)), Path(tmp) / "run")
        schedule = common.epoch_batches(trainer)
        with common.AnonPeak() as anon:
            t0 = time.perf_counter()
            for si, batch in schedule:
                trainer.train_step(si, batch)
            dt = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "pairs": int(sum(len(b) for _, b in schedule)),
                "epoch_s": dt,
                "peak_anon_mb": anon.peak,
                "peak_rss_mb": common.peak_rss_mb(),
            }
        )
    )


class Cgroup:
    """A fresh memory cgroup (v2 or v1) with a hard limit; the child joins it before exec."""

    def __init__(self, cap: int):
        self.cap = cap
        name = f"lightcrl-bench-{os.getpid()}"
        if (CG_ROOT / "cgroup.controllers").exists() and "memory" in (
            CG_ROOT / "cgroup.controllers"
        ).read_text():
            self.version, self.dir = 2, CG_ROOT / name
        elif (CG_ROOT / "memory").is_dir():
            self.version, self.dir = 1, CG_ROOT / "memory" / name
        else:
            raise OSError("no memory cgroup hierarchy")
        self.dir.mkdir()
        try:
            if self.version == 2:
                (self.dir / "memory.max").write_text(str(cap))
                with_swap = self.dir / "memory.swap.max"
                if with_swap.exists():
                    with_swap.write_text("0")
            else:
                (self.dir / "memory.limit_in_bytes").write_text(str(cap))
                memsw = self.dir / "memory.memsw.limit_in_bytes"
                if memsw.exists():
                    memsw.write_text(str(cap))
        except OSError:
            self.close()
            raise

    def join(self) -> None:  # runs in the child between fork and exec
        (self.dir / "cgroup.procs").write_text(str(os.getpid()))

    def stats(self) -> dict:
        if self.version == 2:
            peak = self.dir / "memory.peak"
            events = dict(ln.split() for ln in (self.dir / "memory.events").read_text().splitlines())
            return {
                "peak_mb": int(peak.read_text()) / 2**20 if peak.exists() else None,
                "limit_hits": int(events.get("max", 0)),
                "oom_kills": int(events.get("oom_kill", 0)),
            }
        stat = dict(ln.split() for ln in (self.dir / "memory.stat").read_text().splitlines())
        return {
            "peak_mb": int((self.dir / "memory.max_usage_in_bytes").read_text()) / 2**20,
            "limit_hits": int((self.dir / "memory.failcnt").read_text()),
            "page_cache_now_mb": int(stat.get("cache", 0)) / 2**20,
        }

    def describe(self) -> str:
        knob = "memory.max" if self.version == 2 else "memory.limit_in_bytes"
        return f"cgroup v{self.version} {self.dir} ({knob} = {self.cap / 2**20:.0f} MiB, no swap)"

    def close(self) -> None:
        for _ in range(50):
            try:
                self.dir.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--cap-mb", type=int, default=768, help="memory cap for the training process (MiB)")
    p.add_argument("--factor", type=float, default=2.0, help="store size / cap (default 2)")
    p.add_argument("--method", choices=["auto", "cgroup", "rlimit"], default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--tmp", default=None, help="where to write the store (a disk, not a tmpfs)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    common.add_load_args(p)
    args = p.parse_args(argv)
    if args.child:
        return child(*args.child, args.batch_size)

    cap = args.cap_mb * 2**20
    per_pair = 49 * 1280 * 2 + 16 * 384 * 2 + (1280 + 384) * 4 + 16  # bytes of stores per pair
    n = int(args.factor * cap / per_pair) + 1
    cg = None
    if args.method in ("auto", "cgroup"):
        try:
            cg = Cgroup(cap)
        except OSError as e:
            if args.method == "cgroup":
                raise SystemExit(f"cannot make a memory cgroup: {e}") from e
            print(f"# no memory cgroup ({e}): falling back to RLIMIT_DATA", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="lightcrl-bench-memcap-", dir=args.tmp) as tmp:
            img, txt = common.synthetic_pairs(Path(tmp), n, drop_cache=True)
            size = common.store_bytes(img, txt)
            common.wait_for_quiet(args.max_load, args.wait)
            if cg is not None:
                how, preexec = cg.describe(), cg.join
            else:
                how = f"RLIMIT_DATA = {args.cap_mb} MiB (private memory only; page cache not capped)"

                def preexec():
                    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))

            t0 = time.perf_counter()
            r = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    str(img),
                    str(txt),
                    "--batch-size",
                    str(args.batch_size),
                ],
                preexec_fn=preexec,
                capture_output=True,
                text=True,
            )
            wall = time.perf_counter() - t0
            common.report_load_after()
            flops = common.train_step_flops(img, txt, args.batch_size)  # one step in this process, not timed
            stats = cg.stats() if cg is not None else {}
    finally:
        if cg is not None:
            cg.close()

    print(f"cap: {how}")
    print(f"store: {n} pairs, {size / 2**20:.0f} MiB = {size / cap:.2f} x the cap")
    if r.returncode != 0:
        print(
            f"training FAILED under the cap (exit {r.returncode}; a kill by the OOM killer is -9):\n"
            f"{r.stderr[-2000:]}\n{json.dumps(stats)}"
        )
        sys.exit(1)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(
        f"one epoch over {res['pairs']} pairs completed: {res['epoch_s']:.1f} s "
        f"({res['pairs'] / res['epoch_s']:.0f} pairs/s), child wall time {wall:.1f} s"
    )
    print(
        f"child peak private memory (RssAnon) {res['peak_anon_mb']:.0f} MiB; peak RSS incl. mapped store "
        f"pages {res['peak_rss_mb']:.0f} MiB"
    )
    if stats:
        print(
            f"cgroup: peak charge {stats['peak_mb']:.0f} MiB (private memory + page cache; cap "
            f"{args.cap_mb} MiB), failcnt {stats['limit_hits']}; no OOM kill (the run completed)"
        )
    common.print_roofline("epoch under the cap", res["pairs"] / res["epoch_s"], flops, "pairs")
    common.headline("store_over_cap", size / cap, ".2f")


if __name__ == "__main__":
    main()
