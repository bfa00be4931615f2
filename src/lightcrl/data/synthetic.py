"""A small synthetic image-caption dataset: rendered coloured shapes, written in layouts lightcrl reads.

Each image shows one shape (colour x shape x size x position) on a light background; its captions
describe it ("a small red circle on the left."). Some colour x shape combinations are held out: they
never appear in the training, dev or test images or captions, only in a zero-shot classification split,
so zero-shot accuracy on them measures composition rather than memorisation.

Layout written under ``root``::

    shapes/                       pairs in the Flickr8k layout -> spec ``flickr8k:root/shapes``
      Images/*.jpg
      captions.txt                CSV "image,caption", one row per caption (the Kaggle Flickr8k layout)
      Flickr_8k.{train,dev,test}Images.txt
    shapes-zeroshot/              held-out combos -> spec ``imagefolder:root/shapes-zeroshot`` (split test)
      test/<colour>_<shape>/*.jpg
      classnames.txt, zeroshot_classification_templates.txt
    shapes-zeroshot-seen/         the seen combos, same layout (a reference: accuracy on trained combos)
    synthetic.json                the parameters; an identical request reuses the files (and so the cache)
"""

from __future__ import annotations

import csv
import json
import math
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from lightcrl.io import write_json

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 160, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 200, 30),
    "purple": (135, 55, 175),
    "orange": (240, 130, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
#: Shape diameter as a fraction of the image side.
SIZES: dict[str, tuple[float, float]] = {"small": (0.2, 0.25), "large": (0.33, 0.39)}
#: Centre of the shape (x, y) as fractions of the side, and how captions say it.
POSITIONS: dict[str, tuple[tuple[float, float], str]] = {
    "left": ((0.29, 0.5), "on the left"),
    "right": ((0.71, 0.5), "on the right"),
    "top": ((0.5, 0.29), "at the top"),
    "bottom": ((0.5, 0.71), "at the bottom"),
    "middle": ((0.5, 0.5), "in the middle"),
}
#: Held out of training: each colour once, every shape at least once.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "circle"),
    ("blue", "star"),
    ("yellow", "square"),
    ("purple", "circle"),
    ("orange", "star"),
)
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (246, 246, 246),
    (236, 231, 220),
    (226, 233, 241),
    (238, 240, 226),
    (232, 232, 232),
)
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape} {where}.",
    "there is a {size} {colour} {shape} {where}.",
    "a {colour} {shape} {where}.",
    "a {size} {shape} in {colour} {where}.",
    "{where}, a {size} {colour} {shape}.",
    "a picture of a {colour} {shape}.",
)
ZEROSHOT_TEMPLATES: tuple[str, ...] = ("a {c}.", "a picture of a {c}.", "a {c} shape.", "there is a {c}.")
VERSION = 1


@dataclass(frozen=True)
class Scene:
    """What one image shows."""

    colour: str
    shape: str
    size: str
    position: str

    @property
    def combo(self) -> tuple[str, str]:
        return self.colour, self.shape


@dataclass
class SyntheticSpec:
    """How many images of each kind to render; equal specs give byte-identical files."""

    n_train: int = 720
    n_dev: int = 120
    n_test: int = 120
    zeroshot_per_class: int = 25  # images per held-out combo
    seen_per_class: int = 5  # images per seen combo in the reference split (0: no such split)
    captions_per_image: int = 2
    image_size: int = 224
    seed: int = 0
    held_out: list[list[str]] = field(default_factory=lambda: [list(c) for c in HELD_OUT])


@dataclass
class SyntheticData:
    """Where the generated dataset is and how to name it as lightcrl dataset specs."""

    root: Path
    pairs_spec: str  # flickr8k:<root>/shapes (splits train, dev, test)
    zeroshot_spec: str  # imagefolder:<root>/shapes-zeroshot (the held-out combos)
    seen_spec: str | None  # imagefolder:<root>/shapes-zeroshot-seen (the trained combos)
    held_out: list[tuple[str, str]]
    counts: dict[str, int]
    reused: bool = False


def seen_combos(held_out: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    held = set(map(tuple, held_out if held_out is not None else HELD_OUT))
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in held]


# -- rendering ------------------------------------------------------------------------------------------
def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        pts = [(0.0, -1.0), (0.866, 0.5), (-0.866, 0.5)]
        # A triangle's centroid is not its bounding-box centre: shift down so it looks centred.
        return [(cx + r * x, cy + r * (y + 0.1)) for x, y in pts]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = angle - math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    raise ValueError(shape)


def render(scene: Scene, size: int = 224, rng: random.Random | None = None) -> Image.Image:
    """Draw ``scene`` (with small random jitter in colour, position, size and background)."""
    rng = rng or random.Random(0)
    ss = 2  # supersampling: draw at 2x, downsample -> anti-aliased edges
    big = size * ss
    bg = tuple(min(255, max(0, c + rng.randint(-6, 6))) for c in rng.choice(BACKGROUNDS))
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    lo, hi = SIZES[scene.size]
    r = rng.uniform(lo, hi) * big / 2
    (px, py), _ = POSITIONS[scene.position]
    cx = (px + rng.uniform(-0.035, 0.035)) * big
    cy = (py + rng.uniform(-0.035, 0.035)) * big
    fill = tuple(min(255, max(0, c + rng.randint(-14, 14))) for c in COLOURS[scene.colour])
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        h = r * 0.88  # same visual area as the circle, roughly
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:
        draw.polygon(_polygon(scene.shape, cx, cy, r, rng.uniform(-0.2, 0.2)), fill=fill)
    return img.resize((size, size), Image.LANCZOS)


def captions_for(scene: Scene, n: int, rng: random.Random) -> list[str]:
    """``n`` different captions describing ``scene``."""
    where = POSITIONS[scene.position][1]
    picks = rng.sample(CAPTION_TEMPLATES, min(n, len(CAPTION_TEMPLATES)))
    out = [t.format(size=scene.size, colour=scene.colour, shape=scene.shape, where=where) for t in picks]
    return [c[0].upper() + c[1:] for c in out]


def _scenes(combos: list[tuple[str, str]], n: int, rng: random.Random) -> list[Scene]:
    """``n`` scenes cycling through ``combos`` (balanced), random size and position, shuffled."""
    sizes, positions = list(SIZES), list(POSITIONS)
    scenes = [Scene(*combos[i % len(combos)], rng.choice(sizes), rng.choice(positions)) for i in range(n)]
    rng.shuffle(scenes)
    return scenes


# -- writing ----------------------------------------------------------------------------------------------
def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=92)


def _write_pairs(root: Path, spec: SyntheticSpec, combos: list[tuple[str, str]]) -> dict[str, int]:
    images = root / "Images"
    rows: list[tuple[str, str]] = []
    counts = {}
    split_files = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
                   "test": "Flickr_8k.testImages.txt"}
    for k, (split, n) in enumerate((("train", spec.n_train), ("dev", spec.n_dev), ("test", spec.n_test))):
        rng = random.Random(spec.seed * 1000 + k)
        names = []
        for i, scene in enumerate(_scenes(combos, n, rng)):
            name = f"{split}_{i:05d}.jpg"
            _save(render(scene, spec.image_size, rng), images / name)
            rows += [(name, c) for c in captions_for(scene, spec.captions_per_image, rng)]
            names.append(name)
        # The Flickr8k loader needs every split file; an empty split is simply left without images.
        (root / split_files[split]).write_text("".join(f"{n}\n" for n in names))
        counts[split] = n
    with open(root / "captions.txt", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    return counts


def _write_classes(root: Path, combos: list[tuple[str, str]], per_class: int, spec: SyntheticSpec,
                   salt: int) -> int:
    rng = random.Random(spec.seed * 1000 + salt)
    folders = sorted(f"{c}_{s}" for c, s in combos)  # imagefolder labels = sorted folder order
    for folder in folders:
        colour, shape = folder.split("_")
        for i in range(per_class):
            scene = Scene(colour, shape, rng.choice(list(SIZES)), rng.choice(list(POSITIONS)))
            _save(render(scene, spec.image_size, rng), root / "test" / folder / f"{i:04d}.jpg")
    (root / "classnames.txt").write_text("".join(f"{f.replace('_', ' ')}\n" for f in folders))
    (root / "zeroshot_classification_templates.txt").write_text("".join(f"{t}\n" for t in ZEROSHOT_TEMPLATES))
    return per_class * len(folders)


def generate(root: str | Path, spec: SyntheticSpec | None = None) -> SyntheticData:
    """Render the dataset under ``root`` (reused as is when ``root/synthetic.json`` has the same spec)."""
    spec = spec or SyntheticSpec()
    root = Path(root)
    held = [tuple(c) for c in spec.held_out]
    for c, s in held:
        if c not in COLOURS or s not in SHAPES:
            raise ValueError(f"unknown held-out combination {c} {s}")
    combos = seen_combos(held)
    if spec.n_train < 1 or spec.zeroshot_per_class < 1 or len(held) < 2:
        raise ValueError("need at least one training image, one image per held-out class and two classes")
    meta_path = root / "synthetic.json"
    wanted = {"version": VERSION, "spec": asdict(spec)}
    pairs, zs, seen = root / "shapes", root / "shapes-zeroshot", root / "shapes-zeroshot-seen"
    data = SyntheticData(
        root=root,
        pairs_spec=f"flickr8k:{pairs}",
        zeroshot_spec=f"imagefolder:{zs}",
        seen_spec=f"imagefolder:{seen}" if spec.seen_per_class else None,
        held_out=held,
        counts={},
    )
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = {}
        if {k: meta.get(k) for k in wanted} == wanted and meta.get("complete"):
            # Same files, same mtimes: the feature-store cache keeps hitting on a rerun.
            data.counts, data.reused = meta["counts"], True
            return data
    meta_path.unlink(missing_ok=True)  # written last: its absence marks an unfinished dataset
    for d in (pairs, zs, seen):
        shutil.rmtree(d, ignore_errors=True)
    pairs.mkdir(parents=True)
    counts = _write_pairs(pairs, spec, combos)
    counts["zeroshot"] = _write_classes(zs, held, spec.zeroshot_per_class, spec, salt=11)
    if spec.seen_per_class:
        counts["zeroshot_seen"] = _write_classes(seen, combos, spec.seen_per_class, spec, salt=12)
    data.counts = counts
    write_json(meta_path, {**wanted, "counts": counts, "complete": True,
                           "held_out": [" ".join(c) for c in held]})
    return data
