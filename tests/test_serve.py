"""`lightcrl index` + `lightcrl serve` on a toy run: index structures, metadata, export, the HTTP API,
hostile traffic against a live server, and the page in a real browser."""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import socket
import sqlite3
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import make_pairs_csv
from PIL import Image
from test_train import toy_config

from lightcrl.app.cli import main
from lightcrl.app.config import validate_config
from lightcrl.app.index import SearchIndex, build_index, choose_structure
from lightcrl.app.search import FolderIndex
from lightcrl.app.serve import Limits, SearchService, create_app
from lightcrl.app.train import train
from lightcrl.errors import LightCRLError


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A toy run trained on 40 coloured squares and the exact index of its collection."""
    root = tmp_path_factory.mktemp("serve")
    spec = make_pairs_csv(root / "pairs", n=40)
    cfg = validate_config(toy_config(spec, **{"optim.epochs": 8}))
    train(cfg, root / "run")
    build_index(root / "run", spec, root / "index", progress=False)
    return {"root": root, "spec": spec, "run": root / "run", "index": root / "index",
            "images": root / "pairs"}


def _top(index_dir: Path, service_vec: np.ndarray, k: int = 5) -> list[int]:
    return SearchIndex(index_dir).search(service_vec, k)[0].tolist()


# -- the index --------------------------------------------------------------------------------
def test_structure_follows_size_and_memory():
    assert choose_structure(50_000, 256)["kind"] == "exact"
    ivf = choose_structure(1_000_000, 256)
    assert ivf["kind"] == "ivfpq" and ivf["nlist"] == 4096 and ivf["m"] == 32 and ivf["nbits"] == 8
    assert ivf["nprobe"] == 1024 and ivf["train"] == 40 * 4096
    hnsw = choose_structure(1_000_000, 256, kind="hnsw")  # 1.5 GB of vectors + graph fits 4 GB
    assert hnsw["kind"] == "hnsw" and hnsw["M"] == 16
    with pytest.raises(LightCRLError, match="use --structure ivfpq"):
        choose_structure(1_000_000, 256, memory_mb=1024, kind="hnsw")
    assert choose_structure(10, 256, exact_max=0, memory_mb=0)["nlist"] == 1  # tiny: still valid


def test_index_metadata_and_every_structure_agree(toy):
    from lightcrl.rundir import load_pipeline

    con = sqlite3.connect(toy["index"] / "items.sqlite")
    rows = con.execute("SELECT id, key, path, caption, size FROM items ORDER BY id").fetchall()
    assert len(rows) == 40 and [r[0] for r in rows] == list(range(40))
    assert rows[0][1] == "img000.png" and rows[0][3].startswith("a red square")
    assert rows[0][4] == (toy["images"] / "img000.png").stat().st_size
    emb = np.load(toy["index"] / "embeddings.npy")
    assert emb.shape == (40, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)

    q = load_pipeline(toy["run"]).encode_text(["a blue square"], progress=False)[0]
    exact = _top(toy["index"], q)
    for name, kw in (("hnsw", {"structure": "hnsw"}), ("ivfpq", {"exact_max": 0, "memory_mb": 0})):
        out = toy["root"] / f"index-{name}"
        res = build_index(toy["run"], toy["spec"], out, progress=False, **kw)
        assert res.structure == name and (out / "faiss.index").is_file()
        assert _top(out, q, 1) == exact[:1]
    ids, scores = SearchIndex(toy["index"]).search(q, 5)
    assert np.all(np.diff(scores) <= 0) and np.allclose(scores, emb[ids] @ q, atol=1e-5)


def test_text_index_holds_captions(toy):
    res = build_index(toy["run"], toy["spec"], toy["root"] / "captions", modality="text", progress=False)
    assert (res.count, res.modality) == (80, "text")
    item = SearchIndex(res.dir).item(0)
    assert item.path is None and item.caption


def test_folder_index_embeds_only_changes(toy, tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        (folder / f"img{i:03d}.png").write_bytes((toy["images"] / f"img{i:03d}.png").read_bytes())
    out = tmp_path / "index"
    assert build_index(toy["run"], str(folder), out, progress=False).count == 5
    embedded: list[list[str]] = []
    original = FolderIndex._embed

    def spy(self, enc, paths, *args, **kwargs):
        embedded.append(list(paths))
        return original(self, enc, paths, *args, **kwargs)

    monkeypatch.setattr(FolderIndex, "_embed", spy)
    (folder / "img000.png").unlink()
    (folder / "new.png").write_bytes((toy["images"] / "img010.png").read_bytes())
    (folder / "outside.png").symlink_to(toy["images"] / "img011.png")  # leads out of the folder: left out
    res = build_index(toy["run"], str(folder), out, progress=False)
    assert embedded == [["new.png"]] and res.count == 5
    keys = [i.key for i in SearchIndex(out).items(range(5))]
    assert sorted(keys) == ["img001.png", "img002.png", "img003.png", "img004.png", "new.png"]


def test_clip_retrieval_export_and_cli(toy, tmp_path, capsys):
    import pyarrow.parquet as pq

    dest = tmp_path / "cr"
    code = main(["index", "--run", str(toy["run"]), "--data", toy["spec"], "--out", str(tmp_path / "ix"),
                 "--export", "clip-retrieval", str(dest)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "indexed 40 image items (exact search)" in printed
    img = np.load(dest / "img_emb" / "img_emb_0.npy")
    txt = np.load(dest / "text_emb" / "text_emb_0.npy")
    assert img.shape == txt.shape == (40, 32) and img.dtype == np.float16
    meta = pq.read_table(dest / "metadata" / "metadata_0.parquet").to_pydict()
    assert meta["caption"][0].startswith("a red square") and meta["image_path"][0].endswith("img000.png")
    assert np.allclose(img, np.load(tmp_path / "ix" / "embeddings.npy"), atol=1e-3)
    assert main(["index", "--run", str(toy["run"]), "--data", "nope:/x", "--out", str(tmp_path / "y")]) == 2


def test_a_search_service_leaves_the_process_thread_counts_alone(toy):
    """One thread per search is the server's setting (``serve``), not a side effect of building the service
    in a library user's process: it once left torch at one thread for everything after it."""
    import torch

    before = torch.get_num_threads()
    SearchService(toy["index"])
    assert torch.get_num_threads() == before


# -- the API ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def service(toy):
    return SearchService(toy["index"], limits=Limits(max_body_bytes=256 * 1024, max_pixels=1_000_000))


@pytest.fixture(scope="module")
def client(service):
    from fastapi.testclient import TestClient

    return TestClient(create_app(service))


def _png(rgb=(220, 30, 30), size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, "PNG")
    return buf.getvalue()


def test_text_query_returns_json_results(client):
    r = client.get("/api/search", params={"q": "a red square", "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == "a red square" and len(body["results"]) == 5
    first = body["results"][0]
    assert set(first) >= {"id", "path", "score", "caption"} and "red" in first["caption"]
    assert first["path"].endswith(".png") and not first["path"].startswith("/")
    scores = [x["score"] for x in body["results"]]
    assert scores == sorted(scores, reverse=True)


def test_query_by_example_finds_the_image_itself(client, toy):
    data = (toy["images"] / "img013.png").read_bytes()
    r = client.post("/api/search?k=3", files={"file": ("q.png", data, "image/png")})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["key"] == "img013.png" and r.json()["query"] == "q.png"
    raw = client.post("/api/search?k=3", content=data, headers={"content-type": "application/octet-stream"})
    assert raw.json()["results"] == r.json()["results"]


def test_media_and_page(client, toy):
    r = client.get("/media/7")
    assert r.status_code == 200 and r.content == (toy["images"] / "img007.png").read_bytes()
    assert r.headers["content-type"] == "image/png" and r.headers["x-content-type-options"] == "nosniff"
    thumb = client.get("/media/7?thumb=1")
    assert thumb.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(thumb.content)).size
    for bad in ("/media/40", "/media/-1", "/media/abc", "/media/..%2Fpairs.csv"):
        assert client.get(bad).status_code == 404, bad
    page = client.get("/", params={"q": "a green </script><b>x"})
    assert page.status_code == 200 and "</script><b>" not in page.text  # embedded JSON is escaped
    assert '"results"' in page.text and 'id="grid"' in page.text


@pytest.mark.parametrize("files, status", [
    ({"file": ("a.png", b"", "image/png")}, 400),
    ({"file": ("a.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "image/png")}, 415),  # a signature only
    ({"file": ("a.png", _png(size=(64, 64))[:-30], "image/png")}, 400),  # truncated
    ({"file": ("a.txt", b"hello world", "text/plain")}, 415),
    ({"other": ("a.png", b"x", "image/png")}, 400),
])
def test_bad_uploads_are_4xx(client, files, status):
    r = client.post("/api/search", files=files)
    assert r.status_code == status, r.text
    assert r.json()["detail"]


# -- hostile traffic against a live server ------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(service: SearchService):
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started, "the server did not start"
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming huge dimensions, with a tiny (compressed) body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\0" * 1024, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _multipart(data: bytes, name: str = "x.png", field: str = "file") -> tuple[bytes, str]:
    boundary = "lightcrlboundary7MA4YWxk"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n")
    body = head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _hostile_requests(images: Path, secret: Path) -> list[tuple[str, str, bytes | None, dict]]:
    """(method, raw path, body, headers): traversal, oversized, corrupt, bad parameters, normal ones."""
    reqs: list[tuple[str, str, bytes | None, dict]] = []
    targets = [str(secret), "etc/passwd", "../secret.txt", "../../secret.txt", "pairs.csv",
               "../pairs/pairs.csv"]
    prefixes = ["/media/", "/media/0/", "/media/../", "/", "/static/", "/media/%2e%2e/", "/media/..%2f",
                "/media/%2e%2e%2f", "/media/..\\", "/media/%252e%252e/", "/media//", "/media/0%2f..%2f"]
    for pre in prefixes:
        for t in targets:
            for variant in (t, t.replace("/", "%2f"), t.replace("/", "%2F").replace(".", "%2e"),
                            t.replace("../", "....//"), t.replace("/", "\\")):
                reqs.append(("GET", pre + variant, None, {}))
    for raw in ("-1", "40", "1e3", "0x1", "01", "00000000000007", "9" * 30, "7%00", "7;x", " 7", "7?thumb=2",
                "7?thumb=-1", "%37", "7.0", "\u0661"):
        reqs.append(("GET", "/media/" + raw.replace(" ", "%20").replace("\u0661", "%D9%A1"), None, {}))
    for k in ("0", "-1", "101", "abc", "1e9", "", "99999999999999999999", "5.5", "%00"):
        reqs.append(("GET", f"/api/search?q=red&k={k}", None, {}))
    for q in ("", "%20%20", "a" * 1500, "%00%00", "%ff%fe", "%F0%9F%90%B6+dog", "<script>alert(1)</script>",
              "red&q=blue", "red%0d%0aX-Injected:+1"):
        reqs.append(("GET", f"/api/search?q={q}&k=5", None, {}))
        reqs.append(("GET", f"/?q={q}", None, {}))
    reqs += [("GET", "/api/search", None, {}), ("GET", "/api/search?k=5", None, {}),
             ("PUT", "/api/search?q=red", b"", {}), ("DELETE", "/media/1", None, {}),
             ("GET", "/" + "a" * 4000, None, {}), ("GET", "/api/info", None, {})]
    real = (images / "img001.png").read_bytes()
    bodies = {
        "truncated": real[: len(real) // 2], "header-only": real[:40], "random": os.urandom(3000),
        "bomb": _bomb_png(60_000, 60_000), "bomb2": _bomb_png(1, 2**31 - 1), "zero-dim": _bomb_png(0, 0),
        "gif-garbage": b"GIF89a" + os.urandom(200), "jpeg-garbage": b"\xff\xd8\xff\xe0" + os.urandom(500),
        "wav-garbage": b"RIFF\x24\x00\x00\x00WAVEfmt " + os.urandom(64), "html": b"<html>hi</html>",
        "svg": b"<svg xmlns='http://www.w3.org/2000/svg'/>", "empty": b"", "json": b'{"q": "red"}',
    }
    for data in bodies.values():
        body, ctype = _multipart(data)
        reqs.append(("POST", "/api/search?k=5", body, {"Content-Type": ctype}))
        reqs.append(("POST", "/api/search?k=5", data, {"Content-Type": "image/png"}))
    big = b"\0" * (300 * 1024)  # over the 256 kB limit of this server
    reqs += [
        ("POST", "/api/search", big, {"Content-Type": "image/png"}),
        ("POST", "/api/search", _multipart(big)[0], {"Content-Type": _multipart(big)[1]}),
        ("POST", "/api/search", b"x", {"Content-Type": "multipart/form-data; boundary=zz"}),
        ("POST", "/api/search", b"--zz\r\ngarbage", {"Content-Type": "multipart/form-data; boundary=zz"}),
        ("POST", "/api/search", b"x", {"Content-Type": "multipart/form-data"}),
        ("POST", "/api/search?k=0", real, {"Content-Type": "image/png"}),
        ("POST", "/api/search", _multipart(real, field="other")[0], {"Content-Type": _multipart(real)[1]}),
        ("POST", "/api/search", big, {"Content-Type": "image/png", "Transfer-Encoding": "chunked"}),
    ]
    return reqs


def _send(port: int, method: str, path: str, body: bytes | None, headers: dict) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        if headers.get("Transfer-Encoding") == "chunked":
            conn.putrequest(method, path, skip_accept_encoding=True)
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.endheaders()
            try:
                for s in range(0, len(body or b""), 16384):
                    piece = body[s : s + 16384]
                    conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                conn.send(b"0\r\n\r\n")
            except OSError:
                pass  # the server answered 413 and closed while we were still sending
        else:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.putheader("Content-Length", str(len(body or b"")))
            conn.endheaders()
            try:
                if body:
                    conn.send(body)
            except OSError:
                pass
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_hostile_traffic_against_live_server(toy, service, tmp_path):
    images = toy["images"]
    secret = toy["root"] / "secret.txt"
    secret.write_text("TOP-SECRET-OUTSIDE-THE-COLLECTION")
    # a collection file replaced, after indexing, by a link that leads outside the collection
    victim = images / "img039.png"
    saved = victim.read_bytes()
    victim.unlink()
    victim.symlink_to(secret)
    allowed = {p.read_bytes() for p in images.glob("*.png") if not p.is_symlink()}
    reqs = _hostile_requests(images, secret)
    normal = [("GET", f"/api/search?q=a+{c}+square&k={k}", None, {}) for c in ("red", "green", "blue")
              for k in (1, 5, 10)]
    media = [("GET", f"/media/{i}", None, {}) for i in range(40)]
    everything = (reqs + normal * 4 + media) * 2
    assert len(everything) >= 1000, len(everything)
    try:
        with live_server(service) as port:
            t0 = time.time()
            with ThreadPoolExecutor(12) as pool:  # concurrent clients
                answers = list(pool.map(lambda r: (r, _send(port, *r)), everything))
            elapsed = time.time() - t0
            after = _send(port, "GET", "/api/search?q=a+red+square&k=3", None, {})
    finally:
        victim.unlink()
        victim.write_bytes(saved)
    statuses = [s for _, (s, _) in answers]
    assert max(statuses) < 500, [(r[:2], s) for r, (s, _) in answers if s >= 500][:5]
    for (_, path, _, _), (status, body) in answers:
        assert b"TOP-SECRET" not in body, path
        if status == 200 and path.startswith("/media/") and "thumb" not in path:
            assert body in allowed, path
    by_path = {r[1]: s for r, (s, _) in answers}
    assert by_path["/media/39"] == 404  # the symlink is refused, not followed
    assert sum(1 for s in statuses if s == 413) >= 4 and 415 in statuses and 422 in statuses
    assert after[0] == 200 and b'"results"' in after[1]
    assert elapsed < 20, elapsed


# -- the page in a browser ----------------------------------------------------------------------------------
def test_page_screenshot_with_chromium(service, tmp_path):
    from test_quickstart import _screenshot_script

    mod = _screenshot_script()
    browser = mod.find_browser()
    if browser is None:
        why = "no Chromium: run scripts/install_chromium.sh as root (scripts/setup.sh does), or set $CHROMIUM"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{why} (CI=true)")
        pytest.skip(why)
    png = tmp_path / "serve.png"
    with live_server(service) as port:
        mod.screenshot(browser, f"http://127.0.0.1:{port}/?q=a+red+square", png, size="1100,700")
    im = np.asarray(Image.open(png).convert("RGB"), np.int32)
    # the thumbnail grid: several tiles dominated by the query's red (the toy images are solid squares)
    red = (im[..., 0] > 170) & (im[..., 1] < 90) & (im[..., 2] < 90)
    assert red.mean() > 0.05, red.mean()


def test_service_refuses_an_index_of_other_weights(toy, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(toy["run"], run)
    idx = tmp_path / "ix"
    build_index(run, toy["spec"], idx, progress=False)
    (run / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes() + b" ")
    with pytest.raises(LightCRLError, match="changed since"):
        SearchService(idx)


def test_audio_uploads_are_checked_by_duration(service):
    import soundfile as sf

    def wav(seconds: float, rate: int = 8000) -> bytes:
        buf = io.BytesIO()
        t = np.arange(int(seconds * rate)) / rate
        sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format="WAV")
        return buf.getvalue()

    modality, (samples, rate) = service.decode_upload(wav(0.5))
    assert modality == "audio" and rate == 8000 and samples.shape == (1, 4000)
    with pytest.raises(Exception, match="the limit is 120 s") as e:
        service.decode_upload(wav(121))
    assert e.value.status == 413
    with pytest.raises(Exception, match="no audio encoder") as e:  # the toy run is image-text
        service.search_upload(wav(0.5), "clip.wav", 5)
    assert e.value.status == 415
