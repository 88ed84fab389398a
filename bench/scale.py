"""Benchmark the data half of the chain as the corpus grows: 1x, 4x and 16x of a base corpus.

Per size, in a fresh work folder: the demo corpus is rendered (``demo.num_pieces``
= base pieces x size, through a params overlay), then the stages run as
``dvc repro`` runs them, each as a subprocess with the command line of its
``dvc.yaml`` stage (data paths moved into the work folder, ``params.yaml``
replaced by the bench's own):

    demo_corpus -> ingest -> tokenize_acoustic, tokenize_semantic, tokenize_mulan
    -> tokenize_pack -> semantic_kmeans (the k-means fit) -> mulan_rvq (the RVQ fit)
    -> lm_loader (one epoch of the LM data loader, train/data.py, for each LM stage)

The tokenizers and the fits use the trained demo models in ``models/`` (codec,
w2v-BERT, MuLan and their codebooks): nothing is trained here. The fits write
their codebooks into the work folder and the tokenizers keep using the trained
ones.

Printed: ``kernels.describe()`` and the load average first; one JSON line per
size (per stage: wall seconds, audio-hours per core-hour of the machine's
cores, audio-hours per CPU-hour the stage's processes actually used, peak RSS
of the stage's driver process and of its workers: the sum over every
descendant process, Ray's included, sampled every 0.1 s with psutil, and the
largest single worker); then, per stage, the two targets between the smallest
and the largest size (``k`` = their ratio): time(k x) / (k x time(1x)) <= 1.2
and peak RSS(k x) / RSS(1x) <= 1.3, PASS or FAIL.

The audio-hours of a size are the ingest output's (every stage reads that
corpus, the fits its train split). With the default base of 48 pieces of 20 s
(the demo's 16 min), 16x is 4.3 h.

    python bench/scale.py [--base-pieces 48] [--sizes 1,4,16] [--keep DIR]
    python bench/scale.py --base-pieces 4 --sizes 1,2     # a quick try
    python bench/scale.py --report OUT.txt   # the targets from the JSON lines of a run
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

import yaml

import procs
from cantus.config import read_params

ROOT = Path(__file__).resolve().parents[1]
# The dvc.yaml stages run, in order; lm_loader is this bench's own (LOADER).
STAGES = ("demo_corpus", "ingest", "tokenize_acoustic", "tokenize_semantic", "tokenize_mulan",
          "tokenize_pack", "semantic_kmeans", "mulan_rvq")
LOADER = "lm_loader"
MODELS = ("codec", "semantic", "semantic_kmeans", "mulan", "mulan_rvq")
TIME_TARGET, RSS_TARGET = 1.2, 1.3


def stage_command(stage: dict, work: Path, params: Path, models: Path = ROOT / "models"
                  ) -> list[str]:
    """A dvc.yaml stage's command, run on the work folder: ``params.yaml`` -> ``params``;
    ``data/X`` and ``metrics/X`` -> ``work/X`` and ``work/metrics/X``; ``models/X``
    -> ``work/X`` when the stage writes it (a fit's codebooks), else the trained
    model ``models/X`` (this checkout's ``models/`` by default)."""
    outs = {o if isinstance(o, str) else next(iter(o)) for o in stage.get("outs", [])}
    argv = shlex.split(stage["cmd"])
    if argv[0] != "python":
        raise ValueError(f"dvc.yaml stage command does not start with python: {stage['cmd']}")
    out = [sys.executable]
    for tok in argv[1:]:
        if tok == "params.yaml":
            tok = str(params)
        elif tok.startswith(("data/", "checkpoints/")) or (tok.startswith("models/")
                                                           and tok in outs):
            tok = str(work / tok.split("/", 1)[1])
        elif tok.startswith("metrics/"):
            tok = str(work / tok)
        elif tok.startswith("models/"):
            tok = str(models / tok.split("/", 1)[1])
        out.append(tok)
    return out


def write_params(work: Path, pieces: int, fit_frames: int) -> Path:
    """``work/params.yaml``: this checkout's params.yaml with ``demo.num_pieces`` set, the
    k-means fit's sample cap ``semantic.kmeans.max_frames`` at ``fit_frames``, and
    ``ingest.sources`` (where it exists) the work folder's demo corpus alone."""
    from cantus.overlay import apply

    changes: dict = {"demo": {"num_pieces": pieces},
                     "semantic": {"kmeans": {"max_frames": fit_frames}}}
    if "sources" in read_params(ROOT / "params.yaml")["ingest"]:
        changes["ingest"] = {"sources": [{"kind": "folder", "path": str(work / "demo"),
                                          "captions": ""}]}
    overlay = work / "overlay.yaml"
    overlay.write_text(yaml.safe_dump(changes))
    apply(overlay, ROOT / "params.yaml", out=work / "params.yaml")
    return work / "params.yaml"


def watch(cmd: list[str], log: Path) -> dict:
    """``procs.watch`` from the checkout: a stage's seconds, CPU seconds and peak RSS of its
    driver, its workers together and its largest worker."""
    rec = procs.watch(cmd, log, cwd=ROOT)
    del rec["tree_rss_mib"]
    return rec


def loader_pass(tokens: str, params: str) -> int:
    """One epoch of the LM data loader (``TokenBatches``) per LM stage, with the stage's
    params (batch size, crop, workers, shuffle buffer); returns the batches drawn."""
    from cantus.audio_stream import shard_paths
    from cantus.train.data import TokenBatches
    from cantus.train.stage import load_lm, make_layout

    cfg = load_lm(params)
    paths, batches = shard_paths(tokens, "train"), 0
    for stage in ("semantic", "coarse", "fine"):
        scfg = getattr(cfg, stage)
        t = scfg.train
        data = TokenBatches(paths, make_layout(cfg.tokens, stage, scfg), batch_size=t.batch_size,
                            seed=t.seed, cond_dropout=scfg.cond_dropout,
                            num_workers=t.num_workers, shuffle_buffer=t.shuffle_buffer)
        batches += sum(1 for _ in data._epoch_loader())  # exactly one epoch
    return batches


def run_size(work: Path, pieces: int, cores: int, models: Path, fit_frames: int) -> dict:
    """Every stage on a corpus of ``pieces`` demo pieces, in ``work``; the size's record."""
    work.mkdir(parents=True)
    (work / "metrics").mkdir()
    (work / "logs").mkdir()
    params = write_params(work, pieces, fit_frames)
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    stages = {}
    for name in STAGES:
        stages[name] = watch(stage_command(dvc[name], work, params, models),
                             work / "logs" / f"{name}.log")
    stages[LOADER] = watch([sys.executable, __file__, "--loader-pass", str(work / "tokens"),
                            "--params", str(params)], work / "logs" / f"{LOADER}.log")
    stats = json.loads((work / "metrics" / "ingest.json").read_text())
    if stats["inputs"] != pieces:  # ingest read some other corpus (params' ingest.sources?)
        raise RuntimeError(f"ingest saw {stats['inputs']} inputs, not the {pieces} pieces "
                           f"rendered in {work / 'demo'}")
    hours = float(stats["hours_out"])
    token_rate = read_params(params)["semantic"]["kmeans"]["token_rate"]
    train_frames = int(float(stats["hours_by_split"]["train"]) * 3600 * token_rate)
    for s in stages.values():
        s["audio_h_per_core_h"] = round(hours / (s["s"] * cores / 3600), 1)
        s["audio_h_per_cpu_h"] = round(hours / (s["cpu_s"] / 3600), 1) if s["cpu_s"] else None
    total = sum(s["s"] for s in stages.values())
    return {"pieces": pieces, "audio_h": round(hours, 4), "chunks": stats["chunks"],
            "shards": stats["shards"], "cores": cores, "total_s": round(total, 1),
            "train_frames": train_frames, "fit_frames": fit_frames,
            "fit_sample_full": train_frames >= fit_frames,
            "audio_h_per_core_h": round(hours / (total * cores / 3600), 2), "stages": stages}


def ratios(small: dict, large: dict, k: float) -> list[dict]:
    """Per stage: time(large) / (k x time(small)) and peak RSS(large) / RSS(small), with
    PASS/FAIL against the targets (workers' RSS where the stage has workers)."""
    rows = []
    for name, a in small["stages"].items():
        b = large["stages"][name]
        row = {"stage": name, "time": b["s"] / (k * a["s"]),
               "driver_rss": b["driver_rss_mib"] / a["driver_rss_mib"]}
        if a["workers_rss_mib"] > 0:
            row["workers_rss"] = b["workers_rss_mib"] / a["workers_rss_mib"]
        row["time_ok"] = row["time"] <= TIME_TARGET
        row["rss_ok"] = all(row[c] <= RSS_TARGET for c in ("driver_rss", "workers_rss")
                            if c in row)
        rows.append(row)
    return rows


def print_ratios(rows: list[dict], lo: int, hi: int) -> None:
    k = hi // lo if hi % lo == 0 else hi / lo
    print(f"targets, {hi}x against {lo}x: time({hi}x) / ({k} x time({lo}x)) <= {TIME_TARGET}; "
          f"peak RSS({hi}x) / RSS({lo}x) <= {RSS_TARGET} (driver and workers)")
    print(f"{'stage':20}{'time ratio':>12}{'':6}{'driver RSS':>12}{'workers RSS':>13}")
    for r in rows:
        w = f"{r['workers_rss']:13.3f}" if "workers_rss" in r else f"{'-':>13}"
        print(f"{r['stage']:20}{r['time']:12.3f}  {'PASS' if r['time_ok'] else 'FAIL'}"
              f"{r['driver_rss']:12.3f}{w}  {'PASS' if r['rss_ok'] else 'FAIL'}")


def report(path: Path) -> int:
    """The targets between the smallest and the largest size recorded in ``path``."""
    records = {}
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            records[int(rec["size"].rstrip("x"))] = rec
    if len(records) < 2:
        print(f"{path}: fewer than two sizes recorded", file=sys.stderr)
        return 2
    lo, hi = min(records), max(records)
    print_ratios(ratios(records[lo], records[hi], hi / lo), lo, hi)
    return 0


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-pieces", type=int, default=48, help="demo pieces of the 1x corpus")
    ap.add_argument("--sizes", default="1,4,16", help="comma-separated multiples of the base")
    ap.add_argument("--fit-frames", type=int, default=16384,
                    help="the k-means fit's frame sample (semantic.kmeans.max_frames) for every "
                         "size: its memory is that cap's, so the 1x train split should fill it "
                         "(the default does for the default base)")
    ap.add_argument("--keep", help="work folder to keep (default: a temporary one, removed)")
    ap.add_argument("--models", default=str(ROOT / "models"),
                    help="folder of the trained models (codec, semantic, semantic_kmeans, "
                         "mulan, mulan_rvq)")
    ap.add_argument("--report", metavar="FILE",
                    help="print the targets from the per-size JSON lines in FILE (the output "
                         "of a run, e.g. one stopped before its last size) and exit")
    ap.add_argument("--loader-pass", help=argparse.SUPPRESS)  # TOKENS: the lm_loader child
    ap.add_argument("--params", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.loader_pass:
        print(f"{loader_pass(args.loader_pass, args.params)} batches")
        return 0
    if args.report:
        return report(Path(args.report))
    try:
        sizes = sorted({int(v) for v in args.sizes.split(",")})
    except ValueError:
        ap.error(f"--sizes {args.sizes!r}: expected comma-separated integers such as 1,4,16")
    if args.base_pieces <= 0 or not sizes or sizes[0] <= 0 or args.fit_frames <= 0:
        ap.error("--base-pieces, --fit-frames and every --sizes value must be positive")
    models = Path(args.models).resolve()
    missing = [m for m in MODELS if not (models / m).is_dir()]
    if missing:
        print(f"missing models {missing} in {models}: run `dvc repro tokenize_pack` first",
              file=sys.stderr)
        return 2
    from cantus import kernels

    cores = os.cpu_count() or 1
    print(kernels.describe())
    print(f"load average at start: {_load()}; base {args.base_pieces} pieces; sizes {sizes}; "
          f"k-means fit sample capped at {args.fit_frames} frames "
          f"(semantic.kmeans.max_frames) at every size")
    sys.stdout.flush()
    keep = Path(args.keep) if args.keep else None
    if keep and keep.exists() and any(keep.iterdir()):
        ap.error(f"--keep {keep}: the folder is not empty")
    with tempfile.TemporaryDirectory(prefix="cantus-bench-scale-") as tmp:
        work = keep or Path(tmp)
        records = {}
        for size in sizes:
            rec = run_size(work / f"{size}x", args.base_pieces * size, cores, models,
                           args.fit_frames)
            records[size] = {"size": f"{size}x", **rec}
            print(json.dumps(records[size]))
            if not rec["fit_sample_full"]:
                print(f"note: {size}x has {rec['train_frames']} train frames, fewer than the "
                      f"fit's cap of {args.fit_frames}: its k-means sample is not full, so "
                      "that fit's memory still grows with the corpus")
            sys.stdout.flush()
    print(f"load average at end: {_load()}")
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        print_ratios(ratios(records[lo], records[hi], hi / lo), lo, hi)
    return 0


if __name__ == "__main__":
    sys.exit(main())
