"""Benchmark of the semantic tokens: feature + assignment throughput, k-means fit time.

Goes in: the demo audio shards (``data/audio``). Prints, in one run:
- the CPU, its widest ISA, the cores, the kernels in force and any
  ``cantus.kernels`` caps;
- feature extraction plus centroid assignment throughput (audio-seconds per
  wall-second) of the demo-size w2v-BERT on 1 and 2 threads;
- faiss k-means (what ``semantic_kmeans`` runs) against scikit-learn's
  MiniBatchKMeans, its peer, on the same sample (200k frames at K=1024 by
  default), both on 2 threads (scikit-learn's OpenMP loops, with its OpenBLAS
  calls on one thread, ``--sklearn-blas-threads``: its fastest setting here),
  timed in ``--rounds`` interleaved rounds (the order turns each round) with
  the best of each: their time ratio, both inertias as mean squared distance
  per frame over the whole sample, the epochs scikit-learn ran before its
  early stop (faiss runs every iteration), and PASS or FAIL for faiss being at least
  as fast (no faster ratio was ever set: faiss is chosen over scikit-learn
  for speed, so it must be the faster one). The demo corpus has ~22k train
  frames, so the sample is those frames repeated with 1% Gaussian jitter;
- on a GPU, feature throughput of the paper size (600M) at batch 32.

    python bench/semantic.py [--shards data/audio] [--clips 8] [--frames 200000] [--rounds 2]
    env $(python -m cantus.kernels --env avx2) python bench/semantic.py   # what AVX2 runs

The caps reach ATen, oneDNN and faiss's own SIMD code, not OpenBLAS, whose
sgemm does most of both k-means' work (the frames' distances to the centroids).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from cantus import kernels
from cantus.audio_stream import shard_paths
from cantus.tokenize.semantic import kmeans as sk
from cantus.tokenize.semantic import model as sm


def throughput(clips: list[np.ndarray], threads: int, batch: int = 4) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    fe = sm.FeatureExtractor(sm.build("demo", 0.0, False).eval())
    rng = np.random.default_rng(0)
    book = sk.Codebook(rng.normal(size=(1024, fe.dim)).astype(np.float32),
                       np.zeros(fe.dim, np.float32), np.ones(fe.dim, np.float32))
    fe(clips[:1], sm.SAMPLE_RATE)  # warm-up
    start = time.perf_counter()
    for i in range(0, len(clips), batch):
        feats = fe(clips[i:i + batch], sm.SAMPLE_RATE)
        book.assign(torch.cat(feats))
    wall = time.perf_counter() - start
    return sum(len(c) for c in clips) / sm.SAMPLE_RATE / wall


def kmeans_sample(clips: list[np.ndarray], frames: int) -> tuple[np.ndarray, int]:
    """(normalised float32[frames, D] sample, real demo frames in it)."""
    torch.set_num_threads(2)
    fe = sm.FeatureExtractor(sm.build("demo", 0.0, False).eval())
    feats = torch.cat([f for i in range(0, len(clips), 4)
                       for f in fe(clips[i:i + 4], sm.SAMPLE_RATE)]).numpy()
    rng = np.random.default_rng(0)
    reps = int(np.ceil(frames / len(feats)))
    x = np.tile(feats, (reps, 1))[:frames]
    x = x + 0.01 * x.std(0) * rng.normal(size=x.shape).astype(np.float32)
    mean, std = sk.normalisation(x)
    return np.ascontiguousarray((x - mean) / std, np.float32), len(feats)


def kmeans_race(x: np.ndarray, k: int, iterations: int, rounds: int, blas_threads: int) -> None:
    from sklearn.cluster import MiniBatchKMeans
    from threadpoolctl import threadpool_limits

    def fit_faiss() -> float:
        return sk.fit_kmeans(x, k, iterations, 0)[1]

    def fit_sklearn() -> float:
        with threadpool_limits(limits=blas_threads, user_api="blas"):
            mb = MiniBatchKMeans(n_clusters=k, batch_size=10240, max_iter=iterations, n_init=1,
                                 random_state=0).fit(x)
        steps.append(mb.n_steps_)  # its early stop (max_no_improvement) can end it before
        return float(mb.inertia_) / len(x)  # ``iterations`` epochs; faiss runs them all

    steps: list[int] = []
    fns = {"faiss k-means": fit_faiss, "sklearn MiniBatch": fit_sklearn}
    best, inertia = dict.fromkeys(fns, float("inf")), {}
    for r in range(rounds):
        names = list(fns)[::-1] if r % 2 else list(fns)
        took = {}
        for name in names:
            t = time.perf_counter()
            inertia[name] = fns[name]()
            took[name] = time.perf_counter() - t
            best[name] = min(best[name], took[name])
        print(f"  round {r + 1}: " + ", ".join(f"{n} {took[n]:.1f} s" for n in fns)
              + f"; sklearn / faiss {took['sklearn MiniBatch'] / took['faiss k-means']:.2f}")
    for name in fns:
        print(f"{name:<18} {best[name]:8.1f} s   inertia {inertia[name]:.3f}")
    print(f"sklearn ran {steps[-1]} mini-batch steps = "
          f"{steps[-1] * 10240 / len(x):.1f} epochs (of {iterations} allowed)")
    ratio = best["sklearn MiniBatch"] / best["faiss k-means"]
    print(f"sklearn / faiss time ratio: {ratio:.2f} (faiss inertia "
          f"{inertia['faiss k-means'] / inertia['sklearn MiniBatch']:.3f}x sklearn's); "
          f"target faiss at least as fast (>= 1.0): {'PASS' if ratio >= 1.0 else 'FAIL'}")


def gpu_paper() -> None:
    if not torch.cuda.is_available():
        print("no GPU: paper-size throughput skipped")
        return
    fe = sm.FeatureExtractor(sm.build("paper").cuda().eval())
    clips = [np.random.default_rng(i).normal(0, 0.1, 160000).astype(np.float32)
             for i in range(32)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fe(clips, sm.SAMPLE_RATE)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(3):
            fe(clips, sm.SAMPLE_RATE)
        torch.cuda.synchronize()
    print(f"paper size, batch 32 x 10 s on GPU: {3 * 320 / (time.perf_counter() - t):.0f} "
          "audio-s per wall-s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", default="data/audio")
    ap.add_argument("--clips", type=int, default=8, help="clips timed for throughput")
    ap.add_argument("--frames", type=int, default=200_000, help="k-means sample size")
    ap.add_argument("--k", type=int, default=1024, help="k-means clusters")
    ap.add_argument("--iterations", type=int, default=20, help="k-means iterations (epochs)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved k-means rounds")
    ap.add_argument("--sklearn-blas-threads", type=int, default=1,
                    help="OpenBLAS threads under scikit-learn's 2 OpenMP threads (1: its fastest "
                         "here; 2 threads ran its k-means++ init 8x slower on a loaded 2-core CPU)")
    args = ap.parse_args(argv)
    print(kernels.describe())
    print("load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    clips = [x for x, _ in sk.iter_clips(shard_paths(args.shards, "train"))]
    for n in (1, 2):
        print(f"demo features + assignment, {n} thread(s): "
              f"{throughput(clips[:args.clips], n):.1f} audio-s per wall-s")
    x, real = kmeans_sample(clips, args.frames)
    print(f"k-means sample: {len(x)} frames x {x.shape[1]} dims ({real} real demo frames, "
          f"jittered), K={args.k}, {args.iterations} iterations, 2 threads, best of "
          f"{args.rounds} interleaved rounds; scikit-learn's BLAS on "
          f"{args.sklearn_blas_threads} thread(s)")
    kmeans_race(x, args.k, args.iterations, args.rounds, args.sklearn_blas_threads)
    gpu_paper()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
