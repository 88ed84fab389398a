"""Benchmark the ingest stage: throughput with 1 and 2 Ray workers, peak RSS for N and 2N.

Everything is measured side by side in one run on the same generated inputs
(OGG/Vorbis and FLAC, 44.1 kHz stereo, so decoding and resampling are real):

- audio-seconds ingested per wall-second with 1 and with 2 Ray workers, each
  on a fresh cache, timing ``run()`` only (Ray start-up excluded), and the
  ratio of the two (target >= 1.7) and the 1-worker figure (target >= 50x
  real time per core);
- their reference: the stage's per-file work (``file_hash`` +
  ``process_file``: decode, checks, resample, loudness, chunks, FLAC,
  fingerprints) in a plain loop, no Ray, no staging, dedup or shards, in 1
  process and in 2 processes side by side (each on half the inputs, one
  thread each). The 1-process figure is what one core gives the per-file
  work; 2 against 1 is what this machine itself gives a second worker, the
  ceiling for the Ray scaling;
- the four runs alternate for ``--repeat`` rounds (the order turns each
  round, so the machine's drift hits them alike) and each figure is its best;
- peak resident memory of the whole process tree (driver, Ray servers and
  workers, sampled every 50 ms) for N and for 2N inputs, each in a fresh
  process, and their ratio (target: 2N within 15% of N).

Each target prints PASS or FAIL; the first line names the CPU, its widest
ISA, the cores, the kernels in force and any ``cantus.kernels`` caps.

    python bench/ingest.py [--files 16] [--seconds 60] [--repeat 2]
    env $(python -m cantus.kernels --env avx2) python bench/ingest.py   # what AVX2 runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from cantus import kernels
from procs import ready_then_wait, run_together, watch

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


def plain_loop(folder: Path, part: int, parts: int, go: Path) -> float:
    """Seconds of ``file_hash`` + ``process_file`` over every ``parts``-th input from ``part``,
    in this process, started once ``go`` exists (``{go}.ready{part}`` says imports are done)."""
    from cantus import audio
    from cantus.ingest.process import process_file
    from cantus.ingest.sources import new_input

    cfg = _cfg(1)
    files = sorted(folder.iterdir())[part::parts]
    recs = [new_input(str(f), "local", path=str(f)) for f in files]
    process_file(recs[0], cfg, audio.file_hash(files[0]))  # first calls build caches, as Ray's
    ready_then_wait(go, part)                             # warm-up run does for its workers
    t0 = time.perf_counter()
    for rec in recs:
        if process_file(rec, cfg, audio.file_hash(rec["path"])).reject:
            raise RuntimeError(f"{rec['path']}: rejected")
    return time.perf_counter() - t0


def plain_processes(src: Path, work: Path, n: int, seconds: float) -> float:
    """Audio-seconds per wall-second of ``plain_loop`` in ``n`` processes side by side (one
    thread each), started together once all have imported; timed to the slowest."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    outs = run_together(lambda k, go: [sys.executable, __file__, "--loop-part", f"{k}/{n}",
                                       "--loop-folder", str(src), "--loop-go", str(go)],
                        n, work, env)
    return seconds / max(float(out.split()[-1]) for out in outs)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def peak_rss(src: Path, work: Path, tag: str) -> tuple[float, float]:
    """(peak MiB of the whole process tree, peak MiB of the driver) for one CLI run."""
    params = work / "params.yaml"
    cmd = [sys.executable, "-m", "cantus.ingest.run", "--params", str(params), "--source",
           str(src), "--out", str(work / f"rss_out_{tag}"), "--cache", str(work / f"rss_c_{tag}")]
    rec = watch(cmd, work / f"rss_{tag}.log", every=0.05)
    return rec["tree_rss_mib"], rec["driver_rss_mib"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=16, help="N (the RSS check also runs 2N)")
    p.add_argument("--seconds", type=float, default=60.0, help="length of each input")
    p.add_argument("--repeat", type=int, default=2,
                   help="interleaved rounds of the four runs; the best of each counts")
    p.add_argument("--loop-part", help=argparse.SUPPRESS)  # K/N: run as one plain loop process
    p.add_argument("--loop-folder", help=argparse.SUPPRESS)
    p.add_argument("--loop-go", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.loop_part:
        part, parts = (int(v) for v in args.loop_part.split("/"))
        print(plain_loop(Path(args.loop_folder), part, parts, Path(args.loop_go)))
        return 0
    print(kernels.describe())
    print("load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
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
              f"{secs / 60:.1f} min of audio; best of {args.repeat} interleaved rounds")
        runs = {"ray1": lambda r: throughput(src_2n, work / f"r{r}", 1),
                "ray2": lambda r: throughput(src_2n, work / f"r{r}", 2),
                "loop1": lambda r: plain_processes(src_2n, work, 1, secs),
                "loop2": lambda r: plain_processes(src_2n, work, 2, secs)}
        best = dict.fromkeys(runs, 0.0)
        for r in range(args.repeat):
            names = list(runs)[r % 4:] + list(runs)[:r % 4]  # a different one goes first
            got = {name: runs[name](r) for name in names}
            best = {k: max(best[k], got[k]) for k in best}
            print(f"  round {r}: Ray 1 worker {got['ray1']:7.1f}x, 2 workers {got['ray2']:7.1f}x"
                  f" ({got['ray2'] / got['ray1']:.2f}x); plain loop 1 process "
                  f"{got['loop1']:7.1f}x, 2 {got['loop2']:7.1f}x "
                  f"({got['loop2'] / got['loop1']:.2f}x)")
        one, two = best["ray1"], best["ray2"]
        print(f"throughput, 1 worker : {one:7.1f}x real time   (target >= 50x per core: "
              f"{verdict(one >= 50)}); {one / best['loop1']:.2f}x the plain loop's "
              f"{best['loop1']:.1f}x")
        print(f"throughput, 2 workers: {two:7.1f}x real time   (plain loops: "
              f"{best['loop2']:.1f}x)")
        print(f"scaling 1 -> 2 workers: {two / one:5.2f}x          (target >= 1.7x: "
              f"{verdict(two / one >= 1.7)}); this machine's own 2 vs 1 (plain loops, "
              f"no Ray): {best['loop2'] / best['loop1']:.2f}x")
        tree_n, drv_n = peak_rss(src_n, work, "n")
        tree_2n, drv_2n = peak_rss(src_2n, work, "2n")
        print(f"peak RSS, N={args.files:<3}  inputs: tree {tree_n:7.0f} MiB, "
              f"driver {drv_n:6.0f} MiB")
        print(f"peak RSS, 2N={2 * args.files:<3} inputs: tree {tree_2n:7.0f} MiB, "
              f"driver {drv_2n:6.0f} MiB")
        rss = max(tree_2n / tree_n, drv_2n / drv_n)
        print(f"RSS ratio 2N/N: tree {tree_2n / tree_n:5.3f}, driver {drv_2n / drv_n:5.3f}"
              f"   (target <= 1.15: {verdict(rss <= 1.15)})")
        print(json.dumps({"throughput_1": round(one, 2), "throughput_2": round(two, 2),
                          "scaling": round(two / one, 3),
                          "loop_1": round(best["loop1"], 2), "loop_2": round(best["loop2"], 2),
                          "loop_scaling": round(best["loop2"] / best["loop1"], 3),
                          "rss_ratio_tree": round(tree_2n / tree_n, 3),
                          "rss_ratio_driver": round(drv_2n / drv_n, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
