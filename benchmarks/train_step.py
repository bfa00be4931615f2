"""One cached token-level training step (forward + backward + AdamW) against the machine's limit, this
checkout against another one's code (``--baseline-src``), in interleaved child processes.

    .venv/bin/python benchmarks/train_step.py --baseline-src /path/to/other/checkout/src
    .venv/bin/python benchmarks/train_step.py --profile          # where the step's time goes
    .venv/bin/python benchmarks/train_step.py --precisions fp32,bf16   # optim.precision A/B, this checkout

The model and loss are configs/offline_best.yaml's (DFE width 256, depth 1, 4 heads, linear projections,
CLIP loss) without its anchor coordinates, batch 128, token inputs, on synthetic feature stores of the
real shapes (49 x 1280 fp16 EfficientNet-Lite0 tokens an image, 8-24 x 384 MiniLM tokens a caption)
written with lightcrl's store writer. Each child process imports lightcrl from its ``--src``, builds the
real Trainer on those stores, runs 2 untimed warm-up steps, then times ``--steps`` steps of
``Trainer.train_step`` (store read, forward, loss, backward, gradient clipping, AdamW, bookkeeping). The
children alternate baseline / this checkout for ``--rounds`` rounds; each figure is the median step.

``roofline_fraction`` = the step's FLOPs (torch.utils.flop_counter, forward + backward, counted in each
child) x steps/s over the float32 GEMM GFLOP/s measured in this process just before and after the rounds
(benchmarks/common.py). ``--profile`` runs torch.profiler over 3 steps in one more child per checkout and
prints the top operators by self time, and how much of the step is matrix multiplication.
Wall time and CPU time (``time.process_time``) are both measured: on a machine shared with other jobs,
preemption inflates wall time while the CPU time of a one-thread run (``--threads 1``) still counts the
work done (the GEMM limit is then measured per CPU-second too). Last lines: ``speedup_cpu=`` and
``speedup=<baseline step time / this checkout's step time>`` (wall; 1.0 without a baseline).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import numpy as np

# what the profiler summary counts as compute: the matrix multiplications (and attention's batched ones)
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def step_config(batch_size: int) -> dict:
    """configs/offline_best.yaml's model and loss without the anchors, on the synthetic stores."""
    import yaml

    best = yaml.safe_load((common.REPO / "configs" / "offline_best.yaml").read_text())
    model = {k: v for k, v in best["model"].items() if k != "anchors"}
    cfg = common.synthetic_config(batch_size=batch_size)
    cfg["model"] = model
    cfg["loss"] = best["loss"]
    cfg["data"]["input"] = "tokens"
    return cfg


def child(args) -> None:
    """Runs in a fresh process with lightcrl imported from ``args.src``; prints one JSON line."""
    sys.path.insert(0, str(Path(args.src).resolve()))  # before anything imports lightcrl
    import torch

    import lightcrl
    from lightcrl.app.config import validate_config
    from lightcrl.app.train import Trainer

    common.quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    store = Path(args.store)
    common.patch_stores(store / "image", store / "text")
    cfg = step_config(args.batch_size)
    if args.precision:  # only when asked: checkouts older than optim.precision refuse the key
        cfg["optim"]["precision"] = args.precision
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(validate_config(cfg), Path(tmp) / "run")
        schedule = common.epoch_batches(trainer)
        need = 2 + args.steps + (3 if args.profile else 0)
        if len(schedule) < need:
            raise SystemExit(f"{len(schedule)} batches in the epoch, {need} needed: raise --pairs")
        for si, batch in schedule[:2]:
            trainer.train_step(si, batch)
        times, cpu = [], []
        for si, batch in schedule[2 : 2 + args.steps]:
            t0, c0 = time.perf_counter(), time.process_time()
            trainer.train_step(si, batch)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        out = {"src": str(Path(lightcrl.__file__).parent), "times": times, "cpu": cpu}
        out["flops"] = common.count_flops(trainer.train_step, *schedule[0])
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for si, batch in schedule[2 + args.steps : 5 + args.steps]:
                    trainer.train_step(si, batch)
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events)
            gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS)
            top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:14]
            out["profile"] = {
                "total_ms_per_step": total / 1e3 / 3,
                "gemm_share": gemm / total,
                "top": [(e.key, e.self_cpu_time_total / 1e3 / 3, e.count // 3) for e in top],
            }
    print("RESULT " + json.dumps(out), flush=True)


def run_child(args, src: Path, store: Path, profile: bool = False, precision: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--src", str(src), "--store", str(store)]
    cmd += ["--precision", precision] if precision else []
    cmd += ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--profile"] if profile else []
    res = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode or not lines:
        raise SystemExit(f"child for {src} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--baseline-src", default=None, help="another checkout's src/ to compare with")
    p.add_argument("--pairs", type=int, default=1536, help="pairs in the synthetic stores")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=6, help="timed steps a child (after 2 warm-up steps)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="also profile 3 steps of each checkout")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    p.add_argument("--precisions", default=None,
                   help="comma-separated optim.precision values to compare on this checkout "
                        "(e.g. fp32,bf16); each is one more variant of the interleaved rounds")
    p.add_argument("--precision", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--src", default=str(common.REPO / "src"), help=argparse.SUPPRESS)
    p.add_argument("--store", default=None, help=argparse.SUPPRESS)
    common.add_load_args(p)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    # name -> (src, optim.precision or None for the config's default)
    variants: dict[str, tuple[Path, str | None]] = {"this": (common.REPO / "src", None)}
    if args.baseline_src:
        variants = {"baseline": (Path(args.baseline_src), None), **variants}
    if args.precisions:
        if args.baseline_src:
            raise SystemExit("--precisions compares this checkout with itself: drop --baseline-src")
        names = [x.strip() for x in args.precisions.split(",") if x.strip()]
        variants = {x: (common.REPO / "src", x) for x in names}
    tmp = tempfile.TemporaryDirectory(prefix="lightcrl-bench-step-")
    store = Path(tmp.name)
    common.synthetic_pairs(store, args.pairs)
    common.wait_for_quiet(args.max_load, args.wait)
    common.gemm_gflops(remeasure=True)
    common.gemm_gflops(remeasure=True, cpu_time=True)
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (src, precision) in variants.items():
            results[name].append(run_child(args, src, store, precision=precision))
    common.gemm_gflops(remeasure=True)
    common.gemm_gflops(remeasure=True, cpu_time=True)
    common.report_load_after()
    profiles = {name: run_child(args, src, store, profile=True, precision=precision)
                for name, (src, precision) in variants.items()} if args.profile else {}
    tmp.cleanup()

    cfg = step_config(args.batch_size)
    threads = args.threads or torch.get_num_threads()
    print(
        f"model {cfg['model']}, loss {cfg['loss']}; batch {args.batch_size}, token inputs; {args.steps} "
        f"timed steps a child, {args.rounds} interleaved rounds; torch threads {threads}"
    )
    step_s, step_cpu = {}, {}
    for name, rs in results.items():
        per_round = [float(np.median(r["times"])) for r in rs]
        cpu_round = [float(np.median(r["cpu"])) for r in rs]
        step_s[name], step_cpu[name] = float(np.median(per_round)), float(np.median(cpu_round))
        flops = rs[0]["flops"] / args.batch_size
        print(
            f"{name:8s} ({rs[0]['src']}): step {step_s[name] * 1e3:.0f} ms wall (rounds "
            + ", ".join(f"{t * 1e3:.0f}" for t in per_round)
            + f"), {step_cpu[name] * 1e3:.0f} ms CPU (rounds "
            + ", ".join(f"{t * 1e3:.0f}" for t in cpu_round)
            + f"): {args.batch_size / step_s[name]:.1f} pairs/s, "
            f"{args.batch_size / step_cpu[name]:.1f} pairs per CPU-second"
        )
        dt = "bf16" if variants[name][1] == "bf16" else "fp32"  # the limit of the dtype it computes in
        common.print_roofline(f"{name} step (wall)", args.batch_size / step_s[name], flops, "pairs", dtype=dt)
        common.print_roofline(
            f"{name} step (CPU time)", args.batch_size / step_cpu[name], flops, "pairs", cpu_time=True,
            dtype=dt,
        )
    for name, prof in profiles.items():
        pr = prof["profile"]
        print(
            f"profile {name}: {pr['total_ms_per_step']:.0f} ms of operator self time a step, "
            f"{100 * pr['gemm_share']:.0f}% in matrix multiplications ({', '.join(GEMM_OPS)})"
        )
        for key, ms, calls in pr["top"]:
            print(f"    {key:40s} {ms:9.1f} ms a step  {calls:4d} calls")
    # the first variant is the reference, the last the candidate: baseline vs this, or the first precision
    # vs the last (--precisions fp32,bf16: speedup = fp32 step / bf16 step)
    names = list(step_s)
    base, cand = names[0], names[-1]
    common.headline("speedup_cpu", step_cpu[base] / step_cpu[cand], ".3f")
    common.headline("speedup", step_s[base] / step_s[cand], ".3f")


if __name__ == "__main__":
    main()
