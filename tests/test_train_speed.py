"""benchmarks/train_speed.py --encoders paper-shape: a correctness check, never a timing assertion.

At tiny size (``--tiny``) the paper's encoders (ViT and BERT from their Hugging Face configs) build without
any download, and the cached epoch feeds the model exactly the features the re-encode pass computed.
"""

from __future__ import annotations

import sys

from conftest import REPO, make_pairs_csv

sys.path.insert(0, str(REPO / "benchmarks"))

import train_speed  # noqa: E402


def test_paper_shape_tiny_builds_offline_and_feeds_identical_features(tmp_path, monkeypatch, capsys):
    import lightcrl.app.train_data as train_data

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a download attempt fails instead of reaching the hub
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # the benchmark, a script of its own process, points the trainer at its stores for good
    # (common.patch_stores): give the next tests of this process theirs back
    monkeypatch.setattr(train_data, "cached_store", train_data.cached_store)
    spec = make_pairs_csv(tmp_path / "pairs", n=24)
    for input_mode, precision in (("tokens", []), ("pooled", []), ("tokens", ["--precision", "bf16"])):
        out = train_speed.main(
            ["--encoders", "paper-shape", "--tiny", "--data", spec, "--split", "all", "--pairs", "24",
             "--batch-size", "8", "--reencode-batches", "2", "--input", input_mode, "--threads", "1",
             "--max-load", "1000", "--wait", "0", *precision]
        )
        assert out["reencoded_batches"] == 2
        assert out["inputs_max_abs_diff"] == 0.0
        assert out["step_flops"] > 0 and out["encoder_flops"] > 0
        assert capsys.readouterr().out.strip().splitlines()[-1] == f"ratio={out['ratio']:.1f}"
