"""Read URL lists and MusicCaps CSVs into download requests.

Goes in: a text file with one ``URL`` or ``URL<TAB>caption`` per line, or a
MusicCaps-format CSV (``ytid,start_s,end_s,audioset_positive_labels,
aspect_list,caption,author_id,is_balanced_subset,is_audioset_eval`` and an
optional ``licence``/``license`` column) with a URL template holding
``{ytid}``. Comes out: a list of plain-dict requests, one per input line or
row, in file order; a malformed one carries an ``error`` string instead of
being dropped, so every input reaches either the downloads or the rejects.
``cantus.ingest.download.download_all`` takes these lists as they are.
"""

from __future__ import annotations

import ast
import csv
import math
import re
import urllib.parse
from pathlib import Path
from typing import Any

_URL_RE = re.compile(r"^https?://\S+$", re.IGNORECASE)
_MUSICCAPS_REQUIRED = ("ytid", "start_s", "end_s")


def read_url_list(path: str | Path) -> list[dict[str, Any]]:
    """Parse a URL list: ``URL`` or ``URL<TAB>caption`` per line.

    Blank lines and lines starting with ``#`` are skipped. Returns items
    ``{"url", "caption", "line"}``; a line that is not an http(s) URL comes
    back with an ``error`` string instead of being dropped.
    """
    items = []
    text = Path(path).read_text(encoding="utf-8-sig", errors="replace")
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        url, _, caption = line.partition("\t")
        item = {"url": url.strip(), "caption": caption.strip(), "line": n}
        if not _URL_RE.match(item["url"]):
            item["error"] = "not an http(s) URL"
        items.append(item)
    return items


def read_musiccaps(path: str | Path, url_template: str) -> list[dict[str, Any]]:
    """Parse a MusicCaps-format CSV into download requests.

    Each item holds ``ytid, url, start_s, end_s, caption, aspect_list
    (list[str]), audioset_labels (list[str]), author_id, is_balanced_subset,
    is_audioset_eval, line`` and ``licence`` when the CSV has such a column.
    A bad row (no ytid, non-numeric or empty section, a field over the csv
    module's 128 KiB limit) carries an ``error``; reading goes on with the
    next line.

    Raises:
        ValueError: the template lacks ``{ytid}`` or the CSV lacks a
            required column (a problem of the whole file, not of a row).
    """
    if "{ytid}" not in url_template:
        raise ValueError(f"url_template has no '{{ytid}}': {url_template!r}")
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in _MUSICCAPS_REQUIRED if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
        reader.fieldnames = header
        items = []
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return items
            except csv.Error as e:  # e.g. a caption over the csv module's 128 KiB field limit
                item = _musiccaps_item({}, url_template, reader.reader.line_num)
                item["error"] = f"unreadable CSV row ({e})"
                items.append(item)
                continue
            items.append(_musiccaps_item(row, url_template, reader.line_num))


def _musiccaps_item(row: dict, url_template: str, line: int) -> dict[str, Any]:
    def text(key: str) -> str:
        v = row.get(key)
        return v.strip() if isinstance(v, str) else ""

    ytid = text("ytid")
    item: dict[str, Any] = {
        "ytid": ytid,
        "url": url_template.replace("{ytid}", urllib.parse.quote(ytid, safe="-_.~")),
        "start_s": None, "end_s": None,
        "caption": text("caption"),
        "aspect_list": parse_aspect_list(row.get("aspect_list")),
        "audioset_labels": [x.strip() for x in text("audioset_positive_labels").split(",") if x.strip()],
        "author_id": text("author_id"),
        "is_balanced_subset": text("is_balanced_subset").lower() == "true",
        "is_audioset_eval": text("is_audioset_eval").lower() == "true",
        "line": line,
    }
    for key in ("licence", "license"):
        if key in row:
            item["licence"] = text(key)
    try:
        start, end = float(text("start_s")), float(text("end_s"))
    except ValueError:
        start = end = None
    if not ytid:
        item["error"] = "missing ytid"
    elif start is None or not (math.isfinite(start) and math.isfinite(end)):
        item["error"] = f"non-numeric section start_s={text('start_s')!r} end_s={text('end_s')!r}"
    elif start < 0 or end <= start:
        item["error"] = f"empty or negative section [{start}, {end}]"
    item["start_s"], item["end_s"] = start, end
    return item


def parse_aspect_list(value: Any) -> list[str]:
    """MusicCaps ``aspect_list`` (a Python-list-like string) as a list of str.

    ``"['low quality', \\"80's pop\\"]"`` goes through ``ast.literal_eval``;
    anything it rejects (unbalanced quotes, missing brackets, bare words) is
    split on commas with quotes and brackets stripped. Never raises.
    """
    s = value.strip() if isinstance(value, str) else ""
    if not s:
        return []
    try:
        parsed = ast.literal_eval(s)
    except Exception:  # literal_eval raises many kinds on junk input
        parsed = None
    if isinstance(parsed, (list, tuple, set)):
        tags = [str(x).strip() for x in _flatten(parsed)]
    elif isinstance(parsed, str):
        tags = [parsed.strip()]
    else:
        tags = [p.strip().strip("'\"").strip() for p in s.strip().strip("[]").split(",")]
    return list(dict.fromkeys(t for t in tags if t))


def _flatten(values: Any) -> list[Any]:
    out = []
    for v in values:
        out.extend(_flatten(v) if isinstance(v, (list, tuple, set)) else [v])
    return out
