"""Find exact and near-duplicate chunks.

Goes in: chunks in a fixed order (the first occurrence wins), each with its
PCM hash and spectral fingerprint. Comes out: for every duplicate, the index
of the chunk it duplicates and whether the match was exact (same decoded PCM)
or near (fingerprint cosine similarity above the threshold, found with a
faiss inner-product index). Order-dependent by design and deterministic for
a given order.
"""

from __future__ import annotations

import numpy as np

BATCH = 1024


def find_duplicates(pcm_hashes: list[str], fingerprints: np.ndarray,
                    threshold: float) -> dict[int, tuple[str, int, float]]:
    """Map duplicate index -> (reason, index of the kept original, similarity).

    Args:
        pcm_hashes: one hash per chunk, in priority order.
        fingerprints: float32[N, D], unit-norm rows in the same order.
        threshold: cosine similarity above which two chunks are near-duplicates.
    """
    import faiss

    n = len(pcm_hashes)
    dups: dict[int, tuple[str, int, float]] = {}
    first: dict[str, int] = {}
    for i, h in enumerate(pcm_hashes):
        if h in first:
            dups[i] = ("exact_duplicate", first[h], 1.0)
        else:
            first[h] = i
    if n == 0:
        return dups
    fp = np.ascontiguousarray(fingerprints, dtype=np.float32)
    index = faiss.IndexFlatIP(fp.shape[1])
    kept_ids: list[int] = []  # faiss row -> chunk index
    for start in range(0, n, BATCH):
        batch = list(range(start, min(start + BATCH, n)))
        prior = _best_prior(index, fp[batch], kept_ids)
        within = fp[batch] @ fp[batch].T  # (b, b) similarities inside the batch
        new_rows = []
        for j, i in enumerate(batch):
            if i in dups:
                continue
            best = prior[j]
            for jj in new_rows:  # earlier kept chunks of this batch
                s = float(within[j, jj])
                if s > threshold and (best is None or s > best[1]):
                    best = (batch[jj], s)
            if best is not None and best[1] > threshold:
                dups[i] = ("near_duplicate", best[0], best[1])
            else:
                new_rows.append(j)
        if new_rows:
            index.add(fp[[batch[j] for j in new_rows]])
            kept_ids.extend(batch[j] for j in new_rows)
    return dups


def _best_prior(index, queries: np.ndarray, kept_ids: list[int]) -> list[tuple[int, float] | None]:
    if index.ntotal == 0:
        return [None] * len(queries)
    sims, rows = index.search(queries, 1)
    return [(kept_ids[r], float(s)) if r >= 0 else None
            for s, r in zip(sims[:, 0], rows[:, 0])]
