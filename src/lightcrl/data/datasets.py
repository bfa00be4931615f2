"""Dataset loaders: one split of one dataset, listed (not decoded) from the dataset's official layout.

Spec grammar
------------
A dataset is named by a spec string ``KIND:PATH[?KEY=VALUE&...]``, e.g. ``flickr8k:../shared/data/flickr8k``
or ``csv:pairs.tsv?img_key=filepath&caption_key=title``. The split is passed separately.

Kinds, the official layout each one reads, and their splits (default first):

- ``flickr8k:DIR``: ``Images/*.jpg``, ``captions.txt`` (Kaggle CSV ``image,caption``) or the original
  ``Flickr8k.token.txt``, ``Flickr_8k.{train,dev,test}Images.txt``. Splits test (if present), dev, train.
- ``coco:DIR``: ``annotations/captions_{train,val}YYYY.json`` with images in ``DIR/trainYYYY/``...
  Splits ``val2017``, ``train2014``..., ``train``/``val`` (2017 if present, else 2014); with Karpathy's
  ``dataset_coco.json`` also ``karpathy_test`` (default), ``karpathy_val``, ``karpathy_train`` (+restval).
- ``csv:FILE``: OpenCLIP style, one image path and caption per row. Query: ``img_key`` (filepath),
  ``caption_key`` (title; a comma list for several caption columns), ``sep`` (tab for .tsv, else comma;
  ``\\t`` or ``tab`` accepted). Relative paths are resolved against the file's folder. Split ``all``.
- ``audiocaps-csv:FILE``: the same for audio. Query: ``audio_key`` (audio), ``caption_key`` (caption),
  ``sep``, ``audio_dir`` (base of relative paths), ``ext`` (appended to a bare id, e.g. ``.wav``).
- ``wds:DIR``: CLIP_benchmark webdataset, ``DIR/{split}/*.tar`` holding ``<key>.jpg|png|webp`` with
  ``<key>.cls`` (classification) or ``<key>.txt`` (pairs, one caption a line). Splits: the subfolders.
- ``imagefolder:DIR`` / ``audiofolder:DIR``: class folders in ``DIR/<split>/`` if it exists, else in DIR.
- ``cifar10:DIR`` / ``cifar100:DIR``: official python batches; DIR is ``cifar-10-batches-py`` /
  ``cifar-100-python`` or their parent. Splits test, train. CIFAR-100 uses the fine labels.
- ``tinyimagenet:DIR``: official tiny-imagenet-200 (``wnids.txt``, ``words.txt``, ``train/<wnid>/images``,
  ``val/val_annotations.txt``; the unlabelled test split is refused) or class folders
  ``{train,test}/<wnid>/``. Splits val (or test), train.
- ``esc50:DIR``: ``audio/*.wav`` + ``meta/esc50.csv``; query ``esc10=1`` keeps ESC-10 (labels 0..9).
- ``esc10:DIR``: the original release, ``"0NN - Class name"/<fold>-<freesound id>-<take>.ogg``.
- ``stsb:DIR``, ``sick:FILE``, ``senteval:DIR``: sentence pairs with similarity scores, a text-only
  dataset of their unique sentences (see :mod:`lightcrl.data.sts`).
- ``labelcaptions:<inner spec>``: a classification dataset as a pairs dataset, e.g.
  ``labelcaptions:esc10:DIR``. Each item gets one caption per template of the inner dataset, the class
  name filled in (id ``"<item id>#<k>"``, group = the item id). Splits: those of the inner dataset.

ESC splits: ``all``, ``fold5``, ``folds1-4``, ``fold1,fold3``. Classification datasets read
``classnames.txt`` and ``zeroshot_classification_templates.txt`` (``{c}`` placeholder) from their folder
when present, else use the lists shipped in ``lightcrl/resources/templates``.

Listing is robust to bad items: a missing or zero-byte media file, an empty or undecodable caption or a
malformed CSV row is dropped and recorded in ``Dataset.skipped`` (``strict=True`` raises instead).
Missing roots, annotation files and unknown splits raise :class:`LightCRLError`.
CIFAR batches are Python pickles; they are read by a restricted unpickler that only rebuilds numpy
arrays (:func:`lightcrl.data.media.read_cifar_batch`), so a hostile file is refused, never run.
"""

from __future__ import annotations

import copy
import csv
import functools
import hashlib
import io
import json
import os
import random
import re
import stat
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qsl

from lightcrl.data.media import CONTAINER_SEP, clean_caption, read_cifar_batch, split_container
from lightcrl.data.records import Record
from lightcrl.errors import LightCRLError, SkipItem

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"})
AUDIO_EXTS = frozenset({".wav", ".flac", ".ogg", ".mp3", ".opus", ".m4a", ".aiff", ".aif"})
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
_SPLIT_DIRS = ("test", "val", "valid", "validation", "dev", "train")


# ----------------------------------------------------------------------------------------------- Dataset


class Dataset:
    """One split of one dataset, fully listed at construction (no decoding).

    ``media_records()`` are the images / audio clips (label = class index, or -1 for pairs);
    ``text_records()`` the captions of a pairs dataset (``group`` = their media id).
    """

    def __init__(
        self,
        *,
        spec: str,
        kind: str,
        root: Path,
        split: str,
        task: str,
        media: str,
        classnames: list[str] | None,
        templates: list[str] | None,
        media_records: list[Record],
        text_records: list[Record],
        skipped: list[dict],
        base: Path,
        stats: dict[str, tuple[int, int]],
    ):
        self.spec, self.kind, self.root, self.split = spec, kind, root, split
        self.task, self.media = task, media
        self.classnames, self.templates = classnames, templates
        self.skipped = skipped
        self._media, self._texts = media_records, text_records
        self._base = base  # relative paths in the fingerprint are taken from here
        self._stats = stats  # (size, mtime_ns) of every media file / container, taken at listing time
        self.sample: tuple[int, int] | None = None  # (n, seed) when made by subsample()
        # the spec of the whole dataset when this one is a class selection of it (see select_classes)
        self.view_of: str | None = None
        self.templates_option: str | None = None  # the ``templates=`` query option, when given
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self._media)

    def __repr__(self) -> str:
        return (
            f"Dataset({self.spec!r}, split={self.split!r}, task={self.task}, media={self.media}, "
            f"items={len(self._media)}, texts={len(self._texts)}, skipped={len(self.skipped)}"
            + (f", sample={self.sample}" if self.sample else "")
            + ")"
        )

    def media_records(self) -> list[Record]:
        return list(self._media)

    def text_records(self) -> list[Record]:
        return list(self._texts)

    def fingerprint(self) -> str:
        """sha256 over the listing (ids, relative paths, sizes, sampled file bytes, captions, labels,
        classnames).

        File contents are sampled (head, middle, tail: see :func:`content_stamp`) rather than dated: a
        copy of the data (``cp``, ``docker COPY``, a fresh mount) keeps its cached features, an edited
        file does not.
        """
        if self._fingerprint is None:
            h = hashlib.sha256()
            header = [self.kind, self.split, self.task, self.media, self.classnames]
            if self.templates_option is not None:  # (only then: older fingerprints stay valid)
                header.append(self.templates)
            h.update(json.dumps(header).encode() + b"\n")
            stamps: dict[str, str] = {}
            for r in self._media:
                container, member = split_container(r.path)
                rel = os.path.relpath(container, self._base)
                if member is not None:
                    rel += CONTAINER_SEP + member
                size = (self._stats.get(container) or _stat(container))[0]
                if container not in stamps:
                    stamps[container] = content_stamp(container, size)
                h.update(json.dumps([r.id, rel, size, stamps[container], r.label]).encode() + b"\n")
            for r in self._texts:
                h.update(json.dumps([r.id, r.group, r.text]).encode() + b"\n")
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def subsample(self, n: int, seed: int = 0) -> Dataset:
        """A seeded uniform sample of ``n`` media items (listing order kept) with all their captions."""
        if n >= len(self._media):
            return self
        if n < 1:
            raise LightCRLError(f"subsample size must be at least 1, got {n}")
        chosen = sorted(random.Random(seed).sample(range(len(self._media)), n))
        sub = copy.copy(self)
        sub._media = [self._media[i] for i in chosen]
        groups = {r.id for r in sub._media}
        sub._texts = [t for t in self._texts if t.group in groups]
        sub.skipped = list(self.skipped)
        sub.sample = (n, seed)
        sub._fingerprint = None
        return sub

    def keep_captions(self, per_item: int, seed: int = 0) -> Dataset:
        """At most ``per_item`` captions of each media item (a seeded choice, listing order kept); the
        media items are unchanged. E.g. one caption per image, for a probe of matched pairs."""
        if per_item < 1:
            raise LightCRLError(f"captions per item must be at least 1, got {per_item}")
        if self.task != "pairs":
            raise LightCRLError(f"{self.spec} has no captions to keep ({self.task} dataset)")
        by_group: dict[str, list[int]] = {}
        for i, t in enumerate(self._texts):
            by_group.setdefault(t.group, []).append(i)
        rng = random.Random(seed)
        keep = sorted(i for idx in by_group.values()
                      for i in (idx if len(idx) <= per_item else rng.sample(idx, per_item)))
        sub = copy.copy(self)
        sub._texts = [self._texts[i] for i in keep]
        sub.skipped = list(self.skipped)
        sub._fingerprint = None
        return sub


# ------------------------------------------------------------------------------------------ spec parsing


@dataclass
class _Loader:
    fn: Callable[..., _Meta]
    options: frozenset[str]
    is_file: bool  # PATH names a file (csv) rather than a folder
    selects: frozenset[str] = frozenset()  # options that only keep a subset of the items (and relabel)


_LOADERS: dict[str, _Loader] = {}


def _loader(kind: str, options: Iterable[str] = (), is_file: bool = False, selects: Iterable[str] = ()):
    def register(fn):
        _LOADERS[kind] = _Loader(fn, frozenset(options), is_file, frozenset(selects))
        return fn

    return register


def known_kinds() -> list[str]:
    from lightcrl.data.sts import STS_KINDS  # data.sts builds on this module: imported on use

    return sorted([*_LOADERS, LABELCAPTIONS, *STS_KINDS])


def _split_spec(spec: str) -> tuple[str, Path, dict[str, str]]:
    kind, sep, rest = spec.partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in _LOADERS:
        raise LightCRLError(
            f"unknown dataset spec {spec!r}: expected KIND:PATH with KIND one of {', '.join(known_kinds())}"
        )
    path, _, query = rest.partition("?")
    if not path:
        raise LightCRLError(f"dataset spec {spec!r} has no path after '{kind}:'")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = set(options) - _LOADERS[kind].options - CLASS_OPTIONS - {"templates"}
    if unknown:
        accepted = ", ".join(sorted(_LOADERS[kind].options | CLASS_OPTIONS | {"templates"}))
        raise LightCRLError(
            f"unknown option(s) {', '.join(sorted(unknown))} for {kind} (accepted: {accepted})"
        )
    return kind, Path(path).expanduser(), options


def parse_spec(spec: str) -> tuple[str, Path]:
    """``"kind:path[?query]"`` -> ``(kind, path)``; an unknown kind raises LightCRLError naming the kinds."""
    inner = _labelcaptions_inner(spec)
    if inner is not None:
        return LABELCAPTIONS, parse_spec(inner)[1]
    from lightcrl.data.sts import is_sts_spec

    if is_sts_spec(spec):
        kind, _, path = spec.partition(":")
        return kind.strip().lower(), Path(path).expanduser()
    kind, path, _ = _split_spec(spec)
    return kind, path


def open_dataset(spec: str, split: str | None = None, strict: bool = False) -> Dataset:
    """List one split of the dataset named by ``spec`` (see the module docstring for the grammar)."""
    inner = _labelcaptions_inner(spec)
    if inner is not None:
        return _open_labelcaptions(spec, inner, split, strict)
    from lightcrl.data.sts import is_sts_spec, open_sts

    if is_sts_spec(spec):  # sentence pairs: a text-only dataset of their unique sentences
        return open_sts(spec, split)
    kind, path, options = _split_spec(spec)
    loader = _LOADERS[kind]
    _require(path, f"{kind} file" if loader.is_file else f"{kind} dataset folder")
    abs_path = Path(os.path.abspath(path))
    base = abs_path.parent if loader.is_file else abs_path
    lst = _Lister(base, strict)
    selection = {k: options.pop(k) for k in list(options) if k in CLASS_OPTIONS}
    templates_option = options.pop("templates", None)
    meta = loader.fn(lst, abs_path, split, options)
    if not lst.media:
        reasons = _count_reasons(lst.skipped)
        detail = f" ({len(lst.skipped)} skipped: {reasons})" if lst.skipped else ""
        raise LightCRLError(f"no usable items in {kind} split {meta.split!r} at {path}{detail}")
    ds = Dataset(
        spec=spec,
        kind=kind,
        root=path,
        split=meta.split,
        task=meta.task,
        media=meta.media,
        classnames=meta.classnames,
        templates=meta.templates,
        media_records=lst.media,
        text_records=lst.texts,
        skipped=lst.skipped,
        base=base,
        stats=lst.stats,
    )
    all_names = list(meta.all_classnames or ds.classnames or [])
    if selection:
        ds = select_classes(ds, selection)
    if templates_option is not None:
        if ds.task != "classification" or not ds.classnames:
            raise LightCRLError(f"{spec}: templates= needs a classification dataset with class names")
        ds.templates = read_templates(templates_option, ds.classnames)
        left_out = [n for n in all_names if n not in set(ds.classnames)]
        if left_out and isinstance(ds.templates, dict):
            ds.templates = without_names(ds.templates, left_out, spec)
        ds.templates_option = templates_option
    if any(k in loader.selects for k in options) or selection or templates_option is not None:
        ds.view_of = without_class_options(spec)
    return ds


def _words(text: str) -> str:
    return " " + " ".join(re.findall(r"[a-z0-9]+", text.lower())) + " "


def names_in(text: str, names: list[str]) -> list[str]:
    """The ``names`` that ``text`` contains as whole words, singular or with a plural ``s`` ("rain" is not
    in "train"; "dogs" names "dog")."""
    words = _words(text)
    return [n for n in names if _words(n) in words or _words(n)[:-1] + "s " in words]


def without_names(prompts: dict[str, list[str]], names: list[str], spec: str) -> dict[str, list[str]]:
    """Per-class prompts minus those that name any of ``names``: a class selection's captions never name
    a class left out of it (a description of thunderstorms that says "rain" would otherwise train on the
    held-out class "rain" by name)."""
    out = {c: [p for p in ps if not names_in(p, names)] for c, ps in prompts.items()}
    empty = [c for c, ps in out.items() if not ps]
    if empty:
        raise LightCRLError(f"{spec}: every prompt of class(es) {', '.join(empty)} names a class left out "
                            "of the selection; add prompts that do not")
    return out


def read_templates(name: str, classnames: list[str]) -> list[str] | dict[str, list[str]]:
    """The ``templates=`` option: a ``.txt`` file of templates with a ``{c}`` slot, one a line, or a
    ``.json`` file ``{class name: [prompt, ...]}`` of per-class prompts (class descriptions; every class
    of the dataset must be there, keys matched case-insensitively). A name that is not a file is looked
    up in ``lightcrl/resources/templates`` (e.g. ``templates=esc50_descriptions.json``). Several files,
    comma-separated, give each class the prompts of all of them, in order."""
    if "," in name:
        parts = [read_templates(n.strip(), classnames) for n in name.split(",") if n.strip()]
        if all(isinstance(p, list) for p in parts):
            return [t for p in parts for t in p]
        per_class = [p if isinstance(p, dict) else {c: [t.replace("{c}", c) for t in p] for c in classnames}
                     for p in parts]
        return {c: [t for p in per_class for t in p[c]] for c in classnames}
    path = Path(name).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    else:
        try:
            text = resources.files("lightcrl").joinpath("resources", "templates", name).read_text("utf-8")
        except (FileNotFoundError, IsADirectoryError, OSError):
            raise LightCRLError(f"templates file not found: {name} (nor a shipped resource)") from None
    if name.endswith(".json"):
        try:
            table = {k.strip().lower(): v for k, v in json.loads(text).items()}
        except (json.JSONDecodeError, AttributeError) as e:
            raise LightCRLError(f"templates {name}: expected a JSON object class -> [prompts]: {e}") from None
        missing = [c for c in classnames if not table.get(c.strip().lower())]
        if missing:
            raise LightCRLError(f"templates {name}: no prompts for class(es) {', '.join(missing)}")
        return {c: [str(p) for p in table[c.strip().lower()]] for c in classnames}
    templates = [line.strip() for line in text.splitlines() if line.strip()]
    bad = [t for t in templates if "{c}" not in t]
    if bad or not templates:
        raise LightCRLError(f"templates {name}: every line needs a {{c}} slot: {bad[:1] or 'empty file'}")
    return templates


# -------------------------------------------------------------------------------------- shared helpers


@dataclass
class _Meta:
    """What a loader tells about the split it listed (the records themselves are in the _Lister)."""

    split: str
    task: str = "classification"
    media: str = "image"
    classnames: list[str] | None = None
    templates: list[str] | None = None
    # every class of the dataset when the loader itself kept only some (esc50's esc10=): prompts of the
    # kept classes must not name the others (without_names)
    all_classnames: list[str] | None = None


class _Caption(NamedTuple):
    raw: str | bytes  # as read; decoded and validated by clean_caption
    source: Path  # the annotation file
    where: str  # place in that file, e.g. "line 12"


@dataclass
class _Lister:
    """Collects records while a loader walks a dataset; bad items are skipped (or raise, when strict)."""

    base: Path
    strict: bool
    media: list[Record] = field(default_factory=list)
    texts: list[Record] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    stats: dict[str, tuple[int, int]] = field(default_factory=dict)
    _ids: set[str] = field(default_factory=set)

    def rel(self, path: str | Path) -> str:
        # the common case, a path under base, by string (os.path.relpath normalises both paths: 10x slower,
        # a measurable part of listing 10k-file splits before extraction)
        text, prefix = str(path), self._prefix
        if text.startswith(prefix) and "/.." not in text and "/./" not in text:
            return text[len(prefix):].replace(os.sep, "/")
        return Path(os.path.relpath(path, self.base)).as_posix()

    @functools.cached_property
    def _prefix(self) -> str:
        return os.path.join(str(self.base), "")

    def skip(self, item_id: str, path: str | Path | None, reason: str, detail: str = "") -> None:
        if self.strict:
            raise LightCRLError(f"{reason}: {path or item_id}" + (f": {detail}" if detail else ""))
        self.skipped.append(
            {"id": item_id, "path": None if path is None else str(path), "reason": reason, "detail": detail}
        )

    def check_file(self, item_id: str, path: str | Path) -> bool:
        """Stat a media file (or container); missing and zero-byte files are skipped."""
        key = str(path)
        if key not in self.stats:
            try:
                st = os.stat(key)
            except OSError:
                st = None
            if st is None or not stat.S_ISREG(st.st_mode):
                self.skip(item_id, path, "missing_file", "listed but not found on disk (or not a file)")
                return False
            if st.st_size == 0:
                self.skip(item_id, path, "empty_file", "zero-byte file")
                return False
            self.stats[key] = (st.st_size, st.st_mtime_ns)
        return True

    def add_item(
        self, path: str | Path, label: int = -1, item_id: str | None = None, member: str | None = None
    ) -> bool:
        """Add one media record (``member``: inside the container ``path``); a repeated id is skipped."""
        item_id = item_id or self.rel(path)
        full = str(path) if member is None else f"{path}{CONTAINER_SEP}{member}"
        if item_id in self._ids:
            self.skip(item_id, full, "duplicate", "listed more than once")
            return False
        self._ids.add(item_id)
        self.media.append(Record(id=item_id, path=full, group=item_id, label=label))
        return True

    def add_file(self, path: str | Path, label: int = -1, item_id: str | None = None) -> bool:
        item_id = item_id or self.rel(path)
        return self.check_file(item_id, path) and self.add_item(path, label, item_id)

    def add_pair(
        self, path: Path, captions: list[_Caption], item_id: str | None = None, member: str | None = None
    ) -> None:
        """Add a media item (already checked) with its captions; caption ``k`` gets id ``"<item id>#<k>"``.

        Bad captions are skipped one by one; a media item left without any caption is skipped too.
        """
        item_id = item_id or self.rel(path)
        kept = []
        for k, caption in enumerate(captions):
            try:
                kept.append((k, clean_caption(caption.raw)))
            except SkipItem as exc:
                detail = f"{caption.where}: {exc.args[0].removeprefix(exc.reason + ': ')}"
                self.skip(f"{item_id}#{k}", caption.source, exc.reason, detail)
        if not kept:
            self.skip(item_id, path, "no_caption", "no usable caption")
        elif self.add_item(path, item_id=item_id, member=member):
            self.texts.extend(Record(id=f"{item_id}#{k}", text=t, group=item_id) for k, t in kept)


_STAMP_BLOCK = 4096


def content_stamp(path: str, size: int) -> str:
    """Digest of a file's first, middle and last 4 KiB: cheap (3 reads per file) and blind to mtimes.

    Compressed media change throughout when re-encoded, so three samples catch real edits; an edit that
    keeps the size and misses all three blocks of an uncompressed file would go unseen (documented limit).
    """
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for offset in sorted({0, max(0, size // 2 - _STAMP_BLOCK // 2), max(0, size - _STAMP_BLOCK)}):
                f.seek(offset)
                h.update(f.read(_STAMP_BLOCK))
    except OSError as exc:
        raise LightCRLError(f"cannot read {path} to fingerprint the dataset: {exc}") from exc
    return h.hexdigest()[:16]


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _count_reasons(skipped: list[dict]) -> str:
    counts = Counter(s["reason"] for s in skipped)
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise LightCRLError(f"{what} not found: {path}")
    return path


def _first_existing(candidates: Iterable[Path], what: str) -> Path:
    candidates = list(candidates)
    for p in candidates:
        if p.exists():
            return p
    raise LightCRLError(f"{what} not found: tried {', '.join(str(p) for p in candidates)}")


def _choose_split(kind: str, split: str | None, available: list[str], preferred: Iterable[str] = ()) -> str:
    if not available:
        raise LightCRLError(f"{kind}: no split found")
    if split is None:
        return next((s for s in preferred if s in available), available[0])
    if split not in available:
        raise LightCRLError(
            f"unknown split {split!r} for {kind}: available splits are {', '.join(available)}"
        )
    return split


def _single_split(kind: str, split: str | None) -> str:
    """For kinds whose PATH is one split (a csv file...): only ``all`` is accepted."""
    return _choose_split(kind, split, ["all"])


def _read_lines(path: Path) -> list[str]:
    """Non-empty stripped lines of a UTF-8 text file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise LightCRLError(f"cannot read {path}: {exc}") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def _resource_lines(name: str) -> list[str]:
    text = resources.files("lightcrl").joinpath("resources", "templates", name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _templates(folder: Path, default_resource: str) -> list[str]:
    path = folder / TEMPLATES_FILE
    templates = _read_lines(path) if path.is_file() else _resource_lines(default_resource)
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise LightCRLError(f"template without a {{c}} placeholder in {path}: {bad[0]!r}")
    return templates


def _classnames(folder: Path, n_classes: int, fallback: list[str]) -> list[str]:
    """``folder/classnames.txt`` when present (must have one line per class), else ``fallback``."""
    path = folder / CLASSNAMES_FILE
    if not path.is_file():
        return fallback
    names = _read_lines(path)
    if len(names) != n_classes:
        raise LightCRLError(f"{path} lists {len(names)} class names but the dataset has {n_classes} classes")
    return names


def _walk_files(folder: Path, exts: frozenset[str]) -> list[str]:
    """Files with one of ``exts`` (case-insensitive) under ``folder``, recursively, in sorted order.

    Paths as strings: a ``Path`` per file was half the time of listing a 10k-file split before extraction.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        prefix = os.path.join(dirpath, "")
        found.extend(prefix + f for f in sorted(filenames) if not f.startswith(".") and _suffix(f) in exts)
    return found


def _suffix(name: str) -> str:
    """``Path(name).suffix.lower()`` without building a Path (listing 10k-file folders calls it per file)."""
    dot = name.rfind(".")
    return name[dot:].lower() if 0 < dot < len(name) - 1 else ""


def _subdirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _list_class_folders(lst: _Lister, split_dir: Path, classes: list[str], exts: frozenset[str]) -> None:
    """Label ``i`` = every media file under ``split_dir/classes[i]``."""
    for label, name in enumerate(classes):
        for path in _walk_files(split_dir / name, exts):
            lst.add_file(path, label)


def _folder_split(kind: str, root: Path, split: str | None, default: str) -> tuple[str, Path]:
    """``root/<split>/`` when it exists; else ``root`` itself, unless ``root`` holds other split folders."""
    present = [s for s in _SPLIT_DIRS if (root / s).is_dir()]
    if split is None:
        split = default if default in present or not present else present[0]
    if (root / split).is_dir():
        return split, root / split
    if present:
        raise LightCRLError(f"unknown split {split!r} for {kind}: available splits are {', '.join(present)}")
    return split, root


def _decode_surrogates(data: bytes) -> str:
    """Decode UTF-8, keeping undecodable bytes as surrogate escapes (``clean_caption`` rejects them)."""
    return data.decode("utf-8", "surrogateescape").lstrip("\ufeff")


def _read_table(path: Path, sep: str) -> list[tuple[int, list[str]]]:
    """Rows of a delimited text file as ``(line number, fields)``; blank lines are left out.

    The file is read as bytes and decoded per field (undecodable bytes kept as surrogate escapes, which
    ``clean_caption`` rejects), so one row with invalid UTF-8 cannot break the listing. A malformed row
    comes back empty (too short for any header).
    """
    try:
        text = _decode_surrogates(path.read_bytes())
    except OSError as exc:
        raise LightCRLError(f"cannot read {path}: {exc}") from exc
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, 1 << 30))  # very long captions are kept
    rows = []
    try:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error:
                rows.append((reader.line_num, []))
                continue
            if any(f.strip() for f in row):
                rows.append((reader.line_num, row))
    finally:
        csv.field_size_limit(limit)
    return rows


def _read_csv(path: Path, sep: str) -> tuple[list[str], list[tuple[int, dict[str, str] | None]]]:
    """Header and rows of a delimited file with a header line; a row too short for the header is None."""
    rows = iter(_read_table(path, sep))
    try:
        _, header = next(rows)
    except StopIteration:
        raise LightCRLError(f"empty table file: {path}") from None
    header = [h.strip() for h in header]
    out = [(n, dict(zip(header, row, strict=False)) if len(row) >= len(header) else None) for n, row in rows]
    return header, out


def _require_columns(path: Path, header: list[str], columns: Iterable[str]) -> None:
    missing = [c for c in columns if c not in header]
    if missing:
        raise LightCRLError(f"{path} has no column {', '.join(missing)} (columns: {', '.join(header)})")


def _separator(path: Path, options: dict[str, str]) -> str:
    sep = options.get("sep")
    if not sep:
        return "\t" if path.suffix.lower() == ".tsv" else ","
    sep = {"\\t": "\t", "tab": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}.get(sep, sep)
    if len(sep) != 1:
        raise LightCRLError(f"separator must be one character (or tab/comma/semicolon/pipe), got {sep!r}")
    return sep


# --------------------------------------------------------------------------------------------- loaders


_FLICKR8K_SPLIT_FILES = {
    "test": "Flickr_8k.testImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "train": "Flickr_8k.trainImages.txt",
}


@_loader("flickr8k")
def _load_flickr8k(lst: _Lister, root: Path, split: str | None, options: dict) -> _Meta:
    text_dir = next(
        (d for d in (root, root / "Flickr8k_text") if (d / "Flickr_8k.trainImages.txt").exists()), root
    )
    available = [s for s, name in _FLICKR8K_SPLIT_FILES.items() if (text_dir / name).is_file()]
    if not available:
        raise LightCRLError(f"flickr8k split file not found: {text_dir / _FLICKR8K_SPLIT_FILES['test']}")
    split = _choose_split("flickr8k", split, available, ("test", "dev", "train"))
    image_dir = _first_existing(
        [root / "Images", root / "Flicker8k_Dataset", root / "Flickr8k_Dataset"], "flickr8k image folder"
    )
    captions: dict[str, list[_Caption]] = {}
    kaggle = root / "captions.txt"
    if kaggle.is_file():  # Kaggle layout: CSV "image,caption"
        header, rows = _read_csv(kaggle, ",")
        _require_columns(kaggle, header, ["image", "caption"])
        for n, row in rows:
            if row is None:
                lst.skip(f"line {n}", kaggle, "bad_row", f"line {n}: missing column")
            else:
                captions.setdefault(row["image"].strip(), []).append(
                    _Caption(row["caption"], kaggle, f"line {n}")
                )
    else:  # original release: "<image>#<k>\t<caption>"
        token = _first_existing(
            [text_dir / "Flickr8k.token.txt", root / "Flickr8k.token.txt"], "flickr8k captions"
        )
        for n, row in _read_table(token, "\t"):
            if len(row) < 2:
                lst.skip(f"line {n}", token, "bad_row", f"line {n}: missing column")
            else:
                image = row[0].split("#")[0].strip()
                captions.setdefault(image, []).append(_Caption(row[1], token, f"line {n}"))
    for name in _read_lines(text_dir / _FLICKR8K_SPLIT_FILES[split]):
        path = image_dir / name
        if lst.check_file(lst.rel(path), path):
            lst.add_pair(path, captions.get(name, []))
    return _Meta(split, task="pairs")


_COCO_JSON = re.compile(r"^captions_(train|val)(\d{4})\.json$")
_KARPATHY_SPLITS = {
    "karpathy_test": {"test"},
    "karpathy_val": {"val"},
    "karpathy_train": {"train", "restval"},
}


def _load_json(path: Path):
    try:
        return json.loads(_decode_surrogates(path.read_bytes()))
    except (OSError, ValueError) as exc:
        raise LightCRLError(f"cannot read {path}: {exc}") from exc


@_loader("coco")
def _load_coco(lst: _Lister, root: Path, split: str | None, options: dict) -> _Meta:
    ann_dir = root / "annotations"
    official = {}  # "val2017" -> its captions json
    if ann_dir.is_dir():
        for name in sorted(os.listdir(ann_dir)):
            if m := _COCO_JSON.match(name):
                official[m.group(1) + m.group(2)] = ann_dir / name
    karpathy = next(
        (p for p in (root / "dataset_coco.json", ann_dir / "dataset_coco.json") if p.is_file()), None
    )
    available = sorted(official, key=lambda name: (-int(name[-4:]), name))
    available += [
        alias for alias in ("val", "train") if f"{alias}2017" in official or f"{alias}2014" in official
    ]
    available += list(_KARPATHY_SPLITS) if karpathy else []
    if not available:
        raise LightCRLError(f"coco annotations not found: {ann_dir / 'captions_val2017.json'}")
    split = _choose_split("coco", split, available, ("karpathy_test", "val2017", "val2014"))
    if split in ("val", "train"):  # the 2017 release if present, else 2014
        split += "2017" if f"{split}2017" in official else "2014"
    if split in _KARPATHY_SPLITS:
        _list_coco_karpathy(lst, root, karpathy, _KARPATHY_SPLITS[split])
    else:
        _list_coco_official(lst, root, split, official[split])
    return _Meta(split, task="pairs")


def _list_coco_official(lst: _Lister, root: Path, split: str, ann_path: Path) -> None:
    """``captions_<split>.json``: {"images": [{id, file_name}], "annotations": [{image_id, caption}]}."""
    ann = _load_json(ann_path)
    captions: dict = {}
    for a in ann.get("annotations", []):
        where = f"annotation id {a.get('id')}"
        captions.setdefault(a.get("image_id"), []).append(_Caption(a.get("caption", ""), ann_path, where))
    image_dir = _first_existing([root / split, root / "images" / split], f"coco image folder for {split}")
    for img in ann.get("images", []):
        if not img.get("file_name"):
            lst.skip(f"image id {img.get('id')}", ann_path, "bad_row", "image entry without file_name")
            continue
        path = image_dir / img["file_name"]
        if lst.check_file(lst.rel(path), path):
            lst.add_pair(path, captions.get(img.get("id"), []))


def _list_coco_karpathy(lst: _Lister, root: Path, karpathy: Path, wanted: set[str]) -> None:
    """Karpathy's ``dataset_coco.json``: {"images": [{filepath, filename, split, sentences: [{raw}]}]}."""
    for img in _load_json(karpathy).get("images", []):
        if img.get("split") not in wanted:
            continue
        if not img.get("filename"):
            lst.skip(f"image {img.get('imgid')}", karpathy, "bad_row", "image entry without filename")
            continue
        path = root / img.get("filepath", "") / img["filename"]
        where = f"image {img['filename']}"
        if lst.check_file(lst.rel(path), path):
            lst.add_pair(
                path, [_Caption(s.get("raw", ""), karpathy, where) for s in img.get("sentences", [])]
            )


def _load_caption_csv(
    lst: _Lister,
    file: Path,
    split: str | None,
    options: dict,
    path_key: str,
    caption_key: str,
    base: Path,
    ext: str = "",
) -> str:
    """Rows of (media path, caption columns) -> pairs; a media path on several rows collects all captions.

    ``caption_key`` may name several columns separated by commas (e.g. Clotho's caption_1,...,caption_5).
    """
    split = _single_split(file.name, split)
    caption_keys = [c.strip() for c in caption_key.split(",")]
    header, rows = _read_csv(file, _separator(file, options))
    _require_columns(file, header, [path_key, *caption_keys])
    items: dict[str, list[_Caption]] = {}
    for n, row in rows:
        value = None if row is None else row[path_key].strip()
        if not value:
            lst.skip(f"line {n}", file, "bad_row", f"line {n}: missing column or empty {path_key}")
            continue
        if ext and not Path(value).suffix:
            value += ext
        items.setdefault(value, []).extend(_Caption(row[c], file, f"line {n}") for c in caption_keys)
    for value, captions in items.items():
        path = base / value
        if lst.check_file(value, path):
            lst.add_pair(path, captions, item_id=value)
    return split


@_loader("csv", options=("img_key", "caption_key", "sep"), is_file=True)
def _load_csv(lst: _Lister, file: Path, split: str | None, options: dict) -> _Meta:
    img_key, caption_key = options.get("img_key", "filepath"), options.get("caption_key", "title")
    return _Meta(
        _load_caption_csv(lst, file, split, options, img_key, caption_key, file.parent), task="pairs"
    )


@_loader("audiocaps-csv", options=("audio_key", "caption_key", "sep", "audio_dir", "ext"), is_file=True)
def _load_audiocaps_csv(lst: _Lister, file: Path, split: str | None, options: dict) -> _Meta:
    base = file.parent / options["audio_dir"] if options.get("audio_dir") else file.parent
    audio_key, caption_key = options.get("audio_key", "audio"), options.get("caption_key", "caption")
    split = _load_caption_csv(lst, file, split, options, audio_key, caption_key, base, options.get("ext", ""))
    return _Meta(split, task="pairs", media="audio")


# webdataset grouping: the key is the member path up to the first dot of its file name
_WDS_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@_loader("wds")
def _load_wds(lst: _Lister, root: Path, split: str | None, options: dict) -> _Meta:
    available = [d for d in _subdirs(root) if any(f.endswith(".tar") for f in os.listdir(root / d))]
    split = _choose_split("wds", split, available, ("test",))
    samples = []  # (tar path, key, {ext: TarInfo}, {"cls"/"txt": bytes})
    for tar_path in sorted((root / split).glob("*.tar")):
        tar_path = Path(os.path.abspath(tar_path))
        if not lst.check_file(lst.rel(tar_path), tar_path):
            continue
        try:
            with tarfile.open(tar_path, "r:") as tf:
                groups: dict[str, tuple[dict[str, tarfile.TarInfo], dict[str, bytes]]] = {}
                for m in tf.getmembers():
                    match = _WDS_KEY.match(m.name)
                    if not m.isfile() or not match:
                        continue
                    key, ext = match.group(1), match.group(2).lower()
                    members, payload = groups.setdefault(key, ({}, {}))
                    members[ext] = m
                    if ext in ("cls", "txt"):
                        payload[ext] = tf.extractfile(m).read()
        except (tarfile.TarError, OSError) as exc:
            lst.skip(lst.rel(tar_path), tar_path, "corrupt_archive", str(exc))
            continue
        samples.extend((tar_path, key, members, payload) for key, (members, payload) in groups.items())

    task = "classification" if any("cls" in payload for *_, payload in samples) else "pairs"
    for tar_path, key, members, payload in samples:
        item_id = f"{lst.rel(tar_path)}/{key}"
        image = next((members[e] for e in ("jpg", "jpeg", "png", "webp") if e in members), None)
        where = f"{tar_path}{CONTAINER_SEP}{key}"
        if image is None:
            lst.skip(item_id, where, "missing_file", "no image member")
        elif image.size == 0:
            lst.skip(item_id, f"{tar_path}{CONTAINER_SEP}{image.name}", "empty_file", "zero-byte member")
        elif task == "pairs":
            lines = [line for line in payload.get("txt", b"").split(b"\n") if line.strip()]
            captions = [_Caption(line, tar_path, f"{key}.txt") for line in lines or [b""]]
            lst.add_pair(tar_path, captions, item_id, image.name)
        else:
            try:
                label = int(payload["cls"].decode().strip())
            except (KeyError, ValueError, UnicodeDecodeError):
                lst.skip(item_id, where, "bad_label", "missing or non-integer .cls")
                continue
            lst.add_item(tar_path, label, item_id, image.name)
    if task == "pairs":
        return _Meta(split, task="pairs")
    names = root / CLASSNAMES_FILE
    classnames = _read_lines(names) if names.is_file() else None
    return _Meta(split, classnames=classnames, templates=_templates(root, "image_templates.txt"))


def _load_class_folders(lst: _Lister, kind: str, root: Path, split: str | None, media: str) -> _Meta:
    """imagefolder / audiofolder: label = index of the sorted class folder."""
    exts = AUDIO_EXTS if media == "audio" else IMAGE_EXTS
    templates = f"{media}_templates.txt"
    split, split_dir = _folder_split(kind, root, split, default="test")
    classes = _subdirs(split_dir)
    if not classes:
        raise LightCRLError(f"{kind}: no class folders in {split_dir}")
    _list_class_folders(lst, split_dir, classes, exts)
    classnames = _classnames(root, len(classes), [c.replace("_", " ") for c in classes])
    return _Meta(split, classnames=classnames, templates=_templates(root, templates), media=media)


@_loader("imagefolder")
def _load_imagefolder(lst: _Lister, root: Path, split: str | None, options: dict) -> _Meta:
    return _load_class_folders(lst, "imagefolder", root, split, "image")


@_loader("audiofolder")
def _load_audiofolder(lst: _Lister, root: Path, split: str | None, options: dict) -> _Meta:
    return _load_class_folders(lst, "audiofolder", root, split, "audio")


_CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "meta": "batches.meta",
        "splits": {"test": ["test_batch"], "train": [f"data_batch_{i}" for i in range(1, 6)]},
        "labels": "labels",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "meta": "meta",
        "splits": {"test": ["test"], "train": ["train"]},
        "labels": "fine_labels",
    },
}


def _load_cifar(kind: str, lst: _Lister, root: Path, split: str | None) -> _Meta:
    layout = _CIFAR[kind]
    folder = root if (root / layout["meta"]).is_file() else root / layout["folder"]
    available = [s for s, batches in layout["splits"].items() if (folder / batches[0]).is_file()]
    if not available:
        raise LightCRLError(f"{kind} batches not found: {folder / layout['splits']['test'][0]}")
    split = _choose_split(kind, split, available, ("test",))
    for name in layout["splits"][split]:
        path = Path(os.path.abspath(_require(folder / name, f"{kind} batch")))
        try:
            batch = read_cifar_batch(str(path))
            labels, n_rows = [int(x) for x in batch[layout["labels"]]], len(batch["data"])
        except LightCRLError:  # a refused global: the message names the file already
            raise
        except Exception as exc:  # unpickling errors come in many types
            raise LightCRLError(f"cannot read {kind} batch {path}: {type(exc).__name__}: {exc}") from exc
        if len(labels) != n_rows:
            raise LightCRLError(f"{path}: {n_rows} images but {len(labels)} labels")
        lst.check_file(lst.rel(path), path)
        for row, label in enumerate(labels):
            lst.add_item(path, label, f"{name}/{row}", str(row))
    return _Meta(
        split,
        classnames=_resource_lines(f"{kind}_classnames.txt"),
        templates=_resource_lines(f"{kind}_templates.txt"),
    )


@_loader("cifar10")
def _load_cifar10(lst: _Lister, root: Path, split: str | None, options: dict) -> _Meta:
    return _load_cifar("cifar10", lst, root, split)


@_loader("cifar100")
def _load_cifar100(lst: _Lister, root: Path, split: str | None, options: dict) -> _Meta:
    return _load_cifar("cifar100", lst, root, split)


@_loader("tinyimagenet")
def _load_tinyimagenet(lst: _Lister, root: Path, split: str | None, options: dict) -> _Meta:
    wnids = _read_lines(_require(root / "wnids.txt", "tinyimagenet wnids.txt"))
    label_of = {w: i for i, w in enumerate(wnids)}
    available = [s for s in ("train", "val", "test") if (root / s).is_dir()]
    split = _choose_split("tinyimagenet", split, available, ("val", "test", "train"))
    split_dir = root / split
    annotations = split_dir / "val_annotations.txt"
    if annotations.is_file():  # official val: images/ + "<file>\t<wnid>\t<box>"
        for n, row in _read_table(annotations, "\t"):
            if len(row) < 2 or row[1] not in label_of:
                lst.skip(f"line {n}", annotations, "bad_row", f"line {n}: missing or unknown wnid")
            else:
                lst.add_file(split_dir / "images" / row[0], label_of[row[1]])
    elif any(d in label_of for d in _subdirs(split_dir)):
        # class folders: official train/<wnid>/images/*.JPEG, or repackaged <split>/<wnid>/*.JPEG
        for d in _subdirs(split_dir):
            if d not in label_of:
                lst.skip(d, split_dir / d, "unknown_class", "folder not listed in wnids.txt")
        _list_class_folders(lst, split_dir, wnids, IMAGE_EXTS)
    else:
        raise LightCRLError(
            f"tinyimagenet split {split!r} at {split_dir} has no labels "
            f"(the official test set is unlabelled): use 'val'"
        )
    return _Meta(
        split, classnames=_tiny_classnames(root, wnids), templates=_templates(root, "image_templates.txt")
    )


def _tiny_classnames(root: Path, wnids: list[str]) -> list[str]:
    """classnames.txt wins; else the first lemma of each wnid in words.txt; else the wnids."""
    words = root / "words.txt"
    lemma = {}
    if words.is_file():
        for _, row in _read_table(words, "\t"):
            if len(row) >= 2:
                lemma[row[0].strip()] = row[1].split(",")[0].strip()
    return _classnames(root, len(wnids), [lemma.get(w, w) for w in wnids])


def _esc_folds(kind: str, split: str | None, folds: Iterable[int]) -> tuple[str, set[int]]:
    """``all`` | ``fold5`` | ``folds1-4`` | ``fold1,fold3`` -> the set of folds."""
    folds = sorted(set(folds))
    split = split or "all"
    if split == "all":
        return split, set(folds)
    chosen: set[int] = set()
    for token in split.split(","):
        m = re.fullmatch(r"folds?(\d+)(?:-(\d+))?", token.strip())
        if not m:
            chosen = set()
            break
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        chosen |= set(range(lo, hi + 1))
    if not chosen or not chosen <= set(folds):
        names = ", ".join(f"fold{f}" for f in folds)
        raise LightCRLError(
            f"unknown split {split!r} for {kind}: available splits are all, {names} "
            f"(or a range like folds1-4, or a list like fold1,fold3)"
        )
    return split, chosen


_ESC10_CLASS = re.compile(r"^(\d+)\s*-\s*(.+)$")  # "001 - Dog bark"
_ESC10_CLIP = re.compile(r"^(\d+)-")  # "<fold>-<freesound id>-<take>.ogg"


@_loader("esc10")
def _load_esc10(lst: _Lister, root: Path, split: str | None, options: dict) -> _Meta:
    matches = [(d, _ESC10_CLASS.match(d)) for d in _subdirs(root)]
    classes = sorted((int(m.group(1)), d, m.group(2).strip().lower()) for d, m in matches if m)
    if not classes:
        raise LightCRLError(f"esc10: no class folders like '001 - Dog bark' in {root}")
    clips = []
    for label, (_, folder, _) in enumerate(classes):
        for path in _walk_files(root / folder, AUDIO_EXTS):
            m = _ESC10_CLIP.match(os.path.basename(path))
            if m:
                clips.append((path, int(m.group(1)), label))
            else:
                lst.skip(lst.rel(path), path, "bad_row", "file name is not <fold>-<id>-<take>")
    split, folds = _esc_folds("esc10", split, (f for _, f, _ in clips))
    for path, fold, label in clips:
        if fold in folds:
            lst.add_file(path, label)
    classnames = [name for *_, name in classes]
    return _Meta(
        split, media="audio", classnames=classnames, templates=_templates(root, "audio_templates.txt")
    )


_ESC10_CHOICE = {"1": "only", "true": "only", "yes": "only", "only": "only", "0": "all", "false": "all",
                 "no": "all", "all": "all", "exclude": "exclude"}


@_loader("esc50", options=("esc10",), selects=("esc10",))
def _load_esc50(lst: _Lister, root: Path, split: str | None, options: dict) -> _Meta:
    """ESC-50 in either official layout: the release's class folders ``"NNN - Class name"/<fold>-<id>-<take>``
    (class names from the folders; a name may itself hold " - ") or the GitHub repository's flat
    ``audio/<fold>-<id>-<take>-<target>.wav`` (class names from meta/esc50.csv). Query ``esc10=1`` keeps
    the 10 ESC-10 classes (labels 0..9), ``esc10=exclude`` the other 40 (needs meta/esc50.csv)."""
    choice = _ESC10_CHOICE.get(options.get("esc10", "all").strip().lower())
    if choice is None:
        raise LightCRLError(
            f"esc50: esc10={options['esc10']!r}: expected 1 (only ESC-10), 0 (all) or exclude"
        )
    if (root / "audio").is_dir():
        clips, names = _esc50_flat(lst, root)
    else:
        clips, names = _esc50_folders(lst, root, choice != "all")
    if choice != "all":
        clips = [c for c in clips if c[3] == (choice == "only")]
    split, folds = _esc_folds("esc50", split, (c[1] for c in clips))
    targets = sorted({c[2] for c in clips})
    label_of = {t: i for i, t in enumerate(targets)}
    for path, fold, target, _ in clips:
        if fold in folds:
            lst.add_file(path, label_of[target])
    return _Meta(
        split, media="audio", classnames=[names[t] for t in targets],
        templates=_templates(root, "audio_templates.txt"), all_classnames=[names[t] for t in sorted(names)],
    )


def _esc50_flat(lst: _Lister, root: Path) -> tuple[list[tuple[Path, int, int, bool]], dict[int, str]]:
    """(path, fold, target, is_esc10) of every clip listed in meta/esc50.csv, and the class names."""
    csv_path = _require(root / "meta" / "esc50.csv", "esc50 metadata")
    header, rows = _read_csv(csv_path, ",")
    _require_columns(csv_path, header, ["filename", "fold", "target", "category", "esc10"])
    clips, names = [], {}
    for n, row in rows:
        try:
            fold, target = int(row["fold"]), int(row["target"])  # row is None when too short
        except (TypeError, ValueError):
            lst.skip(f"line {n}", csv_path, "bad_row", f"line {n}: missing or non-integer fold/target")
            continue
        names[target] = row["category"].replace("_", " ").strip()
        is_esc10 = row["esc10"].strip().lower() == "true"
        clips.append((root / "audio" / row["filename"].strip(), fold, target, is_esc10))
    return clips, names


_ESC_CLIP_NAME = re.compile(r"^(\d+)-([^-]+)-([^-.]+)")  # "<fold>-<freesound id>-<take>[...]"


def _esc50_folders(lst: _Lister, root: Path, need_meta: bool):
    """The release layout: class folders in number order are targets 0..49 (101 - Dog = 0, ...)."""
    matches = [(d, _ESC10_CLASS.match(d)) for d in _subdirs(root)]
    classes = sorted((int(m.group(1)), d, m.group(2).strip().lower()) for d, m in matches if m)
    if not classes:
        raise LightCRLError(f"esc50: no audio/ folder and no class folders like '101 - Dog' in {root}")
    esc10: dict[tuple[str, str, str], bool] = {}
    csv_path = root / "meta" / "esc50.csv"
    if csv_path.is_file():  # the official filename is <fold>-<src>-<take>-<target>.wav: match fold, src, take
        header, rows = _read_csv(csv_path, ",")
        _require_columns(csv_path, header, ["fold", "esc10", "src_file", "take"])
        for _, row in rows:
            if row is not None:
                key = (row["fold"].strip(), row["src_file"].strip(), row["take"].strip())
                esc10[key] = row["esc10"].strip().lower() == "true"
    elif need_meta:
        raise LightCRLError(f"esc50: the esc10 option needs {csv_path} (its esc10 column)")
    clips = []
    for target, (_, folder, _) in enumerate(classes):
        for path in _walk_files(root / folder, AUDIO_EXTS):
            m = _ESC_CLIP_NAME.match(os.path.basename(path))
            if not m:
                lst.skip(lst.rel(path), path, "bad_row", "file name is not <fold>-<id>-<take>")
                continue
            key = (m.group(1), m.group(2), m.group(3))
            if need_meta and key not in esc10:
                lst.skip(lst.rel(path), path, "unknown_clip", "not listed in meta/esc50.csv")
                continue
            clips.append((path, int(m.group(1)), target, esc10.get(key, False)))
    return clips, {t: name for t, (_, _, name) in enumerate(classes)}


# -------------------------------------------------------------------------------------- labelcaptions

LABELCAPTIONS = "labelcaptions"


def _labelcaptions_inner(spec: str) -> str | None:
    """The inner spec of ``labelcaptions:<inner spec>``, else None.

    A wrapper, not a ``_loader``: its PATH is a whole spec (with its own ``:`` and ``?query``).
    """
    kind, sep, rest = spec.partition(":")
    if kind.strip().lower() != LABELCAPTIONS:
        return None
    if not sep or not rest.strip():
        raise LightCRLError(
            f"dataset spec {spec!r}: expected labelcaptions:KIND:PATH, e.g. labelcaptions:esc10:DIR"
        )
    return rest.strip()


def _open_labelcaptions(spec: str, inner_spec: str, split: str | None, strict: bool) -> Dataset:
    """Captions = every template of the inner classification dataset with the item's class name."""
    inner = open_dataset(inner_spec, split, strict)
    if inner.task != "classification":
        raise LightCRLError(f"labelcaptions needs a classification dataset; {inner_spec} is {inner.task}")
    if not inner.classnames or not inner.templates:
        raise LightCRLError(f"labelcaptions: {inner_spec} has no class names or no templates")
    media = inner.media_records()
    texts = []
    for r in media:
        if not 0 <= r.label < len(inner.classnames):
            raise LightCRLError(f"labelcaptions: {r.id} has label {r.label}, outside the class names")
        name = inner.classnames[r.label]
        if isinstance(inner.templates, dict):  # per-class prompts (templates=FILE.json)
            prompts = inner.templates[name]
        else:  # replace, not format: a template may hold other braces
            prompts = [t.replace("{c}", name) for t in inner.templates]
        texts.extend(Record(id=f"{r.id}#{k}", text=t, group=r.id) for k, t in enumerate(prompts))
    ds = Dataset(
        spec=spec,
        kind=LABELCAPTIONS,  # in the fingerprint header: differs from the inner dataset's
        root=inner.root,
        split=inner.split,
        task="pairs",
        media=inner.media,
        classnames=inner.classnames,
        templates=inner.templates,
        media_records=media,
        text_records=texts,
        skipped=list(inner.skipped),
        base=inner._base,
        stats=inner._stats,
    )
    if inner.view_of is not None:
        ds.view_of = f"{LABELCAPTIONS}:{inner.view_of}"
    ds.templates_option = inner.templates_option
    return ds


# -------------------------------------------------------------------------------------- class selection
#
# Query options accepted by every classification kind, to build class-disjoint protocols (zero-shot on
# classes never seen in training) from one dataset:
#
#   classgroup=2            keep the classes of group 2 (a comma list keeps several groups)
#   exclude_classgroup=2,3  keep every class outside groups 2 and 3
#   classgroups=5           the number of groups (default 5)
#   groupseed=0             the seed of the split into groups (default 0)
#   classes=dog|cat         keep these class names (``|``-separated, case-insensitive)
#   exclude_classes=dog|cat drop these class names
#
# Groups (class_groups): the label indices 0..K-1 shuffled by random.Random(groupseed), then cut into
# ``classgroups`` consecutive chunks (sizes differ by at most one), each listed in label order. They
# depend only on K, the number of groups and the seed, never on the files. The kept classes are
# relabelled 0..k-1 in their original order and ``classnames`` lists only them.

CLASS_OPTIONS = frozenset({"classgroup", "exclude_classgroup", "classgroups", "groupseed", "classes",
                           "exclude_classes"})


def class_groups(n_classes: int, n_groups: int = 5, seed: int = 0) -> list[list[int]]:
    """The seeded split of label indices 0..n_classes-1 into ``n_groups`` groups (see above)."""
    if not 1 <= n_groups <= n_classes:
        raise LightCRLError(f"classgroups={n_groups}: needs 1 <= groups <= {n_classes} classes")
    order = list(range(n_classes))
    random.Random(seed).shuffle(order)
    bounds = [round(g * n_classes / n_groups) for g in range(n_groups + 1)]
    return [sorted(order[bounds[g] : bounds[g + 1]]) for g in range(n_groups)]


def _int_list(name: str, value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise LightCRLError(f"{name}={value!r}: expected integers separated by commas") from None


def _name_list(value: str) -> set[str]:
    return {v.strip().lower() for v in value.split("|") if v.strip()}


def without_class_options(spec: str) -> str:
    """``spec`` without its class-selection options (and its loader's selecting ones): the whole dataset.

    A selection's feature store is cut from the whole dataset's store (lightcrl.embed.cached_store)."""
    inner = _labelcaptions_inner(spec)
    if inner is not None:
        return f"{LABELCAPTIONS}:{without_class_options(inner)}"
    head, sep, query = spec.partition("?")
    if not sep:
        return spec
    loader = _LOADERS.get(head.partition(":")[0].strip().lower())
    drop = CLASS_OPTIONS | {"templates"} | (loader.selects if loader else frozenset())
    kept = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k not in drop]
    return head + ("?" + "&".join(f"{k}={v}" for k, v in kept) if kept else "")


def select_classes(ds: Dataset, options: dict[str, str]) -> Dataset:
    """The items of the classes chosen by the class-selection ``options`` (see above), relabelled."""
    if ds.task != "classification" or not ds.classnames:
        raise LightCRLError(f"{ds.spec}: class selection needs a classification dataset with class names")
    n = len(ds.classnames)
    n_groups = _int_list("classgroups", options.get("classgroups", "5"))
    seed = _int_list("groupseed", options.get("groupseed", "0"))
    if len(n_groups) != 1 or len(seed) != 1:
        raise LightCRLError(f"{ds.spec}: classgroups and groupseed take one integer each")
    uses_groups = "classgroup" in options or "exclude_classgroup" in options
    groups = class_groups(n, n_groups[0], seed[0]) if uses_groups else []
    keep = set(range(n))
    lower = {name.strip().lower(): i for i, name in enumerate(ds.classnames)}
    for key, include in (("classgroup", True), ("exclude_classgroup", False)):
        if key in options:
            chosen = _int_list(key, options[key])
            bad = [g for g in chosen if not 0 <= g < len(groups)]
            if bad or not chosen:
                raise LightCRLError(f"{ds.spec}: {key}={options[key]!r}: groups are 0..{len(groups) - 1}")
            labels = {label for g in chosen for label in groups[g]}
            keep = keep & labels if include else keep - labels
    for key, include in (("classes", True), ("exclude_classes", False)):
        if key in options:
            names = _name_list(options[key])
            unknown = sorted(names - set(lower))
            if unknown or not names:
                raise LightCRLError(
                    f"{ds.spec}: {key}: unknown class name(s) {', '.join(unknown) or '(none)'}; "
                    f"classes: {', '.join(ds.classnames)}"
                )
            labels = {lower[name] for name in names}
            keep = keep & labels if include else keep - labels
    if not keep:
        raise LightCRLError(f"{ds.spec}: the class selection keeps no class")
    kept = sorted(keep)
    new_label = {old: new for new, old in enumerate(kept)}
    sub = copy.copy(ds)
    sub._media = [replace(r, label=new_label[r.label]) for r in ds._media if r.label in new_label]
    if not sub._media:
        raise LightCRLError(f"{ds.spec}: no items of the selected classes in split {ds.split!r}")
    sub.classnames = [ds.classnames[i] for i in kept]
    sub.skipped = list(ds.skipped)
    sub._fingerprint = None
    return sub
