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

``--paper`` measures instead each field's tokenizer at the paper sizes
(``CodecConfig.paper()``, w2v-BERT XL 600M with K = 1024 centroids,
``MulanModelConfig.paper()`` with a 12 x 1024 RVQ), randomly initialised (speed
does not depend on the weights), as the stage runs them (the field's
``encode_batch``, one thread, the codec's per-machine path warmed first):
audio-hours per core-hour on a few seconds of audio (MuLan on one chunk of
``ingest.chunk_seconds``: its windows overlap, so its cost per audio second
follows the chunk length), and with CUDA audio-hours per GPU-hour (a batch of
clips), beside the published anchors. It needs no trained models.

Throughput is tokenizing time only: the loop's model loading and the
pipeline's start-up (actor processes importing torch and transformers, then
loading their model: ~3-10 s per field, paid once per stage however large the
corpus) are printed apart, and the ratios are also given with them included.
The four runs alternate for ``--repeat`` rounds and each figure is its best,
so the machine's drift hits them alike. Run ``dvc repro tokenize_pack`` first so
the models exist.

    python bench/tokenize_stage.py [--chunks 48] [--repeat 3]
    python bench/tokenize_stage.py --paper [--seconds 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

from procs import ready_then_wait, run_together, watch

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
    ready_then_wait(go, part)
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
    outs = run_together(lambda k, go: [sys.executable, __file__, "--loop-part", f"{k}/{n}",
                                       "--loop-folder", str(folder), "--loop-go", str(go)],
                        n, work)
    results = [tuple(float(v) for v in out.split()[-2:]) for out in outs]
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
    cmd = [sys.executable, "-m", "cantus.tokenize.codec.tokenizer", "--params",
           str(ROOT / "params.yaml"), "--audio", str(folder), "--codec",
           str(ROOT / MODELS["codec"]), "--out", str(out)]
    return watch(cmd, out.parent / f"{out.name}.log", every=0.05)["tree_rss_mib"]


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


# Published figures to read the paper-size ones against (audio-hours per core- or GPU-hour).
ANCHORS = {
    ("acoustic", "cpu"): "EnCodec 24 kHz: 9.8x real time on one CPU thread (EnCodec, Table 5)",
    ("acoustic", "gpu"): "SoundStorm's LibriLight preparation: ~145-290 (codec tokens)",
    ("semantic", "gpu"): "SoundStorm's LibriLight preparation: ~500-1,150 (HuBERT + k-means)",
}


def paper_field(field: str, device: str):
    """(encode_batch over 1-D float32 clips, input sample rate) of one field's tokenizer at
    the paper size, randomly initialised: the stage's own classes, with the model built
    here instead of loaded from a folder."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    if field == "acoustic":
        from cantus.tokenize.codec.model import CodecConfig, SoundStream
        from cantus.tokenize.codec.tokenizer import AcousticTokens

        tok = AcousticTokens.__new__(AcousticTokens)
        tok.model = SoundStream(CodecConfig.paper()).to(device).eval()
        tok.sample_rate, tok.batch_size = tok.model.cfg.sample_rate, 8
        return tok.encode_batch, tok.sample_rate
    if field == "semantic":
        from cantus.tokenize.semantic import model as sm
        from cantus.tokenize.semantic.kmeans import Codebook, SemanticTokenizer

        tok = SemanticTokenizer.__new__(SemanticTokenizer)
        # layer 0: the 7th layer of the MLM module, as semantic.kmeans.layer 0 picks
        tok.extractor = sm.FeatureExtractor(sm.build("paper").to(device).eval(), 0, 25)
        d = tok.extractor.dim
        tok.codebook = Codebook(rng.standard_normal((1024, d)).astype(np.float32),
                                np.zeros(d, np.float32), np.ones(d, np.float32), device)
        return (lambda wavs: tok.encode_batch(wavs, sm.SAMPLE_RATE)), sm.SAMPLE_RATE
    from cantus.tokenize.mulan.model import Mulan
    from cantus.tokenize.mulan.params import MulanModelConfig
    from cantus.tokenize.mulan.rvq import MulanTokenizer, ResidualKMeans

    cfg = MulanModelConfig.paper()
    books = rng.standard_normal((12, 1024, cfg.embed_dim)).astype(np.float32)
    tok = MulanTokenizer(Mulan(cfg, text=False).to(device), ResidualKMeans(books))
    return (lambda wavs: [tok(w) for w in wavs]), cfg.sample_rate


def paper_clip(seconds: float, rate: int, seed: int) -> np.ndarray:
    """A chord with a little noise: float32[seconds x rate]."""
    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    x = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6)) / 4
    return (x + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def time_field(field: str, device: str, seconds: float, clips: int, repeat: int) -> float:
    """Best wall seconds of tokenizing ``clips`` clips of ``seconds`` (after one warm-up
    call: the codec tunes its CPU path on its first call)."""
    import torch

    encode, rate = paper_field(field, device)
    wavs = [paper_clip(seconds, rate, i) for i in range(clips)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    encode(wavs[:1])
    sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        encode(wavs)
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def paper_report(seconds: float, repeat: int) -> None:
    """Paper-size throughput of each field: one CPU thread, and one GPU when CUDA is here."""
    import gc

    import torch

    from cantus.config import load_section
    from cantus.ingest.params import IngestConfig

    chunk = load_section(ROOT / "params.yaml", "ingest", IngestConfig).chunk_seconds
    lengths = {"acoustic": seconds, "semantic": seconds, "mulan": chunk}
    torch.set_num_threads(1)
    print(f"paper-size tokenizers, random init; one CPU thread; best of {repeat}; "
          f"acoustic and semantic on {seconds:g} s, MuLan on one {chunk:g} s chunk "
          "(windows of 10 s at 1 s stride)")
    print(f"{'field':10}{'audio s':>9}{'wall s':>9}{'audio-h per core-h':>20}   published anchor")
    for field, secs in lengths.items():
        wall = time_field(field, "cpu", secs, 1, repeat)
        print(f"{field:10}{secs:9.1f}{wall:9.2f}{secs / wall:20.1f}   "
              f"{ANCHORS.get((field, 'cpu'), '-')}")
        gc.collect()
    if not torch.cuda.is_available():
        print("no CUDA device: audio-hours per GPU-hour not measured")
        return
    clips = 8
    print(f"one GPU ({torch.cuda.get_device_name()}): a batch of {clips} clips per call, "
          "float32")
    print(f"{'field':10}{'audio s':>9}{'wall s':>9}{'audio-h per GPU-h':>20}   published anchor")
    for field, secs in lengths.items():
        wall = time_field(field, "cuda", secs, clips, repeat)
        print(f"{field:10}{clips * secs:9.1f}{wall:9.3f}{clips * secs / wall:20.0f}   "
              f"{ANCHORS.get((field, 'gpu'), '-')}")
        gc.collect()
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=48, help="N (the RSS check also runs 2N)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; each figure is its best")
    ap.add_argument("--paper", action="store_true",
                    help="paper-size tokenizers (random init), per field, instead")
    ap.add_argument("--seconds", type=float, default=4.0,
                    help="--paper: clip length of the acoustic and semantic fields")
    ap.add_argument("--loop-part", help=argparse.SUPPRESS)    # K/N: one plain_processes child
    ap.add_argument("--loop-folder", help=argparse.SUPPRESS)
    ap.add_argument("--loop-go", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.loop_part:
        k, n = (int(v) for v in args.loop_part.split("/"))
        loaded, busy = plain_loop(Path(args.loop_folder), k, n, Path(args.loop_go))
        print(f"{loaded} {busy}")
        return 0
    from cantus import kernels

    print(kernels.describe())
    if args.paper:
        paper_report(args.seconds, args.repeat)
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
