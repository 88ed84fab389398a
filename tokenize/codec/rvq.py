"""Residual vector quantiser with EMA codebooks (SoundStream, section 3.3).

Goes in: vectors ``float[B, D, T]`` (a sequence of frames, channels first) or
``float[B, D]`` (one vector per example, e.g. a MuLan embedding). Comes out:
integer codes ``int64[B, n_q, T]`` (or ``[B, n_q]``) and their reconstruction.

    rvq = ResidualVQ(dim=128, n_q=12, codebook_size=1024)
    quantized, codes, commit = rvq(x)      # training: EMA updates, dropout
    codes = rvq.encode(x)                  # inference
    x_hat = rvq.decode(codes)              # any leading number of levels

Training (``rvq.train()``) does, per level: k-means initialisation of the
codebook on the first batch, EMA updates of the code counts and sums, and
replacement of dead codes (EMA count below ``dead_threshold``) by random
vectors of the current batch. ``quantizer_dropout`` draws the number of
active levels uniformly in ``[1, n_q]`` per example, so one model serves every
bitrate from ``1 / n_q`` to the full one. Under DDP the statistics are summed
over ranks and the initial codebooks are broadcast from rank 0; every rank
runs every level's collectives each training step, even a rank whose draw
left a level with no active example (it adds zero counts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cantus.nearest import CanonicalCache, nearest_torch


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        torch.distributed.all_reduce(t)
    return t


def kmeans(x: torch.Tensor, k: int, iters: int) -> torch.Tensor:
    """Lloyd k-means of ``x`` float[N, D] -> centroids float[k, D], k-means++ seeded.

    With fewer rows than codes (a small first batch) the centroids are rows drawn
    with replacement, so the codebook is still full; empty clusters keep theirs.
    """
    n = x.shape[0]
    if n <= k:
        return x[torch.randint(n, (k,), device=x.device)].clone()
    centroids = x.new_empty(k, x.shape[1])
    centroids[0] = x[torch.randint(n, (1,), device=x.device)]
    d2 = (x - centroids[0]).pow(2).sum(1)  # (N,) squared distance to the nearest centroid
    for i in range(1, k):
        pick = torch.multinomial(d2 / d2.sum(), 1) if d2.sum() > 0 else torch.randint(n, (1,))
        centroids[i] = x[pick[0]]
        d2 = torch.minimum(d2, (x - centroids[i]).pow(2).sum(1))
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(dim=1)  # (N,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids


class EMACodebook(nn.Module):
    """One codebook of ``size`` vectors of ``dim``, learnt by EMA, not by gradient."""

    def __init__(self, dim: int, size: int, decay: float = 0.99, dead_threshold: float = 2.0,
                 kmeans_iters: int = 10, eps: float = 1e-5):
        super().__init__()
        self.size, self.decay, self.eps = size, decay, eps
        self.dead_threshold, self.kmeans_iters = dead_threshold, kmeans_iters
        self.register_buffer("codebook", torch.zeros(size, dim))
        self.register_buffer("cluster_size", torch.zeros(size))
        self.register_buffer("embed_sum", torch.zeros(size, dim))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self._canonical = CanonicalCache()

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """float[N, D] -> int64[N] index of the nearest code (squared L2).

        Outside training the search of ``cantus.nearest``: the closest few by the
        fast distance, re-ranked exactly, the first of bit-equal codes, so the
        tokens do not follow the CPU's rounding. Training keeps the plain
        search (one matrix product and an argmin per step).
        """
        c = self.codebook
        if not self.training:
            return nearest_torch(x, c, self._canonical(c))[0]
        dist = (x.pow(2).sum(1, keepdim=True) - 2 * x @ c.t()
                + c.pow(2).sum(1)[None])  # (N, K)
        return dist.argmin(dim=1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return F.embedding(codes, self.codebook)

    @torch.no_grad()
    def init_from(self, x: torch.Tensor, seed_rows: torch.Tensor | None = None) -> None:
        """k-means on the first batch (rank 0's under DDP, broadcast to all); ``x`` may be
        empty under DDP, and then k-means runs on ``seed_rows`` (the level's whole batch)."""
        centroids = kmeans(x if x.shape[0] or seed_rows is None else seed_rows, self.size,
                           self.kmeans_iters)
        if _distributed():
            torch.distributed.broadcast(centroids, 0)
        # The EMA statistics start from the batch's own assignment, so codes that
        # k-means found a cluster for are not mistaken for dead ones.
        counts = torch.bincount(torch.cdist(x, centroids).argmin(1), minlength=self.size)
        counts = _all_reduce(counts.to(x.dtype))
        self.codebook.copy_(centroids)
        self.cluster_size.copy_(counts)
        self.embed_sum.copy_(centroids * counts[:, None])
        self.initialised.fill_(True)

    @torch.no_grad()
    def update(self, x: torch.Tensor, codes: torch.Tensor,
               spare: torch.Tensor | None = None) -> None:
        """EMA update from vectors ``x`` float[N, D] assigned to ``codes`` int64[N] (N may be
        0 on a rank under DDP; dead codes are then drawn from ``spare``)."""
        onehot_sum = torch.zeros_like(self.embed_sum).index_add_(0, codes, x)
        counts = torch.bincount(codes, minlength=self.size).to(x.dtype)
        _all_reduce(counts), _all_reduce(onehot_sum)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(onehot_sum, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        # Laplace smoothing keeps rarely used codes from dividing by ~0.
        smoothed = (self.cluster_size + self.eps) / (total + self.size * self.eps) * total
        self.codebook.copy_(self.embed_sum / smoothed[:, None])
        self.replace_dead(x if x.shape[0] or spare is None else spare)

    @torch.no_grad()
    def replace_dead(self, x: torch.Tensor) -> None:
        """Codes whose EMA count fell below the threshold become random batch vectors.

        Under DDP every rank sees the same counts (summed), so every rank takes the same
        branch and the broadcast below is met by all of them.
        """
        dead = self.cluster_size < self.dead_threshold  # (K,)
        n_dead = int(dead.sum())
        if n_dead == 0 or x.shape[0] == 0:
            return
        pick = torch.randint(x.shape[0], (n_dead,), device=x.device)
        fresh = x[pick]
        if _distributed():
            torch.distributed.broadcast(fresh, 0)
        self.codebook[dead] = fresh
        self.embed_sum[dead] = fresh * self.dead_threshold
        self.cluster_size[dead] = self.dead_threshold


class ResidualVQ(nn.Module):
    """``n_q`` EMA codebooks, each quantising the residual the previous ones left.

    Args:
        dim: vector size D.
        n_q: number of levels (codebooks).
        codebook_size: codes per level (1024 for 10 bits per level).
        decay: EMA decay of the counts and sums.
        dead_threshold: EMA count under which a code is replaced.
        kmeans_iters: Lloyd iterations of the first-batch initialisation.
        quantizer_dropout: in training, use a random number of levels per example.
    """

    def __init__(self, dim: int, n_q: int, codebook_size: int, *, decay: float = 0.99,
                 dead_threshold: float = 2.0, kmeans_iters: int = 10,
                 quantizer_dropout: bool = True):
        super().__init__()
        if n_q < 1 or codebook_size < 2 or dim < 1:
            raise ValueError(f"bad RVQ shape dim={dim}, n_q={n_q}, size={codebook_size}")
        self.dim, self.n_q, self.codebook_size = dim, n_q, codebook_size
        self.quantizer_dropout = quantizer_dropout
        self.levels = nn.ModuleList(
            EMACodebook(dim, codebook_size, decay, dead_threshold, kmeans_iters)
            for _ in range(n_q))

    @staticmethod
    def _frames(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """[B, D, T] or [B, D] -> [B, D, T] and whether a T axis was added."""
        if x.dim() == 2:
            return x[:, :, None], True
        if x.dim() != 3:
            raise ValueError(f"RVQ input must be [B, D, T] or [B, D], got {tuple(x.shape)}")
        return x, False

    def _check_levels(self, n_q: int | None) -> int:
        n = self.n_q if n_q is None else int(n_q)
        if not 1 <= n <= self.n_q:
            raise ValueError(f"n_q must be in [1, {self.n_q}], got {n_q}")
        return n

    def forward(self, x: torch.Tensor, n_q: int | None = None):
        """Quantise; in training mode also update the codebooks.

        Returns:
            (quantized like x with a straight-through gradient, codes int64[B, n_q, T],
            commitment loss: mean squared distance of each active level's input
            to its code, summed over levels).
        """
        x, squeeze = self._frames(x)
        B, D, T = x.shape
        n = self._check_levels(n_q)
        if self.training and self.quantizer_dropout and n_q is None:
            active = torch.randint(1, self.n_q + 1, (B,), device=x.device)  # (B,)
        else:
            active = torch.full((B,), n, device=x.device)
        residual = x.detach().float().transpose(1, 2)  # (B, T, D)
        quantized = torch.zeros_like(residual)
        codes = []
        for i, level in enumerate(self.levels[:n]):
            on = (active > i)  # (B,)
            flat = residual.reshape(-1, D)  # (B*T, D)
            mask = on[:, None].expand(B, T).reshape(-1)  # (B*T,)
            # Under DDP a level learns on every rank, even one whose dropout left it no
            # active example here: its collectives must be met by all ranks.
            learn = self.training and (bool(mask.any()) or _distributed())
            if learn and not bool(level.initialised):
                level.init_from(flat[mask], seed_rows=flat)
            idx = level.nearest(flat)  # (B*T,)
            q = level.lookup(idx).view(B, T, D) * on[:, None, None]
            if learn:  # after the lookup: this batch sees the codebook it is coded with
                level.update(flat[mask], idx[mask], spare=flat)
            codes.append(idx.view(B, T))
            quantized = quantized + q
            residual = residual - q
        # Commitment: the encoder output is pulled towards what the levels can express.
        xt = x.float().transpose(1, 2)  # (B, T, D)
        commit = ((xt - quantized.detach()).pow(2)).mean()
        out = xt + (quantized - xt).detach()  # straight-through
        out = out.transpose(1, 2).to(x.dtype)
        codes_t = torch.stack(codes, dim=1)  # (B, n, T)
        if squeeze:
            return out[:, :, 0], codes_t[:, :, 0], commit
        return out, codes_t, commit

    @torch.no_grad()
    def encode(self, x: torch.Tensor, n_q: int | None = None) -> torch.Tensor:
        """float[B, D, T] (or [B, D]) -> codes int64[B, n_q, T] (or [B, n_q]); no updates."""
        x, squeeze = self._frames(x)
        n = self._check_levels(n_q)
        B, D, T = x.shape
        residual = x.float().transpose(1, 2).reshape(-1, D)  # (B*T, D)
        codes = []
        for level in self.levels[:n]:
            idx = level.nearest(residual)
            residual = residual - level.lookup(idx)
            codes.append(idx.view(B, T))
        out = torch.stack(codes, dim=1)
        return out[:, :, 0] if squeeze else out

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes int[B, n, T] (or [B, n]), n <= n_q leading levels -> float[B, D, T] (or [B, D])."""
        squeeze = codes.dim() == 2
        if squeeze:
            codes = codes[:, :, None]
        if codes.dim() != 3:
            raise ValueError(f"codes must be [B, n_q, T] or [B, n_q], got {tuple(codes.shape)}")
        self._check_levels(codes.shape[1])
        codes = codes.long()
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must be in [0, {self.codebook_size}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        out = sum(level.lookup(codes[:, i]) for i, level in enumerate(self.levels[:codes.shape[1]]))
        out = out.transpose(1, 2)  # (B, D, T)
        return out[:, :, 0] if squeeze else out
