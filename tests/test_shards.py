"""cantus.shards: shards written and read as streams, whole or not at all."""

from __future__ import annotations

import tracemalloc

import fsspec
import pytest

from cantus import shards
from cantus.ingest.staging import FlacReader

MIB = 1 << 20


def _samples(n: int, size: int, fail_at: int | None = None):
    for i in range(n):
        if i == fail_at:
            raise RuntimeError(f"sample {i} failed")
        yield f"k{i:04d}", {"flac": bytes([i % 251]) * size, "json": b'{"i": %d}' % i}


@pytest.fixture(params=["local", "memory"])
def folder(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path)
    else:
        root = f"memory://shards-test-{tmp_path.name}"
        yield root
        fsspec.filesystem("memory").rm(root, recursive=True)


def test_a_shard_written_from_a_generator_is_the_deterministic_tar(folder):
    path = shards.join(folder, "train-000000.tar")
    shards.write_shard(path, _samples(5, 1000))
    assert shards.read_bytes(path) == shards.tar_bytes(_samples(5, 1000))
    assert [k for k, _ in shards.iter_samples(path)] == [f"k{i:04d}" for i in range(5)]


def test_a_writer_that_fails_midway_leaves_no_shard_and_no_temporary_file(folder):
    path = shards.join(folder, "train-000000.tar")
    with pytest.raises(RuntimeError, match="sample 3 failed"):
        shards.write_shard(path, _samples(5, 1000, fail_at=3))
    assert not shards.exists(path)
    assert shards.glob(folder, "*") == []
    shards.write_shard(path, _samples(2, 10))  # an older shard is replaced only when whole
    with pytest.raises(RuntimeError):
        shards.write_shard(path, _samples(5, 1000, fail_at=1))
    assert [k for k, _ in shards.iter_samples(path)] == ["k0000", "k0001"]


def test_hashed_samples_stream_the_shard_once_with_its_sha256(folder):
    path = shards.join(folder, "train-000000.tar")
    shards.write_shard(path, _samples(7, 3000))
    read = shards.HashedSamples(path)
    assert read.sha256 is None  # known only once every byte went through
    assert list(read) == list(shards.iter_samples(path))
    assert read.sha256 == shards.sha256(path)
    metas = shards.HashedSamples(path, fields=("json",))
    assert [f for _, f in metas] == [{"json": b'{"i": %d}' % i} for i in range(7)]
    assert metas.sha256 == shards.sha256(path)


def test_writing_and_reading_a_shard_hold_one_sample_not_the_shard(tmp_path):
    path = tmp_path / "train-000000.tar"
    tracemalloc.start()
    try:
        shards.write_shard(path, _samples(48, MIB))  # a 48 MiB shard, 1 MiB per sample
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        read = shards.HashedSamples(path)
        assert sum(len(f["flac"]) for _, f in read) == 48 * MIB
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert path.stat().st_size > 48 * MIB
    assert write_peak < 8 * MIB, f"writing peaked at {write_peak / MIB:.1f} MiB"
    assert read_peak < 8 * MIB, f"reading peaked at {read_peak / MIB:.1f} MiB"


def test_flac_reader_reads_one_chunk_at_a_time_and_names_a_missing_one(folder):
    path = shards.join(folder, "abc.tar")
    shards.write_shard(path, [("summary", {"json": b"{}"})] + list(_samples(4, 500)))
    reader = FlacReader(path)
    assert reader.read("k0002") == bytes([2]) * 500
    assert [reader.read(f"k{i:04d}") for i in (3, 0)] == [bytes([3]) * 500, bytes(500)]
    with pytest.raises(KeyError, match="abc.tar: staging file has no chunk k0009"):
        reader.read("k0009")
