"""No load runs code from a file: a hostile pickle is refused with a clear error before anything of it runs.

Three places read files that are (or were) pickles: the ConVIRT resume checkpoint (now safetensors + JSON;
an old ``last.pt`` is refused unread), the aisfx package's ``checkpoint.pth`` (torch's weights-only
unpickler with an allow-list of the numpy types it holds) and official CIFAR python batches (a restricted
unpickler that only rebuilds numpy arrays). Each hostile file below would create a marker file if it were
unpickled; the tests check the error and that the marker never appears. The benign paths: CIFAR and aisfx
below; ConVIRT's resume in tests/test_baselines.py (a resumed run equals an uninterrupted one).
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import pickletools
import struct

import numpy as np
import pytest
import torch

from lightcrl.errors import LightCRLError


class TouchOnLoad:
    """Unpickling this creates ``marker`` (``Path.touch``): what any code in a pickle could do."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


class ShellOnLoad:
    """Unpickling this runs a shell command (``os.system``) that creates ``marker``."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


HOSTILE = [TouchOnLoad, ShellOnLoad]


def test_the_hostile_payloads_do_run_when_unpickled_freely(tmp_path):
    """The payloads are real: plain pickle.loads creates the marker (so its absence below means something)."""
    for i, payload in enumerate(HOSTILE):
        marker = tmp_path / f"marker{i}"
        pickle.loads(pickle.dumps({b"data": payload(marker)}, protocol=2))
        assert marker.exists()


# ----------------------------------------------------------------------------------- ConVIRT checkpoint


def _convirt_cfg(spec: str = "csv:unused"):
    from lightcrl.baselines.convirt import load_config

    return load_config({"data": {"spec": spec, "split": "all"}, "image_size": 48, "batch_size": 4,
                        "proj_dim": 16, "proj_hidden": 32, "progress": False})


@pytest.mark.parametrize("payload", HOSTILE)
def test_convirt_refuses_an_old_pickled_checkpoint_unread(tmp_path, payload):
    from lightcrl.app.train_convirt import train_convirt

    marker = tmp_path / "marker"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"config": {}, "model": payload(marker)}, run / "checkpoints" / "last.pt")
    with pytest.raises(LightCRLError, match=r"last\.pt is a ConVIRT checkpoint pickled by an older lightcrl"):
        train_convirt(_convirt_cfg(), run)
    assert not marker.exists()
    assert (run / "checkpoints" / "last.pt").exists()  # left for the user to delete


def test_convirt_overwrite_deletes_an_old_pickled_checkpoint_unread(tmp_path, monkeypatch):
    import lightcrl.app.train_convirt as tc

    marker = tmp_path / "marker"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": TouchOnLoad(marker)}, run / "checkpoints" / "last.pt")

    class Stop(Exception):
        pass

    def stop(*a, **k):  # stop before the model is built: the old checkpoint is gone by then
        raise Stop

    monkeypatch.setattr(tc, "ConVIRTModel", stop)
    with pytest.raises(Stop):
        tc.train_convirt(_convirt_cfg(), run, overwrite=True)
    assert not (run / "checkpoints" / "last.pt").exists() and not marker.exists()


# -------------------------------------------------------------------------------------- aisfx weights


def _real_aisfx_weights() -> pathlib.Path:
    pytest.importorskip("aisfx")
    from lightcrl.encoders.audio import AisfxEncoder

    return AisfxEncoder.weights_path()


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload", HOSTILE)
def test_aisfx_conversion_refuses_a_hostile_checkpoint(tmp_path, monkeypatch, payload, zipfile):
    pytest.importorskip("aisfx")
    from lightcrl.encoders.audio import AisfxEncoder

    marker = tmp_path / "marker"
    hostile = tmp_path / "checkpoint.pth"
    torch.save(({"embedding_net.w": torch.zeros(2)}, {"prosfx": payload(marker)}), hostile,
               _use_new_zipfile_serialization=zipfile)
    monkeypatch.setenv("LIGHTCRL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(AisfxEncoder, "weights_path", staticmethod(lambda: hostile))
    enc = AisfxEncoder(device="cpu")
    with pytest.raises(LightCRLError, match=r"refusing to load aisfx weights .*\.pth: it references "):
        enc.convert_weights()
    with pytest.raises(LightCRLError, match="refusing to load aisfx weights"):
        enc.state_dict_from_copy()  # the first use converts: same refusal
    assert not marker.exists()
    assert not enc.safetensors_path().exists()


def test_aisfx_weights_only_load_equals_the_full_unpickling():
    from lightcrl.encoders.audio import _load_aisfx_checkpoint

    path = _real_aisfx_weights()
    state, ds_dict = _load_aisfx_checkpoint(path)
    ref_state, ref_ds = torch.load(path, map_location="cpu", weights_only=False)  # the package's own file
    assert list(state) == list(ref_state)
    assert all(state[k].dtype == ref_state[k].dtype and torch.equal(state[k], ref_state[k]) for k in state)
    assert ds_dict == ref_ds
    assert all(type(a) is type(b) for k in ds_dict for a, b in zip(ds_dict[k], ref_ds[k]))


def test_aisfx_allow_list_is_exactly_what_the_file_needs():
    """Each allowed global is needed by the real checkpoint: dropping any one makes the load fail."""
    from lightcrl.encoders.audio import _aisfx_checkpoint_globals

    path = _real_aisfx_weights()
    allowed = _aisfx_checkpoint_globals()
    assert len(allowed) == 3
    for i in range(len(allowed)):
        with torch.serialization.safe_globals(allowed[:i] + allowed[i + 1 :]), pytest.raises(
                pickle.UnpicklingError):
            torch.load(path, map_location="cpu", weights_only=True)
    with torch.serialization.safe_globals(allowed):
        torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------- CIFAR batches


class _Py2Pickler(pickle._Pickler):
    """Writes a pickle as Python 2 + numpy 1.x wrote the official CIFAR batches: protocol 2, byte strings
    as BINSTRING (not Python 3's ``_codecs.encode``), ``numpy.core.multiarray._reconstruct``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        op = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(op + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes

    def save_global(self, obj, name=None) -> None:
        if getattr(obj, "__module__", None) == "numpy._core.multiarray":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n" + obj.__name__.encode() + b"\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _globals(data: bytes) -> set[str]:
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def _batch(n: int = 3, labels: str = "labels") -> dict:
    rng = np.random.default_rng(0)
    return {b"batch_label": b"testing batch 1 of 1",
            labels.encode(): [int(x) for x in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [b"img_%d.png" % i for i in range(n)]}


@pytest.mark.parametrize("dump", ["py2", "protocol2", "protocol4"])
def test_cifar_batches_load_as_with_plain_pickle(tmp_path, dump):
    from lightcrl.data.media import read_cifar_batch

    batch = _batch()
    data = py2_pickle(batch) if dump == "py2" else pickle.dumps(batch, protocol=int(dump[-1]))
    if dump == "py2":  # what pickletools shows in an official batch
        assert _globals(data) == {"numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype"}
    path = tmp_path / "data_batch_1"
    path.write_bytes(data)
    got = read_cifar_batch(str(path))
    plain = pickle.loads(data, encoding="latin1")  # what read_cifar_batch did before: unrestricted
    ref = {(k.decode() if isinstance(k, bytes) else k): v for k, v in plain.items()}
    assert list(got) == list(ref) == ["batch_label", "labels", "data", "filenames"]
    assert got["data"].dtype == np.uint8 and np.array_equal(got["data"], ref["data"])
    assert np.array_equal(got["data"], batch[b"data"])
    assert got["labels"] == ref["labels"] and got["filenames"] == ref["filenames"]
    assert got["batch_label"] == ref["batch_label"]


@pytest.mark.parametrize("payload", HOSTILE)
def test_cifar_batch_with_code_is_refused(tmp_path, payload):
    from lightcrl.data.datasets import open_dataset
    from lightcrl.data.media import read_cifar_batch

    marker = tmp_path / "marker"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batch = {**_batch(), b"labels": payload(marker)}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}))
    name = {TouchOnLoad: r"builtins\.getattr", ShellOnLoad: rf"{os.name}\.system"}[payload]
    msg = rf"refusing to load .*test_batch: it references {name}, which a CIFAR batch never contains"
    with pytest.raises(LightCRLError, match=msg):
        read_cifar_batch(str(folder / "test_batch"))
    with pytest.raises(LightCRLError, match=msg):  # listing the dataset: the same one-line error
        open_dataset(f"cifar10:{folder}")
    assert not marker.exists()


def test_cifar_unpickler_refuses_globals_outside_numpy_arrays(tmp_path):
    """Even a harmless-looking global (here collections.OrderedDict) is refused: only array rebuilding."""
    from collections import OrderedDict

    from lightcrl.data.media import read_cifar_batch

    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps(OrderedDict(_batch()), protocol=2))
    with pytest.raises(LightCRLError, match="references collections.OrderedDict"):
        read_cifar_batch(str(path))
    path.write_bytes(pickle.dumps([1, 2], protocol=2))
    with pytest.raises(LightCRLError, match="not a CIFAR batch"):
        read_cifar_batch(str(path))
