"""Dataset versions: what a version of ``data/audio`` + ``data/tokens`` holds.

Goes in: the ingest tables (``data/audio/manifest.parquet``, ``rejects.parquet``)
and the token tables (``data/tokens/manifest.json``, ``index.parquet``,
``rejects.parquet``), read from a local folder or, through DVC, from any git
revision of a repository with a DVC remote (nothing is recomputed; a fresh
clone without a cache reads from the remote). Comes out: summaries (tracks,
chunks and hours per split, rejects by reason, licences, tokenizer
identities, and the version id, ``cantus.dataset_version``, that a trained LM
stage records and ``cantus generate`` prints), the difference of two versions
(tracks added and removed), the dataset card the ``dataset_card`` stage writes,
and the token samples of a version (``open_version``).

    cantus dataset show [--rev REV] [--repo PATH]
    cantus dataset diff REV_A REV_B [--repo PATH]
    python -m cantus.dataset card --audio data/audio --tokens data/tokens \\
        --params params.yaml --out data/card
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cantus import shards
from cantus.config import ConfigError, read_params
from cantus.dataset_version import dataset_version
from cantus.tokens import ManifestMismatch, _diff, iter_token_samples

AUDIO, TOKENS = "data/audio", "data/tokens"
# The params sections that make data/audio and data/tokens (the card's `params` in dvc.yaml).
DATA_PARAMS = ("demo", "ingest", "codec.model", "codec.disc", "codec.loss", "codec.train",
               "semantic.model", "semantic.pretrain", "semantic.kmeans", "mulan.model",
               "mulan.train", "mulan.rvq", "tokenize")
_NON_COMMERCIAL = ("non-commercial", "noncommercial", "cc-by-nc", "cc by-nc")
_MANIFEST_COLS = ("key", "split", "source", "source_kind", "source_hash", "duration_s",
                  "licence", "meta_json")

Reader = Callable[[str], bytes | None]  # repo-relative path -> its bytes, None if absent


# --- reading a version -------------------------------------------------------------------

def local_reader(audio: str | Path, tokens: str | Path | None) -> Reader:
    """A reader of the tables in local (or fsspec URL) folders ``audio`` and ``tokens``."""
    roots = {AUDIO: str(audio), TOKENS: None if tokens is None else str(tokens)}

    def read(path: str) -> bytes | None:
        folder, _, name = path.rpartition("/")
        if roots.get(folder) is None:
            return None
        p = shards.join(roots[folder], name)
        return shards.read_bytes(p) if shards.exists(p) else None
    return read


def dvc_reader(repo: str, rev: str | None) -> Reader:
    """A reader of repo-relative paths at git revision ``rev`` of ``repo`` (a local git
    repository or URL), through DVC: tracked files come from the cache or the remote.
    ValueError naming ``repo`` and ``rev`` when either cannot be opened."""
    from dvc.api import DVCFileSystem

    if "://" not in repo and not Path(repo).exists():
        raise FileNotFoundError(f"--repo {repo}: no such repository")
    try:
        fs = DVCFileSystem(repo, rev=rev)
    except Exception as e:  # dvc raises its own errors for an unknown revision or a non-repo
        raise ValueError(f"--repo {repo} at {rev or 'the workspace'}: cannot open "
                         f"({type(e).__name__}: {e})") from e

    def read(path: str) -> bytes | None:
        if not fs.exists(path):
            return None
        with fs.open(path, "rb") as f:
            return f.read()
    return read


def _table(data: bytes | None) -> pa.Table | None:
    return None if data is None else pq.read_table(pa.BufferReader(data))


def load_version(read: Reader, where: str) -> dict[str, Any]:
    """The tables of one version: ``{"manifest", "rejects", "token_manifest",
    "token_index", "token_rejects", "version"}`` (the token ones and the version id None
    without token tables). FileNotFoundError naming ``where`` when it has no audio
    manifest."""
    manifest = _table(read(f"{AUDIO}/manifest.parquet"))
    if manifest is None:
        raise FileNotFoundError(f"{where}: no {AUDIO}/manifest.parquet (not a dataset version?)")
    tm, index = read(f"{TOKENS}/manifest.json"), read(f"{TOKENS}/index.parquet")
    return {"manifest": manifest.select(list(_MANIFEST_COLS)),
            "rejects": _table(read(f"{AUDIO}/rejects.parquet")),
            "token_manifest": None if tm is None else json.loads(tm),
            "token_index": _table(index),
            "token_rejects": _table(read(f"{TOKENS}/rejects.parquet")),
            "version": None if tm is None or index is None else dataset_version(tm, index)}


# --- summaries ---------------------------------------------------------------------------

def track_id(row: Mapping[str, Any]) -> str:
    """A manifest row's track, as ingest assigns splits: the video for MusicCaps, else the
    source content hash."""
    ytid = json.loads(row.get("meta_json") or "{}").get("ytid")
    return f"yt:{ytid}" if ytid else row["source_hash"]


def tracks(manifest: pa.Table) -> dict[str, dict[str, Any]]:
    """Track id -> ``{source, split, licence, chunks, seconds}`` of a manifest table."""
    out: dict[str, dict[str, Any]] = {}
    for row in manifest.to_pylist():
        t = out.setdefault(track_id(row), {"source": row["source"], "split": row["split"],
                                           "licence": row["licence"] or "", "chunks": 0,
                                           "seconds": 0.0})
        t["chunks"] += 1
        t["seconds"] += row["duration_s"]
    return dict(sorted(out.items()))


def non_commercial(licence: str) -> bool:
    """Whether a licence text restricts use to non-commercial purposes."""
    return any(w in licence.lower() for w in _NON_COMMERCIAL)


def _source_group(source: str) -> str:
    if "://" in source:
        return source.split("://", 1)[0] + "://" + source.split("://", 1)[1].split("/")[0]
    return str(Path(source).parent)


def sources(manifest: pa.Table) -> list[dict[str, Any]]:
    """Per source (folder, or URL host) and kind: tracks, chunks and a sha256 over the
    sorted content hashes of its tracks (which changes when any track's audio does)."""
    groups: dict[tuple[str, str], set[str]] = defaultdict(set)
    chunks: Counter = Counter()
    for row in manifest.to_pylist():
        g = (row["source_kind"], _source_group(row["source"]))
        groups[g].add(row["source_hash"])
        chunks[g] += 1
    return [{"kind": kind, "source": src, "tracks": len(h), "chunks": chunks[(kind, src)],
             "sha256": hashlib.sha256("\n".join(sorted(h)).encode()).hexdigest()}
            for (kind, src), h in sorted(groups.items())]


def _by_reason(table: pa.Table | None) -> dict[str, int]:
    if table is None or table.num_rows == 0:
        return {}
    return dict(sorted(Counter(table.column("reason").to_pylist()).items()))


def summarize(version: Mapping[str, Any]) -> dict[str, Any]:
    """A version's tables (``load_version``) -> its summary: ``splits`` (tracks, chunks,
    hours each), ``total``, ``licences`` (tracks and chunks each, and whether it is
    non-commercial), ``sources``, ``rejects`` (ingest and token, by reason), ``tokens``
    (the tokenizer identities and chunks/hours per split; None without token tables) and
    ``version`` (the id a trained LM stage records; None without token tables)."""
    tr = tracks(version["manifest"])
    splits: dict[str, dict[str, Any]] = {}
    for s in sorted({t["split"] for t in tr.values()}):
        mine = [t for t in tr.values() if t["split"] == s]
        splits[s] = {"tracks": len(mine), "chunks": sum(t["chunks"] for t in mine),
                     "hours": round(sum(t["seconds"] for t in mine) / 3600, 6)}
    total = {"tracks": len(tr), "chunks": sum(t["chunks"] for t in tr.values()),
             "hours": round(sum(t["seconds"] for t in tr.values()) / 3600, 6)}
    licences: dict[str, dict[str, Any]] = {}
    for t in tr.values():
        lic = licences.setdefault(t["licence"] or "(none given)", {
            "tracks": 0, "chunks": 0, "non_commercial": non_commercial(t["licence"])})
        lic["tracks"] += 1
        lic["chunks"] += t["chunks"]
    tokens = None
    if version["token_manifest"] is not None:
        idx = version["token_index"]
        rows = [] if idx is None else idx.select(["split", "seconds"]).to_pylist()
        tokens = {"tokenizers": version["token_manifest"].get("tokenizers", {}),
                  "splits": {s: {"chunks": sum(r["split"] == s for r in rows),
                                 "hours": round(sum(r["seconds"] for r in rows
                                                    if r["split"] == s) / 3600, 6)}
                             for s in sorted({r["split"] for r in rows})}}
    return {"splits": splits, "total": total, "licences": dict(sorted(licences.items())),
            "sources": sources(version["manifest"]),
            "rejects": {"ingest": _by_reason(version["rejects"]),
                        "tokens": _by_reason(version["token_rejects"])},
            "tokens": tokens, "version": version.get("version")}


def diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Two versions' tables -> ``{"a": summary, "b": summary, "added": [...], "removed":
    [...], "tokenizers_changed": [field, ...]}``; added/removed are tracks (id, source,
    split, licence, chunks, seconds) in ``b`` not in ``a`` and in ``a`` not in ``b``."""
    ta, tb = tracks(a["manifest"]), tracks(b["manifest"])
    sa, sb = summarize(a), summarize(b)
    toks = [(s["tokens"] or {}).get("tokenizers", {}) for s in (sa, sb)]
    return {"a": sa, "b": sb,
            "added": [{"track": k, **tb[k]} for k in sorted(set(tb) - set(ta))],
            "removed": [{"track": k, **ta[k]} for k in sorted(set(ta) - set(tb))],
            "tokenizers_changed": sorted(f for f in set(toks[0]) | set(toks[1])
                                         if toks[0].get(f) != toks[1].get(f))}


# --- text --------------------------------------------------------------------------------

def _split_lines(s: Mapping[str, Any]) -> list[str]:
    lines = [f"  {name:<6} {v['tracks']:>6} tracks {v['chunks']:>7} chunks {v['hours']:>10.4f} h"
             for name, v in s["splits"].items()]
    t = s["total"]
    return lines + [f"  {'total':<6} {t['tracks']:>6} tracks {t['chunks']:>7} chunks "
                    f"{t['hours']:>10.4f} h"]


def show_text(s: Mapping[str, Any], where: str) -> str:
    """A summary as the text ``cantus dataset show`` prints."""
    lines = [f"dataset at {where}",
             f"version: {s['version'] or 'none (no token tables)'}  (the id a trained LM stage "
             "records and `cantus generate` prints)",
             "sources:"]
    lines += [f"  {v['kind']:<9} {v['source']}  {v['tracks']} tracks {v['chunks']} chunks  "
              f"sha256 {v['sha256'][:16]}" for v in s["sources"]]
    lines += ["splits:", *_split_lines(s), "licences:"]
    lines += [f"  {v['tracks']:>6} tracks {v['chunks']:>7} chunks  {name}"
              + ("  [non-commercial]" if v["non_commercial"] else "")
              for name, v in s["licences"].items()]
    for stage, reasons in s["rejects"].items():
        lines.append(f"rejects ({stage}): " + (", ".join(f"{r} {n}" for r, n in reasons.items())
                                               or "none"))
    if s["tokens"] is None:
        lines.append("tokens: none")
    else:
        lines.append("tokens: " + ", ".join(f"{k} {v['chunks']} chunks"
                                            for k, v in s["tokens"]["splits"].items()))
        for field, ident in sorted(s["tokens"]["tokenizers"].items()):
            lines.append(f"  {field}: {json.dumps(ident, sort_keys=True)}")
    return "\n".join(lines)


def diff_text(d: Mapping[str, Any], rev_a: str, rev_b: str) -> str:
    """A diff as the text ``cantus dataset diff`` prints."""
    lines = [f"dataset {rev_a} -> {rev_b}",
             f"  version {d['a']['version'] or 'none'} -> {d['b']['version'] or 'none'}"]
    for name in sorted(set(d["a"]["splits"]) | set(d["b"]["splits"]) | {"total"}):
        va = d["a"]["total"] if name == "total" else d["a"]["splits"].get(name, {})
        vb = d["b"]["total"] if name == "total" else d["b"]["splits"].get(name, {})
        lines.append(f"  {name:<6} " + "  ".join(
            f"{k} {va.get(k, 0):g} -> {vb.get(k, 0):g}" for k in ("tracks", "chunks", "hours")))
    for word, items in (("added", d["added"]), ("removed", d["removed"])):
        lines.append(f"{word}: {len(items)} tracks")
        lines += [f"  {'+' if word == 'added' else '-'} {t['source']} ({t['split']}, "
                  f"{t['chunks']} chunks, {t['licence'] or 'no licence'})" for t in items]
    for stage in ("ingest", "tokens"):
        ra, rb = d["a"]["rejects"][stage], d["b"]["rejects"][stage]
        if ra != rb:
            lines.append(f"rejects ({stage}): " + ", ".join(
                f"{r} {ra.get(r, 0)} -> {rb.get(r, 0)}" for r in sorted(set(ra) | set(rb))))
    lines.append("tokenizers changed: " + (", ".join(d["tokenizers_changed"]) or "none"))
    return "\n".join(lines)


# --- the card ----------------------------------------------------------------------------

def params_hashes(params: Mapping[str, Any], keys: tuple[str, ...] = DATA_PARAMS
                  ) -> dict[str, str]:
    """Dotted params section (``codec.model``) -> sha256 of its canonical JSON.
    ConfigError naming a section the params lack."""
    out = {}
    for key in keys:
        node: Any = params
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise ConfigError(f"missing section '{key}' (the dataset card hashes it)")
            node = node[part]
        blob = json.dumps(node, sort_keys=True, separators=(",", ":"))
        out[key] = hashlib.sha256(blob.encode()).hexdigest()
    return out


def git_revision(where: str | Path) -> str | None:
    """The commit checked out at ``where`` (the one the pipeline runs from), or None."""
    p = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else None


def card(version: Mapping[str, Any], params: Mapping[str, Any], revision: str | None
         ) -> dict[str, Any]:
    """The card of a version: its summary, the git ``revision`` and the params hashes.
    No clock values: it is a cached pipeline output."""
    s = summarize(version)
    nc = {k: v["tracks"] for k, v in s["licences"].items() if v["non_commercial"]}
    return {"git_revision": revision, "params": params_hashes(params), **s,
            "commercial_use": "no" if nc else "as licensed", "non_commercial_tracks": nc}


def card_markdown(c: Mapping[str, Any]) -> str:
    """The card as DATASET.md."""
    out = ["# Dataset card", "",
           f"Made by git revision `{c['git_revision'] or 'unknown (not a git checkout)'}`.", "",
           f"Dataset version `{c['version'] or 'none (no token tables)'}`: the id a trained "
           "LM stage records in its `config.json` and `cantus generate` prints.", "",
           "## Splits", "", "| split | tracks | chunks | hours |", "|---|---:|---:|---:|"]
    out += [f"| {k} | {v['tracks']} | {v['chunks']} | {v['hours']:.4f} |"
            for k, v in [*c["splits"].items(), ("total", c["total"])]]
    out += ["", "## Sources", "", "| kind | source | tracks | chunks | sha256 |",
            "|---|---|---:|---:|---|"]
    out += [f"| {s['kind']} | {s['source']} | {s['tracks']} | {s['chunks']} | `{s['sha256']}` |"
            for s in c["sources"]]
    out += ["", "## Licences", "", "| licence | tracks | chunks | non-commercial |",
            "|---|---:|---:|---|"]
    out += [f"| {k} | {v['tracks']} | {v['chunks']} | {'yes' if v['non_commercial'] else ''} |"
            for k, v in c["licences"].items()]
    if c["non_commercial_tracks"]:
        n = sum(c["non_commercial_tracks"].values())
        out += ["", f"**{n} tracks are licensed for non-commercial use only**: a model trained "
                "on this version may not be used commercially."]
    out += ["", "## Rejects", ""]
    for stage, reasons in c["rejects"].items():
        out.append(f"- {stage}: " + (", ".join(f"{r} {n}" for r, n in reasons.items())
                                     or "none"))
    out += ["", "## Tokenizers", ""]
    if c["tokens"] is None:
        out.append("No token tables.")
    else:
        out += [f"- {f}: `{json.dumps(v, sort_keys=True)}`"
                for f, v in sorted(c["tokens"]["tokenizers"].items())]
    out += ["", "## Params (sha256 of each section of params.yaml)", ""]
    out += [f"- {k}: `{v}`" for k, v in c["params"].items()]
    return "\n".join(out) + "\n"


def write_card(audio: str | Path, tokens: str | Path, params: str | Path, out: str | Path
               ) -> dict[str, Any]:
    """Write ``out/DATASET.md`` and ``out/dataset.json`` for the version in ``audio`` and
    ``tokens``, made with the params file ``params``; returns the card."""
    version = load_version(local_reader(audio, tokens), f"--audio {audio}")
    c = card(version, read_params(params), git_revision(Path(params).resolve().parent))
    shards.makedirs(out)
    shards.atomic_write_json(shards.join(out, "dataset.json"), c)
    shards.atomic_write_bytes(shards.join(out, "DATASET.md"), card_markdown(c).encode())
    return c


# --- the token samples of a version ------------------------------------------------------

def open_version(repo: str, rev: str | None = None, split: str | None = None,
                 expect: Mapping[str, Any] | None = None
                 ) -> Iterator[tuple[str, dict[str, Any]]]:
    """The token samples of ``data/tokens`` at ``rev`` of ``repo`` (through DVC, so from a
    clone with a remote), as ``cantus.tokens.iter_token_samples`` yields them, shard by
    shard in index order; only ``split``'s when given. ``expect``: tokenizer identities
    the manifest must match (``cantus.tokens.check_manifest``), else ManifestMismatch.
    FileNotFoundError / ValueError naming the repo, revision or split."""
    read = dvc_reader(repo, rev)
    where = f"{repo}@{rev or 'workspace'}"
    index = _table(read(f"{TOKENS}/index.parquet"))
    if index is None:
        raise FileNotFoundError(f"{where}: no {TOKENS}/index.parquet (no token shards)")
    if expect is not None:
        raw = read(f"{TOKENS}/manifest.json")
        manifest = json.loads(raw) if raw else {}
        if problems := _diff(expect, manifest.get("tokenizers", manifest), ""):
            raise ManifestMismatch(f"{where}: token shards do not match:\n  "
                                   + "\n  ".join(problems))
    rows = index.select(["split", "shard"]).to_pylist()
    known = sorted({r["split"] for r in rows})
    if split is not None and split not in known:
        raise ValueError(f"split {split!r}: not in {where} (splits: {', '.join(known)})")
    names = list(dict.fromkeys(r["shard"] for r in rows if split in (None, r["split"])))
    for name in names:
        data = read(f"{TOKENS}/{name}")
        if data is None:
            raise FileNotFoundError(f"{where}: {TOKENS}/{name} is in the index but missing")
        yield from iter_token_samples(data)  # shards.iter_samples reads bytes too


# --- command line ------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cantus dataset", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    show = sub.add_parser("show", help="tracks, chunks, hours, licences, rejects, tokenizers")
    show.add_argument("--rev", default=None, help="git revision (default: the workspace)")
    show.add_argument("--repo", default=".", help="git repository path or URL (default .)")
    show.add_argument("--json", action="store_true", help="print the summary as JSON")
    d = sub.add_parser("diff", help="what changed between two revisions")
    d.add_argument("rev_a")
    d.add_argument("rev_b")
    d.add_argument("--repo", default=".", help="git repository path or URL (default .)")
    d.add_argument("--json", action="store_true", help="print the diff as JSON")
    c = sub.add_parser("card", help="write DATASET.md and dataset.json (the dataset_card stage)")
    c.add_argument("--audio", required=True, help="audio shard folder (ingest output)")
    c.add_argument("--tokens", required=True, help="token folder (pack output)")
    c.add_argument("--params", default="params.yaml", help="params file")
    c.add_argument("--out", required=True, help="card folder")
    return p


def main(argv: list[str] | None = None) -> int:
    """``cantus dataset show|diff|card``: 0 done, 2 a missing repository, revision, folder
    or manifest (one line on stderr naming it)."""
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "show":
            where = f"{args.repo}@{args.rev or 'workspace'}"
            s = summarize(load_version(dvc_reader(args.repo, args.rev), where))
            print(json.dumps(s, indent=1, sort_keys=True) if args.json else show_text(s, where))
        elif args.cmd == "diff":
            a, b = (load_version(dvc_reader(args.repo, r), f"{args.repo}@{r}")
                    for r in (args.rev_a, args.rev_b))
            d = diff(a, b)
            print(json.dumps(d, indent=1, sort_keys=True) if args.json
                  else diff_text(d, args.rev_a, args.rev_b))
        else:
            if not shards.is_dir(args.audio):
                raise FileNotFoundError(f"--audio {args.audio}: no such folder")
            if not shards.is_dir(args.tokens):
                raise FileNotFoundError(f"--tokens {args.tokens}: no such folder")
            c = write_card(args.audio, args.tokens, args.params, args.out)
            print(f"dataset card: {c['total']['tracks']} tracks, {c['total']['chunks']} chunks "
                  f"({c['total']['hours']:.3f} h) -> {args.out}")
    except (FileNotFoundError, ValueError) as e:  # ConfigError is a ValueError
        print(f"cantus dataset {args.cmd}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from cantus.cli import end_now

    end_now(main())
