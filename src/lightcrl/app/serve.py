"""`lightcrl serve INDEX_DIR [INDEX_DIR...]`: an HTTP search service over `lightcrl index` directories.

The run and the index are loaded once at start. Several directories (the parts of a collection, built
with the same run) are searched as one (:class:`lightcrl.app.index.ShardedIndex`: top-k merged by
score, ids numbered across the parts in the order given). Endpoints::

    GET  /                      the search page (search box, thumbnail grid, scores, upload-to-search)
    GET  /api/search?q=TEXT&k=K  -> {"query", "k", "modality", "count", "corrected", "results": [{"id",
                                    "key", "path", "score", "caption", "label", "media"}]}
                                (corrected: the scores are cosine + the run's hubness offset, index.py)
    POST /api/search?k=K        an image (or audio clip) as multipart field ``file`` or as the raw body:
                                query by example, the same JSON
    GET  /media/<id>[?thumb=1]  the file of index row <id> (a JPEG thumbnail with thumb=1)
    GET  /api/info              the index's description (count, modality, structure)

Hardening: it listens on 127.0.0.1 unless told otherwise; media are addressed by index row only and a
file is served only when its real path (symbolic links resolved) lies under the collection's root;
request bodies are capped (413) before they are read in full; uploads are identified by their content,
not their name, and images are checked for their pixel count before they are decoded (decompression
bombs), audio for its duration; every bad input is a 4xx with a one-line ``detail``. Model calls are
serialised by a lock (tokenizers and encoders are not re-entrant); index reads are thread-safe.
"""

from __future__ import annotations

import io
import json
import logging
import mimetypes
import re
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lightcrl.app.index import Item, open_index, run_key
from lightcrl.errors import LightCRLError, SkipItem

log = logging.getLogger(__name__)

#: Image formats accepted as uploads (PIL format names); anything else is refused before decoding.
UPLOAD_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")
_ID = re.compile(r"\d{1,12}")


@dataclass
class Limits:
    """What one request may ask for."""

    max_body_bytes: int = 16 * 2**20
    max_pixels: int = 40_000_000  # 8k x 5k: a photo, not a decompression bomb
    max_audio_seconds: float = 120.0
    max_k: int = 100
    max_query_chars: int = 1000
    thumb_size: int = 320
    thumb_cache: int = 2048  # thumbnails kept in memory (about 20 kB each)


class BadRequest(Exception):
    """A request the server refuses: HTTP ``status`` and a one-line message for the client."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def single_query_threads() -> None:
    """One BLAS / faiss thread per search: a request is one query, and requests run in parallel threads.

    Threads inside one small search only add OpenMP/BLAS barrier waits, worst when other processes keep
    the cores busy.
    """
    import faiss
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(1)
    threadpool_limits(1, user_api="blas")


# -- the service, independent of the web framework ----------------------------------------------------------
class SearchService:
    """The index, the run's pipeline and the request logic (the FastAPI app is a thin layer on it)."""

    def __init__(self, index_dir: str | Path | list[str | Path], device: str = "auto",
                 limits: Limits | None = None, run: str | Path | None = None):
        from lightcrl.rundir import load_pipeline

        self.limits = limits or Limits()
        self.index = open_index(index_dir)  # one directory, or the parts of a collection
        run_dir = Path(run or self.index.info["run"])
        if run_key(run_dir) != self.index.info["run_key"]:
            raise LightCRLError(f"the run {run_dir} changed since {index_dir} was built: run "
                                "`lightcrl index` again (its embeddings would not match the queries)")
        self.pipe = load_pipeline(run_dir, device=device)
        self._model_lock = threading.Lock()
        self._thumbs: OrderedDict[int, bytes] = OrderedDict()
        self._thumbs_lock = threading.Lock()
        for modality in self.pipe.encoder_names:  # load encoders now, not in the first request
            if hasattr(self.pipe, "encoder"):  # (ConVIRT's pipeline loads its own on first use)
                self.pipe.encoder(modality)

    # -- queries --------------------------------------------------------------------------------------
    def check_k(self, k: int) -> int:
        if not 1 <= k <= self.limits.max_k:
            raise BadRequest(422, f"k must be between 1 and {self.limits.max_k}, got {k}")
        return k

    def search_text(self, q: str, k: int) -> dict[str, Any]:
        self.check_k(k)
        q = q.strip()
        if not q:
            raise BadRequest(400, "the query q is empty")
        if len(q) > self.limits.max_query_chars:
            raise BadRequest(413, f"the query is {len(q)} characters long, the limit is "
                                  f"{self.limits.max_query_chars}")
        if "text" not in self.pipe.encoder_names:
            raise BadRequest(400, "this model has no text encoder: search by example (POST) instead")
        with self._model_lock:
            vec = self.pipe.encode_text([q], progress=False)[0]
        return self._answer(q, vec, k)

    def search_upload(self, data: bytes, name: str, k: int) -> dict[str, Any]:
        self.check_k(k)
        modality, item = self.decode_upload(data)
        if modality not in self.pipe.encoder_names:
            raise BadRequest(415, f"this model has no {modality} encoder (it has: "
                                  f"{', '.join(self.pipe.encoder_names)})")
        try:
            with self._model_lock:
                encode = self.pipe.encode_image if modality == "image" else self.pipe.encode_audio
                vec = encode([item], progress=False)[0]
        except SkipItem as e:  # e.g. silent audio
            raise BadRequest(400, f"cannot use this {modality}: {e}") from e
        return self._answer(name or f"uploaded {modality}", vec, k, modality)

    def decode_upload(self, data: bytes) -> tuple[str, Any]:
        """Identify an upload by its content: ('image', RGB PIL image) or ('audio', (waveform, rate))."""
        if not data:
            raise BadRequest(400, "the upload is empty")
        image = self._decode_image(data)
        if image is not None:
            return "image", image
        audio = self._decode_audio(data)
        if audio is not None:
            return "audio", audio
        raise BadRequest(415, "the upload is not an image (JPEG, PNG, WebP, GIF, BMP, TIFF) or an audio clip "
                              "(WAV, FLAC, OGG) this server can read")

    def _decode_image(self, data: bytes):
        from PIL import Image, ImageOps, UnidentifiedImageError

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im = Image.open(io.BytesIO(data), formats=UPLOAD_IMAGE_FORMATS)
        except UnidentifiedImageError:
            return None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadRequest(413, f"the image is too large: {e}") from e
        except Exception as e:  # noqa: BLE001 -- a header PIL recognises but cannot parse
            raise BadRequest(400, f"cannot read the image header: {type(e).__name__}: {e}") from e
        w, h = im.size
        if w < 1 or h < 1 or w * h > self.limits.max_pixels:
            raise BadRequest(413, f"the image is {w}x{h} pixels, the limit is {self.limits.max_pixels:,}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im.load()  # the first frame only; truncated data fails here
                return ImageOps.exif_transpose(im).convert("RGB")
        except Exception as e:  # noqa: BLE001 -- PIL raises many types for bad data
            raise BadRequest(400, f"cannot decode the {im.format} image: {type(e).__name__}: {e}") from e

    def _decode_audio(self, data: bytes):
        import soundfile as sf

        try:
            info = sf.info(io.BytesIO(data))
        except Exception:  # noqa: BLE001 -- not audio that libsndfile knows
            return None
        if info.samplerate <= 0 or info.channels <= 0 or info.frames < 0:
            raise BadRequest(400, "the audio header is invalid")
        seconds = info.frames / info.samplerate
        if seconds > self.limits.max_audio_seconds or info.channels > 16:
            raise BadRequest(413, f"the clip is {seconds:.0f} s with {info.channels} channels, the limit is "
                                  f"{self.limits.max_audio_seconds:.0f} s and 16 channels")
        try:
            wav, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True,
                                frames=int(self.limits.max_audio_seconds * info.samplerate) + 1)
        except Exception as e:  # noqa: BLE001
            raise BadRequest(400, f"cannot decode the audio: {type(e).__name__}: {e}") from e
        return wav.T, int(rate)

    def _answer(self, query: str, vec: np.ndarray, k: int, modality: str = "text") -> dict[str, Any]:
        ids, scores = self.index.search(vec, k, modality)
        items = self.index.items(ids)
        results = [self._result(item, float(s)) for item, s in zip(items, scores)]
        # corrected: scores are cosine + the item's hubness offset for this query modality (index.py)
        return {"query": query, "query_modality": modality, "k": k, "modality": self.index.modality,
                "count": len(self.index), "corrected": modality in self.index.hubness_modalities,
                "results": results}

    def _result(self, item: Item, score: float) -> dict[str, Any]:
        return {"id": item.id, "key": item.key, "path": self._rel(item), "score": round(score, 6),
                "caption": item.caption, "label": item.label,
                "media": f"/media/{item.id}" if item.path else None}

    def _root(self, item_id: int) -> Path | None:
        root = self.index.root_of(item_id)
        return root.resolve() if root else None

    def _rel(self, item: Item) -> str | None:
        root = self._root(item.id)
        if item.path is None or root is None:
            return item.path
        try:
            return Path(item.path).relative_to(root).as_posix()
        except ValueError:
            return Path(item.path).name

    def describe(self) -> dict[str, Any]:
        info = self.index.info
        return {"count": info["count"], "modality": info["modality"], "dim": info["dim"],
                "structure": info["structure"]["kind"], "parts": len(info.get("parts", [])) or 1,
                "hubness_corrected": self.index.hubness_modalities,
                "encoders": sorted(self.pipe.encoder_names),
                "max_k": self.limits.max_k, "max_upload_bytes": self.limits.max_body_bytes}

    # -- media ----------------------------------------------------------------------------------------
    def media_item(self, raw_id: str) -> tuple[Item, Path | None]:
        """The item of row ``raw_id`` and its file, checked to lie inside the collection (else 404)."""
        from lightcrl.data.media import split_container

        if not _ID.fullmatch(raw_id):
            raise BadRequest(404, "no such item")
        item = self.index.item(int(raw_id))
        root = self._root(item.id) if item is not None else None
        if item is None or item.path is None or root is None:
            raise BadRequest(404, "no such item")
        container, member = split_container(item.path)
        real = Path(container).resolve()
        if not real.is_relative_to(root) or not real.is_file():
            raise BadRequest(404, "no such item")
        return item, (real if member is None else None)

    def media_bytes(self, item: Item) -> tuple[bytes, str]:
        """A member of a container (tar, CIFAR batch) decoded and re-encoded as PNG."""
        from lightcrl.data.media import load_image

        if self.index.modality != "image":
            raise BadRequest(404, "no such item")
        try:
            im = load_image(item.path)
        except SkipItem as e:
            raise BadRequest(404, "the item's file is unreadable") from e
        buf = io.BytesIO()
        im.save(buf, "PNG")
        return buf.getvalue(), "image/png"

    def thumbnail(self, item: Item) -> bytes:
        """A JPEG thumbnail of an image item (kept in a bounded cache)."""
        from PIL import Image, ImageOps

        with self._thumbs_lock:
            if item.id in self._thumbs:
                self._thumbs.move_to_end(item.id)
                return self._thumbs[item.id]
        if self.index.modality != "image":
            raise BadRequest(404, "no thumbnail for this item")
        try:
            from lightcrl.data.media import load_image

            size = self.limits.thumb_size
            if "::" in item.path:
                im = load_image(item.path)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    im = Image.open(item.path)
                    im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale
                    im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=85)
        except Exception as e:  # noqa: BLE001 -- a collection file changed or broke since indexing
            raise BadRequest(404, "the item's file is unreadable") from e
        data = buf.getvalue()
        with self._thumbs_lock:
            self._thumbs[item.id] = data
            while len(self._thumbs) > self.limits.thumb_cache:
                self._thumbs.popitem(last=False)
        return data


# -- ASGI ---------------------------------------------------------------------------------------------------
class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` with 413 before the app reads them.

    A declared Content-Length over the limit is refused at once; otherwise the body is read here, up to
    the limit, and replayed to the app (so chunked uploads are capped too).
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _plain(send, 400, "invalid Content-Length")
            if int(length) > self.max_bytes:
                return await _plain(send, 413, f"the body is {int(length):,} bytes, the limit is "
                                               f"{self.max_bytes:,}")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _plain(send, 413, f"the body is over the limit of {self.max_bytes:,} bytes")
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


async def _plain(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; media-src 'self'; "
                               "style-src 'unsafe-inline'; script-src 'unsafe-inline'; object-src 'none'",
}


def create_app(service: SearchService):
    """The FastAPI app over ``service`` (wrapped in :class:`BodyLimit`)."""
    from lightcrl.app.serve_page import render_page

    api = FastAPI(title="lightcrl search", docs_url=None, redoc_url=None, openapi_url=None)
    limits = service.limits

    @api.exception_handler(BadRequest)
    async def _bad(request: Request, exc: BadRequest):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("query", "path", "body"))
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    @api.middleware("http")
    async def _headers(request: Request, call_next):
        response = await call_next(request)
        for k, v in _SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response

    @api.get("/api/search")
    def get_search(q: str = Query(..., max_length=limits.max_query_chars),
                   k: int = Query(10, ge=1, le=limits.max_k)):
        return service.search_text(q, k)

    @api.post("/api/search")
    async def post_search(request: Request, k: int = Query(10, ge=1, le=limits.max_k)):
        ctype = request.headers.get("content-type", "")
        name = ""
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=4)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise BadRequest(400, "send the image or audio clip as the multipart field 'file'")
            data, name = await upload.read(), upload.filename or ""
        else:
            data = await request.body()
        return await run_in_threadpool(service.search_upload, data, Path(name).name[:200], k)

    @api.get("/api/info")
    def info():
        return service.describe()

    @api.get("/media/{item_id}")
    def media(item_id: str, thumb: int = Query(0, ge=0, le=1)):
        item, path = service.media_item(item_id)
        if thumb:
            return Response(service.thumbnail(item), media_type="image/jpeg",
                            headers={"Cache-Control": "max-age=3600"})
        if path is None:
            data, mime = service.media_bytes(item)
            return Response(data, media_type=mime)
        mime = mimetypes.guess_type(path.name)[0] or ""
        if not mime.startswith(("image/", "audio/")):
            mime = "application/octet-stream"
        return FileResponse(path, media_type=mime, headers={"Cache-Control": "max-age=3600"})

    @api.get("/", response_class=HTMLResponse)
    def page(q: str = Query("", max_length=limits.max_query_chars),
             k: int = Query(24, ge=1, le=limits.max_k)):
        initial = None
        if q.strip():
            try:
                initial = service.search_text(q, k)
            except BadRequest as e:
                initial = {"query": q, "error": e.detail, "results": []}
        return HTMLResponse(render_page(service.describe(), initial, q, k))

    return BodyLimit(api, limits.max_body_bytes)


def serve(index_dir: str | Path | list[str | Path], host: str = "127.0.0.1", port: int = 8000,
          device: str = "auto", limits: Limits | None = None) -> None:
    """Load the index (or the parts of one) and run the server until interrupted."""
    import uvicorn

    service = SearchService(index_dir, device=device, limits=limits)
    # process-wide (OpenMP / BLAS): set by the server process only, never by a SearchService built in a
    # library user's process (it left torch at one thread for everything after it)
    single_query_threads()
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: the server has no authentication, anyone who reaches this address "
                    "can search the index and read its media", host)
    uvicorn.run(create_app(service), host=host, port=port, log_level="info", workers=1,
                timeout_graceful_shutdown=5)
