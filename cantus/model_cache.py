"""Model folders at URLs (``s3://bucket/models/codec``) as local folders the loaders read.

Goes in: a model folder's path: local, or any fsspec URL. Comes out: a local folder with
the same files. A local path is returned as it is; a URL's folder is fetched once into
``$CANTUS_CACHE/models`` (default ``~/.cache/cantus/models``), under a name keyed by the
folder's content: every object's relative name, size and ETag (an object store's content
tag; the sha256 of the bytes where a file system has none). The same objects under another
URL share the copy, and a changed object gives a new one. The copy appears whole or not
at all (fetched to a temporary folder, then renamed), so concurrent fetches (several Ray
actors on one node) never see half a folder.

    codec = SoundStream.load(local_folder("s3://bucket/models/codec"))

Credentials and the endpoint come from the environment, as for every fsspec URL
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import fsspec

from cantus import shards

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where fetched model folders live: ``$CANTUS_CACHE/models``."""
    return Path(os.environ.get("CANTUS_CACHE", Path.home() / ".cache" / "cantus")) / "models"


def _tag(fs, path: str, info: dict[str, Any]) -> str:
    for k in ("ETag", "etag", "md5Hash", "md5"):
        if info.get(k):
            return str(info[k]).strip('"')
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def listing(url: str) -> list[tuple[str, int, str]]:
    """(relative name, size, content tag) of every object under the folder ``url``, sorted.
    Raises FileNotFoundError naming ``url`` when there is none."""
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    fs.invalidate_cache(root)
    found = fs.find(root, detail=True)
    rows = sorted((p[len(root) + 1:], int(i["size"]), _tag(fs, p, i)) for p, i in found.items()
                  if i.get("type") != "directory" and p.startswith(root + "/"))
    if not rows:
        raise FileNotFoundError(f"{url}: no model folder there (no objects under it)")
    return rows


def local_folder(path: str | Path, cache: str | Path | None = None) -> str:
    """``path`` as a local model folder: itself when local, else the cached copy of the
    URL's folder (fetched if not there yet). Raises FileNotFoundError naming a URL that
    holds nothing, RuntimeError when an object changed while it was fetched."""
    if not shards.is_url(path):
        return str(path)
    url = str(path).rstrip("/")
    rows = listing(url)
    key = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:24]
    root = Path(cache) if cache is not None else cache_root()
    final = root / f"{url.rsplit('/', 1)[-1]}-{key}"
    if final.is_dir():
        return str(final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex[:12]}"
    fs, base = fsspec.core.url_to_fs(url)
    try:
        for rel, size, _ in rows:
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{base.rstrip('/')}/{rel}", str(dest))
            if dest.stat().st_size != size:
                raise RuntimeError(f"{url}/{rel}: fetched {dest.stat().st_size} bytes, the "
                                   f"listing said {size}")
        if listing(url) != rows:
            raise RuntimeError(f"{url}: the model folder changed while it was fetched; "
                               "fetch it again once it is whole")
        try:
            os.rename(tmp, final)
        except OSError:  # another process put the same folder there first
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("fetched %s (%d files) to %s", url, len(rows), final)
    return str(final)
