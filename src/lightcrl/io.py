"""Atomic file output: a reader never sees half a file, a kill never corrupts what was there."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


class AtomicFile:
    """A temp file beside ``path`` that becomes ``path`` at :meth:`commit` (fsync, then rename) and vanishes
    at :meth:`abort`: :func:`atomic_open` for a file written across calls (a shard's tokens, batch by batch).
    """

    def __init__(self, path: str | os.PathLike, mode: str = "w", **kwargs):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            self.file: IO = os.fdopen(fd, mode, **kwargs)
        except BaseException:
            os.close(fd)
            os.unlink(self.tmp)
            raise

    def commit(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.chmod(self.tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give outputs the usual mode
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temp file beside ``path``; on success fsync and rename it over ``path``.

    On any exception the temp file is removed and ``path`` keeps its previous content.
    """
    f = AtomicFile(path, mode, **kwargs)
    try:
        yield f.file
    except BaseException:
        f.abort()
        raise
    f.commit()


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on the file ``path`` (created if missing), so two processes do
    not build or update the same thing at once; the second waits for the first."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; writes are still atomic per file
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, default=_json_default)
        f.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """np.save through a temp file, so a memmap reader never opens a truncated array."""
    with atomic_open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def _sync_file_range():
    """Linux's ``sync_file_range`` (None elsewhere): starts writing a file's dirty pages back without
    waiting for them, so the fsync at commit finds little left to write."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Ask the kernel to start writing ``length`` bytes of ``fd`` from ``offset`` to disk, without
    waiting (RocksDB's ``bytes_per_sync``). False where the call is not available or fails: the fsync
    at commit then does all the work, as before."""
    global _writeback
    if _writeback is False:
        _writeback = _sync_file_range()
    return _writeback is not None and _writeback(fd, offset, length, _SYNC_FILE_RANGE_WRITE) == 0


_writeback: Any = False  # resolved on first use


class NpyRowWriter:
    """A 2-D ``.npy`` file whose rows are appended as they come and whose row count is written at
    :meth:`commit` (atomically, like :func:`save_npy`): a shard's ~125 MB of tokens is written during the
    extraction instead of after it. numpy pads every header for a first axis of any length, so the final
    header takes exactly the placeholder's bytes and the file equals ``np.save`` of the concatenation.

    Every ``writeback_bytes`` written, the kernel is asked to start writing them to disk (without
    waiting): the fsync at commit, which ends an extraction with nothing else to overlap it, then waits
    for the last few MB instead of the whole shard (docs/benchmarks.md).
    """

    writeback_bytes = 16 << 20

    def __init__(self, path: str | os.PathLike, dtype: Any, width: int):
        self.dtype, self.width, self.rows = np.dtype(dtype), int(width), 0
        self._file = AtomicFile(path, "wb")
        self._synced = 0  # bytes from the file's start whose writeback has been started
        try:
            self._header_bytes = self._write_header()
        except BaseException:
            self._file.abort()
            raise

    def _write_header(self) -> int:
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.rows, self.width)}
        np.lib.format.write_array_header_1_0(self._file.file, header)
        return self._file.file.tell()

    def append(self, a: np.ndarray) -> None:
        if a.ndim != 2 or a.shape[1] != self.width:
            raise ValueError(f"rows of width {self.width} expected, got shape {a.shape}")
        if a.size:
            f = self._file.file
            f.write(memoryview(np.ascontiguousarray(a, self.dtype).reshape(-1)).cast("B"))
            end = f.tell()
            if end - self._synced >= self.writeback_bytes:
                f.flush()
                start_writeback(f.fileno(), self._synced, end - self._synced)
                self._synced = end
        self.rows += int(a.shape[0])

    def commit(self) -> None:
        try:
            self._file.file.seek(0)
            if self._write_header() != self._header_bytes:  # cannot happen with numpy's padding; never
                raise RuntimeError("npy header changed length")  # write a file numpy would misread
        except BaseException:
            self._file.abort()
            raise
        self._file.commit()

    def abort(self) -> None:
        self._file.abort()


def save_npy_rows(path: str | os.PathLike, parts: list[np.ndarray], dtype: Any, width: int) -> None:
    """``save_npy(path, np.concatenate(parts).astype(dtype))`` without building the concatenation."""
    w = NpyRowWriter(path, dtype, width)
    try:
        for a in parts:
            w.append(a)
    except BaseException:
        w.abort()
        raise
    w.commit()


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
