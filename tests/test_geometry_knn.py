"""Neighbourhood preservation (kNN overlap before/after alignment)."""

from __future__ import annotations

import numpy as np
import pytest

from lightcrl.metrics.geometry import knn_overlap


def test_knn_overlap_is_one_for_the_same_geometry_and_chance_for_unrelated_points():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16))
    rot = np.linalg.qr(rng.standard_normal((16, 16)))[0]
    assert knn_overlap(x, x, k=5) == 1.0
    assert knn_overlap(x, 2.0 * x @ rot, k=5) == pytest.approx(1.0)  # cosine neighbours survive a rotation
    unrelated = knn_overlap(x, rng.standard_normal((300, 16)), k=5)
    assert unrelated < 0.1  # chance: 5 / 299
    noisy = knn_overlap(x, x + 0.3 * rng.standard_normal(x.shape), k=5)
    assert unrelated < noisy < 1.0
    # subsampled above max_points: still 1 for the same points
    assert knn_overlap(x, x @ rot, k=5, max_points=100) == pytest.approx(1.0)


def test_knn_overlap_by_hand_and_bad_inputs():
    # unit vectors at angles 0, 10, 20, 90, 100 degrees; each point's nearest other point, self excluded
    ang = np.radians([0, 10, 20, 90, 100])
    before = np.stack([np.cos(ang), np.sin(ang)], 1)
    after = before[[0, 1, 2, 3, 4]].copy()
    after[2] = [np.cos(np.radians(95)), np.sin(np.radians(95))]  # item 2 moves next to items 3 and 4
    # k=1 neighbours before: 0->1, 1->0|2 (tie: both 10 deg), 2->1, 3->4, 4->3; after: 0->1, 1->0, 2->3|4,
    # 3->2 (5 deg), 4->2 (5 deg). Kept: item 0 yes; 2, 3, 4 no; item 1 depends on the tie -> 1/5 or 2/5
    assert knn_overlap(before, after, k=1) in (pytest.approx(0.2), pytest.approx(0.4))
    with pytest.raises(ValueError, match="same items"):
        knn_overlap(before, after[:4])
    with pytest.raises(ValueError, match="k"):
        knn_overlap(before, after, k=5)
