"""Sampling one LM stage: conditioning tokens in, target tokens out, any length.

Goes in: a trained stage (``load_stage``), a function giving the stage's
conditioning tokens for a window of target frames, how many target frames
to make, and optionally target frames already known (an audio prompt, or
the earlier part of a long piece). Comes out: the target codes of every
frame: ``uint16[B, T]`` semantic, or ``uint16[B, levels, T]`` acoustic.

Each window is one sequence of the stage's training layout, so the model
sees what it was trained on: a fresh KV cache is filled with the window's
conditioning and the target frames already fixed, then target tokens are
drawn one at a time, each over its own codebook block. Lengths beyond the
training crop slide the window by half a crop (MusicLM: 15 s of new tokens
after a 15 s prefix for 30 s crops); the last window is aligned to the end,
so every window has the crop's full length. A stage with aligned
conditioning gets each position's conditioning frame beside its id, as in
training. Classifier-free guidance runs
the conditioned and the ``null``-conditioned rows in one batch:
``logits = uncond + scale * (cond - uncond)``.

    codes = sample_frames(model, layout, cond_fn, frames=500, options=opts)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cantus.train.layout import Layout

CondFn = Callable[[int, int], dict[str, np.ndarray]]


@dataclass(frozen=True)
class SampleOptions:
    temperature: float = 1.0    # MusicLM: 1.0 semantic, 0.95 coarse, 0.4 fine
    top_k: int = 0              # 0: the whole codebook
    guidance: float = 1.0       # classifier-free guidance scale (1: off)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.guidance <= 0:
            raise ValueError(f"guidance scale must be positive, got {self.guidance}")


def _pick(logits: torch.Tensor, opts: SampleOptions, gen: torch.Generator) -> torch.Tensor:
    """float[B, K] -> int64[B] codes (greedy at temperature 0)."""
    if opts.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / opts.temperature
    if 0 < opts.top_k < logits.shape[-1]:
        kth = logits.topk(opts.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


@torch.no_grad()
def sample_ids(model, layout: Layout, prefix: torch.Tensor, n_new: int, opts: SampleOptions,
               gen: torch.Generator, uncond: torch.Tensor | None = None,
               cond: torch.Tensor | None = None, uncond_cond: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Draw ``n_new`` target ids after ``prefix`` int64[B, P] (whole target frames so far).

    ``uncond`` int64[B, P]: the same prefix with the droppable conditioning
    replaced by ``null``; with it, the logits are guided by ``opts.guidance``.
    ``cond`` int64[B, P + n_new, C]: the aligned conditioning of every position
    (``layout.cond_positions``) for a layout that has it, ``uncond_cond`` the same
    with ``null`` MuLan ids for the guided rows.
    Returns int64[B, n_new] ids of the stage vocabulary.
    """
    b, p = prefix.shape
    guided = uncond is not None and opts.guidance != 1.0
    rows = torch.cat([prefix, uncond]) if guided else prefix
    if layout.cond_width and (cond is None or (guided and uncond_cond is None)):
        raise ValueError(f"the {layout.spec.name} stage has aligned conditioning: pass cond")
    conds = None
    if layout.cond_width:
        conds = torch.cat([cond, uncond_cond]) if guided else cond  # (R, P + n_new, C)
    cache = model.new_cache(rows.shape[0], p + n_new)
    h = model(rows, cache=cache, head=False,
              cond=None if conds is None else conds[:, :p])[:, -1]  # (R, D)
    out = torch.empty(b, n_new, dtype=torch.long, device=prefix.device)
    for i in range(n_new):
        blk = layout.next_block(i)  # prefixes hold whole frames, so i counts levels from 0
        lo, hi = layout.block_range(blk)
        logits = h @ model.head_rows(lo, hi).T                 # (R, K of the block)
        if guided:
            cond, unc = logits[:b], logits[b:]
            logits = unc + opts.guidance * (cond - unc)
        ids = _pick(logits, opts, gen) + lo                    # (B,)
        out[:, i] = ids
        if i + 1 < n_new:
            step = torch.cat([ids, ids]) if guided else ids
            at = None if conds is None else conds[:, p + i:p + i + 1]
            h = model(step[:, None], cache=cache, head=False, cond=at)[:, -1]
    return out


def _frames(codes: np.ndarray) -> int:
    return codes.shape[-1]


def _target_ids(layout: Layout, codes: np.ndarray) -> np.ndarray:
    """Ids of target codes ``[T]`` or ``[levels, T]`` (only the target's levels)."""
    (target,) = layout.spec.target
    if target.levels is not None:  # part_ids slices levels [lo, hi) of a full stack
        full = np.zeros((target.levels[1], codes.shape[-1]), codes.dtype)
        full[target.levels[0]:] = codes
        codes = full
    return layout.part_ids(target, codes)[0]


def window_starts(total: int, window: int, known: int) -> list[tuple[int, int]]:
    """(start, first new frame) of each window that fills frames [known, total).

    A window covers [start, start + window); the first starts at 0, later ones
    keep half a window of frames already made as their prefix; the last is
    aligned to the end so it too has ``window`` frames (when ``total`` allows).
    """
    if window < 2:
        raise ValueError(f"a window of {window} frames cannot slide")
    out, made = [], known
    while made < total:
        start = 0 if made == 0 else max(0, made - window // 2)
        if start + window > total:
            start = max(0, min(start, total - window))
        out.append((start, made))
        made = min(total, start + window)
    return out


def sample_frames(model, layout: Layout, cond_fn: CondFn, frames: int, opts: SampleOptions,
                  batch: int, seed: int = 0, known: np.ndarray | None = None,
                  progress=None) -> np.ndarray:
    """Target codes of ``frames`` frames for ``batch`` rows.

    Args:
        cond_fn: ``(start, end) -> {field: tokens[B, ...]}``, the conditioning
            of target frames [start, end) (time fields sliced to that range).
        known: target codes already fixed for the first frames (``uint16[B, T0]``
            or ``[B, levels, T0]``); they are kept and continued.
        progress: optional tqdm-like bar, advanced by one per frame made.
    Returns:
        uint16[B, frames] (semantic) or uint16[B, levels, frames] (acoustic).
    """
    (target,) = layout.spec.target
    levels = target.n_levels
    window = layout.frames(target.field)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, frames) if target.levels is None else (batch, levels, frames)
    codes = np.zeros(shape, np.uint16)
    made = 0
    if known is not None and _frames(known) > 0:
        made = min(frames, _frames(known))
        codes[..., :made] = known[..., :made]
    droppable = any(p.field in layout.spec.droppable for p in layout.spec.cond)
    for start, first in window_starts(frames, window, made):
        end = min(frames, start + window)
        cond = cond_fn(start, end)
        n_new = (end - first) * levels
        rows, unc, al, unc_al = [], [], [], []
        guided = droppable and opts.guidance != 1.0
        for r in range(batch):
            tokens = {f: v[r] for f, v in cond.items()}
            fixed = _target_ids(layout, codes[r, ..., start:first])
            head = layout.prefix(tokens)
            rows.append(np.concatenate([head, fixed]))
            if guided:
                unc.append(np.concatenate([layout.prefix(tokens, drop_cond=True), fixed]))
            if layout.cond_width:  # the conditioning of each position's next token
                n = head.shape[0] + fixed.shape[0] + n_new
                al.append(layout.cond_positions(layout.target_cond(tokens, end - start),
                                                head.shape[0], n))
                if guided:
                    unc_al.append(layout.cond_positions(
                        layout.target_cond(tokens, end - start, drop_cond=True),
                        head.shape[0], n))
        prefix = torch.from_numpy(np.stack(rows)).to(device)
        uncond = torch.from_numpy(np.stack(unc)).to(device) if unc else None
        aligned = torch.from_numpy(np.stack(al)).to(device) if al else None
        unc_aligned = torch.from_numpy(np.stack(unc_al)).to(device) if unc_al else None
        ids = sample_ids(model, layout, prefix, n_new, opts, gen, uncond, aligned, unc_aligned)
        for r, row in enumerate(ids.cpu().numpy()):
            codes[r, ..., first:end] = layout.decode(row)
        if progress is not None:
            progress.update(end - first)
    return codes


__all__ = ["SampleOptions", "sample_frames", "sample_ids", "window_starts"]
