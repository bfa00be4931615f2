"""scripts/seed_table.py: mean ± sample std over the finished seeds of an experiment's results.csv."""

import csv
import importlib.util
import statistics
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "seed_table.py"


def _load():
    spec = importlib.util.spec_from_file_location("seed_table", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_seed_table_mean_std_and_unfinished(tmp_path):
    cols = ["cell", "kind", "seed", "trainable_params", "train_time_s", "flickr-dev/t2i_R@1",
            "flickr-dev/i2t_R@1", "geometry/knn_overlap_a@10", "geometry/knn_overlap_b@10",
            "stsb/spearman", "stsb/raw_encoder/spearman", "zs-cifar10/top1", "zs-cifar10/top5",
            "zs-tiny/top1", "zs-tiny/top5", "status"]
    rows = [
        ["m-s0", "train", "0", "100", "10", "20", "22", "0.5", "0.6", "80", "82", "40", "90", "8", "20",
         "done"],
        ["m-s1", "train", "1", "100", "14", "24", "22", "0.7", "0.6", "78", "82", "44", "90", "10", "20",
         "done"],
        ["m-s2", "train", "2", "", "", "", "", "", "", "", "", "", "", "", "", "partial"],
        ["b-s0", "asif", "0", "0", "3", "", "", "", "", "", "", "", "", "", "", "partial"],
    ]
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(rows)
    lines = _load().table(str(path)).splitlines()
    m = lines[2].split(" | ")
    assert m[0] == "| m" and m[1] == "0,1"  # the unfinished seed 2 is not counted
    assert m[2] == f"42.00 ± {statistics.stdev([40, 44]):.2f}"  # CIFAR-10 top-1
    assert m[9] == "-3.00 ± 1.41"  # STS-B model - raw, per seed: -2, -4
    assert m[10] == "60.00 ± 14.14"  # kNN overlap in percent
    assert m[12] == "100" and m[13] == "10-14"
    assert m[14].startswith(f"{statistics.fmean([(40 + 8 + 20 + 80) / 4, (44 + 10 + 24 + 78) / 4]):.2f}")
    assert "not measured" in lines[3] and lines[3].startswith("| b | none")
