"""Enumerate ingest inputs: local folders or globs, with their captions.

Goes in: folder paths or glob patterns, and optional captions tables (CSV or
JSONL keyed by path). Comes out: a sorted list of input records (plain dicts,
so they travel to Ray workers as they are)::

    {"uri", "kind", "path", "caption", "tags", "licence", "meta",
     "start_s", "end_s", "error"}

``error`` is None for a usable input, or ``(reason, message)`` for an input
that is rejected before decoding (an unsupported file type, a bad CSV row, a
failed download); such an input still reaches the rejects table.

Captions come, in order of precedence, from a sidecar next to the audio
(``song.json`` with caption/tags/licence, or ``song.txt`` holding the caption),
then from a captions table passed in or found in the folder
(``captions.jsonl`` / ``captions.csv``), keyed by path relative to the table.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
from pathlib import Path
from typing import Any

from cantus.config import ConfigError

log = logging.getLogger(__name__)

AUDIO_EXTS = {".wav", ".wave", ".flac", ".mp3", ".ogg", ".oga", ".opus",
              ".m4a", ".aac", ".mp4", ".webm", ".aif", ".aiff"}
SIDECAR_EXTS = (".json", ".txt")
CAPTION_TABLES = ("captions.jsonl", "captions.csv")


def new_input(uri: str, kind: str, **fields: Any) -> dict[str, Any]:
    """An input record with every field present."""
    rec = {"uri": uri, "kind": kind, "path": None, "caption": "", "tags": [],
           "licence": "", "meta": {}, "start_s": None, "end_s": None, "error": None}
    unknown = set(fields) - set(rec)
    if unknown:
        raise TypeError(f"unknown input fields {sorted(unknown)}")
    rec.update(fields)
    return rec


def printable(text: str) -> str:
    """``text`` as valid UTF-8: bytes a file name held that are not UTF-8 (which
    Python keeps as lone surrogates) are written as ``\\xNN``; other text is unchanged."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def read_caption_table(path: Path) -> dict[str, dict[str, Any]]:
    """Read a captions CSV/JSONL into {resolved path: {caption, tags, licence, ...}}.

    Raises:
        ConfigError: (a ValueError) naming the table and line of a row that is not valid JSON,
            has a CSV field over the csv module's limit (128 KiB), or lacks
            the ``path`` and ``caption`` columns.
    """
    rows: list[dict[str, Any]] = []
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from e
    elif path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            try:
                rows = list(reader)
            except csv.Error as e:
                raise ConfigError(f"{path}:{reader.reader.line_num}: bad CSV row ({e})") from e
    else:
        raise ConfigError(f"{path}: captions table must be .jsonl or .csv")
    table = {}
    for n, row in enumerate(rows, 1):
        if "path" not in row or "caption" not in row:
            raise ConfigError(f"{path}: row {n} needs 'path' and 'caption' columns")
        key = os.path.normpath(os.path.join(path.parent, row["path"]))
        table[os.path.abspath(key)] = row
    return table


def _caption_from_sidecar(audio: Path) -> dict[str, Any] | None:
    js, txt = audio.with_suffix(".json"), audio.with_suffix(".txt")
    if js.is_file():
        try:
            data = json.loads(js.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            log.warning("%s: sidecar is not valid JSON (%s); ignoring it", js, e)
            return None
        return data if isinstance(data, dict) else {"caption": str(data)}
    if txt.is_file():
        return {"caption": txt.read_text(encoding="utf-8", errors="replace").strip()}
    return None


def _expand(spec: str) -> tuple[list[Path], Path | None]:
    """A folder (recursive) or a glob -> (files, folder that may hold caption tables)."""
    p = Path(spec)
    if p.is_dir():
        return sorted(q for q in p.rglob("*") if q.is_file()), p
    if p.is_file():
        return [p], None
    matches = sorted(Path(m) for m in glob.glob(spec, recursive=True))
    return [m for m in matches if m.is_file()], None


def _is_hidden(path: Path, root: Path | None) -> bool:
    rel = path.relative_to(root) if root else Path(path.name)
    return any(part.startswith(".") for part in rel.parts)


def local_inputs(specs: list[str], caption_files: list[str] = ()) -> list[dict[str, Any]]:
    """List every file under ``specs`` as an input record (sorted by path).

    Sidecars and caption tables are not inputs. Any other file with an
    extension that is not audio becomes an input with an ``unsupported_type``
    error, so nothing in a folder is silently skipped.
    """
    captions: dict[str, dict[str, Any]] = {}
    for cf in caption_files:
        captions.update(read_caption_table(Path(cf)))
    files: dict[str, Path] = {}
    for spec in specs:
        found, root = _expand(spec)
        if not found:
            raise FileNotFoundError(f"source {spec!r}: no such folder, file or glob match")
        if root is not None:
            for name in CAPTION_TABLES:
                if (root / name).is_file():
                    captions.update(read_caption_table(root / name))
        for f in found:
            if not _is_hidden(f, root):
                files[os.path.abspath(f)] = f
    table_paths = {os.path.abspath(cf) for cf in caption_files}
    audio_stems = {str(Path(k).with_suffix("")) for k in files
                   if Path(k).suffix.lower() in AUDIO_EXTS}
    inputs = []
    for key in sorted(files):
        f = Path(key)
        if f.name in CAPTION_TABLES or key in table_paths:
            continue
        ext = f.suffix.lower()
        if ext in SIDECAR_EXTS and str(f.with_suffix("")) in audio_stems:
            continue
        # the uri is the path as the source spec gave it (relative stays relative), so the
        # manifest of a clone at another absolute path is byte-identical; reading uses `path`.
        # A name that is not UTF-8 is kept, with its stray bytes escaped in the uri.
        rec = new_input(printable(str(files[key])), "local", path=key)
        if ext not in AUDIO_EXTS:
            hint = " (headerless raw PCM: add a WAV header)" if ext in (".raw", ".pcm") else ""
            rec["error"] = ("unsupported_type", f"{printable(key)}: unsupported file type "
                                                f"'{printable(ext) or '(none)'}'{hint}")
        else:
            _apply_caption(rec, _caption_from_sidecar(f) or captions.get(key))
        inputs.append(rec)
    return inputs


def _apply_caption(rec: dict[str, Any], info: dict[str, Any] | None) -> None:
    if not info:
        return
    rec["caption"] = str(info.get("caption") or "")
    tags = info.get("tags") or []
    if isinstance(tags, str):  # CSV cell: "a; b; c" or JSON text
        try:
            tags = json.loads(tags)
        except json.JSONDecodeError:
            tags = [t.strip() for t in tags.replace(";", ",").split(",") if t.strip()]
    rec["tags"] = tags
    rec["licence"] = str(info.get("licence") or info.get("license") or "")
    rec["meta"] = {k: v for k, v in info.items()
                   if k not in ("caption", "tags", "licence", "license", "path")}


def flat_tags(tags: Any) -> list[str]:
    """Tags as a flat list of strings, from a list or a {field: value(s)} dict."""
    out: list[str] = []
    if isinstance(tags, dict):
        for v in tags.values():
            out.extend(flat_tags(v))
    elif isinstance(tags, (list, tuple)):
        for v in tags:
            out.extend(flat_tags(v))
    elif tags is not None and str(tags) != "":
        out.append(str(tags))
    return out


def url_inputs(path: str) -> list[dict[str, Any]]:
    """Input records of a URL list (``URL`` or ``URL<TAB>caption`` per line)."""
    from cantus.ingest.url_lists import read_url_list

    recs = []
    for item in read_url_list(path):
        uri = item["url"] or f"{path}:{item['line']}"
        rec = new_input(uri, "url", caption=item["caption"],
                        meta={"url": item["url"], "list": str(path), "line": item["line"]})
        if item.get("error"):
            rec["error"] = ("bad_row", f"{uri}: {path} line {item['line']}: {item['error']}")
        recs.append(rec)
    return recs


def musiccaps_inputs(path: str, url_template: str) -> list[dict[str, Any]]:
    """Input records of a MusicCaps-format CSV: one section of one video per row."""
    from cantus.ingest.url_lists import read_musiccaps

    recs = []
    for item in read_musiccaps(path, url_template):
        start, end = item["start_s"], item["end_s"]
        if not item["ytid"]:
            uri = f"{path}:{item['line']}"
        else:
            uri = item["url"] if start is None else f"{item['url']}#t={start:g},{end:g}"
        meta = {k: item[k] for k in ("ytid", "url", "audioset_labels", "author_id",
                                     "is_balanced_subset", "is_audioset_eval", "line")}
        meta["csv"] = str(path)
        rec = new_input(uri, "musiccaps", caption=item["caption"], tags=item["aspect_list"],
                        licence=item.get("licence", ""), meta=meta, start_s=start, end_s=end)
        if item.get("error"):
            rec["error"] = ("bad_row", f"{uri}: {path} line {item['line']}: {item['error']}")
        recs.append(rec)
    return recs


DOWNLOAD_REASONS = ("download_failed", "download_transient")


def fetch_remote(records: list[dict[str, Any]], cfg, cache_dir: Path) -> int:
    """Download every remote record into the cache; set its ``path`` or its ``error``.

    A permanent failure (HTTP 404, private or removed video, no audio, over
    a size cap) is ``download_failed``; a transient one (unreachable,
    timeout, HTTP 5xx or 429, not tried after the circuit breaker opened) is
    ``download_transient``. Failures are never cached, so a rerun tries
    both again. Returns how many downloads were requested.
    """
    from cantus.ingest.download import download_all

    todo = [r for r in records if r["error"] is None]
    requests = [{"url": r["meta"]["url"], "start_s": r["start_s"], "end_s": r["end_s"]}
                for r in todo]
    for rec, got in zip(todo, download_all(requests, cfg, cache_dir)):
        if isinstance(got, Exception):
            permanent = getattr(got, "permanent", False)
            rec["error"] = (DOWNLOAD_REASONS[not permanent],
                            f"{rec['uri']}: {getattr(got, 'reason', got)}")
            continue
        rec["path"] = str(got)
        info = _download_info(Path(got))
        rec["meta"].update({k: info[k] for k in ("title", "uploader", "duration")
                            if info.get(k) is not None})
        if not rec["licence"] and info.get("license"):
            rec["licence"] = str(info["license"])
    return len(todo)


def _download_info(media: Path) -> dict[str, Any]:
    try:
        data = json.loads(media.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}
    info = data.get("info", data)
    return info if isinstance(info, dict) else {}
