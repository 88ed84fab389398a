"""Duplicate search: first occurrence wins, across and inside faiss batches."""

import numpy as np
import pytest

from cantus.ingest import dedup


@pytest.mark.parametrize("batch", [3, 1024])
def test_first_occurrence_wins_across_batches(monkeypatch, batch):
    monkeypatch.setattr(dedup, "BATCH", batch)
    rng = np.random.default_rng(0)
    base = rng.standard_normal((6, 32)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    near = base[1] + 0.01 * rng.standard_normal(32).astype(np.float32)
    near /= np.linalg.norm(near)
    fps = np.stack([base[0], base[1], base[2], near, base[3], base[0], base[4], base[5]])
    hashes = ["a", "b", "c", "n", "d", "a", "e", "f"]  # index 5 repeats index 0 exactly
    dups = dedup.find_duplicates(hashes, fps, threshold=0.97)
    assert set(dups) == {3, 5}
    assert dups[5][:2] == ("exact_duplicate", 0)
    assert dups[3][0] == "near_duplicate" and dups[3][1] == 1 and dups[3][2] > 0.97


def test_a_duplicate_of_a_duplicate_points_at_the_kept_chunk(monkeypatch):
    monkeypatch.setattr(dedup, "BATCH", 2)
    v = np.ones((3, 8), np.float32) / np.sqrt(8)
    dups = dedup.find_duplicates(["x", "y", "z"], v, threshold=0.9)
    assert dups == {1: ("near_duplicate", 0, pytest.approx(1.0)),
                    2: ("near_duplicate", 0, pytest.approx(1.0))}


def test_nothing_in_nothing_out():
    assert dedup.find_duplicates([], np.zeros((0, 4), np.float32), 0.9) == {}
