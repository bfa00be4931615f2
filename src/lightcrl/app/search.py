"""`lightcrl search`: text-to-image search over a folder of images, with a cached incremental index.

The index keeps the frozen image encoder's token features of every image under the folder, in
``$LIGHTCRL_CACHE/search/<folder>-<hash>/`` (keyed by the folder's absolute path and the encoder). Each
search lists the folder again: images whose (size, mtime) are unchanged are reused, new or modified ones
are embedded, deleted ones dropped. A trained run turns the cached features into embeddings (cached per
run and folder state), so a repeated query costs one text encoding and a matrix product.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lightcrl.errors import LightCRLError
from lightcrl.io import locked, read_json, save_npy, write_json, write_text
from lightcrl.paths import cache_dir

log = logging.getLogger(__name__)
INDEX_VERSION = 1


@dataclass
class IndexStats:
    """What an update did: ``embedded`` images were run through the encoder, ``reused`` were not."""

    total: int = 0
    embedded: int = 0
    reused: int = 0
    removed: int = 0
    skipped: int = 0  # unreadable images (kept out of the index until they change)


@dataclass
class SearchHit:
    rank: int
    path: Path
    rel: str
    score: float


@dataclass
class SearchResult:
    query: str
    hits: list[SearchHit]
    stats: IndexStats
    index_dir: Path
    html: Path | None = None
    n_images: int = 0
    notes: list[str] = field(default_factory=list)


def list_media(folder: Path, modality: str = "image") -> dict[str, tuple[int, int]]:
    """Relative POSIX path -> (size, mtime_ns) of every image (or audio) file under ``folder``.

    Hidden files and folders are skipped, and so are symbolic links that lead outside ``folder``.
    """
    from lightcrl.data.datasets import AUDIO_EXTS, IMAGE_EXTS

    exts = AUDIO_EXTS if modality == "audio" else IMAGE_EXTS
    root = folder.resolve()
    found: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in exts:
                continue
            p = Path(dirpath, name)
            try:
                st = p.stat()
                if p.is_symlink() and not p.resolve().is_relative_to(root):
                    continue  # an index (and a server of it) never reaches outside the folder
            except OSError:
                continue
            # an empty file too: it fails to decode and is counted as unreadable, not ignored
            found[p.relative_to(folder).as_posix()] = (st.st_size, st.st_mtime_ns)
    return found


class FolderIndex:
    """Frozen-encoder features of the images (or audio clips) under one folder, cached and updated
    incrementally."""

    def __init__(self, folder: str | Path, encoder: str = "efficientnet-lite0", device: str = "auto",
                 modality: str = "image"):
        self.folder = Path(folder).expanduser().resolve()
        if not self.folder.is_dir():
            raise LightCRLError(f"{modality} folder not found: {folder}")
        self.encoder_name = encoder
        self.device = device
        self.modality = modality
        key = hashlib.sha256(f"{self.folder}|{encoder}".encode()).hexdigest()[:16]
        label = re.sub(r"[^A-Za-z0-9_.-]", "_", self.folder.name)[:40] or "root"
        self.dir = cache_dir() / "search" / f"{label}-{key}"
        self.meta: dict = {}
        self._arrays: dict[str, np.ndarray] = {}

    # -- state ---------------------------------------------------------------------------------------------
    @property
    def files(self) -> list[str]:
        return [f["path"] for f in self.meta.get("files", [])]

    @property
    def listing_hash(self) -> str:
        """Identifies the indexed folder state (used to key cached run embeddings)."""
        return self.meta.get("listing_hash", "")

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, encoder_fp: str) -> dict | None:
        p = self.dir / "index.json"
        if not p.is_file():
            return None
        try:
            meta = read_json(p)
        except (OSError, ValueError):
            return None
        if meta.get("version") != INDEX_VERSION or meta.get("encoder_fingerprint") != encoder_fp:
            return None  # other encoder weights or preprocessing: rebuild
        gen = meta["generation"]
        try:
            arrays = {k: np.load(self.dir / f"{k}-{gen}.npy", mmap_mode="r") for k in ("tokens", "offsets",
                                                                                      "pooled")}
        except (OSError, ValueError):
            return None
        self._arrays = arrays
        return meta

    def item_tokens(self, i: int) -> np.ndarray:
        off = self._arrays["offsets"]
        return np.asarray(self._arrays["tokens"][off[i] : off[i + 1]])

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded tokens [B, T, D] float32, mask [B, T], pooled [B, D] for the given items."""
        toks = [self.item_tokens(int(i)) for i in indices]
        T = max((t.shape[0] for t in toks), default=0)
        D = int(self._arrays["pooled"].shape[1])
        out = np.zeros((len(toks), T, D), np.float32)
        mask = np.zeros((len(toks), T), bool)
        for r, t in enumerate(toks):
            out[r, : len(t)], mask[r, : len(t)] = t, True
        pooled = np.asarray(self._arrays["pooled"][np.asarray(indices)], np.float32)
        return torch.from_numpy(out), torch.from_numpy(mask), torch.from_numpy(pooled)

    # -- update --------------------------------------------------------------------------------------------
    def update(self, batch_size: int = 32, progress: bool = False) -> IndexStats:
        """Bring the index in line with the folder: embed only new or changed images."""
        from lightcrl.encoders import get_encoder

        enc = get_encoder(self.encoder_name, device=self.device)
        if enc.modality != self.modality:
            raise LightCRLError(f"indexing {self.modality} needs an {self.modality} encoder, "
                                f"{self.encoder_name} is {enc.modality}")
        fp = enc.fingerprint()
        with locked(self.dir / ".lock"):
            old = self._load(fp) or {}
            current = list_media(self.folder, self.modality)
            old_files = {f["path"]: f for f in old.get("files", [])}
            old_skipped = old.get("skipped", {})
            keep = {p: f for p, f in old_files.items() if current.get(p) == (f["size"], f["mtime_ns"])}
            still_bad = {p: s for p, s in old_skipped.items() if current.get(p) == (s["size"], s["mtime_ns"])}
            new = [p for p in current if p not in keep and p not in still_bad]
            removed = len(old_files) - len(keep)
            stats = IndexStats(total=len(keep), reused=len(keep), removed=removed, skipped=len(still_bad))
            if old and not new and not removed and len(still_bad) == len(old_skipped):
                self.meta = old
                return stats
            embedded, bad = self._embed(enc, new, batch_size, progress) if new else ({}, {})
            for p, reason in bad.items():
                still_bad[p] = {"size": current[p][0], "mtime_ns": current[p][1], "reason": reason}
            stats.embedded, stats.skipped = len(embedded), len(still_bad)
            stats.total = len(keep) + len(embedded)
            self._write(old, fp, enc.dim, current, keep, embedded, still_bad)
        if bad:
            log.warning("search index: %d unreadable file(s) left out: %s", len(bad),
                        ", ".join(list(bad)[:5]))
        return stats

    def _embed(self, enc, paths: list[str], batch_size: int, progress: bool
               ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, str]]:
        from tqdm.auto import tqdm

        done: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        bad: dict[str, str] = {}
        bar = tqdm(total=len(paths), desc=f"index {self.folder.name}", unit="item",
                   disable=not progress or len(paths) < batch_size)
        for s in range(0, len(paths), batch_size):
            chunk, items = [], []
            for p in paths[s : s + batch_size]:
                try:
                    items.append(enc.transform(self.folder / p))
                    chunk.append(p)
                except Exception as e:  # noqa: BLE001 -- one odd file must not stop the index
                    bad[p] = f"{type(e).__name__}: {e}"
            if items:
                o = enc.encode_batch(enc.collate(items))
                lengths = o.mask.sum(1).cpu().numpy()
                tok = o.tokens.to(torch.float16).cpu().numpy()
                pooled = o.pooled.float().cpu().numpy()
                for r, p in enumerate(chunk):
                    done[p] = (tok[r, : lengths[r]], pooled[r])
            bar.update(len(paths[s : s + batch_size]))
        bar.close()
        return done, bad

    def _write(self, old: dict, fp: str, dim: int, current: dict, keep: dict, embedded: dict,
               skipped: dict) -> None:
        order = sorted([*keep, *embedded])
        tokens, pooled, files = [], [], []
        old_pos = {f["path"]: i for i, f in enumerate(old.get("files", []))}
        for p in order:
            if p in embedded:
                t, pv = embedded[p]
            else:  # copied from the previous generation, not re-embedded
                i = old_pos[p]
                t, pv = self.item_tokens(i), np.asarray(self._arrays["pooled"][i])
            tokens.append(np.asarray(t, np.float16))
            pooled.append(np.asarray(pv, np.float32))
            files.append({"path": p, "size": current[p][0], "mtime_ns": current[p][1]})
        lengths = np.array([len(t) for t in tokens], np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        gen = int(old.get("generation", 0)) + 1
        save_npy(self.dir / f"tokens-{gen}.npy",
                 np.concatenate(tokens) if tokens else np.zeros((0, dim), np.float16))
        save_npy(self.dir / f"offsets-{gen}.npy", offsets)
        save_npy(self.dir / f"pooled-{gen}.npy",
                 np.stack(pooled) if pooled else np.zeros((0, dim), np.float32))
        listing = hashlib.sha256(json.dumps([[f["path"], f["size"], f["mtime_ns"]] for f in files]).encode())
        meta = {"version": INDEX_VERSION, "folder": str(self.folder), "encoder": self.encoder_name,
                "encoder_fingerprint": fp, "generation": gen, "listing_hash": listing.hexdigest(),
                "files": files, "skipped": skipped}
        write_json(self.dir / "index.json", meta, indent=None)  # last: the new generation is now live
        for p in self.dir.glob("*-*.npy"):  # earlier generations
            stem = p.stem.rsplit("-", 1)
            if stem[0] in ("tokens", "offsets", "pooled") and stem[-1] != str(gen):
                p.unlink(missing_ok=True)
        self.meta = meta
        self._load(fp)


#: The name it had when it held images only.
ImageIndex = FolderIndex


# -- search -----------------------------------------------------------------------------------------------
def folder_embeddings(pipe, index: FolderIndex, batch_size: int = 256) -> np.ndarray:
    """The run's embeddings [N, d] of every indexed file, cached beside the index per run."""
    from lightcrl.app.index import run_key

    key = run_key(pipe.run_dir) if pipe.run_dir is not None else None
    path = index.dir / f"emb-{key}-{index.listing_hash[:16]}.npy" if key else None
    if path is not None and path.is_file():
        emb = np.load(path)
        if len(emb) == len(index):
            return emb
    out = []
    for s in range(0, len(index), batch_size):
        tok, mask, pooled = index.batch(np.arange(s, min(s + batch_size, len(index))))
        inputs = pipe.adapter.from_encoder(index.modality, tok, mask, pooled)
        out.append(pipe.encode_features(index.modality, *inputs).numpy())
    emb = np.concatenate(out) if out else np.zeros((0, pipe.model.embed_dim), np.float32)
    if path is not None:
        for old in index.dir.glob(f"emb-{key}-*.npy"):
            old.unlink(missing_ok=True)
        save_npy(path, emb.astype(np.float32))
    return emb


def search(run_dir: str | Path, images: str | Path, query: str, top: int = 8,
           out_html: str | Path | None = None, device: str = "auto", progress: bool = False,
           threads: int | None = None) -> SearchResult:
    """Rank the images under ``images`` by similarity to ``query``; optionally write an HTML gallery.

    ``threads``: torch CPU threads while indexing (None: the cores other processes leave idle).
    """
    from lightcrl.app.quickstart import cpu_threads

    if not query.strip():
        raise LightCRLError("the query is empty")
    with cpu_threads(threads, device):
        return _search(run_dir, images, query, top, out_html, device, progress)


def _search(run_dir, images, query: str, top: int, out_html, device: str, progress: bool) -> SearchResult:
    from lightcrl.api import LightCRLPipeline
    from lightcrl.hubness import gallery_offsets

    pipe = LightCRLPipeline.from_run(run_dir, device=device)
    index = FolderIndex(images, pipe.encoder_names.get("image") or _no_image(run_dir), device=device)
    stats = index.update(progress=progress)
    result = SearchResult(query, [], stats, index.dir, n_images=len(index))
    if len(index) == 0:
        result.notes.append(f"no readable images under {index.folder}")
    else:
        emb = folder_embeddings(pipe, index)
        q = pipe.encode_text([query], progress=False)[0]
        scores = emb @ q
        offsets = gallery_offsets(pipe.model, emb, "image").get("text")
        if offsets is not None:  # the run's hubness correction, as its retrieval eval ranks
            scores = scores + offsets
            result.notes.append("scores are cosine + hubness offset (model.hubness)")
        order = np.argsort(-scores, kind="stable")[: max(1, top)]
        result.hits = [SearchHit(r + 1, index.folder / index.files[i], index.files[i], float(scores[i]))
                       for r, i in enumerate(order)]
    if out_html is not None:
        result.html = write_gallery(result, Path(out_html), run_dir=Path(run_dir), folder=index.folder)
    return result


def _no_image(run_dir) -> str:
    raise LightCRLError(f"the run {run_dir} has no image encoder: search needs an image-text model")


def default_html(run_dir: str | Path, query: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", query.lower()).strip("-")[:60] or "query"
    return Path(run_dir) / "search" / f"{slug}.html"


# -- gallery ----------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;
padding:0 1em;color:#222}
h1{font-weight:600;margin-bottom:.2em}.meta{color:#666;font-size:.9em;margin-top:0}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:14px;margin-top:1.2em}
figure{margin:0;border:1px solid #ddd;border-radius:6px;overflow:hidden;background:#fafafa}
figure img{display:block;width:100%;height:220px;object-fit:contain;background:#fff}
figcaption{padding:.45em .6em;font-size:.85em}.rank{font-weight:600}
.score{float:right;font-variant-numeric:tabular-nums;color:#1a5fb4}
.path{display:block;color:#555;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.bar{height:4px;background:#1a5fb4;margin-top:.3em;border-radius:2px}
""".strip()


def _thumbnail(path: Path, size: int = 320) -> str | None:
    """A base64 JPEG thumbnail (the gallery stands alone), or None when the file cannot be read."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=85)
    except Exception:  # noqa: BLE001 -- a file changed since indexing: show its name only
        return None
    return base64.b64encode(buf.getvalue()).decode("ascii")


def write_gallery(result: SearchResult, out: Path, run_dir: Path, folder: Path) -> Path:
    """A self-contained HTML page of the hits (thumbnails embedded), linking to the full images."""
    s = result.stats
    e = html.escape
    top_score = max((h.score for h in result.hits), default=1.0)
    cards = []
    for h in result.hits:
        thumb = _thumbnail(h.path)
        img = (f'<img src="data:image/jpeg;base64,{thumb}" alt="{e(h.rel, quote=True)}">' if thumb
               else f'<p>{e(h.rel)} (unreadable)</p>')
        width = max(2.0, 100.0 * max(h.score, 0.0) / max(top_score, 1e-9))
        cards.append(
            f'<figure><a href="{e(h.path.resolve().as_uri(), quote=True)}">{img}</a>'
            f'<figcaption><span class="rank">#{h.rank}</span><span class="score">{h.score:.3f}</span>'
            f'<span class="path" title="{e(h.rel, quote=True)}">{e(h.rel)}</span>'
            f'<div class="bar" style="width:{width:.0f}%"></div></figcaption></figure>')
    notes = "".join(f"<p class=\"meta\">{e(n)}</p>" for n in result.notes)
    page = "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(result.query)} - lightcrl search</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
        f"<h1>{e(result.query)}</h1>",
        f'<p class="meta">Top {len(result.hits)} of {result.n_images} images in '
        f"<code>{e(str(folder))}</code>, "
        f"ranked by similarity with run <code>{e(str(run_dir))}</code>. Index: {s.embedded} embedded, "
        f"{s.reused} reused, {s.removed} removed, {s.skipped} unreadable.</p>",
        notes, f'<div class="grid">{"".join(cards)}</div>', "</body>", "</html>", ""])
    write_text(out, page)
    return out
