"""Pack stage: join the per-field token shards by key into training shards.

Goes in: the audio shards (for each chunk's caption, tags and split) and the
token folders of the three fields (``cantus.tokenize.run``). Comes out, in
``--out``: ``{split}-NNNNNN.tar`` with ``{key}.acoustic.npy``,
``{key}.semantic.npy``, ``{key}.mulan.npy`` and ``{key}.json`` per chunk
(the contract of ``cantus.tokens``), ``index.parquet`` (key, split, shard,
token lengths), ``rejects.parquet`` (chunks missing a field, with the reason)
and ``manifest.json`` naming all three tokenizers.

Each field's token shard must have been made from this very audio shard (its
sidecar's ``input_sha256``), or pack refuses it; shards in ``--out`` that the
audio folder no longer has are removed.

Acoustic tokens run at 50 Hz and semantic at 25 Hz; the two are trimmed to
``Ta = 2 Ts`` so every crop aligns across rates.

    python -m cantus.tokenize.pack --audio data/audio --acoustic data/tokens_acoustic \\
        --semantic data/tokens_semantic --mulan data/tokens_mulan --out data/tokens
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa

from cantus import shards
from cantus.tokens import ACOUSTIC_HZ, FIELDS, SEMANTIC_HZ, iter_token_samples, sample_fields

log = logging.getLogger(__name__)
_META_KEYS = ("caption", "tags", "source", "offset_s", "duration_s", "split", "licence")


def _field_tokens(folder: str, shard: str, field: str, audio_sha256: str) -> dict[str, Any]:
    path = shards.join(folder, shard)
    if not shards.exists(path):
        raise FileNotFoundError(f"{path}: missing {field} token shard (run the tokenize stage)")
    sidecar = path[: -len(".tar")] + ".json"
    made_from = (shards.read_json(sidecar).get("input_sha256") if shards.exists(sidecar)
                 else None)
    if made_from != audio_sha256:
        raise ValueError(f"{path}: {field} tokens of other audio than the audio shard {shard} "
                         f"(sha256 {str(made_from)[:12]}, the shard is {audio_sha256[:12]}): "
                         "run the tokenize stage again")
    return {k: item[field] for k, item in iter_token_samples(path)}


def align(acoustic, semantic):
    """Trim to whole semantic frames: ``acoustic[:, :2 Ts]``, ``semantic[:Ta // 2]``."""
    ratio = ACOUSTIC_HZ // SEMANTIC_HZ
    ts = min(semantic.shape[0], acoustic.shape[1] // ratio)
    return acoustic[:, : ts * ratio], semantic[:ts]


def pack_shard(audio_path: str, folders: dict[str, str], out: str) -> dict[str, Any]:
    name = Path(audio_path).name
    audio = shards.HashedSamples(audio_path, fields=("json",))
    # one streaming read of the audio shard: its chunks' metadata, then its identity
    metas = [(key, json.loads(fields["json"])) for key, fields in audio]
    tokens = {f: _field_tokens(folders[f], name, f, audio.sha256) for f in FIELDS}
    rows, rejects = [], []

    def samples():  # written as they are made: one packed sample in memory at a time
        for key, meta in metas:
            missing = [f for f in FIELDS if key not in tokens[f]]
            if missing:
                rejects.append({"key": key, "reason": "missing_field",
                                "detail": f"{name}: no {', '.join(missing)} tokens for {key}"})
                continue
            a, s = align(tokens["acoustic"][key], tokens["semantic"][key])
            if s.shape[0] == 0:
                rejects.append({"key": key, "reason": "too_short",
                                "detail": f"{name}: {key} is shorter than one semantic frame"})
                continue
            toks = {"acoustic": a, "semantic": s, "mulan": tokens["mulan"][key]}
            yield key, sample_fields(toks, {k: meta.get(k) for k in _META_KEYS})
            rows.append({"key": key, "split": meta["split"], "shard": name,
                         "acoustic_frames": int(a.shape[1]), "semantic_frames": int(s.shape[0]),
                         "seconds": s.shape[0] / SEMANTIC_HZ})

    shards.write_shard(shards.join(out, name), samples())
    return {"rows": rows, "rejects": rejects}


def run(audio_dir: str | Path, folders: dict[str, str | Path], out: str | Path) -> dict[str, Any]:
    """Join ``folders`` (field -> token folder) by key into ``out``; every folder local or
    a URL (``s3://...``). Returns the summary (chunks, shards, rejects, hours)."""
    audio_dir, out = str(audio_dir), str(out)
    folders = {f: str(p) for f, p in folders.items()}
    shards.makedirs(out)
    tokenizers = {f: shards.read_json(shards.join(folders[f], "manifest.json"))["tokenizer"]
                  for f in FIELDS}
    paths = shards.glob(audio_dir, "train-*.tar") + shards.glob(audio_dir, "valid-*.tar")
    shards.remove_unplanned(out, [Path(p).name for p in paths])  # a glob must not find old shards
    rows, rejects = [], []
    for p in paths:
        got = pack_shard(p, folders, out)
        rows += got["rows"]
        rejects += got["rejects"]
    for f in FIELDS:  # chunks a tokenizer could not handle
        rejects += shards.read_parquet(shards.join(folders[f], "rejects.parquet")).to_pylist()
    shards.write_parquet(shards.join(out, "index.parquet"), pa.Table.from_pylist(rows, pa.schema([
        ("key", pa.string()), ("split", pa.string()), ("shard", pa.string()),
        ("acoustic_frames", pa.int32()), ("semantic_frames", pa.int32()),
        ("seconds", pa.float64())])))
    shards.write_parquet(shards.join(out, "rejects.parquet"), pa.table(
        {c: pa.array([r[c] for r in rejects], pa.string()) for c in ("key", "reason", "detail")}))
    shards.atomic_write_json(shards.join(out, "manifest.json"), {
        "tokenizers": tokenizers, "fields": list(FIELDS),
        "rates": {"acoustic_hz": ACOUSTIC_HZ, "semantic_hz": SEMANTIC_HZ}})
    summary = {"chunks": len(rows), "shards": len(paths), "rejects": len(rejects),
               "hours": round(sum(r["seconds"] for r in rows) / 3600, 6)}
    log.info("pack: %s", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    """``cantus pack``: 0 done, 2 a missing input folder, audio shard or token shard
    (one line on stderr naming it), 1 a failure."""
    ap = argparse.ArgumentParser(prog="cantus pack", description=__doc__.split("\n\n")[0])
    ap.add_argument("--audio", required=True, help="audio shard folder (ingest output)")
    for f in FIELDS:
        ap.add_argument(f"--{f}", required=True, help=f"{f} token folder")
    ap.add_argument("--out", required=True, help="training shard folder")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        for flag in ("audio", *FIELDS):
            if not shards.is_dir(getattr(args, flag)):  # local, or a URL (s3://...)
                raise FileNotFoundError(f"--{flag} {getattr(args, flag)}: no such folder")
        if not shards.glob(args.audio, "*.tar"):
            raise FileNotFoundError(f"--audio {args.audio}: no audio shards (*.tar)")
        summary = run(args.audio, {f: getattr(args, f) for f in FIELDS}, args.out)
    except FileNotFoundError as e:
        print(f"cantus pack: {e}", file=sys.stderr)
        return 2
    print(f"pack: {summary['chunks']} chunks ({summary['hours']:.3f} h) in {summary['shards']} "
          f"shards, {summary['rejects']} rejects -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
