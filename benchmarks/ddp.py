"""Data-parallel training on CPU: torchrun with 2 processes vs 1 process, same global batch.

    .venv/bin/python benchmarks/ddp.py                         # 2,048 synthetic pairs, 2 epochs, batch 64
    .venv/bin/python benchmarks/ddp.py --pairs 512 --epochs 1 --max-load 99

Synthetic image+caption stores (efficientnet-lite0 / minilm-l6 shapes) are written once; then the real
Trainer trains on them (DFE width 256, depth 1, dropout 0 so the runs are comparable step by step):

- ``1 proc``: one process, torch using both cores (OMP_NUM_THREADS=2);
- ``1 proc, 1 thread``: one process on one core (OMP_NUM_THREADS=1): the per-core reference;
- ``torchrun x2``: ``torch.distributed.run --nproc_per_node=2``, gloo backend, one thread per process; each
  rank reads and runs half of every global batch, the losses all-gather the embeddings (OpenCLIP style).

Throughput is the trainer's own ``time/pairs_per_s`` of the last epoch (the loop only; process start-up
and store opening excluded). The loss curves (``train/loss`` at every step) are compared: max abs diff.
Last line: ``speedup=<torchrun x2 pairs/s / 1 proc pairs/s>``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import common


def child(image_dir: str, text_dir: str, cfg_path: str, run_dir: str) -> None:
    from lightcrl.app.config import validate_config
    from lightcrl.app.train import train

    common.patch_stores(Path(image_dir), Path(text_dir))
    train(validate_config(json.loads(Path(cfg_path).read_text())), run_dir)


def read_run(run: Path) -> tuple[list[tuple[int, float]], float]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    losses = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    pps = [r["time/pairs_per_s"] for r in rows if "time/pairs_per_s" in r]
    return losses, pps[-1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--pairs", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--port", type=int, default=29561)
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    common.add_load_args(p)
    args = p.parse_args(argv)
    if args.child:
        return child(*args.child)

    results = {}
    with tempfile.TemporaryDirectory(prefix="lightcrl-bench-ddp-") as tmp:
        tmp = Path(tmp)
        img, txt = common.synthetic_pairs(tmp / "stores", args.pairs)
        cfg = common.synthetic_config(epochs=args.epochs, batch_size=args.batch_size, dropout=0.0)
        cfg["log_every"] = 1
        cfg_path = tmp / "cfg.json"
        cfg_path.write_text(json.dumps(cfg))
        me = [__file__, "--child", str(img), str(txt), str(cfg_path)]
        runs = {
            "1 proc": ([sys.executable, *me, str(tmp / "one")], "2", tmp / "one"),
            "1 proc, 1 thread": ([sys.executable, *me, str(tmp / "one1")], "1", tmp / "one1"),
            "torchrun x2": (
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nproc_per_node=2",
                    f"--master_port={args.port}",
                    *me,
                    str(tmp / "two"),
                ],
                "1",
                tmp / "two",
            ),
        }
        common.wait_for_quiet(args.max_load, args.wait)
        for name, (cmd, threads, run) in runs.items():
            env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": str(common.REPO / "src")}
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
            results[name] = read_run(run)
            print(f"# {name}: {results[name][1]:.1f} pairs/s", flush=True)
        common.report_load_after()
        flops = common.train_step_flops(img, txt, args.batch_size)  # not timed

    ref_losses, ref_pps = results["1 proc"]
    print(
        f"{args.pairs} pairs, {args.epochs} epochs, global batch {args.batch_size}, {len(ref_losses)} steps"
    )
    for name, (losses, pps) in results.items():
        assert [s for s, _ in losses] == [s for s, _ in ref_losses], name
        diff = max(abs(a - b) for (_, a), (_, b) in zip(losses, ref_losses))
        print(
            f"{name:18s} {pps:8.1f} pairs/s  x{pps / ref_pps:.2f}  loss max abs diff vs 1 proc {diff:.1e}"
        )
    for name, (_, pps) in results.items():
        common.print_roofline(name, pps, flops, "pairs")
    common.headline("speedup", results["torchrun x2"][1] / ref_pps, ".2f")


if __name__ == "__main__":
    main()
