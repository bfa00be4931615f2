"""Screenshot a quickstart report and a search gallery with headless Chromium (a visual check).

    .venv/bin/python scripts/screenshot.py --out runs/quickstart            # report + a fresh search
    .venv/bin/python scripts/screenshot.py --out OUT --gallery g.html page.html ...

Writes PNGs to ``--dest`` (default OUT/screenshots) and exits non-zero when Chromium is missing, a page
is missing, or a screenshot is absent, unreadable or blank. Without ``--gallery`` it first runs
``lightcrl search`` on the quickstart's synthetic images (``--images``/``--query`` to choose others).
Needs Chromium (``apt-get install -y chromium``, or ``scripts/install_chromium.sh``); ``--find-browser``
prints the one it would use (exit 2 when none). It runs headless as root in a container too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_browser() -> str | None:
    """$CHROMIUM, else the first Chromium-like browser on PATH."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def screenshot(browser: str, page: Path | str, png: Path, size: str = "1280,2000",
               timeout: float = 120.0) -> None:
    """Render ``page`` (an HTML file, or an http:// URL) to ``png``; raises RuntimeError when Chromium
    fails or the image looks wrong."""
    is_url = isinstance(page, str) and page.startswith(("http://", "https://"))
    if not is_url and not Path(page).is_file():
        raise RuntimeError(f"page not found: {page}")
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="lightcrl-chromium-") as profile:
        # as root in a container: no sandbox (it needs user namespaces), no GPU, and /tmp instead of a
        # small /dev/shm
        cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--no-first-run",
               "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--screenshot={png.resolve()}", f"--window-size={size}",
               page if is_url else Path(page).resolve().as_uri()]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"chromium timed out after {timeout:.0f} s on {page}") from e
    if not png.is_file() or png.stat().st_size == 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"no screenshot of {page} (chromium exit {proc.returncode}): " + " | ".join(tail))
    check_png(png)


def check_png(png: Path) -> None:
    """The file is a PNG with more than one colour (a blank page is a failure too)."""
    from PIL import Image

    try:
        with Image.open(png) as im:
            im.load()
            extrema = im.convert("L").getextrema()
    except Exception as e:  # noqa: BLE001 -- any decoding problem means a broken screenshot
        raise RuntimeError(f"{png} is not a readable PNG: {e}") from e
    if extrema[0] == extrema[1]:
        raise RuntimeError(f"{png} is blank (one colour)")


def make_gallery(out: Path, images: Path | None, query: str) -> Path:
    """Run `lightcrl search` on the quickstart run and return its gallery."""
    if images is None:
        summary = json.loads((out / "summary.json").read_text())
        data = summary.get("synthetic_data")
        if not data:
            raise RuntimeError("no --images given and the quickstart did not use synthetic data")
        images = Path(data) / "shapes-zeroshot-seen"
        if not images.is_dir():
            images = Path(data) / "shapes" / "Images"
    gallery = out / "search" / "screenshot-gallery.html"
    cli = Path(sys.executable).with_name("lightcrl")
    cmd = [str(cli)] if cli.exists() else [sys.executable, "-m", "lightcrl"]
    cmd += ["search", "--run", str(out), "--images", str(images), "--query", query, "--top", "8",
            "--out", str(gallery)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"lightcrl search failed: {proc.stderr.strip()[-500:]}")
    print(proc.stdout.strip())
    return gallery


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pages", nargs="*", type=Path, help="more HTML pages to screenshot")
    ap.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="quickstart output folder")
    ap.add_argument("--gallery", type=Path, help="a search gallery (default: run a search now)")
    ap.add_argument("--images", type=Path, help="folder for the search (default: the synthetic shapes)")
    ap.add_argument("--query", default="a red circle")
    ap.add_argument("--dest", type=Path, help="where the PNGs go (default: OUT/screenshots)")
    ap.add_argument("--no-report", action="store_true", help="only the gallery and the given pages")
    ap.add_argument("--find-browser", action="store_true", help="print the browser found, exit 2 if none")
    args = ap.parse_args(argv)

    browser = find_browser()
    if args.find_browser and browser:
        print(browser)
        return 0
    if browser is None:
        print("error: no Chromium found (apt-get install -y chromium, or set $CHROMIUM)", file=sys.stderr)
        return 2
    dest = args.dest or args.out / "screenshots"
    try:
        pages = [] if args.no_report else [("report", args.out / "report.html")]
        gallery = args.gallery or make_gallery(args.out, args.images, args.query)
        pages.append(("gallery", gallery))
        pages += [(p.stem, p) for p in args.pages]
        for name, page in pages:
            png = dest / f"{name}.png"
            screenshot(browser, page, png)
            print(f"{name}: {page} -> {png}")
    except (RuntimeError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
