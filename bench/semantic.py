"""Benchmark of the semantic tokens: feature + assignment throughput, k-means fit time.

Goes in: the demo audio shards (``data/audio``). Prints, in one run:
- feature extraction plus centroid assignment throughput (audio-seconds per
  wall-second) of the demo-size w2v-BERT on 1 and 2 threads;
- faiss k-means fit time against scikit-learn's MiniBatchKMeans on the same
  200k-frame sample at K=1024 (their ratio, and both inertias as mean squared
  distance per frame). The demo corpus has ~22k train frames, so the sample is
  those frames repeated with 1% Gaussian jitter to reach 200k;
- on a GPU, feature throughput of the paper size (600M) at batch 32.

    python bench/semantic.py [--shards data/audio] [--clips 8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

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


def kmeans_race(clips: list[np.ndarray], frames: int = 200_000, k: int = 1024) -> None:
    from sklearn.cluster import MiniBatchKMeans

    torch.set_num_threads(2)
    fe = sm.FeatureExtractor(sm.build("demo", 0.0, False).eval())
    feats = torch.cat([f for i in range(0, len(clips), 4)
                       for f in fe(clips[i:i + 4], sm.SAMPLE_RATE)]).numpy()
    rng = np.random.default_rng(0)
    reps = int(np.ceil(frames / len(feats)))
    x = np.tile(feats, (reps, 1))[:frames]
    x = x + 0.01 * x.std(0) * rng.normal(size=x.shape).astype(np.float32)
    mean, std = sk.normalisation(x)
    x = np.ascontiguousarray((x - mean) / std, np.float32)
    print(f"k-means sample: {len(x)} frames x {x.shape[1]} dims "
          f"({len(feats)} real demo frames, jittered), K={k}, 20 iterations")
    t = time.perf_counter()
    _, faiss_inertia = sk.fit_kmeans(x, k, 20, 0)
    t_faiss = time.perf_counter() - t
    t = time.perf_counter()
    mb = MiniBatchKMeans(n_clusters=k, batch_size=10240, max_iter=20, n_init=1,
                         random_state=0).fit(x)
    t_sk = time.perf_counter() - t
    sk_inertia = float(mb.inertia_) / len(x)
    print(f"faiss k-means      {t_faiss:8.1f} s   inertia {faiss_inertia:.3f}")
    print(f"sklearn MiniBatch  {t_sk:8.1f} s   inertia {sk_inertia:.3f}")
    print(f"sklearn / faiss time ratio: {t_sk / t_faiss:.2f}")


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
    args = ap.parse_args(argv)
    clips = [x for x, _ in sk.iter_clips(shard_paths(args.shards, "train"))]
    for n in (1, 2):
        print(f"demo features + assignment, {n} thread(s): "
              f"{throughput(clips[:args.clips], n):.1f} audio-s per wall-s")
    kmeans_race(clips)
    gpu_paper()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
