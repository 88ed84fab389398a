"""Crops streamed from real audio shards: deterministic, resumable, split by rank."""

import itertools

import pytest
import torch

from cantus.audio_stream import AudioBatches, load_all, shard_paths
from conftest import audio_shards


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    return audio_shards(tmp_path_factory.mktemp("stream"), 7, 6.5, seed=500, chunk_seconds=3.0)


def _take(batches, n):
    return [(b["key"], b["audio"].clone()) for b in itertools.islice(iter(batches), n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_exactly_the_next_batches(shard_dir, workers):
    paths = shard_paths(shard_dir, "train")
    kw = dict(crop_seconds=1.0, sample_rate=24000, batch_size=3, seed=5, num_workers=workers,
              shuffle_buffer=8)
    full = _take(AudioBatches(paths, **kw), 12)  # spans an epoch boundary
    first = AudioBatches(paths, **kw)
    _take(first, 5)
    resumed = AudioBatches(paths, **kw)
    resumed.load_state_dict(first.state_dict())
    rest = _take(resumed, 7)
    for (k1, a1), (k2, a2) in zip(full[5:], rest):
        assert k1 == k2 and torch.equal(a1, a2)


def test_crops_have_the_right_shape_and_padding(shard_dir):
    paths = shard_paths(shard_dir, "train")
    b = next(iter(AudioBatches(paths, crop_seconds=2.0, sample_rate=24000, batch_size=4,
                               seed=0)))
    assert b["audio"].shape == (4, 48000) and b["audio"].dtype == torch.float32
    assert (b["length"] <= 48000).all() and (b["length"] > 0).all()
    for row, n in zip(b["audio"], b["length"]):
        assert torch.count_nonzero(row[n:]) == 0
    keys = [m["key"] for _, m in load_all(paths)]
    assert set(b["key"]) <= set(keys)


def test_ranks_see_disjoint_shards_and_seeds_differ(shard_dir):
    paths = shard_paths(shard_dir, "train")
    kw = dict(crop_seconds=0.5, sample_rate=24000, batch_size=1)
    r0 = {k for ks, _ in _take(AudioBatches(paths, seed=1, rank=0, world=2, **kw), 4) for k in ks}
    r1 = {k for ks, _ in _take(AudioBatches(paths, seed=1, rank=1, world=2, **kw), 4) for k in ks}
    assert r0 and r1 and not r0 & r1
    a = [k for ks, _ in _take(AudioBatches(paths, seed=1, **kw), 8) for k in ks]
    b = [k for ks, _ in _take(AudioBatches(paths, seed=2, **kw), 8) for k in ks]
    assert a != b


def test_mismatched_position_is_refused(shard_dir):
    paths = shard_paths(shard_dir, "train")
    a = AudioBatches(paths, crop_seconds=1.0, sample_rate=24000, batch_size=2, seed=0)
    b = AudioBatches(paths, crop_seconds=1.0, sample_rate=24000, batch_size=3, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        b.load_state_dict(a.state_dict())
