"""Token layouts of the three stages: token fields <-> one id sequence.

Goes in: one crop's tokens (``acoustic`` uint16[12, Ta] at 50 Hz, ``semantic``
uint16[Ts] at 25 Hz, ``mulan`` uint16[12]). Comes out: int64 ids of one
sequence, the codebook block of every position and which positions are
targets (the loss is taken there only):

    semantic  [M | S]              p(S | M)
    coarse    [M | S | A[0:4]]     p(A[0:4] | S, M)
    fine      [A[0:4] | A[4:12]]   p(A[4:12] | A[0:4])

With ``aligned`` (params ``lm.<stage>.aligned_cond``) each position also
gets the conditioning of the token it predicts, added to its input
embedding (``aligned_cond``, int64[L, C]; -1 where none): the MuLan ids
(global) and the conditioning frame at the same time (coarse: the semantic
token of that 40 ms; fine: the 4 coarse codes of that frame). The prefix
stays as it is; the model need not learn to find the aligned prefix
position by attention, which a few hundred CPU steps do not teach it.

Every (field, level) has its own block of ids, as many as that field's
codebook holds (``sizes``: K of the acoustic, semantic and MuLan codebooks,
which may differ: the k-means K and the MuLan RVQ are sized to the data, the
codec to its bitrate); blocks follow one another in the order the stage's
parts name them. Acoustic tokens are flattened row-major over time and
level, as in AudioLM (``t0l0 t0l1 .. t0l3 t1l0 ..``). Two ids follow the
blocks: ``null`` replaces dropped conditioning (classifier-free guidance) and
``pad`` fills sequences to ``max_len`` on the right (causal attention never
lets a real position see a pad). Consecutive repeated semantic tokens can be
removed (AudioLM, first two stages), which makes lengths vary per crop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from cantus.tokens import ACOUSTIC_HZ, SEMANTIC_HZ


@dataclass(frozen=True)
class Part:
    """One field of a sequence; ``levels`` [lo, hi) for multi-level fields, None for semantic."""

    field: str
    levels: tuple[int, int] | None = None

    @property
    def n_levels(self) -> int:
        return 1 if self.levels is None else self.levels[1] - self.levels[0]


@dataclass(frozen=True)
class StageSpec:
    """Which parts condition, which are predicted, which conditioning may be dropped."""

    name: str
    cond: tuple[Part, ...]
    target: tuple[Part, ...]
    droppable: tuple[str, ...] = ()   # fields replaced by ``null`` under conditioning dropout

    @property
    def parts(self) -> tuple[Part, ...]:
        return self.cond + self.target

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.field for p in self.parts))


STAGES = ("semantic", "coarse", "fine")


def stage_spec(name: str, coarse_levels: int = 4, acoustic_levels: int = 12,
               mulan_levels: int = 12) -> StageSpec:
    """MusicLM's three stages."""
    m = Part("mulan", (0, mulan_levels))
    s = Part("semantic")
    coarse = Part("acoustic", (0, coarse_levels))
    if name == "semantic":
        return StageSpec(name, (m,), (s,), droppable=("mulan",))
    if name == "coarse":
        return StageSpec(name, (m, s), (coarse,), droppable=("mulan",))
    if name == "fine":
        return StageSpec(name, (coarse,), (Part("acoustic", (coarse_levels, acoustic_levels)),))
    raise ValueError(f"unknown stage {name!r} (one of {', '.join(STAGES)})")


def unaligned(spec: StageSpec, dedup_semantic: bool) -> bool:
    """Deduplicated semantic tokens condition the stage: they are not aligned in time."""
    return dedup_semantic and any(p.field == "semantic" for p in spec.cond)


def dedup(s: np.ndarray) -> np.ndarray:
    """Drop consecutive repeats: [5, 5, 7, 7, 5] -> [5, 7, 5]."""
    if s.size == 0:
        return s
    keep = np.ones(s.shape[0], bool)
    keep[1:] = s[1:] != s[:-1]
    return s[keep]


FIELDS = ("acoustic", "semantic", "mulan")
PAPER_SIZES = {"acoustic": 1024, "semantic": 1024, "mulan": 1024}  # MusicLM's K of each field


def check_sizes(sizes: Mapping[str, int] | int, where: str = "sizes") -> dict[str, int]:
    """``sizes`` as a plain dict of the three fields' K, each in [2, 65536] (tokens are uint16);
    one int is the same K for every field."""
    if isinstance(sizes, int):
        sizes = dict.fromkeys(FIELDS, sizes)
    missing = [f for f in FIELDS if f not in sizes]
    if missing:
        raise ValueError(f"{where}: no codebook size for {', '.join(missing)}")
    out = {f: int(sizes[f]) for f in FIELDS}
    for f, k in out.items():
        if not 2 <= k <= 65536:
            raise ValueError(f"{where}.{f} is {k}: a codebook holds 2 to 65536 codes (uint16)")
    return out


class Layout:
    """Ids, blocks and target mask of one stage at one crop length.

    Args:
        spec: the stage.
        sizes: K of each field's codebooks (``acoustic``, ``semantic``, ``mulan``; one int:
            the same K for all); every level of a field has that many codes.
        crop_seconds: crop length (sets the part lengths and ``max_len``).
        dedup_semantic: remove consecutive repeated semantic tokens.
        aligned: give each position the conditioning of the token it predicts
            (``aligned_cond``); needs time-aligned semantic tokens where they condition.
    """

    def __init__(self, spec: StageSpec, sizes: Mapping[str, int] | int, crop_seconds: float,
                 dedup_semantic: bool = False, aligned: bool = False):
        self.spec, self.dedup, self.aligned = spec, dedup_semantic, aligned
        if aligned and unaligned(spec, dedup_semantic):
            raise ValueError(f"{spec.name}: aligned conditioning needs time-aligned semantic "
                             "tokens (dedup_semantic false)")
        # aligned ids per position: every level of MuLan and of acoustic, one semantic token
        self.cond_width = sum(1 if p.field == "semantic" else p.n_levels
                              for p in spec.cond) if aligned else 0
        self.sizes = check_sizes(sizes)
        self.crop_seconds = crop_seconds
        self.blocks: list[tuple[str, int]] = []   # block b holds ids [offset[b], offset[b + 1])
        for p in spec.parts:
            lo = 0 if p.levels is None else p.levels[0]
            for lvl in range(lo, lo + p.n_levels):
                if (p.field, lvl) not in self.blocks:
                    self.blocks.append((p.field, lvl))
        widths = [self.sizes[f] for f, _ in self.blocks]
        self.offsets = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
        self.null_id = int(self.offsets[-1])
        self.pad_id = self.null_id + 1
        self.vocab_size = -(-(self.pad_id + 1) // 64) * 64  # multiple of 64: faster matmuls
        self.lengths = [self.part_length(p) for p in spec.parts]
        self.max_len = sum(self.lengths)
        self.n_cond = sum(self.lengths[:len(spec.cond)])
        self.target_blocks = np.unique(np.concatenate(
            [self._part_blocks(p, 1) for p in spec.target]))

    def block_range(self, b: int) -> tuple[int, int]:
        """Ids [lo, hi) of block ``b``: its codes 0 .. hi - lo - 1, shifted by lo."""
        return int(self.offsets[b]), int(self.offsets[b + 1])

    def frames(self, field: str) -> int:
        """Frames of a time field in one crop (25 t semantic, 50 t acoustic)."""
        hz = {"semantic": SEMANTIC_HZ, "acoustic": ACOUSTIC_HZ}[field]
        return int(round(self.crop_seconds * hz))

    def part_length(self, p: Part) -> int:
        return p.n_levels if p.field == "mulan" else self.frames(p.field) * p.n_levels

    def block(self, field: str, level: int = 0) -> int:
        return self.blocks.index((field, level))

    def _part_blocks(self, p: Part, frames: int) -> np.ndarray:
        lo = 0 if p.levels is None else p.levels[0]
        one = np.array([self.block(p.field, lvl) for lvl in range(lo, lo + p.n_levels)])
        return np.tile(one, frames)

    def part_ids(self, p: Part, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, blocks) of one part. ``codes``: uint16[L] (mulan), [T] (semantic) or [12, T]."""
        codes = np.asarray(codes).astype(np.int64)
        k = self.sizes[p.field]
        if codes.size and (codes.min() < 0 or codes.max() >= k):
            raise ValueError(f"{p.field} tokens outside [0, {k}) (its codebook size): "
                             f"max {codes.max()}")
        if p.field == "mulan":
            flat = codes[p.levels[0]:p.levels[1]]
        elif p.field == "semantic":
            flat = dedup(codes) if self.dedup else codes
        else:  # (levels, T) -> (T, levels) -> row-major: t0l0 t0l1 .. t1l0 ..
            flat = codes[p.levels[0]:p.levels[1]].T.reshape(-1)
        frames = flat.shape[0] // p.n_levels
        blocks = self._part_blocks(p, frames)
        return flat + self.offsets[blocks], blocks

    def encode(self, tokens: dict[str, np.ndarray], drop_cond: bool = False
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One crop -> (ids int64[L], block int64[L] (-1 at pads), target bool[L]); L = max_len.

        ``tokens`` must already be cropped (``data.crop``); shorter crops are padded.
        ``drop_cond`` replaces the droppable conditioning fields by ``null``.
        """
        ids, blocks, target = [], [], []
        for i, p in enumerate(self.spec.parts):
            pid, pblk = self.part_ids(p, tokens[p.field])
            is_cond = i < len(self.spec.cond)
            if is_cond and drop_cond and p.field in self.spec.droppable:
                pid = np.full_like(pid, self.null_id)
            ids.append(pid), blocks.append(pblk)
            target.append(np.full(pid.shape[0], not is_cond))
        ids_, blocks_, target_ = map(np.concatenate, (ids, blocks, target))
        n = ids_.shape[0]
        if n > self.max_len:
            raise ValueError(f"{self.spec.name} sequence of {n} ids exceeds max_len "
                             f"{self.max_len} (tokens longer than the crop?)")
        pad = self.max_len - n
        return (np.concatenate([ids_, np.full(pad, self.pad_id)]),
                np.concatenate([blocks_, np.full(pad, -1)]),
                np.concatenate([target_, np.zeros(pad, bool)]))

    def prefix(self, tokens: dict[str, np.ndarray], drop_cond: bool = False) -> np.ndarray:
        """The conditioning ids a generator starts from: int64[P]."""
        ids = []
        for p in self.spec.cond:
            pid, _ = self.part_ids(p, tokens[p.field])
            if drop_cond and p.field in self.spec.droppable:
                pid = np.full_like(pid, self.null_id)
            ids.append(pid)
        return np.concatenate(ids)

    def target_cond(self, tokens: dict[str, np.ndarray], n_frames: int,
                    drop_cond: bool = False) -> np.ndarray:
        """int64[n_frames * levels, C]: the aligned conditioning ids of each target token of
        ``n_frames`` target frames (``tokens`` cover those frames; ``drop_cond``: droppable
        fields are ``null``)."""
        (tp,) = self.spec.target
        hz = {"semantic": SEMANTIC_HZ, "acoustic": ACOUSTIC_HZ}
        frames = np.arange(n_frames)
        cols = []
        for p in self.spec.cond:
            ids, _ = self.part_ids(p, tokens[p.field])
            if drop_cond and p.field in self.spec.droppable:
                ids = np.full_like(ids, self.null_id)
            if p.field == "mulan":
                cols.append(np.broadcast_to(ids, (n_frames, ids.shape[0])))
                continue
            per = ids.reshape(-1, p.n_levels)                  # (frames of the field, levels)
            at = frames * int(hz[p.field]) // int(hz[tp.field])
            if n_frames and at[-1] >= per.shape[0]:
                raise ValueError(f"{p.field} conditioning has {per.shape[0]} frames; "
                                 f"{n_frames} {tp.field} frames need {at[-1] + 1}")
            cols.append(per[at])
        per_frame = np.concatenate(cols, axis=1) if cols else np.zeros((n_frames, 0), np.int64)
        return np.repeat(per_frame, tp.n_levels, axis=0)

    def cond_positions(self, tc: np.ndarray, n_cond: int, length: int) -> np.ndarray:
        """int64[length, C]: ``tc`` (``target_cond``) placed at the positions that predict
        each target token (position i predicts id i + 1; the first target follows the
        ``n_cond`` conditioning ids); -1 elsewhere."""
        out = np.full((length, self.cond_width), -1, np.int64)
        n = max(0, min(tc.shape[0], length - n_cond + 1))
        out[n_cond - 1:n_cond - 1 + n] = tc[:n]
        return out

    def aligned_cond(self, tokens: dict[str, np.ndarray], drop_cond: bool = False
                     ) -> np.ndarray:
        """int64[max_len, C] of one crop, position by position as ``encode`` lays it out."""
        n_cond = sum(self.part_ids(p, tokens[p.field])[0].shape[0] for p in self.spec.cond)
        (tp,) = self.spec.target
        n_frames = self.part_ids(tp, tokens[tp.field])[0].shape[0] // tp.n_levels
        return self.cond_positions(self.target_cond(tokens, n_frames, drop_cond), n_cond,
                                   self.max_len)

    def next_block(self, n_generated: int) -> int:
        """Block of the target token generated after ``n_generated`` others (its valid ids
        are ``block_range(block)``)."""
        p = self.spec.target[-1]
        lo = 0 if p.levels is None else p.levels[0]
        return self.block(p.field, lo + n_generated % p.n_levels)

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Generated target ids int64[N] -> uint16 codes: [N] semantic, or [levels, N / levels]
        acoustic (the target's levels, N a whole number of frames)."""
        (p,) = self.spec.target
        ids = np.asarray(ids, dtype=np.int64)
        if ids.shape[0] % p.n_levels:
            raise ValueError(f"{ids.shape[0]} ids are not whole frames of {p.n_levels} levels")
        blocks = self._part_blocks(p, ids.shape[0] // p.n_levels)
        lo, hi = self.offsets[blocks], self.offsets[blocks + 1]
        if np.any((ids < lo) | (ids >= hi)):
            raise ValueError(f"ids of {p.field} fall outside their codebook blocks")
        codes = (ids - lo).astype(np.uint16)
        return codes if p.levels is None else codes.reshape(-1, p.n_levels).T.copy()
