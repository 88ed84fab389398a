"""Benchmark the ingest stage: throughput with 1 and 2 Ray workers, peak RSS for N and 2N.

Everything is measured side by side in one run on the same generated inputs
(OGG/Vorbis and FLAC, 44.1 kHz stereo, so decoding and resampling are real):

- audio-seconds ingested per wall-second with 1 and with 2 Ray workers, each
  on a fresh cache, timing ``run()`` only (Ray start-up excluded), in
  interleaved rounds (best of each setting), and the ratio of the two (target >= 1.7) and the 1-worker figure (target >= 50x
  real time per core);
- peak resident memory of the whole process tree (driver, Ray servers and
  workers, sampled every 50 ms) for N and for 2N inputs, each in a fresh
  process, and their ratio (target: 2N within 15% of N).

    python bench/ingest.py [--files 16] [--seconds 60]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]


def make_inputs(folder: Path, files: int, seconds: float, rate: int = 44100) -> float:
    """Write ``files`` distinct stereo pieces, alternating OGG and FLAC; returns total seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    n = int(seconds * rate)
    for i in range(files):
        rng = np.random.default_rng(i)
        notes = 220 * 2 ** (rng.integers(0, 24, size=int(seconds * 4)) / 12)
        f = np.repeat(notes, int(np.ceil(n / notes.size)))[:n]
        phase = 2 * np.pi * np.cumsum(f) / rate
        x = 0.2 * np.sin(phase) + 0.05 * np.sin(3 * phase) + 0.01 * rng.standard_normal(n)
        stereo = np.stack([x, np.roll(x, 100)], axis=1).astype(np.float32)
        kind = ("ogg", "OGG", "VORBIS") if i % 2 else ("flac", "FLAC", "PCM_16")
        # libsndfile's Vorbis writer crashes on long single writes: write 1 s blocks
        with sf.SoundFile(folder / f"piece{i:04d}.{kind[0]}", "w", rate, 2, format=kind[1],
                          subtype=kind[2]) as f:
            for a in range(0, n, rate):
                f.write(stereo[a:a + rate])
    return files * seconds


def _cfg(workers: int):
    from cantus.config import load_section
    from cantus.ingest.params import IngestConfig

    cfg = load_section(ROOT / "params.yaml", "ingest", IngestConfig)
    return dataclasses.replace(cfg, executor="ray", num_workers=workers)


def throughput(src: Path, work: Path, workers: int) -> float:
    """Audio-seconds per wall-second of one ingest run on ``workers`` Ray CPUs."""
    import ray

    from cantus.ingest import run as ingest
    from cantus.parallel import init_ray

    init_ray(num_cpus=workers)
    try:
        warm = work / f"warm{workers}"
        make_inputs(warm, 2 * workers, 5)  # start every worker process outside the timing
        ingest.run(_cfg(workers), ingest.Inputs(local=(str(warm),)), work / f"wo{workers}",
                   work / f"wc{workers}")
        t0 = time.perf_counter()
        stats = ingest.run(_cfg(workers), ingest.Inputs(local=(str(src),)),
                           work / f"out{workers}", work / f"cache{workers}")
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return stats["hours_in"] * 3600 / wall


def peak_rss(src: Path, work: Path, tag: str) -> tuple[float, float]:
    """(peak MiB of the whole process tree, peak MiB of the driver) for one CLI run."""
    import psutil

    params = work / "params.yaml"
    cmd = [sys.executable, "-m", "cantus.ingest.run", "--params", str(params), "--source",
           str(src), "--out", str(work / f"rss_out_{tag}"), "--cache", str(work / f"rss_c_{tag}")]
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tree_peak = driver_peak = 0
    while proc.poll() is None:
        try:
            procs = [proc] + proc.children(recursive=True)
            rss = [p.memory_info().rss for p in procs if p.is_running()]
            tree_peak = max(tree_peak, sum(rss))
            driver_peak = max(driver_peak, rss[0])
        except psutil.Error:
            pass
        time.sleep(0.05)
    if proc.returncode != 0:
        raise RuntimeError(f"ingest failed ({proc.returncode}): {' '.join(cmd)}")
    return tree_peak / 2**20, driver_peak / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=16, help="N (the RSS check also runs 2N)")
    p.add_argument("--seconds", type=float, default=60.0, help="length of each input")
    p.add_argument("--repeat", type=int, default=2,
                   help="rounds of (1 worker, 2 workers), interleaved; the best of each counts")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cantus-bench-") as tmp:
        work = Path(tmp)
        src_n, src_2n = work / "n", work / "2n"
        secs = make_inputs(src_2n, 2 * args.files, args.seconds)
        src_n.mkdir()
        for f in sorted(src_2n.iterdir())[: args.files]:
            os.link(f, src_n / f.name)
        import yaml

        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["ingest"].update(executor="ray", num_workers=2)
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        print(f"inputs: {2 * args.files} x {args.seconds:.0f} s (OGG/FLAC, 44.1 kHz stereo), "
              f"{secs / 60:.1f} min of audio; {os.cpu_count()} cores")
        rounds = [(throughput(src_2n, work / f"r{r}", 1), throughput(src_2n, work / f"r{r}", 2))
                  for r in range(args.repeat)]
        for r, (a, b) in enumerate(rounds):
            print(f"  round {r}: 1 worker {a:7.1f}x, 2 workers {b:7.1f}x")
        one, two = max(a for a, _ in rounds), max(b for _, b in rounds)
        print(f"throughput, 1 worker : {one:7.1f}x real time   (target >= 50x per core)")
        print(f"throughput, 2 workers: {two:7.1f}x real time")
        print(f"scaling 1 -> 2 workers: {two / one:5.2f}x          (target >= 1.7x)")
        tree_n, drv_n = peak_rss(src_n, work, "n")
        tree_2n, drv_2n = peak_rss(src_2n, work, "2n")
        print(f"peak RSS, N={args.files:<3}  inputs: tree {tree_n:7.0f} MiB, driver {drv_n:6.0f} MiB")
        print(f"peak RSS, 2N={2 * args.files:<3} inputs: tree {tree_2n:7.0f} MiB, "
              f"driver {drv_2n:6.0f} MiB")
        print(f"RSS ratio 2N/N: tree {tree_2n / tree_n:5.3f}, driver {drv_2n / drv_n:5.3f}"
              f"   (target <= 1.15)")
        print(json.dumps({"throughput_1": round(one, 2), "throughput_2": round(two, 2),
                          "scaling": round(two / one, 3),
                          "rss_ratio_tree": round(tree_2n / tree_n, 3),
                          "rss_ratio_driver": round(drv_2n / drv_n, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
