"""One training epoch on cached features vs the original design (frozen encoders run on every batch).

    .venv/bin/python benchmarks/train_speed.py                  # 256 Flickr8k train images, batch 64
    .venv/bin/python benchmarks/train_speed.py --pairs 128 --max-load 99

Both epochs use the same lightcrl Trainer (configs/flickr8k.yaml's model: DFE width 256, depth 1), the
same data subset, the same batches and ``Trainer.train_step`` (forward, loss, backward, AdamW):

- cached: the batch's tokens come from the feature stores (memmapped fp16 shards), as `lightcrl train` does;
- original design: the batch's raw images are decoded and pushed through EfficientNet-Lite0 and its raw
  captions through MiniLM-L6 (no gradients, as frozen encoders), then the same model step.

The feature stores are extracted once first (a fresh cache; the one-off cost is printed: it is what the
cached design pays instead, once for all epochs). Each epoch is preceded by one untimed warm-up step.
Last line: ``ratio=<original epoch time / cached epoch time>`` (target >= 100).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import common


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--data", default=None, help="pairs dataset spec (default flickr8k:<data>/flickr8k)")
    p.add_argument("--split", default="train")
    p.add_argument("--pairs", type=int, default=256, help="images (one random caption each per epoch)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--config", default=str(common.REPO / "configs" / "flickr8k.yaml"))
    p.add_argument(
        "--input",
        choices=["tokens", "pooled"],
        default="tokens",
        help="model input: every token (the paper's DFE, default) or one pooled vector a modality",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    common.add_load_args(p)
    args = p.parse_args(argv)

    import torch

    from lightcrl.app.config import load_config
    from lightcrl.app.train import Trainer
    from lightcrl.encoders import get_encoder
    from lightcrl.io import read_json

    common.quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = args.data or f"flickr8k:{common.data_root() / 'flickr8k'}"
    tmp = tempfile.TemporaryDirectory(prefix="lightcrl-bench-train-")
    os.environ["LIGHTCRL_CACHE"] = str(Path(tmp.name) / "cache")
    cfg = load_config(
        args.config,
        [
            f"data.sources.0.spec={spec}",
            f"data.sources.0.split={args.split}",
            "data.sources.0.val_split=",
            f"data.sources.0.limit={args.pairs}",
            "optim.epochs=1",
            f"optim.batch_size={args.batch_size}",
            "progress=false",
            "tensorboard=false",
            "device=cpu",
            f"data.input={args.input}",
        ],
    )
    with common.timer() as t_extract:
        trainer = Trainer(cfg, Path(tmp.name) / "run")  # builds (extracts) both feature stores
    s = trainer.train_sets[0]
    schedule = common.epoch_batches(trainer)
    n_pairs = sum(len(b) for _, b in schedule)

    # the original design's batch: raw inputs -> frozen encoders -> tokens (same format as the stores')
    img_enc = get_encoder(s.media.manifest["encoder"]["name"], device="cpu")
    txt_enc = get_encoder(s.text.manifest["encoder"]["name"], device="cpu")
    paths = {r["id"]: r["path"] for r in read_json(s.media.dir / "plan.json")["records"]}
    enc_time = [0.0]

    C = torch.contiguous_format  # the stores' layout (the encoders' outputs may be strided views)

    def online_batch(pair_idx, device):
        t0 = time.perf_counter()
        images = [paths[s.media.items.ids[i]] for i in s.media_index[pair_idx]]
        captions = [s.text.items.texts[j] for j in s.text_index[pair_idx]]
        im = img_enc.encode_batch(img_enc.collate([img_enc.transform(x) for x in images]))
        tx = txt_enc.encode_batch(txt_enc.collate([txt_enc.transform(c) for c in captions]))
        if s.input == "pooled":  # one vector a modality, as PairSet.features gives from a store
            one = torch.ones(len(images), 1, dtype=torch.bool)
            out = {
                s.media_modality: (im.pooled.unsqueeze(1).clone(memory_format=C), one),
                "text": (tx.pooled.unsqueeze(1).clone(memory_format=C), one),
            }
        else:
            T = s.max_text_tokens or tx.tokens.shape[1]
            out = {
                s.media_modality: (im.tokens.clone(memory_format=C), im.mask.clone(memory_format=C)),
                "text": (tx.tokens[:, :T].clone(memory_format=C), tx.mask[:, :T].clone(memory_format=C)),
            }
        enc_time[0] += time.perf_counter() - t0
        return out

    cached_batch = s.batch
    read_time = [0.0]

    def timed_cached_batch(pair_idx, device):
        t0 = time.perf_counter()
        out = cached_batch(pair_idx, device)
        read_time[0] += time.perf_counter() - t0
        return out

    def epoch() -> float:
        trainer.train_step(*schedule[0])  # warm-up, untimed
        enc_time[0] = read_time[0] = 0.0
        t0 = time.perf_counter()
        for si, batch in schedule:
            trainer.train_step(si, batch)
        return time.perf_counter() - t0

    common.wait_for_quiet(args.max_load, args.wait)
    s.batch = timed_cached_batch
    t_cached = epoch()
    t_read = read_time[0]
    s.batch = online_batch
    t_online = epoch()
    common.report_load_after()
    s.batch = cached_batch
    # FLOPs of one model step (forward + backward), counted after the timings (it also updates the model)
    step_flops = common.count_flops(trainer.train_step, *schedule[0]) / len(schedule[0][1])
    tmp.cleanup()

    steps = len(schedule)
    print(
        f"{n_pairs} pairs an epoch ({args.pairs} images of {spec} [{args.split}], one caption each), "
        f"batch {args.batch_size}, {steps} steps; model {cfg.model['arch']} width {cfg.model['width']} "
        f"depth {cfg.model['depth']}, input {args.input}; torch threads {torch.get_num_threads()}"
    )
    print(f"one-off feature extraction (both stores, incl. encoder load): {t_extract[0]:.1f} s")
    print(
        f"cached   epoch: {t_cached:8.3f} s  {n_pairs / t_cached:9.1f} pairs/s  "
        f"(store reads {t_read:.3f} s, model steps {t_cached - t_read:.3f} s)"
    )
    print(
        f"original epoch: {t_online:8.3f} s  {n_pairs / t_online:9.1f} pairs/s  "
        f"(frozen encoders incl. decoding {enc_time[0]:.3f} s, model steps {t_online - enc_time[0]:.3f} s)"
    )
    print(
        f"speed-up per epoch: {t_online / t_cached:.1f}x; bound by the model step alone: "
        f"{t_online / max(t_cached - t_read, 1e-9):.1f}x"
    )
    common.print_roofline("cached epoch (model step)", n_pairs / t_cached, step_flops, "pairs")
    common.headline("ratio", t_online / t_cached, ".1f")


if __name__ == "__main__":
    main()
