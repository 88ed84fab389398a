import numpy as np
import pytest

from cantus.reservoir import Reservoir


def stream(res: Reservoir, x: np.ndarray, parts: int) -> np.ndarray:
    for part in np.array_split(x, parts):
        res.add(part)
    return res.sample()


def test_reservoir_is_bounded_and_uniform():
    s = stream(Reservoir(cap=500, seed=1), np.arange(10000, dtype=np.float32)[:, None], 37)[:, 0]
    assert s.shape == (500,) and len(np.unique(s)) == 500
    assert 4000 < s.mean() < 6000        # not just the first rows
    # each row is kept with probability cap / n: the sample's halves hold about as many
    assert abs(int((s < 5000).sum()) - 250) < 60


def test_sample_does_not_depend_on_how_the_stream_was_cut():
    x = np.random.default_rng(0).normal(size=(5000, 3)).astype(np.float32)
    one = stream(Reservoir(cap=700, seed=4), x, 1)
    many = stream(Reservoir(cap=700, seed=4), x, 91)
    assert np.array_equal(one, many)
    assert not np.array_equal(one, stream(Reservoir(cap=700, seed=5), x, 91))


def test_a_short_stream_is_kept_whole_in_order_and_allocates_little():
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    res = Reservoir(cap=1 << 20, seed=0)
    assert np.array_equal(stream(res, x, 4), x)
    assert res.rows.shape[0] < 2048      # not the cap's million rows
    grown = Reservoir(cap=5000, seed=0)
    big = np.arange(3000, dtype=np.float32)[:, None]
    assert np.array_equal(stream(grown, big, 7), big)   # doubled past its first 1024 rows


def test_an_empty_reservoir_says_what_it_lacks():
    with pytest.raises(ValueError, match="no frames were added"):
        Reservoir(cap=10, seed=0, what="frames").sample()
    with pytest.raises(ValueError, match="cap of at least 1"):
        Reservoir(cap=0, seed=0)
