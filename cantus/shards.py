"""The shard format shared by every stage: deterministic WebDataset tars.

A shard is a plain tar whose members are ``{key}.{field}``; WebDataset groups
consecutive members with the same key into one sample. Headers carry no
time, owner or mode from the machine, so the same samples give the same bytes
everywhere. Writes go to a temporary name first and are renamed into place,
so a reader (or a resumed run) never sees half a shard.

Paths may be local or any fsspec URL (``s3://``, ``gs://``, ``file://``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import fsspec

log = logging.getLogger(__name__)


def _fs(path: str | Path):
    return fsspec.core.url_to_fs(str(path))


def _is_local(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols


def is_url(path: str | Path) -> bool:
    """Whether ``path`` names a remote file system (``s3://...``), not a local path."""
    return "://" in str(path) and not str(path).startswith("file://")


def join(folder: str | Path, name: str) -> str:
    """``folder/name``, keeping a URL a URL (``Path`` would turn ``s3://`` into ``s3:/``)."""
    return f"{str(folder).rstrip('/')}/{name}" if is_url(folder) else str(Path(folder) / name)


def exists(path: str | Path) -> bool:
    fs, p = _fs(path)
    return fs.exists(p)


def is_dir(path: str | Path) -> bool:
    """Whether ``path`` (local or URL) is a folder; on an object store, a prefix holding
    at least one object."""
    fs, p = _fs(path)
    if not _is_local(fs):
        fs.invalidate_cache(p)  # another process (a Ray worker) may have written there
    return fs.isdir(p)


def glob(folder: str | Path, pattern: str) -> list[str]:
    """Sorted paths in ``folder`` matching ``pattern`` (no ``/``): local paths for a local
    folder, full URLs for a remote one; always listed afresh."""
    fs, p = _fs(folder)
    if _is_local(fs):  # relative stays relative
        base = Path(p) if str(folder).startswith("file://") else Path(folder)
        return sorted(str(x) for x in base.glob(pattern))
    fs.invalidate_cache(p)
    return sorted(fs.unstrip_protocol(x) for x in fs.glob(f"{p.rstrip('/')}/{pattern}"))


def read_bytes(path: str | Path) -> bytes:
    fs, p = _fs(path)
    with fs.open(p, "rb") as f:
        return f.read()


def read_json(path: str | Path) -> Any:
    return json.loads(read_bytes(path))


def size(path: str | Path) -> int:
    fs, p = _fs(path)
    return int(fs.size(p))


def remove(path: str | Path) -> None:
    fs, p = _fs(path)
    fs.rm(p)


def makedirs(path: str | Path) -> None:
    """Create a folder (a no-op on object stores, where prefixes need no creating)."""
    fs, p = _fs(path)
    fs.makedirs(p, exist_ok=True)


def sha256(path: str | Path, block: int = 1 << 22) -> str:
    """sha256 of a file's bytes (local or any fsspec URL), read in blocks."""
    import hashlib

    fs, p = _fs(path)
    h = hashlib.sha256()
    with fs.open(p, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def remove_unplanned(folder: str | Path, planned: Iterable[str]) -> list[str]:
    """Delete ``{split}-NNNNNN.tar`` shards (and ``.json`` sidecars) of ``folder`` (local
    or URL) whose shard name is not in ``planned``: what an earlier, larger plan left,
    which a reader globbing the folder would pick up. Returns the names removed."""
    import re

    keep = {Path(n).stem for n in planned}
    gone = []
    for path in glob(folder, "*-*"):
        p = Path(path)
        if (p.suffix in (".tar", ".json") and re.fullmatch(r"[a-z]+-\d{6}", p.stem)
                and p.stem not in keep):
            remove(path)
            gone.append(p.name)
    if gone:
        log.warning("%s: removed %d shard file(s) no longer planned: %s", folder, len(gone),
                    ", ".join(gone[:5]) + (" ..." if len(gone) > 5 else ""))
    return gone


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so the file appears whole or not at all."""
    fs, p = _fs(path)
    parent = p.rsplit("/", 1)[0] if "/" in p else "."
    fs.makedirs(parent, exist_ok=True)
    if _is_local(fs):
        tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    else:  # object stores publish an upload only once it is complete
        with fs.open(p, "wb") as f:
            f.write(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as sorted, indented JSON (stable bytes) atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode())


def tar_bytes(samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> bytes:
    """Build a deterministic tar from ``(key, {field: bytes})`` samples.

    Keys must not contain dots (WebDataset splits the member name at the first
    dot); fields are written in sorted order.
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, fields in samples:
            if "." in key or "/" in key:
                raise ValueError(f"shard key {key!r} must not contain '.' or '/'")
            for field in sorted(fields):
                data = fields[field]
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_shard(path: str | Path, samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> None:
    """Write one shard atomically."""
    atomic_write_bytes(path, tar_bytes(samples))


def member_names(path: str | Path) -> list[str]:
    """Member names of a tar, reading headers only."""
    fs, p = _fs(path)
    with fs.open(p, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        return [m.name for m in tar]


def read_hashed(path: str | Path) -> tuple[bytes, str]:
    """A whole shard's bytes and their sha256, from one read (pass the bytes to
    ``iter_samples``)."""
    import hashlib

    fs, p = _fs(path)
    with fs.open(p, "rb") as f:
        data = f.read()
    return data, hashlib.sha256(data).hexdigest()


def iter_samples(path: str | Path | bytes, fields: tuple[str, ...] | None = None
                 ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Read ``(key, {field: bytes})`` samples back from a shard (its path, or its bytes
    from ``read_hashed``), in order.

    ``fields`` limits which members are read (the others are skipped unread).
    """
    want = set(fields) if fields is not None else None
    key, found = None, {}
    if isinstance(path, bytes):
        opened = io.BytesIO(path)
    else:
        fs, p = _fs(path)
        opened = fs.open(p, "rb")
    with opened as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for m in tar:
            k, _, field = m.name.partition(".")
            if key is not None and k != key:
                yield key, found
                found = {}
            key = k
            if want is None or field in want:
                found[field] = tar.extractfile(m).read()
    if key is not None:
        yield key, found


def write_parquet(path: str | Path, table) -> None:
    """Write a pyarrow Table to Parquet atomically (deterministic bytes)."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    atomic_write_bytes(path, buf.getvalue())


def read_parquet(path: str | Path):
    """Read a Parquet file (local or fsspec URL) into a pyarrow Table."""
    import pyarrow.parquet as pq

    fs, p = _fs(path)
    with fs.open(p, "rb") as f:
        return pq.read_table(f)


def local_path(path: str | Path) -> Path | None:
    """The local Path of ``path`` if it is on the local file system, else None."""
    fs, p = _fs(path)
    return Path(p) if _is_local(fs) else None
