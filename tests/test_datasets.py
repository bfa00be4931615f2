"""Dataset loaders (lightcrl.data.datasets) and media decoding (lightcrl.data.media).

Unit tests build tiny instances of each official layout in tmp_path, from a few real files of the shared
data folder when it is there (generated ones otherwise). Integration tests list the real datasets.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from lightcrl.data.datasets import open_dataset, parse_spec
from lightcrl.data.media import clean_caption, load_audio, load_image
from lightcrl.errors import LightCRLError, SkipItem
from lightcrl.paths import data_root

DATA = data_root()
HAVE_DATA = (DATA / "README.md").is_file()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"shared data not found at {DATA}")


# ------------------------------------------------------------------------------------------- builders


def jpeg_bytes(i: int = 0, size: int = 32) -> bytes:
    """A real CIFAR-10 JPEG when the shared data is there, else a generated one."""
    real = DATA / "cifar10" / "test" / "airplane" / f"{i:04d}.jpg"
    if real.is_file():
        return real.read_bytes()
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def tone(path: Path, sr: int = 8000, seconds: float = 0.5, channels: int = 1, amp: float = 0.5) -> Path:
    t = np.arange(int(sr * seconds)) / sr
    wav = amp * np.sin(2 * np.pi * 440 * t)
    if channels > 1:
        wav = np.stack([wav] * channels, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wav, sr)
    return path


def reasons(ds) -> Counter:
    return Counter(s["reason"] for s in ds.skipped)


def make_flickr8k(root: Path, extra_rows: bytes = b"") -> Path:
    for i in range(4):
        write(root / "Images" / f"img{i}.jpg", jpeg_bytes(i))
    rows = b"image,caption\n"
    for i in range(4):
        rows += b"".join(b"img%d.jpg,caption %d of image %d\n" % (i, k, i) for k in range(5))
    write(root / "captions.txt", rows + extra_rows)
    write(root / "Flickr_8k.trainImages.txt", "img0.jpg\nimg1.jpg\n")
    write(root / "Flickr_8k.devImages.txt", "img2.jpg\nimg3.jpg\n")
    return root


def make_imagefolder(root: Path, n_classes: int = 3, per_class: int = 2) -> Path:
    for c in range(n_classes):
        for i in range(per_class):
            write(root / f"class_{c}" / f"{i:03d}.jpg", jpeg_bytes(i))
    return root


# ---------------------------------------------------------------------------------------- media: images


def test_load_image_rgb_and_png_named_jpg(tmp_path):
    img = load_image(str(write(tmp_path / "a.jpg", jpeg_bytes(0))))
    assert img.mode == "RGB" and img.size == (32, 32)
    Image.new("RGB", (5, 4), (10, 200, 30)).save(tmp_path / "b.png")
    os.rename(tmp_path / "b.png", tmp_path / "b.jpg")
    img = load_image(str(tmp_path / "b.jpg"))
    assert img.getpixel((0, 0)) == (10, 200, 30)


def test_load_image_applies_exif_orientation(tmp_path):
    """A camera JPEG stored sideways with an orientation tag decodes upright; an untagged one as it is."""
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    img.save(tmp_path / "tagged.jpg", exif=exif, quality=95)
    img.save(tmp_path / "plain.jpg", quality=95)
    upright = load_image(str(tmp_path / "tagged.jpg"))
    assert upright.mode == "RGB" and upright.size == (20, 40)
    red, blue = upright.getpixel((10, 2)), upright.getpixel((10, 37))  # the left edge is now the top
    assert red[0] > 200 > red[2] and blue[2] > 200 > blue[0]
    assert load_image(str(tmp_path / "plain.jpg")).size == (40, 20)


@pytest.mark.parametrize(
    "content", [b"", b"this is not an image", None], ids=["zero_byte", "not_an_image", "truncated"]
)
def test_load_image_corrupt(tmp_path, content):
    if content is None:
        big = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            big, "JPEG"
        )
        content = big.getvalue()[: len(big.getvalue()) // 2]
    path = write(tmp_path / "bad.jpg", content)
    with pytest.raises(SkipItem) as exc:
        load_image(str(path))
    assert exc.value.reason == "corrupt_image" and exc.value.path == str(path)
    assert str(path) in str(exc.value)  # the message names the file (PIL reads from memory)


def test_load_image_missing(tmp_path):
    with pytest.raises(SkipItem) as exc:
        load_image(str(tmp_path / "nope.jpg"))
    assert exc.value.reason == "missing_file" and str(tmp_path / "nope.jpg") in str(exc.value)


def test_load_image_cmyk_jpeg(tmp_path):
    rgb = Image.new("RGB", (16, 16), (200, 40, 60))
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg", "JPEG", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    out = np.asarray(load_image(str(tmp_path / "cmyk.jpg")), dtype=int)
    assert np.abs(out - np.array([200, 40, 60])).max() < 12


def test_load_image_16bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    img = load_image(str(tmp_path / "g16.png"))
    assert img.mode == "RGB"
    assert [img.getpixel((x, 0))[0] for x in range(4)] == [0, 1, 128, 255]


def test_load_image_palette_la_grayscale(tmp_path):
    Image.new("RGB", (4, 4), (255, 0, 0)).convert("P").save(tmp_path / "p.png")
    Image.new("LA", (4, 4), (0, 0)).save(tmp_path / "la.png")  # black, fully transparent
    Image.new("L", (4, 4), 77).save(tmp_path / "l.png")
    assert load_image(str(tmp_path / "p.png")).getpixel((0, 0)) == (255, 0, 0)
    assert load_image(str(tmp_path / "la.png")).getpixel((0, 0)) == (255, 255, 255)  # over white
    assert load_image(str(tmp_path / "l.png")).getpixel((0, 0)) == (77, 77, 77)


# ----------------------------------------------------------------------------------------- media: audio


def test_load_audio_resamples_and_mixes_to_mono(tmp_path):
    path = tone(tmp_path / "a.wav", sr=8000, seconds=0.5, channels=2)
    wav = load_audio(str(path), 16000)
    assert wav.dtype == np.float32 and wav.ndim == 1 and abs(len(wav) - 8000) <= 2
    assert load_audio(str(path), 8000, mono=False).shape == (2, 4000)


@needs_data
def test_load_audio_real_ogg():
    clip = next((DATA / "esc10" / "001 - Dog bark").glob("*.ogg"))
    wav = load_audio(str(clip), 16000)
    assert wav.dtype == np.float32 and 4.5 * 16000 < len(wav) < 5.5 * 16000


@pytest.mark.parametrize(
    "name,content,reason",
    [
        ("silent.wav", "silence", "silent_audio"),
        ("garbage.wav", b"RIFF\x00\x00garbage" * 10, "corrupt_audio"),
        ("empty.wav", b"", "corrupt_audio"),
        ("missing.wav", None, "missing_file"),
    ],
)
def test_load_audio_bad_inputs(tmp_path, name, content, reason):
    path = tmp_path / name
    if content == "silence":
        sf.write(str(path), np.zeros(4000), 8000)
    elif content is not None:
        write(path, content)
    with pytest.raises(SkipItem) as exc:
        load_audio(str(path), 16000)
    assert exc.value.reason == reason


def test_clean_caption():
    assert clean_caption(b"  a dog \n") == "a dog"
    assert clean_caption("x" * 10_000) == "x" * 10_000
    for bad, reason in [
        (b"caf\xe9", "invalid_text"),
        ("caf\udce9", "invalid_text"),
        (" \t\n", "empty_caption"),
    ]:
        with pytest.raises(SkipItem) as exc:
            clean_caption(bad)
        assert exc.value.reason == reason


# ------------------------------------------------------------------------------------------- spec, errors


def test_parse_spec_and_unknown_kind():
    assert parse_spec("flickr8k:../data/flickr8k") == ("flickr8k", Path("../data/flickr8k"))
    assert parse_spec("csv:a.tsv?img_key=x") == ("csv", Path("a.tsv"))
    with pytest.raises(LightCRLError, match=r"cifar10.*flickr8k"):
        parse_spec("nosuchkind:/x")
    with pytest.raises(LightCRLError, match="img_key"):
        open_dataset("csv:a.csv?bogus=1")


def test_missing_root_and_annotations(tmp_path):
    with pytest.raises(LightCRLError, match="nowhere"):
        open_dataset(f"flickr8k:{tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LightCRLError, match="Flickr_8k"):
        open_dataset(f"flickr8k:{tmp_path / 'empty'}")
    with pytest.raises(LightCRLError, match=r"no audio/ folder and no class folders"):
        open_dataset(f"esc50:{tmp_path / 'empty'}")


# ---------------------------------------------------------------------------------------------- flickr8k


def test_flickr8k_layout_and_splits(tmp_path):
    ds = open_dataset(f"flickr8k:{make_flickr8k(tmp_path)}", "train")
    assert (ds.task, ds.media, ds.split, len(ds)) == ("pairs", "image", "train", 2)
    media, texts = ds.media_records(), ds.text_records()
    assert [m.id for m in media] == ["Images/img0.jpg", "Images/img1.jpg"]
    assert all(m.group == m.id and m.label == -1 and Path(m.path).is_file() for m in media)
    assert len(texts) == 10 and texts[0].id == "Images/img0.jpg#0" and texts[0].text == "caption 0 of image 0"
    assert {t.group for t in texts} == {m.id for m in media}
    assert len(open_dataset(f"flickr8k:{tmp_path}", "dev")) == 2
    with pytest.raises(LightCRLError, match="available splits are dev, train"):
        open_dataset(f"flickr8k:{tmp_path}", "test")


def test_flickr8k_bad_items_are_skipped(tmp_path):
    extra = (
        b"img0.jpg,\n"  # empty caption
        b'img0.jpg,"   "\n'  # whitespace only
        b"img0.jpg,caf\xe9 au lait\n"  # not UTF-8
        b"img0.jpg," + b"long " * 2000 + b"\n"  # 10k chars: kept
        b"img1.jpg\n"  # missing column
        b"ghost.jpg,a caption for a missing image\n"
        b"void.jpg,a caption for an empty image\n"
    )
    root = make_flickr8k(tmp_path, extra)
    write(root / "Images" / "void.jpg", b"")
    write(root / "Flickr_8k.trainImages.txt", "img0.jpg\nimg1.jpg\nghost.jpg\nvoid.jpg\n")
    ds = open_dataset(f"flickr8k:{root}", "train")
    assert len(ds) == 2 and len(ds.text_records()) == 11
    assert max(len(t.text) for t in ds.text_records()) == len(("long " * 2000).strip())
    assert reasons(ds) == Counter(empty_caption=2, invalid_text=1, bad_row=1, missing_file=1, empty_file=1)
    bad = next(s for s in ds.skipped if s["reason"] == "invalid_text")
    assert bad["id"] == "Images/img0.jpg#7" and "captions.txt" in bad["path"]
    with pytest.raises(LightCRLError, match=r"captions\.txt"):
        open_dataset(f"flickr8k:{root}", "train", strict=True)


def test_strict_names_missing_image(tmp_path):
    root = make_flickr8k(tmp_path)
    os.remove(root / "Images" / "img1.jpg")
    assert reasons(open_dataset(f"flickr8k:{root}", "train")) == Counter(missing_file=1)
    with pytest.raises(LightCRLError, match=r"missing_file: .*img1\.jpg"):
        open_dataset(f"flickr8k:{root}", "train", strict=True)


def test_flickr8k_original_token_layout(tmp_path):
    write(tmp_path / "Flicker8k_Dataset" / "a.jpg", jpeg_bytes(0))
    write(tmp_path / "Flickr8k_text" / "Flickr8k.token.txt", "a.jpg#0\tone dog\na.jpg#1\ttwo dogs\n")
    write(tmp_path / "Flickr8k_text" / "Flickr_8k.trainImages.txt", "a.jpg\n")
    ds = open_dataset(f"flickr8k:{tmp_path}", "train")
    assert [t.text for t in ds.text_records()] == ["one dog", "two dogs"]


# -------------------------------------------------------------------------------------------------- coco


def test_coco_official_and_karpathy(tmp_path):
    for split in ("val2014", "val2017"):
        write(tmp_path / split / f"{split}_1.jpg", jpeg_bytes(1))
        ann = {
            "images": [{"id": 1, "file_name": f"{split}_1.jpg"}, {"id": 2, "file_name": "missing.jpg"}],
            "annotations": [
                {"id": 10, "image_id": 1, "caption": " a cat "},
                {"id": 11, "image_id": 1, "caption": "two cats"},
                {"id": 12, "image_id": 2, "caption": "nothing"},
            ],
        }
        write(tmp_path / "annotations" / f"captions_{split}.json", json.dumps(ann))
    ds = open_dataset(f"coco:{tmp_path}", "val")
    assert ds.split == "val2017" and [m.id for m in ds.media_records()] == ["val2017/val2017_1.jpg"]
    assert [t.text for t in ds.text_records()] == ["a cat", "two cats"]
    assert reasons(ds) == Counter(missing_file=1)
    assert open_dataset(f"coco:{tmp_path}", "val2014").split == "val2014"
    karpathy = {
        "images": [
            {
                "filepath": "val2014",
                "filename": "val2014_1.jpg",
                "split": "test",
                "sentences": [{"raw": "x"}],
            },
            {"filepath": "val2014", "filename": "val2014_1.jpg", "split": "restval", "sentences": []},
        ]
    }
    write(tmp_path / "dataset_coco.json", json.dumps(karpathy))
    ds = open_dataset(f"coco:{tmp_path}")
    assert ds.split == "karpathy_test" and len(ds) == 1 and ds.text_records()[0].text == "x"
    with pytest.raises(LightCRLError, match="val2017"):
        open_dataset(f"coco:{tmp_path}", "test2015")


# --------------------------------------------------------------------------------------------------- csv


def test_csv_openclip_style(tmp_path):
    write(tmp_path / "imgs" / "a.jpg", jpeg_bytes(0))
    write(tmp_path / "imgs" / "b.jpg", jpeg_bytes(1))
    write(
        tmp_path / "pairs.tsv",
        "filepath\ttitle\nimgs/a.jpg\ta red car\nimgs/b.jpg\tblue sky\nimgs/a.jpg\tcar\n",
    )
    ds = open_dataset(f"csv:{tmp_path / 'pairs.tsv'}")
    assert ds.split == "all" and [m.id for m in ds.media_records()] == ["imgs/a.jpg", "imgs/b.jpg"]
    assert [(t.id, t.text) for t in ds.text_records()][:2] == [
        ("imgs/a.jpg#0", "a red car"),
        ("imgs/a.jpg#1", "car"),
    ]
    assert ds.media_records()[0].path == str(tmp_path / "imgs" / "a.jpg")

    write(tmp_path / "custom.csv", "img;cap;x\nimgs/a.jpg;hello;1\nimgs/b.jpg\nimgs/zzz.jpg;gone;2\n")
    ds = open_dataset(f"csv:{tmp_path / 'custom.csv'}?img_key=img&caption_key=cap&sep=;")
    assert len(ds) == 1 and reasons(ds) == Counter(bad_row=1, missing_file=1)
    write(tmp_path / "tabs.csv", "filepath\ttitle\nimgs/a.jpg\thi\n")
    assert len(open_dataset(f"csv:{tmp_path / 'tabs.csv'}?sep=\\t")) == 1
    with pytest.raises(LightCRLError, match="no column caption"):
        open_dataset(f"csv:{tmp_path / 'pairs.tsv'}?caption_key=caption")


def test_csv_module_limit_restored(tmp_path):
    limit = csv.field_size_limit()
    write(tmp_path / "x.jpg", jpeg_bytes(0))
    write(tmp_path / "big.csv", "filepath,title\nx.jpg," + "w" * 200_000 + "\n")
    assert len(open_dataset(f"csv:{tmp_path / 'big.csv'}").text_records()[0].text) == 200_000
    assert csv.field_size_limit() == limit


def test_audiocaps_csv(tmp_path):
    tone(tmp_path / "wavs" / "yt1.wav")
    write(tmp_path / "meta" / "train.csv", "audiocap_id,youtube_id,start_time,caption\n1,yt1,0,a dog barks\n")
    ds = open_dataset(
        f"audiocaps-csv:{tmp_path / 'meta' / 'train.csv'}?audio_key=youtube_id&ext=.wav&audio_dir=../wavs"
    )
    assert (ds.media, ds.task, len(ds)) == ("audio", "pairs", 1)
    assert load_audio(ds.media_records()[0].path, 8000).shape == (4000,)
    assert ds.text_records()[0].text == "a dog barks"


# --------------------------------------------------------------------------------------------------- wds


def make_tar(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_wds_classification(tmp_path):
    make_tar(tmp_path / "test" / "0.tar", {
        "s0.jpg": jpeg_bytes(0), "s0.cls": b"1",
        "s1.webp": b"", "s1.cls": b"0",
        "s2.jpg": jpeg_bytes(2), "s2.cls": b"not a number",
    })  # fmt: skip
    make_tar(tmp_path / "test" / "1.tar", {"s3.jpg": jpeg_bytes(3), "s3.cls": b"0\n"})
    write(tmp_path / "classnames.txt", "cat\ndog\n")
    write(tmp_path / "zeroshot_classification_templates.txt", "a photo of a {c}.\n")
    ds = open_dataset(f"wds:{tmp_path}")
    assert (ds.task, ds.split, ds.classnames, ds.templates) == (
        "classification",
        "test",
        ["cat", "dog"],
        ["a photo of a {c}."],
    )
    records = ds.media_records()
    assert [(r.id, r.label) for r in records] == [("test/0.tar/s0", 1), ("test/1.tar/s3", 0)]
    assert records[0].path == f"{tmp_path / 'test' / '0.tar'}::s0.jpg"
    assert reasons(ds) == Counter(empty_file=1, bad_label=1)
    assert load_image(records[0].path).size == (32, 32)
    with pytest.raises(SkipItem, match="missing_file"):
        load_image(f"{tmp_path / 'test' / '0.tar'}::nope.jpg")


def test_wds_pairs(tmp_path):
    make_tar(tmp_path / "test" / "0.tar", {
        "a.jpg": jpeg_bytes(0), "a.txt": b"first caption\nsecond caption\n",
        "b.png": jpeg_bytes(1), "b.txt": b"  \n",
    })  # fmt: skip
    ds = open_dataset(f"wds:{tmp_path}", "test")
    assert ds.task == "pairs" and ds.classnames is None and len(ds) == 1
    assert [t.text for t in ds.text_records()] == ["first caption", "second caption"]
    assert reasons(ds) == Counter(empty_caption=1, no_caption=1)


# ---------------------------------------------------------------------------------- imagefolder / audio


def test_imagefolder_splits_classnames_templates(tmp_path):
    make_imagefolder(tmp_path / "test")
    make_imagefolder(tmp_path / "train")
    write(tmp_path / "test" / "class_0" / "notes.txt", "ignored")
    write(tmp_path / "test" / "class_1" / "empty.jpg", b"")
    ds = open_dataset(f"imagefolder:{tmp_path}")
    assert ds.split == "test" and len(ds) == 6 and reasons(ds) == Counter(empty_file=1)
    assert ds.classnames == ["class 0", "class 1", "class 2"] and "{c}" in ds.templates[0]
    assert [r.label for r in ds.media_records()] == [0, 0, 1, 1, 2, 2]
    write(tmp_path / "classnames.txt", "zero\none\ntwo\n")
    assert open_dataset(f"imagefolder:{tmp_path}", "train").classnames == ["zero", "one", "two"]
    with pytest.raises(LightCRLError, match="available splits are test, train"):
        open_dataset(f"imagefolder:{tmp_path}", "val")
    flat = make_imagefolder(tmp_path / "flat", n_classes=2)
    assert len(open_dataset(f"imagefolder:{flat}", "anything")) == 4


def test_audiofolder(tmp_path):
    tone(tmp_path / "dog" / "a.wav")
    tone(tmp_path / "rain" / "b.flac")
    ds = open_dataset(f"audiofolder:{tmp_path}")
    assert (ds.media, ds.classnames, len(ds)) == ("audio", ["dog", "rain"], 2)
    assert any("sound" in t for t in ds.templates)


# ------------------------------------------------------------------------------------------------ cifar


def cifar_row(image: bytes) -> np.ndarray:
    """An image as one row of an official CIFAR batch: 3072 uint8, channel-major (R plane, G, B)."""
    return np.asarray(Image.open(io.BytesIO(image)).convert("RGB")).transpose(2, 0, 1).ravel()


def write_cifar(folder: Path, batches: dict[str, int], meta: str, label_key: str, n_classes: int) -> None:
    folder.mkdir(parents=True)
    for b, (name, n) in enumerate(batches.items()):
        data = np.stack([cifar_row(jpeg_bytes(b * 10 + i)) for i in range(n)])
        labels = [i % n_classes for i in range(n)]
        batch = {b"data": data, label_key.encode(): labels, b"filenames": [b"%d.png" % i for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / meta).write_bytes(pickle.dumps({b"label_names": [b"c%d" % i for i in range(n_classes)]}))


def test_cifar10_official_batches(tmp_path):
    batches = {"test_batch": 3, **{f"data_batch_{i}": 2 for i in range(1, 6)}}
    write_cifar(tmp_path / "cifar-10-batches-py", batches, "batches.meta", "labels", 10)
    ds = open_dataset(f"cifar10:{tmp_path}")  # the parent of the extracted folder
    assert ds.split == "test" and len(ds) == 3 and [r.label for r in ds.media_records()] == [0, 1, 2]
    assert ds.classnames[:2] == ["airplane", "automobile"] and len(ds.templates) == 18
    record = ds.media_records()[1]
    assert record.path.endswith("test_batch::1") and record.id == "test_batch/1"
    img = load_image(record.path)
    assert img.mode == "RGB" and img.size == (32, 32)
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(io.BytesIO(jpeg_bytes(1)))))
    train = open_dataset(f"cifar10:{tmp_path / 'cifar-10-batches-py'}", "train")
    assert len(train) == 10
    with pytest.raises(LightCRLError, match="available splits are test, train"):
        open_dataset(f"cifar10:{tmp_path}", "val")


def test_cifar100_fine_labels(tmp_path):
    write_cifar(tmp_path / "cifar-100-python", {"test": 4, "train": 2}, "meta", "fine_labels", 100)
    ds = open_dataset(f"cifar100:{tmp_path / 'cifar-100-python'}", "test")
    assert len(ds.classnames) == 100 and ds.classnames[1] == "aquarium fish" and len(ds.templates) == 18
    assert [r.label for r in ds.media_records()] == [0, 1, 2, 3]


# ----------------------------------------------------------------------------------------- tinyimagenet


def test_tinyimagenet_official_layout(tmp_path):
    wnids = ["n02", "n01"]  # official wnids.txt is not sorted: its order is the label order
    write(tmp_path / "wnids.txt", "\n".join(wnids) + "\n")
    write(
        tmp_path / "words.txt", "n01\tgoldfish, Carassius auratus\nn02\tbullfrog, Rana catesbeiana\nn03\tx\n"
    )
    for w in wnids:
        write(tmp_path / "train" / w / "images" / f"{w}_0.JPEG", jpeg_bytes(0))
        write(tmp_path / "train" / w / f"{w}_boxes.txt", "ignored")
    write(tmp_path / "val" / "images" / "val_0.JPEG", jpeg_bytes(0))
    write(tmp_path / "val" / "images" / "val_1.JPEG", jpeg_bytes(1))
    write(
        tmp_path / "val" / "val_annotations.txt", "val_0.JPEG\tn01\t0\t0\t1\t1\nval_1.JPEG\tn99\t0\t0\t1\t1\n"
    )
    write(tmp_path / "test" / "images" / "test_0.JPEG", jpeg_bytes(0))
    ds = open_dataset(f"tinyimagenet:{tmp_path}")
    assert ds.split == "val" and ds.classnames == ["bullfrog", "goldfish"]
    assert [(r.id, r.label) for r in ds.media_records()] == [("val/images/val_0.JPEG", 1)]
    assert reasons(ds) == Counter(bad_row=1)
    train = open_dataset(f"tinyimagenet:{tmp_path}", "train")
    assert [r.label for r in train.media_records()] == [0, 1]
    with pytest.raises(LightCRLError, match="unlabelled"):
        open_dataset(f"tinyimagenet:{tmp_path}", "test")


# ------------------------------------------------------------------------------------------------- ESC


def test_esc50_folds_and_esc10_subset(tmp_path):
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    clips = [(1, 0, "dog", True), (2, 0, "dog", True), (5, 1, "rooster", True), (5, 4, "frog", False)]
    clips += [(3, 1, "rooster", True), (4, 4, "frog", False)]
    for i, (fold, target, cat, esc10) in enumerate(clips):
        rows.append(f"{fold}-{i}-A-{target}.wav,{fold},{target},{cat},{esc10},{i},A")
        tone(tmp_path / "audio" / f"{fold}-{i}-A-{target}.wav")
    rows.append("bad-row.wav,x")
    write(tmp_path / "meta" / "esc50.csv", "\n".join(rows) + "\n")
    ds = open_dataset(f"esc50:{tmp_path}")
    assert ds.split == "all" and len(ds) == 6 and ds.media == "audio" and reasons(ds) == Counter(bad_row=1)
    assert ds.classnames == ["dog", "rooster", "frog"]
    assert len(open_dataset(f"esc50:{tmp_path}", "fold5")) == 2
    assert len(open_dataset(f"esc50:{tmp_path}", "folds1-4")) == 4
    assert len(open_dataset(f"esc50:{tmp_path}", "fold1,fold3")) == 2
    sub = open_dataset(f"esc50:{tmp_path}?esc10=1", "all")
    assert sub.classnames == ["dog", "rooster"] and [r.label for r in sub.media_records()] == [0, 0, 1, 1]
    with pytest.raises(LightCRLError, match="available splits are all, fold1"):
        open_dataset(f"esc50:{tmp_path}", "fold9")


def test_esc10_original_layout(tmp_path):
    for folder, clips in {"001 - Dog bark": ["1-100-A", "5-101-A"], "002 - Rain": ["5-200-B"]}.items():
        for clip in clips:
            tone(tmp_path / folder / f"{clip}.ogg")
    write(tmp_path / "README.txt", "not a clip")
    ds = open_dataset(f"esc10:{tmp_path}", "fold5")
    assert ds.classnames == ["dog bark", "rain"] and [r.label for r in ds.media_records()] == [0, 1]
    assert load_audio(ds.media_records()[0].path, 8000).shape == (4000,)


# ---------------------------------------------------------------------------- fingerprint and subsample


def test_fingerprint_tracks_listing(tmp_path):
    root = make_flickr8k(tmp_path)
    fp = open_dataset(f"flickr8k:{root}", "train").fingerprint()
    assert fp == open_dataset(f"flickr8k:{root}", "train").fingerprint() and len(fp) == 64
    text = (root / "captions.txt").read_text().replace("caption 3 of image 1", "caption three of image 1")
    write(root / "captions.txt", text)
    fp2 = open_dataset(f"flickr8k:{root}", "train").fingerprint()
    assert fp2 != fp

    folder = make_imagefolder(tmp_path / "folder")
    fp = open_dataset(f"imagefolder:{folder}").fingerprint()
    write(folder / "class_0" / "new.jpg", jpeg_bytes(5))
    fp2 = open_dataset(f"imagefolder:{folder}").fingerprint()
    assert fp2 != fp
    fp = fp2

    # A copy with new mtimes (cp without -p, a fresh mount) keeps the fingerprint: cached features stay
    # valid. Rewriting a file with other bytes of the SAME size changes it.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy, copy_function=shutil.copy)
    for f in copy.rglob("*.jpg"):
        os.utime(f, ns=(1, 1))
    assert open_dataset(f"imagefolder:{copy}").fingerprint() == fp
    target = next(iter(sorted(copy.rglob("*.jpg"))))
    data = bytearray(target.read_bytes())
    data[-3] ^= 0xFF  # a byte near the end of the JPEG stream
    target.write_bytes(bytes(data))
    assert open_dataset(f"imagefolder:{copy}").fingerprint() != fp


def test_subsample_is_seeded_and_spread(tmp_path):
    root = make_imagefolder(tmp_path, n_classes=10, per_class=10)
    ds = open_dataset(f"imagefolder:{root}")
    sub = ds.subsample(20, seed=0)
    assert len(sub) == 20 and len({r.id for r in sub.media_records()}) == 20
    assert [r.id for r in sub.media_records()] == [r.id for r in ds.subsample(20, seed=0).media_records()]
    assert [r.id for r in sub.media_records()] != [r.id for r in ds.subsample(20, seed=1).media_records()]
    assert len({r.label for r in sub.media_records()}) >= 7
    assert sub.fingerprint() != ds.fingerprint() and sub.classnames == ds.classnames
    assert ds.subsample(100) is ds and ds.subsample(1000) is ds


def test_subsample_keeps_all_captions(tmp_path):
    ds = open_dataset(f"flickr8k:{make_flickr8k(tmp_path)}", "train")
    sub = ds.subsample(1, seed=3)
    (media,) = sub.media_records()
    assert [t.group for t in sub.text_records()] == [media.id] * 5


# ------------------------------------------------------------------------------------------- integration


@pytest.mark.integration
@needs_data
def test_real_flickr8k():
    train = open_dataset(f"flickr8k:{DATA / 'flickr8k'}", "train")
    dev = open_dataset(f"flickr8k:{DATA / 'flickr8k'}", "dev")
    assert (len(train), len(train.text_records())) == (6091, 5 * 6091)
    assert (len(dev), len(dev.text_records())) == (1000, 5000)
    assert not train.skipped and not dev.skipped
    assert Counter(t.group for t in dev.text_records()).most_common(1)[0][1] == 5
    assert not {m.id for m in train.media_records()} & {m.id for m in dev.media_records()}


@pytest.mark.integration
@needs_data
def test_real_cifar10_imagefolder():
    ds = open_dataset(f"imagefolder:{DATA / 'cifar10'}", "test")
    assert len(ds) == 10_000 and len(ds.classnames) == 10 and len(ds.templates) == 18
    assert Counter(r.label for r in ds.media_records()) == {i: 1000 for i in range(10)}
    assert ds.classnames == [
        line for line in (DATA / "cifar10" / "classnames.txt").read_text().split("\n") if line
    ]


@pytest.mark.integration
@needs_data
def test_real_tinyimagenet():
    ds = open_dataset(f"tinyimagenet:{DATA / 'tinyimagenet'}", "test")
    assert len(ds.classnames) == 200 and ds.classnames[0] == "goldfish"
    assert len(ds) == 10_000 and len({r.label for r in ds.media_records()}) == 200


@pytest.mark.integration
@needs_data
def test_real_esc10():
    ds = open_dataset(f"esc10:{DATA / 'esc10'}")
    assert len(ds) == 400 and ds.classnames[0] == "dog bark" and len(ds.classnames) == 10
    assert len(open_dataset(f"esc10:{DATA / 'esc10'}", "fold5")) == 80
    assert len(open_dataset(f"esc10:{DATA / 'esc10'}", "folds1-4")) == 320


@pytest.mark.integration
@needs_data
def test_real_cifar10_pickle_from_real_jpegs(tmp_path):
    """An official-format CIFAR-10 test batch built from real CIFAR JPEGs lists and decodes."""
    names = sorted((DATA / "cifar10" / "test").iterdir())
    rows, labels = [], []
    for label, d in enumerate(names):
        for f in sorted(d.iterdir())[:2]:
            rows.append(cifar_row(f.read_bytes()))
            labels.append(label)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batch = {b"data": np.stack(rows), b"labels": labels, b"batch_label": b"testing batch 1 of 1"}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [d.name.encode() for d in names]}))
    ds = open_dataset(f"cifar10:{folder}")
    assert len(ds) == 20 and ds.classnames == [d.name for d in names]
    real_templates = (DATA / "cifar10" / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert ds.templates == real_templates  # the shipped resource matches CLIP_benchmark's list
    assert load_image(ds.media_records()[-1].path).size == (32, 32)
