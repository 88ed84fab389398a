"""A seeded uniform sample of rows from a stream of arrays, in memory bounded by its cap.

The k-means fit (semantic tokens) and the MuLan RVQ fit sample their training
rows with it, so a fit on a split of any size holds at most ``cap`` rows:

    res = Reservoir(cap=262144, seed=0, what="frames")
    for x in stream:            # float[n, D] arrays, any n
        res.add(x)
    sample = res.sample()       # float32[min(seen, cap), D]
"""

from __future__ import annotations

import numpy as np


class Reservoir:
    """At most ``cap`` rows sampled uniformly from all rows added (algorithm R, seeded): the
    rows in arrival order while fewer than ``cap`` have come. The buffer grows by doubling
    up to ``cap``, so a small stream allocates little."""

    def __init__(self, cap: int, seed: int, what: str = "rows"):
        if cap < 1:
            raise ValueError(f"a reservoir of {what} needs a cap of at least 1, got {cap}")
        self.cap, self.what, self.seen = cap, what, 0
        self.rng, self.rows = np.random.default_rng(seed), None

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32)
        if self.rows is None:
            self.rows = np.empty((min(self.cap, max(1024, len(x))), x.shape[1]), np.float32)
        take = min(len(x), max(0, self.cap - self.seen))
        if self.seen + take > len(self.rows):
            grown = np.empty((min(self.cap, max(2 * len(self.rows), self.seen + take)),
                              x.shape[1]), np.float32)
            grown[:self.seen] = self.rows[:self.seen]
            self.rows = grown
        self.rows[self.seen:self.seen + take] = x[:take]
        rest = x[take:]
        if len(rest):
            n = self.seen + take + np.arange(len(rest))  # global index of each row
            j = (self.rng.random(len(rest)) * (n + 1)).astype(np.int64)
            keep = j < self.cap
            self.rows[j[keep]] = rest[keep]
        self.seen += len(x)

    def sample(self) -> np.ndarray:
        if self.rows is None:
            raise ValueError(f"no {self.what} were added")
        return self.rows[:min(self.seen, self.cap)]
