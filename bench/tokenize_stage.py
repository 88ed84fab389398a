"""Benchmark the tokenize stage against the same models in a plain loop.

Measured side by side in one run, on the same chunks (taken from the demo
audio shards, rewritten into shards of 4) and the same trained demo models:

- pipeline throughput (audio-seconds per wall-second, all three fields, one
  model actor each) against a plain Python loop on one thread, in a process of
  its own, that decodes each chunk and calls the three tokenizers (target
  ratio >= 0.9);
- the pipeline with 2 actors per field against 1 (target >= 1.7x), beside
  what the machine itself gives: the plain loop in 2 processes side by side
  (each on half the shards) against 1;
- peak RSS of the whole process tree for N and 2N chunks (target: within 15%);
- with CUDA: the three fields with one GPU actor each, as audio-hours
  tokenized per GPU-hour.

Throughput is tokenizing time only: the loop's model loading and the
pipeline's start-up (actor processes importing torch and transformers, then
loading their model: ~3-10 s per field, paid once per stage however large the
corpus) are printed apart, and the ratios are also given with them included.
The four runs alternate for ``--repeat`` rounds and each figure is its best,
so the machine's drift hits them alike. Run ``dvc repro tokenize_pack`` first so
the models exist.

    python bench/tokenize_stage.py [--chunks 48] [--repeat 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"codec": "models/codec", "semantic": "models/semantic",
          "semantic_kmeans": "models/semantic_kmeans", "mulan": "models/mulan",
          "mulan_rvq": "models/mulan_rvq"}
FIELDS = {"acoustic": ("codec",), "semantic": ("semantic", "semantic_kmeans"),
          "mulan": ("mulan", "mulan_rvq")}


def make_shards(folder: Path, chunks: int, per_shard: int = 4) -> float:
    """``chunks`` samples of the demo train shards (cycled) as shards; returns audio seconds."""
    import json

    from cantus import shards

    src = [s for p in sorted((ROOT / "data/audio").glob("train-*.tar"))
           for s in shards.iter_samples(p)]
    picked = [(f"{key[:24]}{i:08x}", fields) for i, (key, fields)
              in enumerate(src[i % len(src)] for i in range(chunks))]
    folder.mkdir(parents=True)
    for n in range(0, chunks, per_shard):
        shards.write_shard(folder / f"train-{n // per_shard:06d}.tar", picked[n:n + per_shard])
    return sum(json.loads(f["json"])["duration_s"] for _, f in picked)


def plain_loop(folder: Path, part: int, parts: int, go: Path) -> tuple[float, float]:
    """(model loading s, tokenizing s): decode + the three tokenizers, one chunk at a time,
    over every ``parts``-th shard from ``part`` (the actors' round-robin split), started
    once ``go`` exists (``{go}.ready{part}`` says loading is done)."""
    import torch

    from cantus import audio, shards
    from cantus.audio_stream import decode_sample
    from cantus.tokenize.fields import load_field

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    toks = [load_field(f, {m: str(ROOT / MODELS[m]) for m in ms}) for f, ms in FIELDS.items()]
    loaded = time.perf_counter() - t0
    Path(f"{go}.ready{part}").touch()
    while not go.exists():
        time.sleep(0.005)
    t1 = time.perf_counter()
    for path in sorted(folder.glob("*.tar"))[part::parts]:
        for _, fields in shards.iter_samples(path):
            x, meta = decode_sample(fields)
            for tok in toks:
                tok.encode_batch([audio.resample(x, meta["sample_rate"], tok.sample_rate)])
    return loaded, time.perf_counter() - t1


def plain_processes(folder: Path, work: Path, n: int) -> tuple[float, float]:
    """``plain_loop`` in ``n`` processes side by side, each on 1/n of the shards, started
    together once all have loaded: (loading s, tokenizing s of the slowest). With n = 1
    and 2 it is what this machine itself gives two workers, with no Ray in the way."""
    go = work / f"go-{n}-{time.monotonic_ns()}"
    procs = [subprocess.Popen([sys.executable, __file__, "--loop-part", f"{k}/{n}",
                               "--loop-folder", str(folder), "--loop-go", str(go)],
                              stdout=subprocess.PIPE, text=True) for k in range(n)]
    while (sum(Path(f"{go}.ready{k}").exists() for k in range(n)) < n
           and all(p.poll() is None for p in procs)):
        time.sleep(0.01)
    go.touch()
    results = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise RuntimeError(f"plain loop process failed ({p.returncode})")
        results.append(tuple(float(v) for v in out.split()[-2:]))
    return max(r[0] for r in results), max(r[1] for r in results)


def pipeline(folder: Path, work: Path, actors: int, gpus: float = 0.0) -> tuple[float, float]:
    """(actor start-up s, tokenizing s) of the three field stages, ``actors`` actors each
    (each holding ``gpus`` GPUs; then Ray gets every CPU, else 2)."""
    import shutil

    import ray

    from cantus.parallel import init_ray
    from cantus.tokenize import run as tokenize

    cfg = dataclasses.replace(tokenize.load_config(ROOT / "params.yaml"), executor="ray",
                              actors=actors, max_in_flight=2 * actors)
    if gpus:
        cfg = dataclasses.replace(cfg, gpus_per_actor=gpus, device="cuda")
    init_ray(num_cpus=0 if gpus else 2)
    try:
        startup = busy = 0.0
        for field, ms in FIELDS.items():
            out = work / f"{field}_{actors}"
            shutil.rmtree(out, ignore_errors=True)
            from cantus.tokenize.fields import FIELDS as TOKENIZERS

            s = tokenize.run(cfg, TOKENIZERS[field], folder,
                             {m: str(ROOT / MODELS[m]) for m in ms}, out)
            startup, busy = startup + s["startup_s"], busy + s["tokenize_s"]
        return startup, busy
    finally:
        ray.shutdown()


def peak_rss(folder: Path, out: Path) -> float:
    """Peak MiB of the whole process tree of one acoustic-field CLI run on Ray."""
    import psutil

    cmd = [sys.executable, "-m", "cantus.tokenize.codec.tokenizer", "--params",
           str(ROOT / "params.yaml"), "--audio", str(folder), "--codec",
           str(ROOT / MODELS["codec"]), "--out", str(out)]
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [proc] + proc.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    if proc.returncode:
        raise RuntimeError(f"tokenize failed ({proc.returncode}): {' '.join(cmd)}")
    return peak / 2**20


def gpu_report(work: Path, secs: float) -> None:
    """With CUDA: one GPU actor per field; audio-hours tokenized per GPU-hour."""
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: GPU actors not measured")
        return
    up, busy = pipeline(work / "n", work / "gpu", 1, gpus=1.0)
    print(f"GPU actors ({torch.cuda.get_device_name()}), 1 per field: "
          f"{secs / busy:.0f} audio-hours per GPU-hour ({secs / (up + busy):.0f} with "
          f"{up:.1f} s start-up); demo models, a small input: a lower bound")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=48, help="N (the RSS check also runs 2N)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; each figure is its best")
    ap.add_argument("--loop-part", help=argparse.SUPPRESS)    # K/N: one plain_processes child
    ap.add_argument("--loop-folder", help=argparse.SUPPRESS)
    ap.add_argument("--loop-go", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.loop_part:
        k, n = (int(v) for v in args.loop_part.split("/"))
        loaded, busy = plain_loop(Path(args.loop_folder), k, n, Path(args.loop_go))
        print(f"{loaded} {busy}")
        return 0
    missing = [m for m in MODELS.values() if not (ROOT / m).is_dir()]
    if missing:
        print(f"missing models {missing}: run `dvc repro tokenize_pack` first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="cantus-bench-tok-") as tmp:
        work = Path(tmp)
        secs = make_shards(work / "n", args.chunks)
        make_shards(work / "2n", 2 * args.chunks)
        print(f"{args.chunks} chunks in shards of 4, {secs:.0f} s of audio; demo models; "
              f"3 fields; best of {args.repeat} rounds")
        runs: dict[str, list[tuple[float, float]]] = {"loop": [], "loop2": [], "one": [],
                                                       "two": []}
        for _ in range(args.repeat):  # interleaved, so drift hits all four alike
            runs["loop"].append(plain_processes(work / "n", work, 1))
            runs["loop2"].append(plain_processes(work / "n", work, 2))
            runs["one"].append(pipeline(work / "n", work, 1))
            runs["two"].append(pipeline(work / "n", work, 2))
        best = {k: (min(r[0] for r in v), min(r[1] for r in v), min(sum(r) for r in v))
                for k, v in runs.items()}
        print(f"{'':26}{'start-up':>10}{'tokenize':>10}{'total':>9}   throughput")
        names = {"loop": "plain loop (1 thread)", "loop2": "2 plain loops side by side",
                 "one": "pipeline, 1 actor", "two": "pipeline, 2 actors"}
        for k, (up, busy, total) in best.items():
            print(f"{names[k]:26}{up:9.1f}s{busy:9.1f}s{total:8.1f}s   {secs / busy:5.1f}x real "
                  f"time ({secs / total:4.1f}x with start-up)")
        loop, loop2, one, two = best["loop"], best["loop2"], best["one"], best["two"]
        print(f"pipeline / loop, 1 actor : {loop[1] / one[1]:5.2f} throughput (target >= 0.9); "
              f"{loop[2] / one[2]:5.2f} with start-up")
        print(f"2 actors vs 1            : {one[1] / two[1]:5.2f}x throughput (target >= 1.7x); "
              f"{one[2] / two[2]:5.2f}x with start-up")
        print(f"  this machine's own 2 vs 1 (plain loops, no Ray): {loop[1] / loop2[1]:5.2f}x; "
              f"the pipeline gets {one[1] / two[1] / (loop[1] / loop2[1]):4.0%} of it")
        gpu_report(work, secs)
        rss_n, rss_2n = peak_rss(work / "n", work / "rss_n"), peak_rss(work / "2n", work / "rss_2n")
        print(f"peak RSS (acoustic field, process tree): N {rss_n:.0f} MiB, 2N {rss_2n:.0f} MiB, "
              f"ratio {rss_2n / rss_n:5.3f} (target <= 1.15)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
