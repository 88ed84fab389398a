"""Find exact and near-duplicate chunks.

Goes in: chunks in a fixed order (the first occurrence wins), each with its
PCM hash and spectral fingerprint (an array or a ``np.memmap``: the search
reads it in blocks and never copies all of it). Comes out: for every
duplicate, the index of the chunk it duplicates and whether the match was
exact (same decoded PCM) or near (fingerprint cosine similarity above the
threshold). A chunk is a near-duplicate of the most similar earlier chunk that
was kept, ties to the lower index. Order-dependent by design.

Two searches find the candidate pairs:

- **exact** (at most ``exact_max`` chunks): every chunk against every kept
  earlier chunk, by float32 matrix products in blocks of ``BATCH``; quadratic.
- **approximate** (more chunks): multi-table random-hyperplane LSH (SimHash).
  ``BITS`` signs of seeded +-1 projections form one table's key; ``tables``
  tables make a pair at exactly the threshold share a key in at least one of
  them with probability ``1 - MISS`` (more similar pairs: more likely). Two
  chunks are a candidate pair when they share a key; each chunk is paired
  with the first and the previous ``WINDOW`` members of its bucket, which
  bounds the work when thousands of copies of one piece fill a bucket.
  Linear in the chunks plus the pairs.

Decisions do not depend on the CPU's float rounding: a float32 similarity
only selects candidates (with ``MARGIN`` to spare, far above its error), and
every decision is taken on the similarity recomputed in float64 in a fixed
order (``dot64``: float32 products are exact in float64, the sum is one
left-to-right fold), so AVX2, AVX-512 and generic kernels decide alike. A
hash bit whose float32 projection is within ``EPS`` of zero is recomputed the
same way before its sign is read.
"""

from __future__ import annotations

import math
import tempfile

import numpy as np

BATCH = 1024          # rows per block of the exact search
EXACT_MAX = 16384     # chunks (after exact duplicates) up to which the search is exact
MARGIN = 1e-4         # float32 similarity within this under the threshold is re-checked
BITS = 24             # hash bits per LSH table (a multiple of 8, at most 32)
MISS = 1e-3           # chance that a pair at exactly the threshold shares no table
WINDOW = 64           # each chunk meets the first and previous WINDOW chunks of its bucket
EPS = 1e-4            # |float32 projection| under this: its sign is recomputed in float64
SEED = 0              # of the hyperplanes
HASH_ROWS = 8192      # chunks hashed per block
PAIR_ROWS = 65536     # candidate pairs checked per block


def find_duplicates(pcm_hashes: list[str], fingerprints: np.ndarray, threshold: float,
                    exact_max: int = EXACT_MAX) -> dict[int, tuple[str, int, float]]:
    """Map duplicate index -> (reason, index of the kept original, similarity).

    Args:
        pcm_hashes: one hash per chunk, in priority order.
        fingerprints: float32[N, D], unit-norm rows in the same order (may be a memmap).
        threshold: cosine similarity above which two chunks are near-duplicates.
        exact_max: at most this many non-exact-duplicate chunks are searched exactly,
            more with the LSH index.
    """
    n = len(pcm_hashes)
    if fingerprints.shape[0] != n:
        raise ValueError(f"fingerprints: {fingerprints.shape[0]} rows for {n} PCM hashes")
    dups: dict[int, tuple[str, int, float]] = {}
    first: dict[str, int] = {}
    for i, h in enumerate(pcm_hashes):
        if h in first:
            dups[i] = ("exact_duplicate", first[h], 1.0)
        else:
            first[h] = i
    rows = np.fromiter(first.values(), np.int64, len(first))  # ascending: dicts keep order
    if len(rows) == 0:
        return dups
    search = _exact if len(rows) <= exact_max else _approximate
    for i, (j, sim) in search(fingerprints, rows, threshold).items():
        dups[i] = ("near_duplicate", j, sim)
    return dups


def dot64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64[P]: row-wise dot products of float32[P, D] ``a`` and ``b`` (or a float32[D]
    row broadcast), the same bits on any CPU: exact products, one fixed-order sum."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = np.broadcast_arrays(np.atleast_2d(a), np.atleast_2d(b))
    acc = a[:, 0] * b[:, 0]
    for d in range(1, a.shape[1]):
        acc += a[:, d] * b[:, d]
    return acc


def _best(sims: np.ndarray, ids: np.ndarray, threshold: float) -> tuple[int, float] | None:
    """The (id, similarity) of the highest float64 similarity above ``threshold``, ties to
    the lower id; None when none is above."""
    above = sims > threshold
    if not above.any():
        return None
    sims, ids = sims[above], ids[above]
    k = np.lexsort((ids, -sims))[0]
    return int(ids[k]), float(sims[k])


def _exact(fp: np.ndarray, rows: np.ndarray, threshold: float) -> dict[int, tuple[int, float]]:
    """Near-duplicates by comparing each chunk with every kept earlier one (blocks of BATCH)."""
    kept = np.empty((len(rows), fp.shape[1]), np.float32)  # kept rows, at most exact_max
    kept_ids = np.empty(len(rows), np.int64)
    nk, found = 0, {}
    cut = threshold - MARGIN
    for start in range(0, len(rows), BATCH):
        ids = rows[start:start + BATCH]
        q = np.ascontiguousarray(fp[ids], np.float32)
        prior = q @ kept[:nk].T  # (b, kept so far)
        within = q @ q.T
        hit_row, hit_col = np.nonzero(prior > cut)
        hits = np.split(kept_ids[hit_col], np.searchsorted(hit_row, np.arange(1, len(ids))))
        new: list[int] = []  # block positions kept so far
        for j, i in enumerate(ids):
            cand = hits[j].tolist()
            cand += [ids[jj] for jj in new if within[j, jj] > cut]
            best = None
            if cand:
                cand = np.asarray(cand, np.int64)
                best = _best(dot64(fp[cand], q[j]), cand, threshold)
            if best is None:
                new.append(j)
            else:
                found[int(i)] = best
        kept[nk:nk + len(new)], kept_ids[nk:nk + len(new)] = q[new], ids[new]
        nk += len(new)
    return found


def tables(threshold: float) -> int:
    """LSH tables so that a pair of cosine ``threshold`` shares no key with chance <= MISS."""
    p = 1 - math.acos(min(1.0, threshold)) / math.pi  # one bit agrees
    hit = p ** BITS                                  # one table's whole key agrees
    return 1 if hit >= 1 else max(1, math.ceil(math.log(MISS) / math.log1p(-hit)))


def _keys(fp: np.ndarray, rows: np.ndarray, n_tables: int) -> np.ndarray:
    """uint32[N, T]: each row's key in each table, from the signs of seeded +-1 projections."""
    rng = np.random.default_rng(SEED)
    planes = (rng.integers(0, 2, (fp.shape[1], n_tables * BITS), dtype=np.int8) * 2 - 1
              ).astype(np.float32)
    keys = np.empty((len(rows), n_tables), np.uint32)
    for a in range(0, len(rows), HASH_ROWS):
        x = np.ascontiguousarray(fp[rows[a:a + HASH_ROWS]], np.float32)
        proj = x @ planes
        r, c = np.nonzero(np.abs(proj) < EPS)  # signs the float32 rounding may decide
        if len(r):
            proj[r, c] = dot64(x[r], planes[:, c].T)
        packed = np.packbits((proj > 0).reshape(len(x), n_tables, BITS), axis=2,
                             bitorder="little").astype(np.uint32)  # (b, T, BITS / 8)
        keys[a:a + len(x)] = sum(packed[:, :, k] << np.uint32(8 * k)
                                 for k in range(packed.shape[2]))
    return keys


def _bucket_pairs(key: np.ndarray) -> np.ndarray:
    """int64[P, 2] (earlier, later) positions sharing ``key``: each with the first and the
    previous WINDOW members of its bucket."""
    order = np.argsort(key, kind="stable")  # within a bucket: ascending position
    s = key[order]
    pos = np.arange(len(s))
    start = np.maximum.accumulate(np.where(np.r_[True, s[1:] != s[:-1]], pos, 0))
    out = []
    for d in range(1, WINDOW + 1):  # the previous WINDOW members
        same = np.flatnonzero(s[d:] == s[:-d])
        if len(same) == 0:
            break
        out.append(np.stack([order[same], order[same + d]], axis=1))
    big = np.flatnonzero(pos - start > WINDOW)  # and the first WINDOW of a long bucket
    for e in range(WINDOW if len(big) else 0):
        out.append(np.stack([order[start[big] + e], order[big]], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def _approximate(fp: np.ndarray, rows: np.ndarray, threshold: float
                 ) -> dict[int, tuple[int, float]]:
    """Near-duplicates among candidate pairs from the LSH tables, decided in order."""
    n = len(rows)
    keys = _keys(fp, rows, tables(threshold))
    codes = np.unique(np.concatenate([(p[:, 0] * n + p[:, 1]) for p in
                                      (_bucket_pairs(keys[:, t]) for t in range(keys.shape[1]))]))
    del keys
    lo_all, hi_all = codes // n, codes % n
    near_lo, near_hi, near_sim = [], [], []
    for a in range(0, len(codes), PAIR_ROWS):
        lo, hi = rows[lo_all[a:a + PAIR_ROWS]], rows[hi_all[a:a + PAIR_ROWS]]
        x, y = np.asarray(fp[lo], np.float32), np.asarray(fp[hi], np.float32)
        cand = np.flatnonzero(np.einsum("pd,pd->p", x, y) > threshold - MARGIN)
        sims = dot64(x[cand], y[cand])
        keep = sims > threshold
        near_lo.append(lo[cand][keep]), near_hi.append(hi[cand][keep])
        near_sim.append(sims[keep])
    lo, hi, sim = (np.concatenate(v) if v else np.zeros(0) for v in (near_lo, near_hi, near_sim))
    order = np.lexsort((lo, hi))
    lo, hi, sim = lo[order].astype(np.int64), hi[order].astype(np.int64), sim[order]
    found: dict[int, tuple[int, float]] = {}
    bounds = np.flatnonzero(np.r_[True, hi[1:] != hi[:-1], True]) if len(hi) else [0]
    for a, b in zip(bounds[:-1], bounds[1:]):  # later chunks in order: earlier decisions stand
        ok = np.array([int(j) not in found for j in lo[a:b]])
        best = _best(sim[a:b][ok], lo[a:b][ok], threshold) if ok.any() else None
        if best is not None:
            found[int(hi[a])] = best
    return found


class FingerprintSpool:
    """Fingerprint rows appended to an unnamed local temporary file, read back memory-mapped,
    so the driver never holds all of them.

    ``add(float32[n, D])`` returns the rows' (start, stop); ``array()`` (after the last add)
    is the read-only ``float32[rows, D]`` memmap. The file goes when the spool does.
    """

    def __init__(self, dim: int, folder: str | None = None):
        self.dim, self.rows = dim, 0
        self._file = tempfile.TemporaryFile(dir=folder)

    def add(self, fp: np.ndarray) -> tuple[int, int]:
        fp = np.ascontiguousarray(fp, np.float32).reshape(-1, self.dim) if np.size(fp) else \
            np.zeros((0, self.dim), np.float32)
        self._file.write(fp.tobytes())
        self.rows += len(fp)
        return self.rows - len(fp), self.rows

    def array(self) -> np.ndarray:
        self._file.flush()
        if self.rows == 0:
            return np.zeros((0, self.dim), np.float32)
        return np.memmap(self._file, np.float32, "r", shape=(self.rows, self.dim))

    def writable(self, rows: int) -> np.ndarray:
        """A fresh ``float32[rows, D]`` memmap on this (empty) spool's file, to fill in place."""
        if self.rows:
            raise ValueError("writable(): the spool already holds rows")
        self.rows = rows
        if rows == 0:
            return np.zeros((0, self.dim), np.float32)
        return np.memmap(self._file, np.float32, "w+", shape=(rows, self.dim))
