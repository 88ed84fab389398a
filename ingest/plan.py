"""From per-input results to the stage's outputs: duplicates, splits, shards, tables.

Goes in: the sorted input records and their ``process_task`` summaries.
Comes out: a ``Plan`` that knows which chunks are kept, which split each
track is in, which shard each chunk goes to, and builds the manifest,
rejects and stats. Everything here is a pure function of its inputs, so the
same inputs always give the same plan (and the same bytes on disk).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from cantus import shards
from cantus.ingest.dedup import FingerprintSpool, find_duplicates
from cantus.ingest.params import IngestConfig
from cantus.ingest.sources import flat_tags, printable
from cantus.ingest import staging as staging_files

SPLITS = ("train", "valid")


@dataclass
class Kept:
    rec: dict[str, Any]
    res: dict[str, Any]
    chunk: dict[str, Any]
    split: str = "train"
    shard: str = ""


def track_id(rec: dict[str, Any], res: dict[str, Any]) -> str:
    """What a split is assigned by: the video for MusicCaps, else the source content."""
    ytid = rec["meta"].get("ytid")
    return f"yt:{ytid}" if ytid else res["source_hash"]


def _unit(seed: int, track: str) -> float:
    h = hashlib.sha256(f"{seed}:{track}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def assign_splits(tracks: list[str], valid_fraction: float, seed: int) -> dict[str, str]:
    """Track -> split by a seeded hash, so adding tracks never moves old ones.

    With two or more tracks and a non-zero fraction, at least one track is
    valid and one is train (the extreme hash is moved), so both splits exist.
    """
    units = {t: _unit(seed, t) for t in sorted(set(tracks))}
    split = {t: "valid" if u < valid_fraction else "train" for t, u in units.items()}
    if len(units) >= 2 and valid_fraction > 0:
        if "valid" not in split.values():
            split[min(units, key=units.get)] = "valid"
        if "train" not in split.values():
            split[max(units, key=units.get)] = "train"
    return split


class Plan:
    def __init__(self, cfg: IngestConfig, records: list[dict[str, Any]],
                 results: dict[int, dict[str, Any]]):
        self.cfg = cfg
        self.records = records
        self.results = results
        self.rejects: list[dict[str, Any]] = []
        self.kept: list[Kept] = []
        self._collect()
        self._assign()

    def _reject(self, rec, reason, detail, **extra):
        row = {"input": printable(rec["uri"]), "kind": rec["kind"], "reason": reason,
               "detail": printable(detail),
               "chunk_key": None, "duplicate_of": None, "duplicate_of_input": None,
               "source_hash": None, "similarity": None}
        row.update(extra)
        self.rejects.append(row)

    def _collect(self):
        candidates, hashes, sources = [], [], []  # sources: each result's fingerprints
        for i, rec in enumerate(self.records):
            res = self.results.get(i)
            if rec["error"] is not None:
                self._reject(rec, *rec["error"])
            elif res is None or res["reject"]:
                reason, detail = res["reject"] if res else ("not_processed", "no result")
                self._reject(rec, reason, detail, source_hash=(res or {}).get("source_hash"))
            else:
                for ch in res["chunks"]:
                    candidates.append(Kept(rec, res, ch))
                    hashes.append(ch["pcm_hash"])
                if res["chunks"]:
                    sources.append(res["fingerprints"])
        # Fingerprints in chunk order go to a memory-mapped temporary file, not a list.
        spool = FingerprintSpool(sources[0].shape[1] if sources else 1)
        fp, row = spool.writable(len(candidates)), 0
        for src in sources:
            fp[row:row + len(src)] = src
            row += len(src)
        dups = find_duplicates(hashes, fp, self.cfg.near_dup_threshold)
        del fp, spool
        for n, k in enumerate(candidates):
            if n in dups:
                reason, orig, sim = dups[n]
                o = candidates[orig]
                self._reject(k.rec, reason,
                             f"{k.rec['uri']} @ {k.chunk['offset'] / self.cfg.sample_rate:.1f} s "
                             f"duplicates chunk {o.chunk['key']} of {o.rec['uri']} "
                             f"(similarity {sim:.3f})",
                             chunk_key=k.chunk["key"], duplicate_of=o.chunk["key"],
                             duplicate_of_input=o.rec["uri"],
                             source_hash=k.res["source_hash"], similarity=round(sim, 4))
            else:
                self.kept.append(k)

    def _assign(self):
        tracks = [track_id(k.rec, k.res) for k in self.kept]
        split = assign_splits(tracks, self.cfg.valid_fraction, self.cfg.seed)
        for k, t in zip(self.kept, tracks):
            k.split = split[t]
        # Stable sort: within a split, input order then chunk order.
        self.kept.sort(key=lambda k: SPLITS.index(k.split))
        self.shards: dict[str, list[Kept]] = {}
        for s in SPLITS:
            members = [k for k in self.kept if k.split == s]
            size = self.cfg.shard_max_samples
            for n in range(0, len(members), size):
                name = f"{s}-{n // size:06d}.tar"
                self.shards[name] = members[n:n + size]
                for k in self.shards[name]:
                    k.shard = name

    def sample_json(self, k: Kept) -> dict[str, Any]:
        rate = self.cfg.sample_rate
        return {
            "key": k.chunk["key"], "caption": k.rec["caption"], "tags": k.rec["tags"],
            "source": k.rec["uri"], "source_kind": k.rec["kind"],
            "source_hash": k.res["source_hash"], "pcm_hash": k.chunk["pcm_hash"],
            "offset_s": k.chunk["offset"] / rate, "duration_s": k.chunk["length"] / rate,
            "sample_rate": rate, "licence": k.rec["licence"], "split": k.split,
            "meta": k.rec["meta"],
        }

    def shard_jobs(self, out: str):
        """One job per shard for ``write_shard_task``."""
        for name, members in self.shards.items():
            yield {"path": f"{out}/{name}", "name": name,
                   "samples": [(k.chunk["key"], k.res["staging"],
                                printable(json.dumps(self.sample_json(k), sort_keys=True,
                                                     ensure_ascii=False))) for k in members]}

    def manifest_table(self) -> pa.Table:
        rows = [self.sample_json(k) | {"shard": k.shard} for k in self.kept]
        cols = ["key", "split", "shard", "source", "source_kind", "source_hash", "offset_s",
                "duration_s", "sample_rate", "caption", "licence", "pcm_hash"]
        data = {c: [printable(r[c]) if isinstance(r[c], str) else r[c] for r in rows]
                for c in cols}
        data["tags"] = [[printable(t) for t in flat_tags(r["tags"])] for r in rows]
        data["meta_json"] = [printable(json.dumps(r["meta"], sort_keys=True, ensure_ascii=False))
                             for r in rows]
        schema = pa.schema([(c, pa.float64() if c in ("offset_s", "duration_s") else
                             pa.int32() if c == "sample_rate" else pa.string()) for c in cols]
                           + [("tags", pa.list_(pa.string())), ("meta_json", pa.string())])
        return pa.table(data, schema=schema)

    def rejects_table(self) -> pa.Table:
        cols = ["input", "kind", "reason", "detail", "chunk_key", "duplicate_of",
                "duplicate_of_input", "source_hash"]
        schema = pa.schema([(c, pa.string()) for c in cols] + [("similarity", pa.float64())])
        return pa.table({c: [r[c] for r in self.rejects] for c in schema.names}, schema=schema)

    def stats(self) -> dict[str, Any]:
        rate = self.cfg.sample_rate
        seconds_in = sum(r.get("seconds_in") or 0.0 for r in self.results.values())
        out_inputs = {k.rec["uri"] for k in self.kept}
        by_split = Counter(k.split for k in self.kept)
        secs_split = Counter()
        for k in self.kept:
            secs_split[k.split] += k.chunk["length"] / rate
        return {
            "inputs": len(self.records),
            "inputs_in_output": len(out_inputs),
            "inputs_rejected": len(self.records) - len(out_inputs),
            "hours_in": round(seconds_in / 3600, 6),
            "hours_out": round(sum(secs_split.values()) / 3600, 6),
            "chunks": len(self.kept),
            "chunks_by_split": {s: by_split.get(s, 0) for s in SPLITS},
            "hours_by_split": {s: round(secs_split.get(s, 0.0) / 3600, 6) for s in SPLITS},
            "tracks_by_split": {s: len({track_id(k.rec, k.res) for k in self.kept
                                        if k.split == s}) for s in SPLITS},
            "shards": len(self.shards),
            "rejects": len(self.rejects),
            "rejects_by_reason": dict(sorted(Counter(r["reason"] for r in self.rejects).items())),
        }


def write_shard_task(job: dict[str, Any]) -> bool:
    """Write one shard unless an identical one is already there; True if skipped.

    An existing shard is kept when its members and their JSON (which holds
    each chunk's PCM hash) are exactly what the plan asks for.
    """
    if shards.exists(job["path"]) and _shard_matches(job):
        return True
    readers: dict[str, staging_files.FlacReader] = {}

    def samples():  # one chunk's FLAC in memory at a time, read from its staging file
        for key, staging, meta in job["samples"]:
            if staging not in readers:
                readers[staging] = staging_files.FlacReader(staging)
            yield key, {"flac": readers[staging].read(key), "json": meta.encode()}

    shards.write_shard(job["path"], samples())
    return False


def _shard_matches(job: dict[str, Any]) -> bool:
    expected = [(key, meta) for key, _, meta in job["samples"]]
    try:
        found = [(key, fields.get("json", b"").decode()) for key, fields
                 in shards.iter_samples(job["path"], fields=("json",))]
        names = shards.member_names(job["path"])
    except Exception:  # an unreadable leftover is rewritten
        return False
    want_names = [n for key, _ in expected for n in (f"{key}.flac", f"{key}.json")]
    return found == expected and names == want_names


def remove_stale_shards(out: str, keep: dict[str, Any]) -> list[str]:
    """Delete shard tars (and temp leftovers) of an earlier, larger plan from ``out`` (a
    local folder or a URL); returns their names."""
    removed = []
    for path in shards.glob(out, "*"):
        name = path.rsplit("/", 1)[-1]
        stale_tar = name.endswith(".tar") and name.split("-")[0] in SPLITS and name not in keep
        if stale_tar or ".tmp-" in name:
            shards.remove(path)
            removed.append(name)
    return removed
