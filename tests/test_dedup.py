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


def _unit(x):
    x = np.asarray(x, np.float64)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _pair_at(rng, cos):
    """Two unit float32 vectors of 256 dims at cosine ``cos``."""
    a, noise = rng.standard_normal((2, 256))
    a /= np.linalg.norm(a)
    noise -= (noise @ a) * a
    noise /= np.linalg.norm(noise)
    return _unit(np.stack([a, cos * a + np.sqrt(1 - cos * cos) * noise]))


def _planted_set(n_random=12000, n_pairs=300, seed=0, threshold=0.97):
    """Random unit rows with near-duplicates hidden at random positions: audio ones (a
    piece's fingerprint, re-encoded, 10 dB quieter, padded 0-100 ms) and vector pairs at
    cosines uniform in (threshold, 1). Returns float32[N, 256]."""
    import soxr

    from cantus.ingest.process import fingerprint

    rng, rate = np.random.default_rng(seed), 24000
    groups = []
    for g in range(6):
        n = 4 * rate
        notes = 220 * 2 ** (rng.integers(0, 24, size=8) / 12)
        phase = 2 * np.pi * np.cumsum(np.repeat(notes, n // 8)) / rate
        x = (0.2 * np.sin(phase) + 0.01 * rng.standard_normal(n)).astype(np.float32)
        re = soxr.resample(soxr.resample(x, rate, 8000), 8000, rate)[:n]
        re = np.round(re * 128) / 128 + 0.003 * rng.standard_normal(n)
        pad = np.concatenate([np.zeros(int(rng.integers(0, 2400))), x])[:n]
        groups.append(np.stack([fingerprint(v.astype(np.float32), rate)
                                for v in (x, re, 0.316 * x, pad)]))
    groups += [_pair_at(rng, rng.uniform(threshold, 1.0)) for _ in range(n_pairs)]
    fp = _unit(rng.standard_normal((n_random + sum(map(len, groups)), 256)))
    pos = rng.permutation(len(fp))
    k = 0
    for g in groups:
        fp[np.sort(pos[k:k + len(g)])] = g
        k += len(g)
    return fp


def test_lsh_finds_what_the_exact_search_finds_on_planted_near_duplicates():
    fp = _planted_set()
    hashes = [str(i) for i in range(len(fp))]
    exact = dedup.find_duplicates(hashes, fp, 0.97, exact_max=len(fp))
    lsh = dedup.find_duplicates(hashes, fp, 0.97, exact_max=0)
    assert len(exact) > 300  # the planted pairs, and the audio copies above the threshold
    recall = sum(lsh.get(i) == d for i, d in exact.items()) / len(exact)
    assert recall >= 0.99, recall
    assert all(exact.get(i) == d for i, d in lsh.items())  # nothing found that is not there


def test_decisions_follow_the_float64_similarity_at_the_threshold():
    """Pairs a hair either side of the threshold, where float32 rounding (which differs
    from CPU to CPU) cannot tell: both searches decide on the fixed-order float64 value."""
    rng = np.random.default_rng(3)
    pairs = [_pair_at(rng, 0.97 + s * d) for d in (1e-8, 3e-8, 1e-7, 1e-6) for s in (-1, 1)]
    fp = np.concatenate(pairs)
    hashes = [str(i) for i in range(len(fp))]
    want = {2 * k + 1: ("near_duplicate", 2 * k, float(dedup.dot64(p[0], p[1])[0]))
            for k, p in enumerate(pairs) if dedup.dot64(p[0], p[1])[0] > 0.97}
    assert 0 < len(want) < len(pairs)
    assert dedup.find_duplicates(hashes, fp, 0.97) == want
    assert dedup.find_duplicates(hashes, fp, 0.97, exact_max=0) == want


def test_dot64_is_a_fixed_order_sum_of_exact_products():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((2, 5, 256)).astype(np.float32)
    want = [sum(float(x) * float(y) for x, y in zip(r, s)) for r, s in zip(a, b)]  # left fold
    assert dedup.dot64(a, b).tolist() == want


def test_thousands_of_copies_in_one_bucket_all_point_at_the_first(monkeypatch):
    monkeypatch.setattr(dedup, "WINDOW", 4)  # buckets longer than the window
    rng = np.random.default_rng(5)
    base = _unit(rng.standard_normal(256))
    copies = _unit(base + 1e-3 * rng.standard_normal((300, 256)))
    fp = np.concatenate([_unit(rng.standard_normal((50, 256))), copies])
    dups = dedup.find_duplicates([str(i) for i in range(len(fp))], fp, 0.97, exact_max=0)
    assert set(dups) == set(range(51, 350)) and {d[1] for d in dups.values()} == {50}


def test_same_decisions_from_a_memmap(tmp_path):
    fp = _planted_set(n_random=3000, n_pairs=50, seed=1)
    spool = dedup.FingerprintSpool(256, str(tmp_path))
    assert spool.add(fp[:100]) == (0, 100) and spool.add(np.zeros((0, 0))) == (100, 100)
    assert spool.add(fp[100:]) == (100, len(fp))
    mm = spool.array()
    assert isinstance(mm, np.memmap) and np.array_equal(mm, fp)
    hashes = [str(i) for i in range(len(fp))]
    for exact_max in (0, len(fp)):
        assert (dedup.find_duplicates(hashes, mm, 0.97, exact_max=exact_max)
                == dedup.find_duplicates(hashes, fp, 0.97, exact_max=exact_max))


def test_rows_and_hashes_must_agree():
    with pytest.raises(ValueError, match="fingerprints: 2 rows for 3 PCM hashes"):
        dedup.find_duplicates(["a", "b", "c"], np.zeros((2, 4), np.float32), 0.9)


def test_the_plan_passes_its_fingerprints_memory_mapped(monkeypatch, cfg):
    from cantus.ingest import plan

    seen = []

    def spy(hashes, fp, threshold):
        seen.append((type(fp), np.array(fp)))
        return dedup.find_duplicates(hashes, fp, threshold)

    monkeypatch.setattr(plan, "find_duplicates", spy)
    rng = np.random.default_rng(6)
    fps = [_unit(rng.standard_normal((k, 256))) for k in (2, 0, 3)]
    records = [{"error": None, "meta": {}, "uri": f"in{i}"} for i in range(3)]
    results = {i: {"reject": None, "source_hash": f"s{i}", "fingerprints": fp,
                   "chunks": [{"pcm_hash": f"h{i}.{j}", "key": f"k{i}.{j}", "offset": 0,
                               "length": 1} for j in range(len(fp))]}
               for i, fp in enumerate(fps)}
    p = plan.Plan(cfg, records, results)
    (kind, got), = seen
    assert issubclass(kind, np.memmap) and np.array_equal(got, np.concatenate(fps))
    assert len(p.kept) == 5
