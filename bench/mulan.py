"""Benchmark MuLan's audio embedding: throughput on 1 and 2 threads, cost of the 1 s stride.

Measures ``embed_long`` (10 s windows, embeddings averaged) of the model size
in params.yaml (random weights: speed does not depend on them, the trained
model in ``--model`` is used when given), on generated audio, in interleaved
rounds (best of each setting):

- audio-seconds embedded per wall-second at the configured stride (1 s) on 1
  and on 2 torch threads;
- the same with non-overlapping windows (stride = window), and the ratio of
  the two: what the 1 s stride costs, for users choosing between them.

    python bench/mulan.py [--seconds 60] [--rounds 3] [--model models/mulan]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _model(path: str | None):
    from cantus.config import load_section
    from cantus.tokenize.mulan.model import build_mulan, load_mulan
    from cantus.tokenize.mulan.params import MulanConfig

    if path:
        return load_mulan(path)
    return build_mulan(load_section(ROOT / "params.yaml", "mulan", MulanConfig).model).eval()


def _time(model, wav: torch.Tensor, stride: int, threads: int) -> float:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model.embed_long(wav, stride=stride)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="length of the test audio")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default=None, help="trained MuLan folder (default: random)")
    args = p.parse_args(argv)
    model = _model(args.model)
    cfg = model.cfg
    wav = torch.from_numpy((0.1 * np.random.default_rng(0).standard_normal(
        int(args.seconds * cfg.sample_rate))).astype(np.float32))
    settings = {(threads, name): stride for threads in (1, 2)
                for name, stride in (("stride", cfg.stride), ("no_overlap", cfg.window))}
    _time(model, wav[: cfg.window * 2], cfg.window, 1)  # warm-up
    best = {k: float("inf") for k in settings}
    for _ in range(args.rounds):
        for (threads, name), stride in settings.items():
            best[threads, name] = min(best[threads, name], _time(model, wav, stride, threads))
    out = {"audio_seconds": args.seconds, "window_s": cfg.window_seconds,
           "stride_s": cfg.stride_seconds,
           "windows": {"stride": len(model.windows(wav, cfg.stride)),
                       "no_overlap": len(model.windows(wav, cfg.window))}}
    for (threads, name), t in best.items():
        out[f"{name}_{threads}_thread_x_realtime"] = round(args.seconds / t, 2)
    for threads in (1, 2):
        out[f"stride_cost_ratio_{threads}_thread"] = round(
            best[threads, "stride"] / best[threads, "no_overlap"], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
