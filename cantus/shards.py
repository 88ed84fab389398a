"""The shard format shared by every stage: deterministic WebDataset tars.

A shard is a plain tar whose members are ``{key}.{field}``; WebDataset groups
consecutive members with the same key into one sample. Headers carry no
time, owner or mode from the machine, so the same samples give the same bytes
everywhere. Writes go to a temporary name first and are renamed into place,
so a reader (or a resumed run) never sees half a shard.

Paths may be local or any fsspec URL (``s3://``, ``gs://``, ``file://``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

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


def _with_parent(path: str | Path):
    """``(fs, p)`` of ``path``, its parent folder made."""
    fs, p = _fs(path)
    fs.makedirs(p.rsplit("/", 1)[0] if "/" in p else ".", exist_ok=True)
    return fs, p


@contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: the file appears at ``path`` whole when the
    block ends, or not at all when it raises. Local files go to a temporary name that is
    renamed into place; a URL's bytes are spooled to a local temporary file and uploaded
    at the end (object stores publish an upload only once it is complete), so a writer
    streams through it without holding the file in memory."""
    fs, p = _with_parent(path)
    if _is_local(fs):
        tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
    else:
        with tempfile.TemporaryFile() as f:
            yield f
            f.seek(0)
            with fs.open(p, "wb") as out:
                shutil.copyfileobj(f, out, 1 << 22)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so the file appears whole or not at all."""
    fs, p = _fs(path)
    if _is_local(fs):
        with atomic_open(path) as f:
            f.write(data)
    else:  # already in memory: uploaded as it is, with no spool file
        fs, p = _with_parent(path)
        with fs.open(p, "wb") as f:
            f.write(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as sorted, indented JSON (stable bytes) atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode())


def _write_tar(f: BinaryIO, samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> None:
    """Write ``(key, {field: bytes})`` samples to ``f`` as a deterministic tar, one member
    at a time. Keys must not contain dots (WebDataset splits the member name at the first
    dot); fields are written in sorted order."""
    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
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


def tar_bytes(samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> bytes:
    """The bytes of the deterministic tar ``write_shard`` writes for ``samples``."""
    buf = io.BytesIO()
    _write_tar(buf, samples)
    return buf.getvalue()


def write_shard(path: str | Path, samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> None:
    """Write one shard atomically, streaming: ``samples`` may be a generator, and only the
    sample being written is in memory."""
    with atomic_open(path) as f:
        _write_tar(f, samples)


def member_names(path: str | Path) -> list[str]:
    """Member names of a tar, reading headers only."""
    fs, p = _fs(path)
    with fs.open(p, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        return [m.name for m in tar]


def member_index(path: str | Path) -> dict[str, tuple[int, int]]:
    """``{member name: (offset of its data, size)}`` of a tar, reading headers only."""
    fs, p = _fs(path)
    with fs.open(p, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar}


def read_range(path: str | Path, offset: int, size: int) -> bytes:
    """``size`` bytes of a file from ``offset`` (one seek and read; a range request on a URL)."""
    fs, p = _fs(path)
    with fs.open(p, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{path}: {size} bytes at {offset} asked, {len(data)} read (truncated?)")
    return data


class _Hashing(io.RawIOBase):
    """A read-only file that hashes every byte read through it."""

    def __init__(self, raw: BinaryIO, digest):
        self.raw, self.digest = raw, digest

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.raw.readinto(b)
        self.digest.update(memoryview(b)[:n])
        return n


class HashedSamples:
    """A shard's samples streamed in one read, with the sha256 of the whole file.

    Iterate it once for ``(key, {field: bytes})`` in order (``fields`` limits which are
    read); ``sha256`` is set once the iteration has ended. Only the current sample is in
    memory, never the shard."""

    def __init__(self, path: str | Path, fields: tuple[str, ...] | None = None):
        self.path, self.fields = path, fields
        self.sha256: str | None = None

    def __iter__(self) -> Iterator[tuple[str, dict[str, bytes]]]:
        fs, p = _fs(self.path)
        digest = hashlib.sha256()
        with fs.open(p, "rb") as raw:
            f = io.BufferedReader(_Hashing(raw, digest), 1 << 20)
            with tarfile.open(fileobj=f, mode="r|") as tar:
                yield from _grouped(tar, self.fields)
            while f.read(1 << 20):  # the end-of-archive padding is part of the file
                pass
        self.sha256 = digest.hexdigest()


def _grouped(tar: tarfile.TarFile, fields: tuple[str, ...] | None
             ) -> Iterator[tuple[str, dict[str, bytes]]]:
    want = set(fields) if fields is not None else None
    key, found = None, {}
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


def iter_samples(path: str | Path | bytes, fields: tuple[str, ...] | None = None
                 ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Read ``(key, {field: bytes})`` samples back from a shard (its path, or its bytes
    already read), in order.

    ``fields`` limits which members are read (the others are skipped unread).
    """
    if isinstance(path, bytes):
        opened = io.BytesIO(path)
    else:
        fs, p = _fs(path)
        opened = fs.open(p, "rb")
    with opened as f, tarfile.open(fileobj=f, mode="r:") as tar:
        yield from _grouped(tar, fields)


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
