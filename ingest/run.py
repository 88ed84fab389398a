"""Ingest stage: sources -> chunked, de-duplicated WebDataset audio shards.

Goes in: the sources listed in ``ingest.sources`` of params.yaml (local folders/globs
with sidecar or table captions, URL lists and MusicCaps-style CSVs downloaded with
yt-dlp; ``--source``, ``--urls`` and ``--musiccaps`` on the command line replace the
list) and the rest of the ``ingest`` section. Comes out, under ``--out``:

- ``{split}-{NNNNNN}.tar``: one sample per chunk, ``{key}.flac`` (mono, 24 kHz)
  and ``{key}.json`` (caption, tags, source, offset, duration, licence, hashes);
- ``manifest.parquet``: every chunk in the shards, one row each;
- ``rejects.parquet``: every input (or duplicate chunk) left out, with its reason;
- a stats JSON (``--stats``): hours in and out, chunks, rejects by reason.

Run it with::

    python -m cantus.ingest.run --params params.yaml --out data/audio \\
        --stats metrics/ingest.json                      # the sources in params.yaml
    python -m cantus.ingest.run --params params.yaml --source ~/music --out data/mine

Per-input work is cached under ``--cache`` keyed by file content and
processing params, and finished shards are kept, so a killed run resumes
where it stopped and ends byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cantus import shards
from cantus.config import ConfigError, load_section
from cantus.ingest import plan as planning
from cantus.ingest import sources, staging as stagemod
from cantus.ingest.dedup import FingerprintSpool
from cantus.ingest.params import IngestConfig, SourceConfig
from cantus.ingest.process import FINGERPRINT_DIM
from cantus.parallel import init_ray, map_unordered, worker_count

log = logging.getLogger(__name__)


class IngestError(RuntimeError):
    """The stage cannot produce output (every input failed), or too many
    downloads failed transiently for the output to be a dataset version."""


@dataclass(frozen=True)
class Inputs:
    """Where the audio comes from (paths: command line, not params)."""

    local: tuple[str, ...] = ()
    captions: tuple[str, ...] = ()
    urls: tuple[str, ...] = ()
    musiccaps: tuple[str, ...] = ()

    def __post_init__(self):
        if not (self.local or self.urls or self.musiccaps):
            raise ConfigError("no sources given: list them in ingest.sources or pass "
                              "--source, --urls or --musiccaps")

    @classmethod
    def of(cls, sources: tuple[SourceConfig, ...], captions: tuple[str, ...] = ()) -> Inputs:
        """The entries of ``ingest.sources`` (in their order), plus captions tables."""
        def paths(*kinds: str) -> tuple[str, ...]:
            return tuple(s.path for s in sources if s.kind in kinds)

        return cls(local=paths("folder", "glob"),
                   captions=tuple(s.captions for s in sources if s.captions) + captions,
                   urls=paths("url_list"), musiccaps=paths("musiccaps_csv"))


@dataclass
class _Progress:
    cached_inputs: int = 0
    processed_inputs: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    results: dict[int, dict[str, Any]] = field(default_factory=dict)


def run(cfg: IngestConfig, inputs: Inputs, out: str | Path, cache: str | Path,
        stats_path: str | Path | None = None) -> dict[str, Any]:
    """Run the whole stage; returns the stats dict (also written as JSON)."""
    out, cache = str(out).rstrip("/"), str(cache).rstrip("/")
    clock = [time.perf_counter()]
    records = gather(cfg, inputs, cache)
    clock.append(time.perf_counter())
    log.info("%d inputs", len(records))
    prog = _Progress()
    todo = [(i, r) for i, r in enumerate(records) if r["error"] is None]
    workers = worker_count(cfg.num_workers)
    staging = f"{cache}/ingest/{stagemod.processing_hash(cfg)}"
    spool = FingerprintSpool(FINGERPRINT_DIM)  # fingerprints go to disk as they arrive
    for j, res in map_unordered(stagemod.process_task, [r for _, r in todo], args=(cfg, staging),
                                executor=cfg.executor, max_in_flight=2 * workers,
                                desc="decode+chunk", total=len(todo)):
        res["fingerprints"] = spool.add(res.get("fingerprints", ()))  # a reject has none
        prog.results[todo[j][0]] = res
        prog.cached_inputs += res["cached"]
        prog.processed_inputs += not res["cached"]
    fingerprints = spool.array()
    for res in prog.results.values():
        a, b = res["fingerprints"]
        res["fingerprints"] = fingerprints[a:b]
    clock.append(time.perf_counter())
    plan = planning.Plan(cfg, records, prog.results)
    clock.append(time.perf_counter())
    for name, skipped in map_unordered(planning.write_shard_task, plan.shard_jobs(out),
                                       executor=cfg.executor, max_in_flight=2 * workers,
                                       desc="shards", total=len(plan.shards)):
        prog.shards_skipped += skipped
        prog.shards_written += not skipped
    clock.append(time.perf_counter())
    stats = plan.stats()
    stats_run = {"inputs_cached": prog.cached_inputs, "inputs_processed": prog.processed_inputs,
                 "shards_skipped": prog.shards_skipped,
                 "shards_written": prog.shards_written}
    shards.write_parquet(f"{out}/manifest.parquet", plan.manifest_table())
    shards.write_parquet(f"{out}/rejects.parquet", plan.rejects_table())
    planning.remove_stale_shards(out, plan.shards)
    shards.atomic_write_json(stats_path or f"{out}/stats.json", stats)
    clock.append(time.perf_counter())
    phases = ("gather", "process", "plan", "shards", "tables")
    log.info("ingest phases: %s", ", ".join(f"{p} {b - a:.2f} s" for p, a, b
                                            in zip(phases, clock, clock[1:])))
    log.info("ingest: %s", {**stats, **stats_run})
    if (why := transient_failures(cfg, records)) is not None:
        raise IngestError(f"{why}; reasons in {out}/rejects.parquet")
    if stats["chunks"] == 0:
        raise IngestError(f"all {len(records)} inputs were rejected; "
                          f"reasons in {out}/rejects.parquet: {stats['rejects_by_reason']}")
    return {**stats, **stats_run}


def transient_failures(cfg: IngestConfig, records: list[dict[str, Any]]) -> str | None:
    """Why the stage must fail when more than ``cfg.max_failed_fraction`` of the
    requested downloads failed transiently (network down, timeouts, HTTP 5xx),
    else None. Such a run would lock a smaller dataset that no rerun replaces."""
    requested = [r for r in records if r["kind"] != "local" and
                 (r["error"] is None or r["error"][0] in sources.DOWNLOAD_REASONS)]
    failed = [r for r in requested if r["error"] and r["error"][0] == "download_transient"]
    if not failed or len(failed) <= cfg.max_failed_fraction * len(requested):
        return None
    causes = Counter(r["error"][1][len(r["uri"]) + 2:].split(" (")[0].split(":")[0]
                     for r in failed)
    return (f"{len(failed)} of {len(requested)} downloads failed transiently "
            f"({', '.join(f'{c}: {n}' for c, n in causes.most_common())}), more than "
            f"ingest.max_failed_fraction = {cfg.max_failed_fraction:g}; transient failures "
            f"are not cached, so a rerun retries them")


def gather(cfg: IngestConfig, inputs: Inputs, cache: str) -> list[dict[str, Any]]:
    """Every input as a record, remote ones downloaded into the cache.

    yt-dlp writes to local disk, so downloads need a local ``cache``; the
    per-input results may live on any fsspec file system.
    """
    records = sources.local_inputs(list(inputs.local), list(inputs.captions))
    remote: list[dict[str, Any]] = []
    for path in inputs.urls:
        remote.extend(sources.url_inputs(path))
    for path in inputs.musiccaps:
        remote.extend(sources.musiccaps_inputs(path, cfg.download.url_template))
    if remote:
        local = shards.local_path(cache)
        if local is None:
            raise ConfigError(f"--cache {cache}: downloads need a local cache folder")
        sources.fetch_remote(remote, cfg.download, local / "downloads")
    records.extend(remote)
    records.sort(key=lambda r: (r["uri"], r["start_s"] or 0.0, r["end_s"] or 0.0))
    return records


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cantus ingest", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file (section 'ingest')")
    p.add_argument("--source", action="append", default=[], metavar="DIR_OR_GLOB",
                   help="local folder (recursive) or glob of audio files; repeatable. "
                        "--source, --urls and --musiccaps replace ingest.sources")
    p.add_argument("--captions", action="append", default=[], metavar="CSV_OR_JSONL",
                   help="captions table keyed by path; repeatable")
    p.add_argument("--urls", action="append", default=[], metavar="FILE",
                   help="text file with one URL per line (optionally URL<TAB>caption)")
    p.add_argument("--musiccaps", action="append", default=[], metavar="CSV",
                   help="MusicCaps-format CSV; sections are downloaded with yt-dlp")
    p.add_argument("--out", required=True, help="output folder for shards and tables")
    p.add_argument("--cache", default="data/cache", help="download and per-input cache")
    p.add_argument("--stats", default=None, help="stats JSON path (default OUT/stats.json)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _check_inputs(args: argparse.Namespace) -> None:
    """Each ``--source`` must be a folder, a file or a glob with matches, and each table a
    file; FileNotFoundError naming the flag and path, before any work (or Ray) starts."""
    import glob

    for spec in args.source:
        if not (Path(spec).exists() or glob.glob(spec, recursive=True)):
            raise FileNotFoundError(f"--source {spec}: no such folder, file or glob match")
    for flag in ("captions", "urls", "musiccaps"):
        for path in getattr(args, flag):
            if not Path(path).is_file():
                raise FileNotFoundError(f"--{flag} {path}: no such file")


TRACKED = ("data/demo", "data/sources")  # the ingest stage's data deps in dvc.yaml


def check_sources(sources: tuple[SourceConfig, ...]) -> None:
    """Each entry's path (and captions table) must exist: FileNotFoundError naming
    ``ingest.sources[i].path``, before any work (or Ray) starts. A path DVC does not
    track (outside ``data/demo`` and ``data/sources``) is logged as a warning."""
    import glob

    for i, s in enumerate(sources):
        key, p = f"ingest.sources[{i}]", Path(s.path)
        ok = {"folder": p.is_dir, "url_list": p.is_file, "musiccaps_csv": p.is_file,
              "glob": lambda: any(Path(m).is_file() for m in glob.glob(s.path, recursive=True))}
        if not ok[s.kind]():
            what = {"folder": "no such folder", "glob": "the glob matches no file"}
            raise FileNotFoundError(f"{key}.path: {s.path}: {what.get(s.kind, 'no such file')}")
        if s.captions and not Path(s.captions).is_file():
            raise FileNotFoundError(f"{key}.captions: {s.captions}: no such file")
        rel = os.path.normpath(s.path)
        if p.is_absolute() or not any(rel == t or rel.startswith(t + os.sep) for t in TRACKED):
            log.warning("%s.path: %s is outside %s, so `dvc repro` does not see changes in it; "
                        "bring it in with `cantus add-source %s`", key, s.path,
                        " and ".join(TRACKED), s.path)


def _what(e: Exception) -> str:
    return "" if isinstance(e, FileNotFoundError) else "configuration error: "


def main(argv: list[str] | None = None) -> int:
    """``cantus ingest``: 0 done, 2 a bad params key or a missing input (one line on stderr
    naming it), 1 a failed ingest (too many transient download failures, no chunks)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_section(args.params, "ingest", IngestConfig)
        _check_inputs(args)
        if args.source or args.urls or args.musiccaps:  # the command line replaces the list
            inputs = Inputs(tuple(args.source), tuple(args.captions), tuple(args.urls),
                            tuple(args.musiccaps))
        else:
            check_sources(cfg.sources)
            inputs = Inputs.of(cfg.sources, tuple(args.captions))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"cantus ingest: {_what(e)}{e}", file=sys.stderr)
        return 2
    if cfg.executor == "ray":
        init_ray(cfg.num_workers)
    try:
        stats = run(cfg, inputs, args.out, args.cache, args.stats)
    except (ConfigError, FileNotFoundError) as e:  # a bad captions table, $CANTUS_COOKIES, ...
        print(f"cantus ingest: {_what(e)}{e}", file=sys.stderr)
        return 2
    except IngestError as e:
        print(f"cantus ingest: {e}", file=sys.stderr)
        return 1
    print(f"ingest: {stats['inputs']} inputs -> {stats['chunks']} chunks "
          f"({stats['hours_out']:.3f} h) in {args.out}; {stats['rejects']} rejects "
          f"{stats['rejects_by_reason']}; {stats['inputs_cached']} inputs from the cache, "
          f"{stats['shards_skipped']} shards already in place")
    return 0


if __name__ == "__main__":
    sys.exit(main())
