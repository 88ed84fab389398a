"""Stream aligned random crops of token shards as encoded stage sequences.

Goes in: a token folder (``cantus.tokens``: ``{split}-NNNNNN.tar`` with
``acoustic``/``semantic``/``mulan`` npy members) and a stage ``Layout``.
Comes out: batches ``{"ids": int64[B, T], "block": int64[B, T], "target":
bool[B, T], "key": list[str]}`` with ``T = layout.max_len`` (and ``"cond":
int64[B, T, C]`` where the layout has aligned conditioning).

A crop of t seconds takes 25 t semantic and 50 t acoustic frames from the
same offset (``crop``). ``TokenBatches`` is ``cantus.audio_stream.AudioBatches``
over token samples: the same per-epoch shard shuffle, split by rank and
DataLoader worker, seeded shuffle buffer and exact ``state_dict`` position.
Crop offsets and conditioning dropout are drawn from ``(seed, epoch, key)``,
so resuming needs no extra state.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from cantus import shards
from cantus.audio_stream import AudioBatches, AudioCrops, _seed
from cantus.tokens import ACOUSTIC_HZ, SEMANTIC_HZ, npy_load

from .layout import Layout

RATIO = ACOUSTIC_HZ // SEMANTIC_HZ  # acoustic frames per semantic frame


def crop(tokens: dict[str, np.ndarray], seconds: float, rng: random.Random | None
         ) -> dict[str, np.ndarray]:
    """Crop every time field to ``seconds`` from one offset (random, or 0 if ``rng`` is None).

    The offset is drawn in semantic frames (the coarser rate) so it lands on a
    frame of both: semantic ``[s0, s0 + 25 t)``, acoustic ``[2 s0, 2 s0 + 50 t)``.
    Tokens shorter than the crop are returned whole.
    """
    n_sem = int(round(seconds * SEMANTIC_HZ))
    lengths = []
    if "semantic" in tokens:
        lengths.append(tokens["semantic"].shape[-1] - n_sem)
    if "acoustic" in tokens:
        lengths.append((tokens["acoustic"].shape[-1] - RATIO * n_sem) // RATIO)
    room = max(0, min(lengths)) if lengths else 0
    s0 = rng.randrange(room + 1) if rng is not None and room > 0 else 0
    out = dict(tokens)
    if "semantic" in tokens:
        out["semantic"] = tokens["semantic"][s0:s0 + n_sem]
    if "acoustic" in tokens:
        out["acoustic"] = tokens["acoustic"][:, RATIO * s0:RATIO * (s0 + n_sem)]
    return out


def decode_tokens(fields: dict[str, bytes], want: tuple[str, ...]) -> dict[str, np.ndarray]:
    missing = [f for f in want if f"{f}.npy" not in fields]
    if missing:
        raise KeyError(f"token sample lacks {', '.join(missing)}")
    return {f: npy_load(fields[f"{f}.npy"]) for f in want}


def encode_item(layout: Layout, key: str, tokens: dict[str, np.ndarray], seed: int, epoch: int,
                cond_dropout: float, random_crop: bool) -> dict[str, Any]:
    rng = random.Random(_seed(seed, epoch, key, "crop")) if random_crop else None
    draw = random.Random(_seed(seed, epoch, key, "drop")).random()
    drop = cond_dropout > 0 and draw < cond_dropout
    return encoded(layout, crop(tokens, layout.crop_seconds, rng), drop, key)


def encoded(layout: Layout, tokens: dict[str, np.ndarray], drop: bool, key: str = ""
            ) -> dict[str, Any]:
    """One cropped sample as tensors: ids, block, target, and ``cond`` int64[L, C] when the
    layout has aligned conditioning."""
    ids, block, target = layout.encode(tokens, drop_cond=drop)
    out = {"ids": torch.from_numpy(ids), "block": torch.from_numpy(block),
           "target": torch.from_numpy(target), "key": key}
    if layout.cond_width:
        out["cond"] = torch.from_numpy(layout.aligned_cond(tokens, drop_cond=drop))
    return out


class TokenCrops(AudioCrops):
    """One epoch of encoded token crops (``AudioCrops`` with a token ``_crop``)."""

    def __init__(self, layout: Layout, cond_dropout: float, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layout, self.cond_dropout = layout, cond_dropout

    def _crop(self, item: tuple[str, dict]) -> dict[str, Any]:
        key, fields = item
        tokens = decode_tokens(fields, self.layout.spec.fields)
        out = encode_item(self.layout, key, tokens, self.seed, self.epoch, self.cond_dropout,
                          random_crop=True)
        out["worker"] = self._worker()[0]
        return out


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    # Pads sit on the right: cut the columns no sequence of this batch reaches.
    n = max(int((i["block"] >= 0).sum()) for i in items)
    keys = ("ids", "block", "target") + (("cond",) if "cond" in items[0] else ())
    batch = {k: torch.stack([i[k][:n] for i in items]) for k in keys}
    batch["key"] = [i["key"] for i in items]
    if "worker" in items[0]:
        batch["worker"] = items[0]["worker"]
    return batch


class TokenBatches(AudioBatches):
    """Endless, resumable batches of encoded crops (see ``AudioBatches`` for the order)."""

    def __init__(self, paths: list[str], layout: Layout, *, batch_size: int, seed: int,
                 cond_dropout: float = 0.0, num_workers: int = 0, shuffle_buffer: int = 64,
                 rank: int = 0, world: int = 1, pin_memory: bool = False):
        super().__init__(paths, crop_seconds=layout.crop_seconds, sample_rate=SEMANTIC_HZ,
                         batch_size=batch_size, seed=seed, num_workers=num_workers,
                         shuffle_buffer=shuffle_buffer, rank=rank, world=world,
                         pin_memory=pin_memory)
        self.layout, self.cond_dropout = layout, cond_dropout

    def _epoch_loader(self) -> torch.utils.data.DataLoader:
        ds = TokenCrops(self.layout, self.cond_dropout, self.paths, self.crop, self.seed,
                        self.epoch, self.rank, self.world, self.shuffle_buffer,
                        list(self.consumed), self.next_worker)
        gen = torch.Generator().manual_seed(_seed(self.seed, self.epoch, "loader") >> 1)
        return torch.utils.data.DataLoader(ds, batch_size=self.batch_size,
                                           num_workers=self.num_workers, collate_fn=collate,
                                           drop_last=True, persistent_workers=False,
                                           generator=gen, pin_memory=self.pin_memory)


def fixed_crops(paths: list[str], layout: Layout, limit: int, seed: int = 0
                ) -> Iterator[dict[str, Any]]:
    """The first ``limit`` samples of ``paths`` in order, each cropped at a seeded offset
    (no dropout): the same crops every call, for validation and the unigram baseline."""
    n = 0
    for path in paths:
        for key, fields in shards.iter_samples(path):
            if n >= limit:
                return
            tokens = decode_tokens(fields, layout.spec.fields)
            yield encode_item(layout, key, tokens, seed, -1, 0.0, random_crop=True)
            n += 1


def batched(items: Iterator[dict[str, Any]], batch_size: int) -> Iterator[dict[str, Any]]:
    buf: list[dict[str, Any]] = []
    for item in items:
        buf.append(item)
        if len(buf) == batch_size:
            yield collate(buf)
            buf = []
    if buf:
        yield collate(buf)
