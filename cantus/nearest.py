"""Nearest-codebook-row search whose codes do not depend on float ties.

Two things make a plain ``argmin(|x|^2 - 2 x.c + |c|^2)`` give other codes on
another CPU:

- **Bit-equal rows.** The codec's k-means seeds a codebook from fewer vectors
  than codes, and a small fit copies its residuals. The distances to two
  equal rows come from different lanes or tiles of a matrix product, so which
  one is smaller depends on the instruction set and the BLAS blocking.
  ``canonical_rows`` maps every row to the first row bit-equal to it, and the
  searches return that index.
- **Cancellation.** In float32 the expanded distance loses the digits that
  tell two close codes apart once the residual is small beside ``|x|^2``
  (a well-fitted level): its error is about ``1e-7 |x|^2`` whatever the true
  gap, and it follows the kernel's summation order. The searches take the ``CANDIDATES`` nearest rows by the fast expanded
  distance, then choose among them by ``sum((x - c)^2)`` in float64, ties to
  the lower index.

What can still differ is a code whose input itself moved: encoder outputs
under other kernels differ in their last bits, and a point that close to the
boundary between two codes can fall either way. A codebook of near-equal
codes (a level fitted on residuals that were already ~0) makes that common:
the codes of such a level carry nothing and follow the rounding.
"""

from __future__ import annotations

import numpy as np
import torch


def canonical_rows(book: np.ndarray) -> np.ndarray:
    """int64[K]: for each row of ``book`` float[K, D], the index of the first row bit-equal to it."""
    book = np.ascontiguousarray(book)
    if book.shape[0] == 0:
        return np.zeros(0, np.int64)
    as_bytes = book.reshape(book.shape[0], -1).view(np.uint8)  # compare bits, not values
    _, first, inverse = np.unique(as_bytes, axis=0, return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)].astype(np.int64)


def distinct_rows(book: np.ndarray) -> np.ndarray:
    """The rows of ``book`` float[K, D] with bit-equal repeats removed, first ones kept, in order."""
    canon = canonical_rows(book)
    return book[canon == np.arange(len(book))]


CANDIDATES = 8  # rows re-ranked exactly: the fast distance's error never skips this many


def canonical_torch(book: torch.Tensor) -> torch.Tensor:
    """``canonical_rows`` of a tensor, as an int64 tensor on the tensor's device."""
    return torch.from_numpy(canonical_rows(book.detach().float().cpu().numpy())).to(book.device)


def nearest_torch(x: torch.Tensor, book: torch.Tensor, canon: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest row (squared L2) of ``book`` float[K, D] for each row of ``x``
    float[N, D], of bit-equal rows the first: ids int64[N] and their squared distances
    float32[N]. ``canon`` is ``canonical_torch(book)``.
    """
    m = min(CANDIDATES, book.shape[0])
    sq, book64 = book.pow(2).sum(1)[None], book.double()                         # (1, K)
    ids, dist = [], []
    for part in x.split(max(1, (1 << 22) // (m * max(1, book.shape[1])))):  # <= 32 MB float64
        d = part.pow(2).sum(1, keepdim=True) - 2 * part @ book.T + sq           # (n, K)
        cand = canon[d.topk(m, dim=1, largest=False).indices].sort(dim=1).values  # (n, m)
        exact = (part.double()[:, None, :] - book64[cand]).pow(2).sum(-1)        # (n, m)
        best = exact.min(dim=1)  # first of equal minima: the lowest index, as cand is sorted
        ids.append(cand.gather(1, best.indices[:, None])[:, 0])
        dist.append(best.values.float())
    if not ids:
        return x.new_zeros(0, dtype=torch.long), x.new_zeros(0)
    return torch.cat(ids), torch.cat(dist)


def nearest_np(x: np.ndarray, book: np.ndarray, canon: np.ndarray | None = None) -> np.ndarray:
    """``nearest_torch`` on arrays: int64[N] ids (``canon`` as from ``canonical_rows``)."""
    canon = canonical_rows(book) if canon is None else canon
    ids, _ = nearest_torch(torch.from_numpy(np.ascontiguousarray(x, np.float32)),
                           torch.from_numpy(np.ascontiguousarray(book, np.float32)),
                           torch.from_numpy(canon))
    return ids.numpy()


class CanonicalCache:
    """``canonical_torch`` of a codebook, recomputed only when the tensor changes."""

    def __init__(self):
        self._key, self._canon = None, None

    def __call__(self, book: torch.Tensor) -> torch.Tensor:
        key = (book.data_ptr(), book._version, book.device, tuple(book.shape))
        if key != self._key:
            self._canon, self._key = canonical_torch(book), key
        return self._canon
