"""Benchmark near-duplicate search: time, peak RSS and recall at four sizes, exact beside LSH.

The set is N random unit 256-d fingerprints (a memmap on disk, as the ingest
stage passes them) with planted near-duplicates hidden at random positions:

- audio ones: synthetic pieces fingerprinted with the ingest code
  (``cantus.ingest.process.fingerprint``), each with a re-encode (resampled to
  8 kHz and back, 8-bit, noise), a -10 dB copy and two copies padded by
  0-100 ms (similarities from 0.95 to 1: both sides of the threshold);
- vector ones: pairs at cosine similarities drawn uniformly in (threshold, 1),
  the hardest case for the LSH tables.

For each size (N/64, N/16, N/4, N: prefixes of one set, each holding a
quarter of the groups whole) a fresh process
times ``find_duplicates`` and reads its peak RSS (VmHWM: it counts the
memmap's pages that were read, up to the set's size); where the exact search is
affordable (``--exact-upto``) it runs too, side by side. Recall is against
the exact search of the planted rows alone (random rows are never within the
threshold of anything, so that is the exact search's answer for the whole
set), and at the sizes where both ran, the two answers are compared whole.

    python bench/dedup.py --n 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DIM, RATE = 256, 24000


def piece(seed: int, seconds: float = 6.0) -> np.ndarray:
    """A seeded mono melody (two notes a second, a harmonic, noise) at 24 kHz."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    notes = 220 * 2 ** (rng.integers(0, 24, size=int(seconds * 2)) / 12)
    f = np.repeat(notes, int(np.ceil(n / notes.size)))[:n]
    phase = 2 * np.pi * np.cumsum(f) / RATE
    return (0.2 * np.sin(phase) + 0.05 * np.sin(3 * phase)
            + 0.01 * rng.standard_normal(n)).astype(np.float32)


def audio_groups(count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` float32[5, 256] groups: a piece's fingerprint, then its re-encode, gain
    change and two paddings."""
    import soxr

    from cantus.ingest.process import fingerprint

    rng, out = np.random.default_rng(seed), []
    for g in range(count):
        x = piece(seed * 100003 + g)
        re = soxr.resample(soxr.resample(x, RATE, 8000), 8000, RATE)[:len(x)]
        re = np.round(re * 128) / 128 + 0.003 * rng.standard_normal(len(x))
        pads = [np.concatenate([np.zeros(int(rng.integers(0, 2400)), np.float32), x])[:len(x)]
                for _ in range(2)]
        out.append(np.stack([fingerprint(v.astype(np.float32), RATE)
                             for v in (x, re, 0.316 * x, *pads)]))
    return out


def vector_pairs(count: int, threshold: float, seed: int = 1) -> list[np.ndarray]:
    """``count`` float32[2, 256] pairs of unit vectors at cosines uniform in (threshold, 1)."""
    rng, out = np.random.default_rng(seed), []
    for _ in range(count):
        a, noise = rng.standard_normal((2, DIM))
        a /= np.linalg.norm(a)
        noise -= (noise @ a) * a
        noise /= np.linalg.norm(noise)
        c = rng.uniform(threshold, 1.0)
        out.append(np.stack([a, c * a + np.sqrt(1 - c * c) * noise]).astype(np.float32))
    return out


def build(path: Path, n: int, groups: list[np.ndarray], sizes: list[int], seed: int = 2
          ) -> np.ndarray:
    """Write the set to ``path`` (float32[n, 256] raw), group ``g`` hidden at random rows
    below ``sizes[g % len(sizes)]`` (so every prefix size holds some whole groups); returns
    the planted rows, int64."""
    rng = np.random.default_rng(seed)
    mm = np.memmap(path, np.float32, "w+", shape=(n, DIM))
    for a in range(0, n, 1 << 16):
        x = rng.standard_normal((min(1 << 16, n - a), DIM)).astype(np.float32)
        mm[a:a + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    taken: set[int] = set()
    for g, rows in enumerate(groups):
        limit, p = sizes[g % len(sizes)], []
        while len(p) < len(rows):
            r = int(rng.integers(0, limit))
            if r not in taken:
                taken.add(r)
                p.append(r)
        mm[np.sort(p)] = rows
    mm.flush()
    return np.array(sorted(taken), np.int64)


def child(path: str, n: int, rows: int, threshold: float, exact: bool) -> None:
    """Time one search of the first ``rows`` rows; print its figures as JSON."""
    from cantus.ingest.dedup import find_duplicates

    fp = np.memmap(path, np.float32, "r", shape=(n, DIM))[:rows]
    hashes = [str(i) for i in range(rows)]
    t0 = time.perf_counter()
    dups = find_duplicates(hashes, fp, threshold, exact_max=rows if exact else 0)
    wall = time.perf_counter() - t0
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    print(json.dumps({"seconds": wall, "peak_rss_mb": int(status["VmHWM"].split()[0]) / 1024,
                      "dups": {str(k): v[1] for k, v in dups.items()}}))


def run_child(path: Path, n: int, rows: int, threshold: float, exact: bool) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(path), "--n", str(n),
                          "--rows", str(rows), "--threshold", str(threshold)]
                         + (["--exact"] if exact else []),
                         check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="largest size")
    p.add_argument("--exact-upto", type=int, default=65536,
                   help="also time the exact search at sizes up to this")
    p.add_argument("--audio-groups", type=int, default=60)
    p.add_argument("--vector-pairs", type=int, default=2000)
    p.add_argument("--threshold", type=float, default=None,
                   help="default: ingest.near_dup_threshold of params.yaml")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rows", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--exact", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.n, args.rows, args.threshold, args.exact)
    if args.threshold is None:
        import yaml

        args.threshold = yaml.safe_load((ROOT / "params.yaml").read_text())["ingest"][
            "near_dup_threshold"]
    from cantus.ingest.dedup import find_duplicates
    from cantus.kernels import active

    k = active()
    print(f"machine: {os.cpu_count()} cores, aten {k['aten']}, faiss {k['faiss']}, "
          f"blas {k['blas']}; threshold {args.threshold}")
    t0 = time.perf_counter()
    groups = audio_groups(args.audio_groups) + vector_pairs(args.vector_pairs, args.threshold)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fp.f32"
        sizes = [args.n // 64, args.n // 16, args.n // 4, args.n]
        planted = build(path, args.n, groups, sizes)
        print(f"set: {args.n} x {DIM} float32 ({args.n * DIM * 4 / 2**20:.0f} MiB memmap), "
              f"{len(planted)} planted rows in {len(groups)} groups; built in "
              f"{time.perf_counter() - t0:.1f} s")
        mm = np.memmap(path, np.float32, "r", shape=(args.n, DIM))
        print(f"{'N':>9} {'lsh s':>8} {'lsh RSS MiB':>12} {'exact s':>8} {'exact RSS MiB':>14}"
              f" {'planted dups':>13} {'recall':>7} {'same as exact':>14}")
        times = []
        for size in sizes:
            pl = np.sort(planted[planted < size])
            ref = find_duplicates([str(i) for i in pl], np.asarray(mm[pl]), args.threshold,
                                  exact_max=len(pl))
            want = {int(pl[i]): int(pl[v[1]]) for i, v in ref.items()}
            lsh = run_child(path, args.n, size, args.threshold, exact=False)
            got = {int(a): b for a, b in lsh["dups"].items()}
            recall = sum(got.get(i) == j for i, j in want.items()) / max(1, len(want))
            ex = run_child(path, args.n, size, args.threshold, exact=True) \
                if size <= args.exact_upto else None
            same = "-" if ex is None else str({int(a): b for a, b in ex["dups"].items()} == got)
            times.append(lsh["seconds"])
            print(f"{size:>9} {lsh['seconds']:>8.2f} {lsh['peak_rss_mb']:>12.0f} "
                  f"{ex['seconds'] if ex else float('nan'):>8.2f} "
                  f"{ex['peak_rss_mb'] if ex else float('nan'):>14.0f} {len(want):>13} "
                  f"{recall:>7.4f} {same:>14}", flush=True)
        print(f"time({sizes[-1]}) / time({sizes[-2]}) = {times[-1] / times[-2]:.2f} "
              f"(target <= 5); whole bench {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
