"""STS data (lightcrl.data.sts) and the sts evaluation: SentEval's layout, the per-year convention,
sentence features through the store cache.

Unit tests build tiny SentEval trees in tmp_path and embed with the toy text encoder; the integration
tests read the real STS Benchmark (and SICK) from the shared data folder with MiniLM.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import toy_encoders
from scipy import stats

from lightcrl.app.cli import main as cli_main
from lightcrl.app.evaluate import EvalRequest, EvalTarget, headline, run_eval
from lightcrl.data import sts as sts_data
from lightcrl.data.datasets import open_dataset
from lightcrl.encoders import get_encoder
from lightcrl.errors import LightCRLError
from lightcrl.metrics import sts
from lightcrl.paths import data_root

# SentEval's own folders and subsets (facebookresearch/SentEval senteval/sts.py), written out here so
# that a wrong list in lightcrl.data.sts fails these tests; STS13 has no SMT in the public release
SENTEVAL_TREE = {
    "STS12-en-test": ["MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"],
    "STS13-en-test": ["FNWN", "headlines", "OnWN"],
    "STS14-en-test": ["deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"],
    "STS15-en-test": ["answers-forums", "answers-students", "belief", "headlines", "images"],
    "STS16-en-test": ["answer-answer", "headlines", "plagiarism", "postediting", "question-question"],
}
WORDS = "red blue green yellow dog cat bird horse runs sleeps eats jumps big small old young".split()
Scored = list[tuple[str, str, float]]


def _pairs(rng: np.random.Generator, n: int) -> Scored:
    """Pairs sharing k < 4 of 4 words, scored k + noise: the toy encoder's cosine correlates, imperfectly
    (never two identical sentences: cosines of 1 would tie, and float rounding would break the ties)."""
    out = []
    for _ in range(n):
        a = list(rng.choice(WORDS, 4, replace=False))
        k = int(rng.integers(0, 4))
        b = a[:k] + list(rng.choice([w for w in WORDS if w not in a], 4 - k, replace=False))
        out.append((" ".join(a), " ".join(b), round(k + float(rng.uniform(0, 1)), 2)))
    return out


def _write_year(folder: Path, subsets: list[str], rng: np.random.Generator, n: int = 5) -> dict[str, Scored]:
    """SentEval year folder; the 2nd pair of every subset has an EMPTY gold line (unscored: dropped)."""
    folder.mkdir(parents=True)
    scored = {}
    for sub in subsets:
        pairs = _pairs(rng, n + 1)
        gold = [f"{s:.2f}" for *_, s in pairs]
        gold[1] = ""
        (folder / f"STS.input.{sub}.txt").write_text("".join(f"{a}\t{b}\n" for a, b, _ in pairs))
        (folder / f"STS.gs.{sub}.txt").write_text("".join(f"{g}\n" for g in gold))
        scored[sub] = pairs[:1] + pairs[2:]
    return scored


def _write_stsb(folder: Path, rng: np.random.Generator, n: int = 8) -> Scored:
    folder.mkdir(parents=True)
    test = _pairs(rng, n)
    for split in ("train", "dev", "test"):
        rows = test if split == "test" else _pairs(rng, n)
        lines = [f"captions\tMSRvid\t2012test\t{i:04d}\t{s}\t{a}\t{b}" for i, (a, b, s) in enumerate(rows)]
        (folder / f"sts-{split}.csv").write_text("\n".join(lines) + "\n")
    return test


def make_senteval_tree(root: Path, seed: int = 0) -> dict[str, dict[str, Scored]]:
    """SentEval's data/downstream/STS in miniature; returns {set: {subset: scored pairs}}."""
    rng = np.random.default_rng(seed)
    sets = {f.split("-")[0]: _write_year(root / f, subs, rng) for f, subs in SENTEVAL_TREE.items()}
    sets["STSBenchmark"] = {"test": _write_stsb(root / "STSBenchmark", rng)}
    return sets


def _concatenated_spearman(subsets: dict[str, Scored]) -> float:
    """MTEB's per-year score, computed here without lightcrl's store or metrics: toy-text pooled
    vectors, cosine, ONE Spearman over all pairs of the year."""
    enc = get_encoder("toy-text")
    pairs = [p for scored in subsets.values() for p in scored]
    e1 = enc.encode([a for a, _, _ in pairs]).pooled.numpy().astype(np.float64)
    e2 = enc.encode([b for _, b, _ in pairs]).pooled.numpy().astype(np.float64)
    cos = (e1 * e2).sum(1) / np.linalg.norm(e1, axis=1) / np.linalg.norm(e2, axis=1)
    return 100 * stats.spearmanr(cos, [s for *_, s in pairs])[0]


def _raw_toy() -> EvalTarget:
    return EvalTarget.resolve("raw", text_encoder="toy-text")


# ------------------------------------------------------------------------------------------------ loaders
def test_senteval_folder_loader_drops_unscored_pairs(tmp_path: Path):
    (tmp_path / "STS.input.news.txt").write_text('a "quoted" one\tb\nc\td\te-extra\nx\ty\n', encoding="utf-8")
    (tmp_path / "STS.gs.news.txt").write_text("4.2\n\n1\n", encoding="utf-8")
    (tmp_path / "STS.input.orphan.txt").write_text("p\tq\n", encoding="utf-8")  # no gold file: ignored
    data = sts_data.load_senteval_year(tmp_path)
    assert list(data) == ["news"]
    s1, s2, sc = data["news"]
    assert s1 == ['a "quoted" one', "x"] and s2 == ["b", "y"]
    np.testing.assert_allclose(sc, [4.2, 1.0])


def test_sick_loader_with_semeval_set_column(tmp_path: Path):
    p = tmp_path / "SICK.txt"
    p.write_text(
        "pair_ID\tsentence_A\tsentence_B\tentailment_label\trelatedness_score\tentailment_AB\tentailment_BA\t"
        "sentence_A_original\tsentence_B_original\tsentence_A_dataset\tsentence_B_dataset\tSemEval_set\n"
        "1\tA b\tC d\tNEUTRAL\t4.5\tA_neutral_B\tB_neutral_A\to\to\tFLICKR\tFLICKR\tTRAIN\n"
        "2\tE f\tG h\tNEUTRAL\t3.2\tA_neutral_B\tB_neutral_A\to\to\tFLICKR\tFLICKR\tTEST\n",
        encoding="utf-8",
    )
    assert sts_data.load_sick(p)[0] == ["A b", "E f"]
    s1, s2, sc = sts_data.load_sick(p, split="test")
    assert s1 == ["E f"] and s2 == ["G h"] and sc.tolist() == [3.2]


def test_senteval_tree_loads_every_year_and_one_year_folder(tmp_path: Path):
    expected = make_senteval_tree(tmp_path)
    sets = sts_data.load_senteval(tmp_path)
    assert list(sets) == ["STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark"]
    for name, subsets in expected.items():
        assert list(sets[name]) == list(subsets)
        for sub, scored in subsets.items():
            assert sets[name][sub].sents1 == [a for a, _, _ in scored]
            assert sets[name][sub].gold.tolist() == [s for *_, s in scored]
    one = sts_data.load_senteval(tmp_path / "STS13-en-test")
    assert list(one) == ["STS13"] and list(one["STS13"]) == ["FNWN", "headlines", "OnWN"]
    assert list(sts_data.load_senteval(tmp_path / "STSBenchmark")) == ["STSBenchmark"]


def test_senteval_partial_year_and_empty_folder_are_clear_errors(tmp_path: Path, capsys):
    make_senteval_tree(tmp_path / "STS")
    (tmp_path / "STS" / "STS14-en-test" / "STS.input.images.txt").unlink()
    rc = cli_main(["eval", "--run", "raw", "--task", "sts", "--data", f"senteval:{tmp_path / 'STS'}",
                   "--text-encoder", "toy-text", "--output", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "STS14 lacks subset(s) images" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    with pytest.raises(LightCRLError, match="no SentEval STS data"):
        sts_data.load_senteval(tmp_path / "empty")


def test_sts_specs_are_text_datasets_of_unique_sentences(tmp_path: Path):
    expected = make_senteval_tree(tmp_path)
    ds = open_dataset(f"senteval:{tmp_path}")
    scored = [p for subsets in expected.values() for pairs in subsets.values() for p in pairs]
    sentences = {a for a, _, _ in scored} | {b for _, b, _ in scored}
    assert ds.media == "text" and ds.split == "test"
    assert {r.text for r in ds.media_records()} == sentences and len(ds) == len(sentences)
    sub = ds.subsample(2, seed=3)  # --limit: 2 pairs per subset, and only their sentences
    assert all(len(p.gold) == 2 for subsets in sub.sets.values() for p in subsets.values())
    assert len(sub) < len(ds) and sub.fingerprint() != ds.fingerprint()
    assert open_dataset(f"stsb:{tmp_path / 'STSBenchmark'}", "dev").split == "dev"


# -------------------------------------------------------------------------------------------- evaluation
def test_eval_senteval_tree_one_row_per_year_mean_headline(tmp_path: Path, capsys):
    expected = make_senteval_tree(tmp_path / "STS")
    out = tmp_path / "r.json"
    rc = cli_main(["eval", "--run", "raw", "--task", "sts", "--data", f"senteval:{tmp_path / 'STS'}",
                   "--text-encoder", "toy-text", "--output", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    m = json.loads(out.read_text())["metrics"]
    years = ["STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark"]
    for name in years:
        assert f"{name}/spearman" in printed
        want = _concatenated_spearman(expected[name])
        assert m[f"{name}/spearman"] == pytest.approx(want, abs=1e-6)
        assert m[f"raw_encoder/{name}/n"] == sum(len(s) for s in expected[name].values())
    # the year's headline is the concatenation (MTEB), not SentEval's mean of subsets
    assert abs(m["raw_encoder/STS12/spearman"] - m["raw_encoder/STS12/mean/spearman"]) > 1e-3
    assert m["spearman"] == pytest.approx(np.mean([m[f"{y}/spearman"] for y in years]))
    assert "None" not in printed and None not in headline({"task": "sts", "metrics": m}).values()


def test_eval_one_year_folder(tmp_path: Path):
    expected = make_senteval_tree(tmp_path / "STS")
    r = run_eval(_raw_toy(), EvalRequest("sts", f"senteval:{tmp_path / 'STS' / 'STS13-en-test'}",
                                         output=tmp_path / "r.json"))
    shown = headline(r)
    assert list(shown) == ["spearman", "raw_encoder/spearman"]
    assert shown["spearman"] == pytest.approx(_concatenated_spearman(expected["STS13"]), abs=1e-6)
    assert {"raw_encoder/FNWN/spearman", "raw_encoder/mean/spearman"} <= set(r["metrics"])


def test_second_sts_eval_reuses_the_sentence_store(tmp_path: Path, monkeypatch):
    make_senteval_tree(tmp_path / "STS")
    spec = f"senteval:{tmp_path / 'STS' / 'STS15-en-test'}"
    first = run_eval(_raw_toy(), EvalRequest("sts", spec, output=tmp_path / "a.json"))

    def no_encoding(self, batch):
        raise AssertionError("the encoder ran although the sentences' store exists")

    monkeypatch.setattr(toy_encoders.ToyText, "encode_batch", no_encoding)
    second = run_eval(_raw_toy(), EvalRequest("sts", spec, output=tmp_path / "b.json"))
    assert second["metrics"] == first["metrics"]


def test_limit_samples_pairs_per_subset(tmp_path: Path):
    make_senteval_tree(tmp_path / "STS")
    r = run_eval(_raw_toy(), EvalRequest("sts", f"senteval:{tmp_path / 'STS'}", limit=3,
                                         output=tmp_path / "r.json"))
    assert r["metrics"]["raw_encoder/STS14/n"] == 3 * 6 and r["metrics"]["raw_encoder/STSBenchmark/n"] == 3


def test_pair_with_a_sentence_the_encoder_skips_is_left_out(tmp_path: Path):
    scored = _write_stsb(tmp_path / "stsb", np.random.default_rng(1))
    rows = (tmp_path / "stsb" / "sts-test.csv").read_text().splitlines()
    rows[2] = "\t".join(rows[2].split("\t")[:5] + ["", "an empty first sentence"])  # empty: not embeddable
    (tmp_path / "stsb" / "sts-test.csv").write_text("\n".join(rows) + "\n")
    r = run_eval(_raw_toy(), EvalRequest("sts", f"stsb:{tmp_path / 'stsb'}", output=tmp_path / "r.json"))
    assert r["metrics"]["raw_encoder/n"] == len(scored) - 1
    kept = {"test": [p for i, p in enumerate(scored) if i != 2]}
    assert r["metrics"]["spearman"] == pytest.approx(_concatenated_spearman(kept), abs=1e-6)


# --------------------------------------------------------------------------------------------- real data
STSB = data_root() / "sts" / "STSBenchmark"
SICK = data_root() / "nli" / "sick2014" / "SICK_train.txt"


def _bow(sentences: list[str], dim: int = 4096) -> np.ndarray:
    out = np.zeros((len(sentences), dim), dtype=np.float32)
    for i, s in enumerate(sentences):
        for tok in s.lower().split():
            out[i, zlib.crc32(tok.encode()) % dim] += 1.0
    return out


@pytest.mark.integration
@pytest.mark.skipif(not (STSB / "sts-dev.csv").is_file(), reason="STS Benchmark data not found")
def test_sts_benchmark_real_files():
    s1, s2, sc = sts_data.load_sts_benchmark(STSB, "dev")
    assert len(s1) == len(s2) == len(sc) == 1500
    assert sc.min() >= 0 and sc.max() <= 5
    assert s1[0] == "a man with a hard hat is dancing ."
    assert len(sts_data.load_sts_benchmark(STSB, "test")[0]) == 1379
    if (STSB / "stsbenchmark" / "sts-test.csv").is_file():  # original files: extra source columns
        orig = sts_data.load_sts_benchmark(STSB / "stsbenchmark", "test")
        np.testing.assert_array_equal(orig[2], sts_data.load_sts_benchmark(STSB, "test")[2])
    r = sts.evaluate(_bow(s1), _bow(s2), sc)
    assert 20 < r["spearman"] < 90 and r["n"] == 1500


@pytest.mark.integration
@pytest.mark.skipif(not SICK.is_file(), reason="SICK data not found")
def test_sick_real_file():
    s1, s2, sc = sts_data.load_sick(SICK)
    assert len(s1) == len(s2) == len(sc) == 4500
    assert sc.min() >= 1 and sc.max() <= 5
    assert s1[0].startswith("A group of kids is playing in a yard")


NEEDS_STSB = pytest.mark.skipif(not (STSB / "sts-test.csv").is_file(), reason="STS Benchmark data not found")


@pytest.mark.integration
@NEEDS_STSB
def test_minilm_sts_benchmark_matches_mteb_and_is_cached(tmp_path: Path, monkeypatch):
    """Raw MiniLM on STS-B test: MTEB's published 82.03 for all-MiniLM-L6-v2, from the sentence store;
    a second evaluation reads the store without running the encoder."""
    from lightcrl.encoders.text import HFTextEncoder

    request = EvalRequest("sts", f"stsb:{STSB}", "test", output=tmp_path / "a.json")
    first = run_eval(EvalTarget.resolve("raw"), request)["metrics"]
    assert round(first["spearman"], 2) == 82.03 and first["raw_encoder/n"] == 1379

    def no_encoding(self, batch):
        raise AssertionError("MiniLM ran although the STS-B sentences are in the store")

    monkeypatch.setattr(HFTextEncoder, "encode_batch", no_encoding)
    assert run_eval(EvalTarget.resolve("raw"), request)["metrics"] == first


@pytest.mark.integration
@NEEDS_STSB
def test_minilm_on_a_senteval_tree_made_of_sts_benchmark(tmp_path: Path):
    """SentEval's layout from real sentences (small copies): STSBenchmark/ and an STS16 of dev pairs."""
    tree = tmp_path / "STS"
    (tree / "STSBenchmark").mkdir(parents=True)
    test_rows = (STSB / "sts-test.csv").read_text(encoding="utf-8").splitlines(keepends=True)[:150]
    (tree / "STSBenchmark" / "sts-test.csv").write_text("".join(test_rows), encoding="utf-8")
    dev = sts_data.load_sts_benchmark(STSB, "dev")
    year = tree / "STS16-en-test"
    year.mkdir()
    for k, sub in enumerate(SENTEVAL_TREE["STS16-en-test"]):
        idx = range(20 * k, 20 * k + 20)
        inputs = [f"{dev.sents1[i]}\t{dev.sents2[i]}\n" for i in idx]
        (year / f"STS.input.{sub}.txt").write_text("".join(inputs), encoding="utf-8")
        gold = ["\n" if i == 20 * k else f"{dev.gold[i]}\n" for i in idx]  # the first: unscored
        (year / f"STS.gs.{sub}.txt").write_text("".join(gold), encoding="utf-8")
    raw = EvalTarget.resolve("raw")
    m = run_eval(raw, EvalRequest("sts", f"senteval:{tree}", output=tmp_path / "a.json"))["metrics"]
    assert m["raw_encoder/STS16/n"] == 5 * 19 and m["raw_encoder/STSBenchmark/n"] == 150
    assert 50 < m["STS16/spearman"] <= 100 and 50 < m["STSBenchmark/spearman"] <= 100
    assert m["spearman"] == pytest.approx((m["STS16/spearman"] + m["STSBenchmark/spearman"]) / 2)
    alone = run_eval(raw, EvalRequest("sts", f"stsb:{tree / 'STSBenchmark'}", output=tmp_path / "b.json"))
    assert alone["metrics"]["spearman"] == pytest.approx(m["STSBenchmark/spearman"], abs=1e-3)
