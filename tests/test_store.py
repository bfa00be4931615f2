"""Feature store and extraction on tiny generated inputs, with the toy encoders (fast)."""

from __future__ import annotations

import errno
import json
import sys

import numpy as np
import pytest
import torch

from lightcrl import store as store_mod
from lightcrl.embed import EmbedOptions, cached_store, embed
from lightcrl.errors import LightCRLError, StoreMismatch
from lightcrl.store import FeatureStore


def _arrays(d):
    return {p.name: np.load(p) for p in sorted(d.glob("shard_*.npy"))}


def test_store_roundtrip_ragged_and_padded(tmp_path, pairs_csv):
    s = embed(
        "toy-text", pairs_csv, None, tmp_path / "t", EmbedOptions(shard_size=16, batch_size=8, num_workers=0)
    )
    assert len(s) == 80 and s.manifest["count"] == 80
    assert len(s.manifest["shards"]) == 5
    lengths = s.lengths
    assert lengths.min() >= 2 and lengths.max() == 5  # "a red square number 0" = 5 words
    tok, mask = s.tokens(np.arange(80))
    assert tok.dtype == np.float16 and tok.shape == (80, 5, 12)
    assert (mask.sum(1) == lengths).all()
    assert (tok[~mask] == 0).all()  # padding is zero
    # the model's read casts to float32 while gathering: the same values, the same mask, cut or not
    for cut in (None, 3):
        t16, m16 = s.tokens(np.arange(80), cut)
        t32, m32 = s.batch(np.arange(80), cut)
        assert t32.dtype == torch.float32 and np.array_equal(t32.numpy(), t16.astype(np.float32))
        assert np.array_equal(m32.numpy(), m16)
    # pooled excludes padding: equals the mean over real tokens (fp16 storage tolerance)
    pooled = s.pooled()
    manual = (tok.astype(np.float32) * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(pooled, manual, atol=2e-3)
    # caption records link to their image
    assert s.items.groups[0] == "img000.png" and s.items.texts[1] == "something red"


def test_reuse_and_fingerprint_change(tmp_path, pairs_csv):
    out = tmp_path / "img"
    opts = EmbedOptions(shard_size=16, batch_size=8, num_workers=0)
    s1 = embed("toy-image", pairs_csv, None, out, opts)
    mtime = (out / "manifest.json").stat().st_mtime_ns
    s2 = embed("toy-image", pairs_csv, None, out, opts)  # reused, not re-extracted
    assert (out / "manifest.json").stat().st_mtime_ns == mtime and s2.fingerprint == s1.fingerprint
    # change the dataset: a caption edit does not touch an image store, but adding an image does
    csv_path = pairs_csv.split(":", 1)[1]
    with open(csv_path, "a") as f:
        f.write("img000.png,extra caption\n")
    from PIL import Image

    Image.new("RGB", (8, 8), (1, 2, 3)).save(out.parent / "pairs" / "new.png")
    with open(csv_path, "a") as f:
        f.write("new.png,a new image\n")
    with pytest.raises(StoreMismatch, match="--overwrite"):
        embed("toy-image", pairs_csv, None, out, opts)
    s3 = embed(
        "toy-image",
        pairs_csv,
        None,
        out,
        EmbedOptions(shard_size=16, batch_size=8, num_workers=0, overwrite=True),
    )
    assert len(s3) == 41 and s3.fingerprint != s1.fingerprint


def test_deterministic_and_workers_agree(tmp_path, pairs_csv):
    a = embed("toy-image", pairs_csv, None, tmp_path / "a", EmbedOptions(shard_size=16, num_workers=0))
    b = embed("toy-image", pairs_csv, None, tmp_path / "b", EmbedOptions(shard_size=16, num_workers=2))
    for k, v in _arrays(a.dir).items():
        np.testing.assert_array_equal(v, _arrays(b.dir)[k])


def test_resume_after_partial_run_equals_uninterrupted(tmp_path, pairs_csv, monkeypatch):
    opts = EmbedOptions(shard_size=8, batch_size=4, num_workers=0)
    ref = embed("toy-image", pairs_csv, None, tmp_path / "ref", opts)
    # interrupt after 2 shards
    real_commit = store_mod.ShardWriter.commit  # completes a shard (its token rows are already written)
    calls = {"n": 0}

    def dying_commit(self, *a, **k):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real_commit(self, *a, **k)

    monkeypatch.setattr(store_mod.ShardWriter, "commit", dying_commit)
    with pytest.raises(KeyboardInterrupt):
        embed("toy-image", pairs_csv, None, tmp_path / "part", opts)
    assert not (tmp_path / "part" / "manifest.json").exists()
    assert len(list((tmp_path / "part").glob("shard_*.json"))) == 2
    assert not list((tmp_path / "part").glob(".*.tmp"))  # the third shard's streamed tokens: removed
    monkeypatch.setattr(store_mod.ShardWriter, "commit", real_commit)
    resumed = embed("toy-image", pairs_csv, None, tmp_path / "part", opts)
    assert resumed.manifest["count"] == ref.manifest["count"]
    ra, rb = _arrays(ref.dir), _arrays(resumed.dir)
    assert ra.keys() == rb.keys()
    for k in ra:
        np.testing.assert_array_equal(ra[k], rb[k])


def test_corrupt_inputs_skipped_and_counted(tmp_path, pairs_csv):
    root = tmp_path / "pairs"
    (root / "img003.png").write_bytes(b"")  # zero-byte
    data = (root / "img005.png").read_bytes()
    (root / "img005.png").write_bytes(data[: len(data) // 2])  # truncated
    (root / "img007.png").write_bytes(b"this is not an image at all")
    (root / "img009.png").unlink()  # missing
    s = embed("toy-image", pairs_csv, None, tmp_path / "s", EmbedOptions(shard_size=16, num_workers=0))
    reasons = sorted(x["reason"] for x in s.skipped())
    assert len(s) == 36, reasons
    assert len(reasons) == 4
    assert set(reasons) <= {"missing_file", "empty_file", "corrupt_image"}
    assert all(x.get("path") or x.get("id") for x in s.skipped())
    with pytest.raises(LightCRLError, match=r"img00[3579]\.png"):
        embed("toy-image", pairs_csv, None, tmp_path / "strict", EmbedOptions(num_workers=0, strict=True))


def test_out_of_disk_space_keeps_existing_store(tmp_path, pairs_csv, monkeypatch):
    opts = EmbedOptions(shard_size=8, batch_size=4, num_workers=0)
    out = tmp_path / "s"
    good = embed("toy-image", pairs_csv, None, out, opts)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lightcrl.io.np.save", full)
    with pytest.raises(LightCRLError, match="No space left"):
        embed(
            "toy-image",
            pairs_csv,
            None,
            out,
            EmbedOptions(shard_size=8, batch_size=4, num_workers=0, overwrite=True, limit=20),
        )
    monkeypatch.undo()
    # the old store files that were not cleared are intact; no temp files are left behind
    assert not list(out.glob(".*.tmp"))
    assert good.fingerprint  # the in-memory reader is still valid
    del before


def test_version_mismatch_is_refused(tmp_path, pairs_csv):
    s = embed("toy-image", pairs_csv, None, tmp_path / "s", EmbedOptions(num_workers=0))
    m = json.loads((s.dir / "manifest.json").read_text())
    m["version"] = 999
    (s.dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreMismatch, match="version 999"):
        FeatureStore(s.dir)


def test_cached_store_and_limit_sampling(tmp_path, pairs_csv):
    a = cached_store("toy-image", pairs_csv, None, EmbedOptions(limit=10, num_workers=0))
    b = cached_store("toy-image", pairs_csv, None, EmbedOptions(limit=10, num_workers=0))
    assert a.dir == b.dir and len(a) == 10
    ids = [int(i[3:6]) for i in a.items.ids]
    assert max(ids) - min(ids) > 20  # spread over the dataset, not the first 10
    c = cached_store("toy-image", pairs_csv, None, EmbedOptions(limit=10, seed=1, num_workers=0))
    assert c.dir != a.dir


def test_text_encoder_on_classification_dataset_is_a_clear_error(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / "f" / cls).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "f" / cls / "a.png")
    with pytest.raises(LightCRLError, match="no captions"):
        embed("toy-text", f"imagefolder:{tmp_path / 'f'}", None, tmp_path / "o", EmbedOptions(num_workers=0))


def test_cached_store_waits_for_another_process_building_it(pairs_csv):
    """Two processes sharing the cache build a store once: the second waits on the store's lock file
    (held here, as a first builder would), then reuses what the first wrote."""
    import shutil
    import threading

    from lightcrl.io import locked

    opts = EmbedOptions(shard_size=16, batch_size=8, num_workers=0)
    first = cached_store("toy-image", pairs_csv, None, opts)
    out = first.dir
    shutil.rmtree(out)
    result = {}
    with locked(out.parent / f".{out.name}.lock"):
        def build():
            result["store"] = cached_store("toy-image", pairs_csv, None, opts)

        waiter = threading.Thread(target=build)
        waiter.start()
        waiter.join(timeout=2.0)
        assert waiter.is_alive() and not (out / "manifest.json").exists()  # waiting, not building
    waiter.join(timeout=60)
    assert result["store"].fingerprint == first.fingerprint


def test_save_npy_rows_equals_saving_the_concatenation(tmp_path):
    from lightcrl.io import save_npy_rows

    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 7)).astype(np.float32) for n in (3, 0, 5)]
    parts.append(rng.standard_normal((2, 7)).astype(np.float16))
    save_npy_rows(tmp_path / "rows.npy", parts, np.float16, 7)
    got = np.load(tmp_path / "rows.npy", mmap_mode="r")
    assert got.dtype == np.float16 and np.array_equal(got, np.concatenate(parts).astype(np.float16))
    np.save(tmp_path / "ref.npy", np.concatenate(parts).astype(np.float16))  # byte for byte: the header
    assert (tmp_path / "rows.npy").read_bytes() == (tmp_path / "ref.npy").read_bytes()  # is rewritten
    save_npy_rows(tmp_path / "empty.npy", [], np.float16, 4)
    assert np.load(tmp_path / "empty.npy").shape == (0, 4)
    with pytest.raises(ValueError, match="width 7"):
        save_npy_rows(tmp_path / "bad.npy", [np.zeros((2, 6))], np.float16, 7)
    assert not (tmp_path / "bad.npy").exists()  # atomic: nothing half-written is left


def test_row_writer_starts_writeback_of_every_written_byte(tmp_path, monkeypatch):
    """The writer asks the kernel to start writing each ``writeback_bytes`` as they are written (ranges
    back to back from the file's start), and the file is still ``np.save`` of the rows."""
    from lightcrl import io as io_mod

    calls = []
    real = io_mod.start_writeback
    monkeypatch.setattr(io_mod, "start_writeback",
                        lambda fd, off, n: calls.append((off, n)) or real(fd, off, n))
    monkeypatch.setattr(io_mod.NpyRowWriter, "writeback_bytes", 1000)
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((int(k), 16)).astype(np.float16) for k in rng.integers(1, 60, 40)]
    io_mod.save_npy_rows(tmp_path / "rows.npy", parts, np.float16, 16)
    np.testing.assert_array_equal(np.load(tmp_path / "rows.npy"), np.concatenate(parts))
    assert calls and calls[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in zip(calls, calls[1:]))  # no gap, no overlap
    header = (tmp_path / "rows.npy").stat().st_size - sum(p.nbytes for p in parts)
    assert header + sum(p.nbytes for p in parts) - (calls[-1][0] + calls[-1][1]) < 1000 + 60 * 32
    assert all(n >= 1000 for _, n in calls)
    # a real call on Linux, a harmless False elsewhere (the fsync at commit then writes everything)
    with open(tmp_path / "f.bin", "wb") as f:
        f.write(b"x" * 4096)
        f.flush()
        assert io_mod.start_writeback(f.fileno(), 0, 4096) is sys.platform.startswith("linux")


def test_record_to_dict_has_every_field():
    from dataclasses import asdict

    from lightcrl.data.records import Record

    r = Record(id="a/b.png", path="/x/a/b.png", text=None, group="a/b.png", label=3)
    assert r.to_dict() == asdict(r) and Record(**r.to_dict()) == r


def test_streamed_shard_rows_write_the_same_files(tmp_path, pairs_csv, monkeypatch):
    """Token rows appended batch by batch (the default for image stores) = rows written at the shard's end."""
    import lightcrl.embed as embed_mod

    appends = []
    real_append = store_mod.ShardWriter.append
    monkeypatch.setattr(store_mod.ShardWriter, "append",
                        lambda self, rows: appends.append(self.index) or real_append(self, rows))
    opts = EmbedOptions(shard_size=8, batch_size=3, num_workers=0)  # batches straddle no shard, end ragged
    streamed = embed("toy-image", pairs_csv, None, tmp_path / "streamed", opts)
    n_streamed, appends[:] = len(appends), []
    monkeypatch.setattr(embed_mod, "STREAM_SHARD_ROWS", False)
    at_end = embed("toy-image", pairs_csv, None, tmp_path / "end", opts)
    assert len(appends) == len(set(appends)) < n_streamed  # one append per shard vs one per batch
    files = sorted(p.name for p in streamed.dir.iterdir())
    assert files == sorted(p.name for p in at_end.dir.iterdir()) and any("tokens" in f for f in files)
    for name in files:
        assert (streamed.dir / name).read_bytes() == (at_end.dir / name).read_bytes(), name
