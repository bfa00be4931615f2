"""Extraction: run a frozen encoder once over a dataset split and write a feature store.

Decoding and resizing run in DataLoader worker processes when cores are free for them (with a GPU), so
the encoder, not the data path, is the bottleneck; on CPU, where the forward pass uses every core, they
run in this process between batches (see ``default_workers``). Shards are fixed ranges of the record
list, so a resumed run re-creates exactly the same batches and the store equals an uninterrupted one, bit
for bit. Under torchrun, rank r extracts the shards s with s % world == r into the same directory and
rank 0 writes the manifest.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lightcrl.data.records import Record
from lightcrl.encoders import EncoderOutput, FrozenEncoder, get_encoder
from lightcrl.encoders.joined import JoinedEncoder, join_tokens
from lightcrl.errors import LightCRLError, SkipItem, StoreMismatch
from lightcrl.io import locked, write_json
from lightcrl.paths import cache_dir
from lightcrl.store import (
    STORE_VERSION,
    FeatureStore,
    ShardWriter,
    completed_shards,
    finalize,
    read_plan,
    store_fingerprint,
    write_shard,
)

log = logging.getLogger(__name__)


@dataclass
class EmbedOptions:
    batch_size: int = 64
    shard_size: int = 2048
    num_workers: int | None = None  # None: default_workers(): decoding processes (measured per path)
    # Intra-op threads of an ONNX Runtime forward; None: default_forward_threads() (measured).
    forward_threads: int | None = None
    # Batches in the ONNX Runtime forward at once, each on forward_threads threads; None:
    # default_forward_streams() (measured: 2 streams x 1 thread on 2 cores).
    forward_streams: int | None = None
    strict: bool = False
    limit: int | None = None
    seed: int = 0
    overwrite: bool = False
    device: str = "auto"
    progress: bool = True
    # How the frozen encoder's forward runs (lightcrl.encoders.backends): auto (the measured-fastest),
    # eager (PyTorch as written) or onnx (ONNX Runtime). Used where the encoder is given by name. The
    # default is $LIGHTCRL_ENCODER_BACKEND when set (so training and evaluation, which build their stores
    # with default options, can reuse stores of one backend), else auto.
    encoder_backend: str = field(default_factory=lambda: os.environ.get("LIGHTCRL_ENCODER_BACKEND") or "auto")
    # Text: batch captions of similar length (less padding); the store keeps record order either way.
    bucket_by_length: bool = True
    # Text (bucketed): encode each distinct caption of a shard once and copy its rows to the repeats.
    # Label captions repeat the same prompts for every item of a class (docs/benchmarks.md).
    dedupe_text: bool = True
    # Pairs data: keep at most this many captions per media item (seeded by ``seed``); None = all.
    captions_per_item: int | None = None


class _Items(Dataset):
    """Worker-side: record position -> transformed input, or the reason it was skipped."""

    def __init__(self, payloads: list[Any], paths: list[str | None], transform: Callable):
        self.payloads, self.paths, self.transform = payloads, paths, transform

    def __len__(self):
        return len(self.payloads)

    def __getitem__(self, pos):
        try:
            return pos, self.transform(self.payloads[pos]), None
        except SkipItem as e:
            return pos, None, {"reason": e.reason, "detail": str(e), "path": e.path or self.paths[pos]}
        except Exception as e:  # noqa: BLE001 -- a decoder bug on one odd file must not kill a long job
            return (
                pos,
                None,
                {"reason": "error", "detail": f"{type(e).__name__}: {e}", "path": self.paths[pos]},
            )


class _Collate:
    def __init__(self, collate: Callable):
        self.collate = collate

    def __call__(self, rows):
        good = [(p, x) for p, x, s in rows if s is None]
        skipped = [(p, s) for p, _, s in rows if s is not None]
        batch = self.collate([x for _, x in good]) if good else None
        return [p for p, _ in good], batch, skipped


def _encoder(encoder: str | FrozenEncoder, opts: EmbedOptions) -> FrozenEncoder:
    """A name is built with the options' device and backend; an encoder object keeps its own."""
    if isinstance(encoder, str):
        return get_encoder(encoder, device=opts.device, backend=opts.encoder_backend)
    return encoder


def _select_records(dataset, encoder: FrozenEncoder) -> list[Record]:
    if encoder.modality == dataset.media:
        return dataset.media_records()
    if encoder.modality == "text":
        if dataset.task != "pairs":
            raise LightCRLError(
                f"{dataset.spec} is a classification dataset: "
                f"it has no captions for text encoder {encoder.name}"
            )
        return dataset.text_records()
    raise LightCRLError(f"encoder {encoder.name} ({encoder.modality}) cannot embed {dataset.media} data")


# Reasons for which listing drops one caption (not a media item): only text stores report them.
_CAPTION_REASONS = frozenset({"empty_caption", "invalid_text"})


def plan_store(encoder: FrozenEncoder, data_spec: str, split: str | None, opts: EmbedOptions) -> dict:
    """List the dataset and decide what the store will hold (cheap: no decoding, no model)."""
    from lightcrl.data.datasets import open_dataset
    from lightcrl.data.nli import is_nli_spec, open_nli

    if is_nli_spec(data_spec):  # NLI triplets: a text-only dataset of their unique sentences
        ds = open_nli(data_spec, split, limit=opts.limit, seed=opts.seed)
    else:
        ds = open_dataset(data_spec, split, strict=opts.strict)
        if opts.limit:
            ds = ds.subsample(opts.limit, seed=opts.seed)
        if opts.captions_per_item:
            ds = ds.keep_captions(opts.captions_per_item, seed=opts.seed)
    records = _select_records(ds, encoder)
    if not records:
        raise LightCRLError(f"{data_spec} split {ds.split!r} has no usable items ({len(ds.skipped)} skipped)")
    fp = store_fingerprint(encoder.fingerprint(), ds.fingerprint(), [r.id for r in records])
    enc_is_text = encoder.modality == "text"  # a media store does not count its dataset's bad captions
    return {
        "version": STORE_VERSION,
        "fingerprint": fp,
        "encoder": {"name": encoder.name, "modality": encoder.modality, "identity": encoder.store_identity()},
        "dataset": {
            "spec": ds.spec,
            "kind": ds.kind,
            "split": ds.split,
            "task": ds.task,
            "media": ds.media,
            "limit": opts.limit,
            "seed": opts.seed,
            **({"captions_per_item": opts.captions_per_item} if opts.captions_per_item else {}),
            "fingerprint": ds.fingerprint(),
            "view_of": getattr(ds, "view_of", None),  # the whole dataset's spec for a class selection
            "classnames": ds.classnames,
            "templates": ds.templates,
        },
        "dim": encoder.dim,
        "shard_size": opts.shard_size,
        "batch_size": opts.batch_size,
        "n_shards": (len(records) + opts.shard_size - 1) // opts.shard_size,
        "records": [r.to_dict() for r in records],
        "listing_skipped": [
            dict(s) for s in ds.skipped if enc_is_text or s.get("reason") not in _CAPTION_REASONS
        ],
    }


def _check_existing(out: Path, plan: dict, overwrite: bool) -> str:
    """'reuse' a finished identical store, 'resume' a partial one, or 'fresh' after clearing."""
    manifest_path = out / "manifest.json"
    old = None
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            old = None
    old_plan = read_plan(out)
    old_fp = (old or {}).get("fingerprint") or (old_plan or {}).get("fingerprint")
    same_layout = old_plan is not None and all(
        old_plan.get(k) == plan[k] for k in ("shard_size", "batch_size", "version")
    )
    if old_fp is None and not any(out.glob("shard_*")):
        return "fresh"
    if old_fp == plan["fingerprint"] and (old is not None or same_layout):
        if old is not None and old.get("version") == STORE_VERSION:
            return "reuse"
        if same_layout:
            return "resume"
    old_version = (old or old_plan or {}).get("version")
    if not overwrite and old_version is not None and old_version != STORE_VERSION:
        raise StoreMismatch(
            f"{out} holds a feature store in format version {old_version}, this lightcrl writes and reads "
            f"version {STORE_VERSION}. Pass --overwrite to re-extract it, or choose another --out."
        )
    if not overwrite and _backend_of(old or old_plan or {}) != plan["encoder"]["identity"]["backend"]:
        _refuse_other_backend(out, old or old_plan or {}, plan)
    if not overwrite:
        raise StoreMismatch(
            f"{out} holds a feature store made from other inputs (fingerprint {str(old_fp)[:12]} != "
            f"{plan['fingerprint'][:12]}: the encoder, its weights, preprocessing or the dataset changed). "
            "Pass --overwrite to re-extract, or choose another --out."
        )
    for p in list(out.glob("shard_*")) + [out / "manifest.json", out / "plan.json"]:
        p.unlink(missing_ok=True)
    return "fresh"


def _backend_of(store_plan: dict) -> str:
    # stores written before encoder backends existed were computed by eager PyTorch
    return store_plan.get("encoder", {}).get("identity", {}).get("backend", "eager")


def _refuse_other_backend(out: Path, old: dict, plan: dict) -> None:
    """A store of the other backend holds features that differ by float error: never mixed, never
    silently replaced (it may have taken hours); the user picks one."""
    old_backend, new_backend = _backend_of(old), plan["encoder"]["identity"]["backend"]
    # Would this very run, with the store's backend, have produced the store? Then say how to reuse it.
    as_old = {**plan["encoder"]["identity"], "backend": old_backend}
    enc_fp = hashlib.sha256(json.dumps(as_old, sort_keys=True).encode()).hexdigest()
    ids = [r["id"] for r in plan["records"]]
    if store_fingerprint(enc_fp, plan["dataset"]["fingerprint"], ids) != old.get("fingerprint"):
        return  # other inputs changed too: the general mismatch message applies
    raise StoreMismatch(
        f"{out} holds features computed by the {old_backend} encoder backend; this run asks for "
        f"{new_backend}. Pass --encoder-backend {old_backend} to reuse the store, --overwrite to re-extract "
        "it, or choose another --out."
    )


def embed(
    encoder: str | FrozenEncoder,
    data_spec: str,
    split: str | None,
    out_dir: str | Path,
    opts: EmbedOptions | None = None,
    rank: int = 0,
    world: int = 1,
) -> FeatureStore:
    """Extract (or reuse, or resume) the store for ``encoder`` over ``data_spec``/``split`` in ``out_dir``."""
    opts = opts or EmbedOptions()
    enc = _encoder(encoder, opts)
    out = Path(out_dir)
    plan = plan_store(enc, data_spec, split, opts)
    with _write_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        state = _check_existing(out, plan, opts.overwrite) if rank == 0 else "resume"
        if world > 1:
            torch.distributed.barrier()
        if state == "reuse":
            log.info("reusing feature store %s", out)
            return FeatureStore(out)
        if isinstance(enc, JoinedEncoder):  # from the parts' cached stores: each on its own fast path
            parts = [cached_store(p, data_spec, split, opts, rank, world) for p in enc.parts]
            if rank == 0:
                join_stores(parts, plan, out)
            if world > 1:
                torch.distributed.barrier()
            return FeatureStore(out)
        if rank == 0:
            _remove_stale_temp_files(out)  # left by a killed run (the other ranks wait at the barrier)
            write_json(out / "plan.json", plan, indent=None)
        if world > 1:
            torch.distributed.barrier()

        records = [Record(**r) for r in plan["records"]]
        todo = [s for s in range(plan["n_shards"]) if s not in completed_shards(out) and s % world == rank]
        _extract(enc, records, plan, todo, out, opts, show=rank == 0)
        if world > 1:
            torch.distributed.barrier()
        if rank == 0:
            manifest = finalize(out, plan)
            _report_skipped(manifest)
        if world > 1:
            torch.distributed.barrier()
    return FeatureStore(out)


# Errors of the file system rather than of lightcrl: reported as one line, the store left resumable.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


@contextlib.contextmanager
def _write_errors(out: Path):
    try:
        yield
    except OSError as e:
        # e.filename is None for a failed write through an open file; a named file must be in the store
        # (an unreadable encoder weights file, say, is not a store write error)
        named = e.filename is None or Path(os.fsdecode(e.filename)).resolve().is_relative_to(out.resolve())
        if e.errno in _WRITE_ERRNOS and named:
            raise LightCRLError(
                f"cannot write the feature store in {out}: {os.strerror(e.errno)}"
                f"{f' ({e.filename})' if e.filename else ''}. Completed shards are intact; free space "
                "(or fix permissions) and rerun the same command to resume."
            ) from e
        raise


def _remove_stale_temp_files(out: Path) -> None:
    """Temp files of lightcrl.io.atomic_open (``.<name>.<random>.tmp``) that a SIGKILL left behind."""
    for p in out.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            p.unlink()


def _extract(enc, records, plan, todo, out, opts: EmbedOptions, show: bool) -> None:
    if not todo:
        return
    from tqdm.auto import tqdm

    size, bs = plan["shard_size"], plan["batch_size"]
    payloads = [r.text if enc.modality == "text" else r.path for r in records]
    paths = [r.path or r.id for r in records]
    # Text: batches of similar lengths, so dynamic padding pads little; flush() restores record order.
    bucketed = enc.modality == "text" and opts.bucket_by_length
    text_lengths = [len(p or "") for p in payloads] if bucketed else None
    repeats = shard_repeats(payloads, todo, size) if bucketed and opts.dedupe_text else {}
    batches = plan_batches(todo, size, bs, len(records), text_lengths,
                           skip={f for pairs in repeats.values() for f, _ in pairs})
    workers = opts.num_workers if opts.num_workers is not None else default_workers(enc)
    streams = opts.forward_streams or default_forward_streams(enc)
    enc.set_forward_threads(opts.forward_threads or default_forward_threads(enc, streams))
    loader = DataLoader(
        _Items(payloads, paths, enc.transform),
        batch_sampler=batches,
        collate_fn=_Collate(enc.collate),
        num_workers=workers,
        pin_memory=enc.device.type == "cuda",
        prefetch_factor=(4 if enc.device.type == "cuda" else 2) if workers else None,
        persistent_workers=False,
    )
    total = sum(min((s + 1) * size, len(records)) - s * size for s in todo)
    bar = tqdm(
        total=total,
        desc=f"embed {enc.name}",
        unit="item",
        disable=not (opts.progress and show),
        dynamic_ncols=True,
    )
    shard_of = lambda pos: pos // size
    positions_of = {r.id: i for i, r in enumerate(records)}

    def add(shard: _Shard, positions: list[int], o: EncoderOutput) -> None:
        lengths = o.mask.sum(1).cpu().numpy()
        tok = o.tokens.cpu().numpy().astype(np.float16, copy=False)  # float16 already (encode_batch)
        rows = [tok[i, : lengths[i]] for i in range(len(positions))]
        if bucketed or not STREAM_SHARD_ROWS:
            shard.tokens.extend(rows)
        else:  # batches come in record order: their rows go to the shard's file now, during the forward
            if shard.kept and positions and positions[0] <= shard.kept[-1]:
                raise RuntimeError("unbucketed batches out of record order")  # a bug, not a user error
            shard.writer.append(rows)
        shard.pooled.append(o.pooled.cpu().numpy().astype(np.float32, copy=False))
        shard.kept.extend(positions)

    def flush(shard: _Shard) -> None:
        _copy_repeats(shard, repeats.get(shard.index, ()), records)
        bar.update(len(repeats.get(shard.index, ())))
        kept, pooled = shard.kept, shard.pooled
        order = sorted(range(len(kept)), key=kept.__getitem__)  # record order, whatever the batches were
        if bucketed or not STREAM_SHARD_ROWS:
            try:
                shard.writer.append(shard.tokens[i] for i in order)
            except BaseException:
                shard.writer.abort()
                raise
        pooled_arr = np.concatenate(pooled)[order] if pooled else np.zeros((0, enc.dim), np.float32)
        shard.writer.commit(
            pooled_arr,
            {
                "kept": [kept[i] for i in order],
                "skipped": sorted(shard.skipped, key=lambda s: positions_of[s["id"]]),
                "tokens": int(sum(shard.writer.lengths)),
            },
        )

    # ONNX Runtime releases the GIL and its threads sleep between operators: without worker processes,
    # decode the next batch in a thread while this one runs; with them, the fp16 conversion and the shard
    # writes run in a thread instead (a writer thread beside the decode thread measured slower under
    # load: benchmarks/extract.py). Eager torch keeps them in turn.
    fast = getattr(enc, "backend", "eager") == "onnx"
    overlap = PREFETCH_THREAD and workers == 0 and fast
    writer = _Writer(background=BACKGROUND_WRITES and workers > 0 and fast)
    current: _Shard | None = None
    try:
        for positions, output, skips in encoded(_prefetched(loader) if overlap else loader, enc, streams):
            first = positions[0] if positions else skips[0][0]
            if current is not None and shard_of(first) != current.index:
                writer.submit(flush, current)
                current = None
            current = current or _Shard(shard_of(first), ShardWriter(out, shard_of(first)))
            for pos, info in skips:
                if opts.strict:
                    raise LightCRLError(f"bad input {info['path']}: {info['detail']} (--strict)")
                current.skipped.append({"id": records[pos].id, **info})
            if output is not None:
                writer.submit(add, current, positions, output)
            bar.update(len(positions) + len(skips))
        if current is not None:
            writer.submit(flush, current)
    except BaseException:
        writer.close(reraise=False)  # this error is the one to report; finished shards are on disk
        if current is not None:
            current.writer.abort()  # the unfinished shard's temp files (a kill leaves them to the resume)
        raise
    writer.close()
    bar.close()


def shard_repeats(texts: list, shards: list[int], shard_size: int) -> dict[int, list[tuple[int, int]]]:
    """Per shard, ``(position, first position)`` of every text that already occurred in that shard.

    Per shard, not per store, so each shard stays self-contained: a resumed extraction needs nothing of
    the shards it does not redo.
    """
    out: dict[int, list[tuple[int, int]]] = {}
    for s in shards:
        first: dict = {}
        for p in range(s * shard_size, min((s + 1) * shard_size, len(texts))):
            q = first.setdefault(texts[p], p)
            if q != p:
                out.setdefault(s, []).append((p, q))
    return out


def _copy_repeats(shard: _Shard, repeats, records) -> None:
    """Give each repeated text of ``shard`` the rows (or the skip) of its first occurrence."""
    if not repeats:
        return
    where = {p: i for i, p in enumerate(shard.kept)}
    skipped = {s["id"]: s for s in shard.skipped}
    pooled = np.concatenate(shard.pooled) if shard.pooled else None
    copied = []
    for p, q in repeats:
        if q in where:
            shard.kept.append(p)
            shard.tokens.append(shard.tokens[where[q]])
            copied.append(where[q])
        elif records[q].id in skipped:
            info = {**skipped[records[q].id], "id": records[p].id}
            if "path" in info:
                info["path"] = records[p].path or records[p].id
            shard.skipped.append(info)
    if copied:
        shard.pooled = [pooled, pooled[copied]]


@dataclass
class _Shard:
    """What one shard collects until it is written (in record order by flush)."""

    index: int
    writer: ShardWriter
    tokens: list = field(default_factory=list)  # only while bucketed batches come out of record order
    pooled: list = field(default_factory=list)
    kept: list = field(default_factory=list)
    skipped: list = field(default_factory=list)


# Conversions and shard writes in a background thread for the ONNX Runtime path with worker processes.
BACKGROUND_WRITES = True


class _Writer:
    """Runs jobs in submission order, in one background thread or (``background=False``) at once.

    At most ``depth`` jobs wait (each holds a batch's outputs); an error of a job is raised in the caller
    at a later ``submit`` or at ``close``, which waits for every job: a shard handed to the writer is on
    disk when extraction returns, and one interrupted by a kill is not marked complete (atomic writes).
    """

    def __init__(self, background: bool, depth: int = 3):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(1, thread_name_prefix="lightcrl-write") if background else None
        self.pending: deque = deque()
        self.depth = depth

    def submit(self, fn: Callable, *args) -> None:
        if self.pool is None:
            fn(*args)
            return
        self.pending.append(self.pool.submit(fn, *args))
        while self.pending and (len(self.pending) > self.depth or self.pending[0].done()):
            self.pending.popleft().result()

    def close(self, reraise: bool = True) -> None:
        if self.pool is None:
            return
        try:
            while self.pending:
                f = self.pending.popleft()
                if reraise:
                    f.result()
                else:
                    f.exception()  # waits; its error gives way to the caller's
        finally:
            for f in self.pending:
                f.cancel()
            self.pool.shutdown(wait=True)


PREFETCH_THREAD = True
# Unbucketed stores: append each batch's token rows to the shard's file as the batch comes out of the
# forward (else: keep them and write the file when the shard is complete).
STREAM_SHARD_ROWS = True


def encoded(batches: Iterable, enc: FrozenEncoder, streams: int = 1) -> Iterator:
    """``(positions, EncoderOutput or None, skips)`` for each ``(positions, batch or None, skips)``, in order,
    tokens in the store's float16.

    With ``streams`` > 1 that many batches run through the forward at once, from a thread pool: ONNX
    Runtime releases the GIL and one session may run from several threads. On 2 cores, 2 single-threaded
    streams lose only the time the decoding thread takes, where one 2-threaded forward stalls at every
    operator whose second thread the decoder pre-empted (docs/benchmarks.md).
    """

    def encode(batch):
        return None if batch is None else enc.encode_batch(batch, tokens_dtype=torch.float16)

    if streams <= 1:
        for positions, batch, skips in batches:
            yield positions, encode(batch), skips
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pending: deque = deque()
    pool = ThreadPoolExecutor(streams, thread_name_prefix="lightcrl-forward")
    try:
        for positions, batch, skips in batches:
            pending.append((positions, pool.submit(encode, batch), skips))
            while len(pending) > streams:  # `streams` running, one more waiting for a free thread
                positions, future, skips = pending.popleft()
                yield positions, future.result(), skips
        while pending:
            positions, future, skips = pending.popleft()
            yield positions, future.result(), skips
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _prefetched(iterable, depth: int = 2):
    """Iterate ``iterable`` in a background thread, ``depth`` items ahead; its errors re-raised here."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def run():
        try:
            for x in iterable:
                if stop.is_set():
                    return
                q.put(x)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer
            q.put(e)

    t = threading.Thread(target=run, daemon=True, name="lightcrl-decode")
    t.start()
    try:
        while (x := q.get()) is not done:
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                q.get_nowait()  # unblock a producer waiting on a full queue


def plan_batches(
    shards: list[int], shard_size: int, batch_size: int, n: int, lengths: list[int] | None = None,
    skip: set[int] | frozenset[int] = frozenset(),
) -> list[list[int]]:
    """The batches (lists of record positions) that extract ``shards``; a batch never spans two shards.

    Without ``lengths``: consecutive positions. With them (text): each shard's positions sorted by length
    (ties by position, so a resumed run makes the same batches), then cut into batches; the shard writer
    puts the items back in record order. Positions in ``skip`` (repeated texts) are left out.
    """
    out = []
    for s in shards:
        positions = [p for p in range(s * shard_size, min((s + 1) * shard_size, n)) if p not in skip]
        if lengths is not None:
            positions.sort(key=lambda p: (lengths[p], p))
        out.extend(positions[b : b + batch_size] for b in range(0, len(positions), batch_size))
    return out


# The ONNX Runtime path on CPU: decoding processes and the forward's intra-op threads. Measured on the 2
# shared cores under load 28-33 (256 CIFAR-10 images, 3 interleaved rounds, median; docs/benchmarks.md):
# decoding in a thread of this process 9.5 images/s, 1 worker process + 2 ORT threads 8.3, 1 + 1 5.5. So
# no worker process by default; a quiet machine has not been measured (--workers 1 to try it).
ONNX_DECODE_WORKERS = 0
ONNX_FORWARD_THREADS: int | None = None  # None: torch's thread count, shared by the streams
# Batches in the forward at once on CPU (each on torch's threads / streams). 1,000 CIFAR-10 images,
# efficientnet-lite0, 2 cores: see docs/benchmarks.md, "Two forward streams".
ONNX_FORWARD_STREAMS = 2


def default_workers(enc: FrozenEncoder) -> int:
    """DataLoader workers when none are asked for.

    With a GPU, decoding gets every core but one. On CPU, eager torch already runs on every core through
    its intra-op threads, and a decoding worker process competes with them: each time it takes a core, the
    OpenMP threads of the running layer wait for the pre-empted one. Measured on 2 shared cores
    (efficientnet-lite0, 600 CIFAR-10 images): decoding in this process between batches ran at 0.94-0.96 of
    the forward pass alone, one worker at 0.92 when the machine was quiet and 0.65 once other jobs ran.
    So eager on CPU: workers only for cores torch does not use (e.g. with ``torch.set_num_threads(1)``).
    ONNX Runtime's threads sleep between operators instead of waiting for each other, and its forward is
    5x faster, so decoding must keep up: ``ONNX_DECODE_WORKERS`` processes (when there are 2+ cores; 0 as
    measured so far: then a thread of this process decodes the next batch during the forward).
    """
    cores = os.cpu_count() or 1
    if enc.device.type == "cpu":
        if getattr(enc, "backend", "eager") == "onnx" and cores >= 2:
            return ONNX_DECODE_WORKERS
        return max(0, cores - torch.get_num_threads())
    return max(1, cores - 1)


def default_forward_streams(enc: FrozenEncoder) -> int:
    """Batches in the forward at once: ``ONNX_FORWARD_STREAMS`` for ONNX Runtime on a CPU with as many
    cores (no more streams than torch's threads), else 1 (eager torch already uses every core)."""
    if getattr(enc, "backend", "eager") == "onnx" and enc.device.type == "cpu":
        return max(1, min(ONNX_FORWARD_STREAMS, torch.get_num_threads(), os.cpu_count() or 1))
    return 1


def default_forward_threads(enc: FrozenEncoder, streams: int = 1) -> int | None:
    """Intra-op threads for the encoder's ONNX Runtime session: torch's count shared by the streams
    (None, for a single stream: torch's count when the session starts)."""
    if getattr(enc, "backend", "eager") == "onnx" and enc.device.type == "cpu":
        if ONNX_FORWARD_THREADS:
            return ONNX_FORWARD_THREADS
        return max(1, torch.get_num_threads() // streams) if streams > 1 else None
    return None


def _report_skipped(manifest: dict) -> None:
    skipped = manifest.get("skipped", [])
    if skipped:
        by_reason = ", ".join(f"{k}: {v}" for k, v in sorted(manifest["skipped_by_reason"].items()))
        log.warning("skipped %d item(s) (%s); details in manifest.json", len(skipped), by_reason)


def cached_store(
    encoder: str | FrozenEncoder,
    data_spec: str,
    split: str | None,
    opts: EmbedOptions | None = None,
    rank: int = 0,
    world: int = 1,
) -> FeatureStore:
    """The store for these inputs in the implicit cache ($LIGHTCRL_CACHE/stores), built on first use.

    Under torchrun every rank calls it: a missing store is extracted as :func:`embed` does (rank r takes
    the shards s with s % world == r), a selection is cut from its parent by rank 0 alone.
    """
    opts = opts or EmbedOptions()
    enc = _encoder(encoder, opts)
    plan = plan_store(enc, data_spec, split, opts)
    slug = hashlib.sha256(plan["fingerprint"].encode()).hexdigest()[:16]
    label = f"{enc.name}-{plan['dataset']['kind']}-{plan['dataset']['split']}".replace("/", "_").replace(
        ":", "_"
    )
    out = cache_dir() / "stores" / f"{label}-{slug}"
    if world > 1:  # the ranks coordinate through barriers (a lock held by rank 0 would deadlock them)
        return _cached_store(enc, data_spec, split, opts, rank, world, plan, out)
    # Separate processes sharing the cache (two trainings, a grid and a server) build a store once: the
    # second waits for the first, then reuses its store instead of deleting the other's temp files.
    with locked(out.parent / f".{out.name}.lock"):
        return _cached_store(enc, data_spec, split, opts, rank, world, plan, out)


def _cached_store(enc, data_spec, split, opts, rank, world, plan, out: Path) -> FeatureStore:
    if (out / "manifest.json").exists():
        try:
            store = FeatureStore(out)
            if store.fingerprint == plan["fingerprint"]:
                return store
        except LightCRLError:
            pass
        shutil.rmtree(out, ignore_errors=True)
    parent_spec = plan["dataset"].get("view_of")
    if parent_spec and not opts.limit and not isinstance(enc, JoinedEncoder):
        # a selection of a dataset's classes (or items): cut from the whole dataset's store, which one
        # extraction serves for every selection (e.g. the 5 folds of a class-disjoint protocol)
        parent = cached_store(enc, parent_spec, split, opts, rank, world)
        cut = cut_store(parent, plan, out) if rank == 0 else None
        if world > 1:
            agreed = [cut]
            torch.distributed.broadcast_object_list(agreed, src=0)
            cut = agreed[0]
        if cut:
            return FeatureStore(out)
    return embed(enc, data_spec, split, out, opts, rank=rank, world=world)


JOIN_CHUNK = 256  # items joined at once by join_stores


def join_stores(parts: list[FeatureStore], plan: dict, out: Path) -> None:
    """Write the joined encoder's store of ``plan`` into ``out`` from its parts' stores of the same items.

    An item is kept when every part kept it (a part's skip reason is kept otherwise); its tokens and pooled
    feature are the first part's stored tokens and the other parts' pooled features, joined as the encoder
    joins them (``lightcrl.encoders.joined.join_tokens``; equal to a direct extraction up to the first
    part's float16 token storage).
    """
    records = [Record(**r) for r in plan["records"]]
    for part in parts:  # same dataset, split and sample: the same records, or a bug upstream
        part_skips = {s["id"] for s in part.skipped()}
        missing = [r.id for r in records if r.id not in part._index and r.id not in part_skips]
        if missing:
            raise LightCRLError(f"store {part.dir} lacks {len(missing)} item(s) of the joined store, e.g. "
                                f"{missing[0]!r}: delete it and rerun")
    skips: dict[str, dict] = {}
    for part in parts:
        for s in part.skipped():
            skips.setdefault(s["id"], dict(s))
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_files(out)
    write_json(out / "plan.json", plan, indent=None)
    size = plan["shard_size"]
    listing_skipped = {s["id"] for s in plan.get("listing_skipped", [])}
    for s in range(plan["n_shards"]):
        positions = range(s * size, min((s + 1) * size, len(records)))
        kept = [p for p in positions if all(records[p].id in part._index for part in parts)]
        kept_set = set(kept)
        skipped = [skips[records[p].id] for p in positions
                   if p not in kept_set and records[p].id not in listing_skipped]
        tokens, pooled = [], []
        for c in range(0, len(kept), JOIN_CHUNK):  # a chunk of items at a time: vectorised, bounded memory
            ids = [records[p].id for p in kept[c : c + JOIN_CHUNK]]
            rows = [np.asarray([part.index_of(i) for i in ids], np.int64) for part in parts]
            first, mask = parts[0].tokens(rows[0], dtype=np.float32)
            others = [torch.from_numpy(np.asarray(part.pooled(r), np.float32))
                      for part, r in zip(parts[1:], rows[1:], strict=True)]
            out_chunk = join_tokens(torch.from_numpy(first), torch.from_numpy(mask), others)
            lengths = out_chunk.mask.sum(1).tolist()
            chunk_tokens = out_chunk.tokens.numpy().astype(np.float16)
            tokens.extend(chunk_tokens[i, : lengths[i]] for i in range(len(ids)))
            pooled.append(out_chunk.pooled.numpy())
        pooled = np.concatenate(pooled) if pooled else np.zeros((0, plan["dim"]), np.float32)
        write_shard(out, s, tokens, pooled, {"kept": kept, "skipped": skipped,
                                             "tokens": int(sum(t.shape[0] for t in tokens))})
    manifest = finalize(out, plan)
    _report_skipped(manifest)
    log.info("joined feature store %s from %s (%d items)", out, ", ".join(str(p.dir) for p in parts),
             manifest["count"])


def cut_store(parent: FeatureStore, plan: dict, out: Path) -> bool:
    """Write the store of ``plan`` into ``out`` from the rows of ``parent`` (a superset of its items).

    Every planned record must be in the parent with the same id, and the same caption for text; items the
    parent skipped are skipped again with the parent's reason. Labels come from the plan (a class selection
    relabels). Returns False, writing nothing, when the parent does not cover the plan.
    """
    if parent.manifest["encoder"]["identity"] != plan["encoder"]["identity"]:
        return False
    records = [Record(**r) for r in plan["records"]]
    parent_skips = {s["id"]: s for s in parent.skipped()}
    rows: list[int | None] = []
    for r in records:
        if r.id in parent._index:
            row = parent.index_of(r.id)
            if r.text is not None and parent.items.texts[row] != r.text:
                return False
            rows.append(row)
        elif r.id in parent_skips:
            rows.append(None)
        else:
            return False
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_files(out)
    write_json(out / "plan.json", plan, indent=None)
    size = plan["shard_size"]
    listing_skipped = {s["id"] for s in plan.get("listing_skipped", [])}
    for s in range(plan["n_shards"]):
        positions = range(s * size, min((s + 1) * size, len(records)))
        kept = [p for p in positions if rows[p] is not None]
        skipped = [
            {k: v for k, v in parent_skips[records[p].id].items()}
            for p in positions
            if rows[p] is None and records[p].id not in listing_skipped
        ]
        tok = [parent.tokens([rows[p]])[0][0] for p in kept]
        pooled = parent.pooled(np.asarray([rows[p] for p in kept], np.int64)) if kept else (
            np.zeros((0, parent.dim), np.float32))
        write_shard(out, s, tok, pooled, {"kept": kept, "skipped": skipped,
                                          "tokens": int(sum(t.shape[0] for t in tok))})
    manifest = finalize(out, plan)
    _report_skipped(manifest)
    log.info("cut feature store %s from %s (%d items)", out, parent.dir, manifest["count"])
    return True
