"""Audio: the aiSFX encoder (weights conversion, front end, padding), HF audio encoders, labelcaptions,
skip-and-count through extraction, and a three-modality training smoke run on real data.

The unit tests need only the `aisfx` package (its weights ship on PyPI); the integration test reads
Flickr8k and ESC-10 from the shared data folder and is skipped without it.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from lightcrl.data.datasets import open_dataset
from lightcrl.encoders.audio import AisfxEncoder, AisfxFrontEnd, collate_blocks
from lightcrl.errors import LightCRLError
from lightcrl.paths import cache_dir, data_root

pytest.importorskip("aisfx")

SR = 44100
DATA = data_root()
HAVE_AUDIO_DATA = (DATA / "esc10").is_dir() and (DATA / "flickr8k").is_dir()


def tone(seconds: float, sr: int = SR, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    """A sine with a little noise (so the spectrogram is not degenerate), peak 0.5."""
    t = np.arange(int(round(seconds * sr))) / sr
    noise = np.random.default_rng(seed).normal(0, 0.01, t.shape)
    return (0.5 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


@pytest.fixture(scope="module")
def aisfx() -> AisfxEncoder:
    enc = AisfxEncoder(device="cpu")
    enc.use_backend("eager")  # the package's own model, compared at 1e-6 (ONNX Runtime: test_backends.py)
    return enc


# --------------------------------------------------------------------------------------- weights


def test_safetensors_copy_gives_the_pickled_models_embeddings(aisfx, monkeypatch):
    import aisfx.inference as inf

    blocks = aisfx.transform(tone(3.5))  # 151 frames: blocks at 0 and 50 (the partial third is dropped)
    assert blocks.shape == (2, 100, 96)
    # the package's own path: unpickle checkpoint.pth, CrossNet.get_embedding per block
    weights, ds_dict = torch.load(inf.get_path_modelWeights(), map_location="cpu", weights_only=False)
    reference = inf.load_bestModel(weights, ds_dict, "cpu")
    with torch.no_grad():
        expected = reference.get_embedding(blocks)
    out = aisfx.encode([tone(3.5)])
    torch.testing.assert_close(out.tokens[0], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.pooled[0], expected.mean(0), rtol=1e-6, atol=1e-6)

    copy = aisfx.safetensors_path()
    assert copy.parent == cache_dir() / "weights" and copy.name.startswith("aisfx-") and copy.is_file()
    assert copy.name == f"aisfx-{aisfx.weights_digest()[:16]}.safetensors"

    # a later process loads the copy: nothing is unpickled in the hot path
    def no_unpickling(*a, **k):
        raise AssertionError("torch.load called although the safetensors copy exists")

    monkeypatch.setattr(torch, "load", no_unpickling)
    later = AisfxEncoder(device="cpu")
    later.use_backend("eager")
    again = later.encode([tone(3.5)])
    assert torch.equal(again.tokens, out.tokens)


def test_identity_names_weights_and_front_end(aisfx):
    ident = aisfx.identity()
    assert ident["weights"] == aisfx.weights_digest() and len(ident["weights"]) == 64
    assert ident["frontend"]["sample_rate"] == SR and ident["frontend"]["n_mels"] == 96
    other = AisfxEncoder(device="cpu", frontend=AisfxFrontEnd(block_hop=25))
    assert other.fingerprint() != aisfx.fingerprint()


# -------------------------------------------------------------------------------------- front end


@pytest.mark.parametrize("rate", [22050, 48000])
def test_resampling_to_the_models_rate(tmp_path, rate):
    path = tmp_path / f"sine{rate}.wav"
    sf.write(path, tone(1.5, rate, freq=1000.0), rate)
    fe = AisfxFrontEnd()
    wav = fe.load(str(path))
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) - int(1.5 * SR)) <= 1  # 1.5 s at 44.1 kHz
    peak_hz = np.argmax(np.abs(np.fft.rfft(wav))) * SR / len(wav)
    assert abs(peak_hz - 1000.0) < 5  # still a 1 kHz tone: resampled, not reinterpreted
    spec = fe.spectrogram(wav)
    assert spec.shape == (1 + len(wav) // 1024, 96)
    # an array with its rate resamples the same way
    arr = fe.load((tone(1.5, rate, freq=1000.0), rate))
    np.testing.assert_allclose(arr, wav, atol=1e-4)


def test_padding_is_masked_and_never_changes_real_tokens(aisfx):
    short, long = tone(1.0), tone(5.0, freq=880.0, seed=1)
    items = [aisfx.transform(short), aisfx.transform(long)]
    assert [x.shape[0] for x in items] == [1, 3]  # < 1 block -> one zero-padded block; 5 s -> 3
    batch = collate_blocks(items)
    assert batch["block_mask"].tolist() == [[True, False, False], [True, True, True]]
    assert batch["blocks"].shape == (4, 100, 96)  # the real blocks only
    out = aisfx.encode_batch(batch)
    assert torch.all(out.tokens[0, 1:] == 0)
    alone = aisfx.encode([short])
    torch.testing.assert_close(out.tokens[0, :1], alone.tokens[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.pooled[1], out.tokens[1].mean(0), rtol=1e-6, atol=1e-6)


def test_transform_and_collate_are_picklable(aisfx):
    fn = pickle.loads(pickle.dumps(aisfx.transform))
    assert torch.equal(fn(tone(1.0)), aisfx.transform(tone(1.0)))
    assert pickle.loads(pickle.dumps(aisfx.collate)) is collate_blocks


# ----------------------------------------------------------------------------------- extraction


def _audiofolder(root: Path) -> str:
    for c, (name, freq) in enumerate([("dog bark", 300.0), ("rain", 2000.0)]):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(2):
            sf.write(folder / f"clip{i}.wav", tone(1.0 + i, 22050, freq, seed=c * 10 + i), 22050)
    (root / "rain" / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(256)) * 4)
    sf.write(root / "dog bark" / "silent.wav", np.zeros(22050, np.float32), 22050)
    return f"audiofolder:{root}"


def test_embed_skips_and_counts_corrupt_and_silent_clips(tmp_path, aisfx):
    from lightcrl.embed import EmbedOptions, embed

    spec = _audiofolder(tmp_path / "clips")
    store = embed(aisfx, spec, None, tmp_path / "store", EmbedOptions(num_workers=1, progress=False))
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["count"] == 4 and len(store) == 4
    reasons = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert reasons == {"corrupt.wav": "corrupt_audio", "silent.wav": "silent_audio"}
    assert manifest["skipped_by_reason"] == {"corrupt_audio": 1, "silent_audio": 1}
    assert all(s["detail"] for s in manifest["skipped"])
    assert store.pooled().shape == (4, 512) and store.modality == "audio"
    assert sorted(store.lengths.tolist()) == [1, 1, 1, 1]  # 1-2 s clips: one block each


# --------------------------------------------------------------------------------- labelcaptions


def test_labelcaptions_wraps_a_classification_dataset(tmp_path):
    spec = _audiofolder(tmp_path / "clips")
    inner = open_dataset(spec)
    ds = open_dataset(f"labelcaptions:{spec}")
    assert ds.task == "pairs" and ds.media == "audio" and ds.kind == "labelcaptions"
    assert [r.id for r in ds.media_records()] == [r.id for r in inner.media_records()]
    texts = ds.text_records()
    assert len(texts) == len(inner) * len(inner.templates) == 6 * 6
    by_group: dict[str, list[str]] = {}
    for t in texts:
        by_group.setdefault(t.group, []).append(t.text)
    for r in inner.media_records():
        name = inner.classnames[r.label]
        assert by_group[r.id] == [t.replace("{c}", name) for t in inner.templates]
    assert "the sound of a dog bark." in by_group["dog bark/clip0.wav"]
    assert ds.fingerprint() != inner.fingerprint()
    # a seeded sample keeps the same media items as the same sample of the inner dataset
    sample_ids = [r.id for r in ds.subsample(3).media_records()]
    assert sample_ids == [r.id for r in inner.subsample(3).media_records()]


def test_labelcaptions_refuses_pairs_datasets(tmp_path, pairs_csv):
    with pytest.raises(LightCRLError, match="classification"):
        open_dataset(f"labelcaptions:{pairs_csv}")
    with pytest.raises(LightCRLError, match="labelcaptions:KIND:PATH"):
        open_dataset("labelcaptions:")


# ------------------------------------------------------------------------------ transformers


def test_hf_audio_unavailable_id_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    from lightcrl.encoders import get_encoder

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network retries
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(LightCRLError, match="(?s)'hf-audio:nobody/no-such-audio-model'.*internet or a local"):
        get_encoder("hf-audio:nobody/no-such-audio-model", device="cpu")


def test_hf_audio_encoder_on_a_tiny_local_ast(tmp_path):
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    from lightcrl.encoders import get_encoder

    torch.manual_seed(0)
    cfg = ASTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_length=64,
        num_mel_bins=32,
    )
    ASTModel(cfg).save_pretrained(tmp_path / "ast")
    ASTFeatureExtractor(num_mel_bins=32, max_length=64, sampling_rate=16000).save_pretrained(tmp_path / "ast")
    enc = get_encoder(f"hf-audio:{tmp_path / 'ast'}", device="cpu")
    assert (enc.modality, enc.dim, enc.sample_rate) == ("audio", 32, 16000)
    transform, collate = (pickle.loads(pickle.dumps(f)) for f in (enc.transform, enc.collate))
    waves = [transform(tone(0.5, 16000)), transform((tone(1.0, 48000), 48000))]
    assert [len(w) for w in waves] == [8000, 16000]
    out = enc.encode_batch(collate(waves))
    assert out.tokens.shape[0] == 2 and out.tokens.shape[2] == 32 and out.pooled.shape == (2, 32)
    assert out.mask.all()
    assert len(enc.identity()["weights"]) == 64  # local folder: digest of its weight files


# --------------------------------------------------------------------------------- integration


@pytest.mark.integration
@pytest.mark.skipif(not HAVE_AUDIO_DATA, reason=f"flickr8k/esc10 not found in {DATA}")
def test_three_modality_training_smoke(tmp_path):
    from safetensors.torch import load_file

    from lightcrl.app.config import validate_config
    from lightcrl.app.evaluate import EvalRequest, EvalTarget, run_eval
    from lightcrl.app.train import train

    esc10 = f"esc10:{DATA / 'esc10'}"
    cfg = validate_config(
        {
            "name": "three-smoke",
            "data": {
                "sources": [
                    {
                        "spec": f"flickr8k:{DATA / 'flickr8k'}",
                        "split": "train",
                        "val_split": "dev",
                        "limit": 32,
                        "val_limit": 8,
                    },
                    {
                        "spec": esc10,
                        "split": "folds1-4",
                        "val_split": "fold5",
                        "media_encoder": "aisfx",
                        "captions": "templates",
                        "limit": 32,
                        "val_limit": 8,
                    },
                ],
                "input": "tokens",
                "num_workers": 1,
            },
            "model": {"width": 32, "heads": 2, "ffn_dim": 64},
            "optim": {"epochs": 1, "batch_size": 16, "warmup_steps": 1},
            "tensorboard": False,
            "progress": False,
        }
    )
    summary = train(cfg, tmp_path / "run")
    assert summary["epochs"] == 1 and summary["steps"] == 4  # 2 flickr + 2 esc10 batches of 16

    info = json.loads((tmp_path / "run" / "model.json").read_text())
    assert info["input_dims"] == {"image": 1280, "text": 384, "audio": 512}
    assert info["encoders"] == {"image": "efficientnet-lite0", "text": "minilm-l6", "audio": "aisfx"}
    keys = load_file(str(tmp_path / "run" / "model.safetensors"))
    for m in ("image", "text", "audio"):
        assert any(k.startswith(f"projections.{m}.") for k in keys), m
        assert f"contexts.{m}" in keys

    # zero-shot on the held-out fold reuses the validation store (same sample) and runs end to end
    target = EvalTarget.resolve(str(tmp_path / "run"), device="cpu")
    result = run_eval(
        target, EvalRequest("zeroshot", esc10, "fold5", limit=8, device="cpu", output=tmp_path / "zs.json")
    )
    assert 0.0 <= result["metrics"]["top1"] <= 100.0 and result["metrics"]["chance"] == 10.0
    # text -> audio retrieval on the label captions: instance recalls plus class relevance
    result = run_eval(
        target,
        EvalRequest(
            "retrieval",
            f"labelcaptions:{esc10}",
            "fold5",
            limit=8,
            device="cpu",
            output=tmp_path / "ret.json",
        ),
    )
    m = result["metrics"]
    assert m["n_images"] == 8 and m["n_texts"] == 8 * 6
    assert 0.0 <= m["class_map"] <= 100.0 and 0.0 <= m["class_precision@1"] <= 100.0


# ------------------------------------------------------------------------------ aisfx@LAYER


def test_aisfx_layers_match_the_packages_crossnet():
    """aisfx@heads-* are CrossNet's own classifier heads on each block's embedding (checked against the
    package's model, head by head, in its ds_dict order); aisfx@block3 is conv block 3 pooled like the last
    block; every layer is its own store identity, and the default's identity has no layer entry."""
    import aisfx.inference as inf

    from lightcrl.encoders import get_encoder
    from lightcrl.encoders.audio import AISFX_HEADS, AISFX_LAYERS

    weights, ds_dict = torch.load(inf.get_path_modelWeights(), map_location="cpu", weights_only=False)
    ref = inf.load_bestModel(weights, ds_dict, "cpu").eval()
    assert [(k, int(n)) for k, (_, n) in sorted(ds_dict.items(), key=lambda kv: int(kv[1][0]))] == list(
        AISFX_HEADS)
    items = [torch.from_numpy(np.asarray(AisfxFrontEnd()(tone(3.5)))),
             torch.from_numpy(np.asarray(AisfxFrontEnd()(tone(6.0, freq=880.0))))]
    batch = collate_blocks(items)
    blocks = batch["blocks"]
    with torch.no_grad():
        emb = ref.get_embedding(blocks)
        logits = torch.cat([ref(blocks, name)[1] for name, _ in AISFX_HEADS], dim=-1)
        hidden = torch.cat([ref.fc[k][:4](emb) for k in range(len(AISFX_HEADS))], dim=-1)
        n = ref.embedding_net
        x = n.conv_block1(blocks.unsqueeze(1), pool_size=(2, 2), pool_type="max")
        x = n.conv_block3(n.conv_block2(x, pool_size=(2, 2), pool_type="max"), pool_size=(2, 2),
                          pool_type="max")
        block3 = x.mean(3).max(2).values
    base = get_encoder("aisfx", device="cpu", backend="eager")
    assert "layer" not in base.identity()
    expected = {"heads-logits": logits, "heads-hidden": hidden, "block3": block3}
    fps = {base.fingerprint()}
    for layer, want in expected.items():
        enc = get_encoder(f"aisfx@{layer}", device="cpu", backend="eager")
        assert enc.name == f"aisfx@{layer}" and enc.dim == AISFX_LAYERS[layer][1] == want.shape[1]
        assert enc.identity()["layer"] == layer and enc.identity()["weights"] == base.identity()["weights"]
        out = enc.encode_batch(batch)
        assert out.tokens.shape == (2, int(batch["block_mask"].sum(1).max()), enc.dim)
        real = out.tokens[batch["block_mask"]]  # the real blocks, clip by clip: the rows of `blocks`
        torch.testing.assert_close(real, want, rtol=1e-5, atol=1e-5)
        fps.add(enc.fingerprint())
    assert len(fps) == 4
    with pytest.raises(LightCRLError, match="default output"):
        get_encoder("aisfx@embedding", device="cpu")
    with pytest.raises(LightCRLError, match="valid layers: block3, heads-hidden1, heads-hidden, heads-log"):
        get_encoder("aisfx@block9", device="cpu")


def test_encoder_backend_default_comes_from_the_environment(monkeypatch):
    """LIGHTCRL_ENCODER_BACKEND sets the backend of stores built with default options (train, eval)."""
    from lightcrl.embed import EmbedOptions

    monkeypatch.delenv("LIGHTCRL_ENCODER_BACKEND", raising=False)
    assert EmbedOptions().encoder_backend == "auto"
    monkeypatch.setenv("LIGHTCRL_ENCODER_BACKEND", "eager")
    assert EmbedOptions().encoder_backend == "eager"
    assert EmbedOptions(encoder_backend="onnx").encoder_backend == "onnx"
