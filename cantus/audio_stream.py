"""Stream random crops from audio shards, deterministically and resumably.

Goes in: the ingest stage's WebDataset audio shards (``{split}-NNNNNN.tar``
with ``{key}.flac`` and ``{key}.json``). Comes out: batches
``{"audio": float32[B, T], "length": int64[B], "key": list[str]}`` of
``crop_seconds`` crops (shorter chunks are zero-padded; ``length`` says how
many samples are real). With ``with_meta=True`` each batch also carries
``"meta"``: the samples' parsed JSON (caption, tags, ...), in batch order.

Order is a pure function of ``(seed, epoch)``: shards are shuffled per epoch,
split across ranks (DDP) and DataLoader workers, samples pass a seeded
shuffle buffer, and each crop's offset is drawn from ``(seed, epoch, key)``.
With fewer shards than ranks (or than a rank's workers) the samples are
split instead: each reads every shard of its share and keeps every
``world``-th (``workers``-th) sample from its own offset, so no rank is left
without data and no sample is read twice in an epoch.
``AudioBatches`` counts batches, so its ``state_dict()`` is the data position
of a checkpoint and ``load_state_dict`` resumes at exactly the next batch.

    batches = AudioBatches(shard_paths("data/audio", "train"), crop_seconds=2.0,
                           sample_rate=24000, batch_size=8, seed=0)
    for batch in batches: ...
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cantus import shards
from cantus.audio import decode_sample  # noqa: F401  (re-exported: callers import it here)


def shard_paths(folder: str | Path, split: str) -> list[str]:
    """Sorted shard paths of one split in an audio or token shard folder (local, or a URL
    such as ``s3://bucket/audio``: then full URLs, which ``shards.iter_samples`` streams)."""
    paths = shards.glob(folder, f"{split}-*.tar")
    if not paths:
        raise FileNotFoundError(f"no '{split}' shards in {folder} (expected {split}-NNNNNN.tar)")
    return paths


def _seed(*parts: Any) -> int:
    h = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big")


class AudioCrops(torch.utils.data.IterableDataset):
    """One epoch of crops, split over ranks and workers; skips ``skip`` per worker."""

    def __init__(self, paths: list[str], crop: int, seed: int, epoch: int, rank: int,
                 world: int, shuffle_buffer: int, skip_per_worker: list[int],
                 first_worker: int = 0, with_meta: bool = False):
        super().__init__()
        self.first_worker, self.with_meta = first_worker, with_meta
        self.paths, self.crop, self.seed, self.epoch = paths, crop, seed, epoch
        self.rank, self.world = rank, world
        self.shuffle_buffer, self.skip_per_worker = shuffle_buffer, skip_per_worker

    def _worker(self) -> tuple[int, int]:
        """(logical worker id, workers). The DataLoader polls its workers round-robin
        from worker 0; rotating ids makes a resumed epoch poll the right one first."""
        info = torch.utils.data.get_worker_info()
        if info is None:
            return 0, 1
        return (info.id + self.first_worker) % info.num_workers, info.num_workers

    def _my_share(self) -> tuple[list[str], int, int, int]:
        """(shards this worker reads, its logical id, stride, offset): of the samples of
        those shards, in order, it keeps number n when ``n % stride == offset``."""
        wid, nw = self._worker()
        order = list(self.paths)
        random.Random(_seed(self.seed, self.epoch, "shards")).shuffle(order)
        if len(order) >= self.world:
            mine, stride, offset = order[self.rank::self.world], 1, 0
        else:  # fewer shards than ranks: every rank reads them all, takes every world-th
            mine, stride, offset = order, self.world, self.rank
        if len(mine) >= nw:
            return mine[wid::nw], wid, stride, offset
        # fewer shards than workers: each worker takes every nw-th sample of the rank's
        return mine, wid, stride * nw, offset + stride * wid

    def __iter__(self) -> Iterator[dict[str, Any]]:
        paths, wid, stride, offset = self._my_share()
        rng = random.Random(_seed(self.seed, self.epoch, self.rank, wid, "buffer"))
        skip = self.skip_per_worker[wid] if wid < len(self.skip_per_worker) else 0
        for n, item in enumerate(self._shuffled(paths, rng, stride, offset)):
            if n >= skip:
                yield self._crop(item)

    def _shuffled(self, paths: list[str], rng: random.Random, stride: int = 1,
                  offset: int = 0) -> Iterator[tuple[str, dict]]:
        buf: list[tuple[str, dict]] = []
        n = -1
        for path in paths:
            for key, fields in shards.iter_samples(path):
                n += 1
                if n % stride != offset:
                    continue
                buf.append((key, fields))
                if len(buf) >= self.shuffle_buffer:
                    yield buf.pop(rng.randrange(len(buf)))
        while buf:
            yield buf.pop(rng.randrange(len(buf)))

    def _crop(self, item: tuple[str, dict]) -> dict[str, Any]:
        key, fields = item
        x, meta = decode_sample(fields)
        n = x.shape[0]
        start = 0
        if n > self.crop:
            start = random.Random(_seed(self.seed, self.epoch, key, "crop")).randrange(
                n - self.crop + 1)
        piece = np.zeros(self.crop, np.float32)
        got = x[start:start + self.crop]
        piece[:got.shape[0]] = got
        item = {"audio": torch.from_numpy(piece), "length": got.shape[0], "key": key,
                "worker": self._worker()[0]}
        if self.with_meta:
            item["meta"] = meta
        return item


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch = {"audio": torch.stack([i["audio"] for i in items]),
             "length": torch.tensor([i["length"] for i in items], dtype=torch.int64),
             "key": [i["key"] for i in items], "worker": items[0]["worker"]}
    if "meta" in items[0]:
        batch["meta"] = [i["meta"] for i in items]
    return batch


class AudioBatches:
    """Endless, resumable batches of crops over epochs.

    Args:
        paths: shard paths (``shard_paths``).
        crop_seconds: crop length; ``sample_rate`` is the shards' rate.
        batch_size, seed, num_workers: as for a DataLoader; the sequence of
            batches depends on (seed, num_workers, batch_size), nothing else.
        rank, world: this process's DDP rank and the world size.
        with_meta: also return each sample's JSON metadata as ``batch["meta"]``.
        pin_memory: batches in pinned memory (for non-blocking copies to a GPU).
    """

    def __init__(self, paths: list[str], *, crop_seconds: float, sample_rate: int,
                 batch_size: int, seed: int, num_workers: int = 0, shuffle_buffer: int = 64,
                 rank: int = 0, world: int = 1, with_meta: bool = False,
                 pin_memory: bool = False):
        self.paths, self.with_meta, self.pin_memory = list(paths), with_meta, pin_memory
        self.crop = int(round(crop_seconds * sample_rate))
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.shuffle_buffer, self.rank, self.world = shuffle_buffer, rank, world
        self.epoch = 0
        self.consumed = [0] * max(1, num_workers)  # samples taken from each worker this epoch
        self.next_worker = 0  # the worker whose batch comes next

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": list(self.consumed), "seed": self.seed,
                "next_worker": self.next_worker,
                "num_workers": self.num_workers, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("seed", "num_workers", "batch_size"):
            if state[k] != getattr(self, k):
                raise ValueError(f"data position was saved with {k}={state[k]}, "
                                 f"this run uses {k}={getattr(self, k)}")
        self.epoch, self.consumed = int(state["epoch"]), [int(c) for c in state["consumed"]]
        self.next_worker = int(state["next_worker"])

    def _epoch_loader(self) -> torch.utils.data.DataLoader:
        ds = AudioCrops(self.paths, self.crop, self.seed, self.epoch, self.rank, self.world,
                        self.shuffle_buffer, list(self.consumed), self.next_worker,
                        self.with_meta)
        # A DataLoader draws its base seed from the generator it is given, else from
        # the global torch RNG: its own generator keeps a trainer's RNG (dropout) the
        # same whether an epoch's loader was made before a checkpoint or after resume.
        gen = torch.Generator().manual_seed(_seed(self.seed, self.epoch, "loader") >> 1)
        return torch.utils.data.DataLoader(ds, batch_size=self.batch_size,
                                           num_workers=self.num_workers,
                                           collate_fn=_collate, drop_last=True,
                                           persistent_workers=False, generator=gen,
                                           pin_memory=self.pin_memory)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            fresh = not any(self.consumed)
            got = 0
            for batch in self._epoch_loader():
                # Counting what each worker gave makes the position exact even
                # when workers run out of shards at different times.
                worker = batch.pop("worker")
                self.consumed[worker] += self.batch_size
                self.next_worker = (worker + 1) % len(self.consumed)
                got += 1
                yield batch
            if got == 0 and fresh:
                raise ValueError(f"fewer than batch_size={self.batch_size} crops per worker "
                                 f"in {len(self.paths)} shards (rank {self.rank} of "
                                 f"{self.world}, {max(1, self.num_workers)} worker(s) each)")
            self.epoch, self.consumed = self.epoch + 1, [0] * len(self.consumed)
            self.next_worker = 0


def iter_all(paths: list[str]) -> Iterator[tuple[np.ndarray, dict]]:
    """Every (audio, metadata) of the shards in order, decoded one at a time: a stage that
    streams a split holds one chunk of audio, not the split."""
    for path in paths:
        for _, fields in shards.iter_samples(path):
            yield decode_sample(fields)


def iter_meta(paths: list[str]) -> Iterator[dict]:
    """Every sample's metadata in order, from its JSON member alone (no audio is read)."""
    import json

    for path in paths:
        for _, fields in shards.iter_samples(path, fields=("json",)):
            yield json.loads(fields["json"])


def load_all(paths: list[str], limit: int | None = None) -> list[tuple[np.ndarray, dict]]:
    """Every (audio, metadata) of the shards in order: for small fixed evaluation sets."""
    out = []
    for path in paths:
        for _, fields in shards.iter_samples(path):
            out.append(decode_sample(fields))
            if limit is not None and len(out) >= limit:
                return out
    return out
