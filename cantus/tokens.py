"""The token-shard contract between tokenize/ and train/.

A token folder (``data/tokens``) holds:

- ``{split}-NNNNNN.tar``: WebDataset shards, one sample per chunk, keyed by
  the audio chunk's id: ``{key}.acoustic.npy`` (uint16[12, Ta], 50 Hz),
  ``{key}.semantic.npy`` (uint16[Ts], 25 Hz), ``{key}.mulan.npy``
  (uint16[12]) and ``{key}.json`` (caption, tags, source, offset, duration);
- ``index.parquet``: key, split, shard and the token lengths of every sample;
- ``manifest.json``: the exact tokenizers (checkpoint hashes, layer, centroid
  and RVQ hashes, rates, hops, codebook sizes). A reader passes what it
  expects to ``check_manifest``, which refuses a mismatch and says what differs.

``npy`` members are written with ``numpy.save``, so plain
``webdataset.WebDataset(url).decode()`` reads them as arrays.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cantus import shards

FIELDS = ("acoustic", "semantic", "mulan")
# MusicLM's rates: 24 kHz audio, SoundStream hop 480 (50 Hz), w2v-BERT tokens at 25 Hz.
ACOUSTIC_HZ = 50
SEMANTIC_HZ = 25


class ManifestMismatch(ValueError):
    """Token shards made by other tokenizers than the ones a run asks for."""


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def sample_fields(tokens: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> dict[str, bytes]:
    """Shard members of one sample: ``{field}.npy`` per token field plus ``json``."""
    out = {f"{name}.npy": npy_bytes(arr) for name, arr in tokens.items()}
    out["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()
    return out


def iter_token_samples(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(key, {"acoustic": uint16[12, Ta], ..., "meta": dict})`` from one token shard."""
    for key, fields in shards.iter_samples(path):
        item: dict[str, Any] = {}
        for name, data in fields.items():
            if name.endswith(".npy"):
                item[name[:-4]] = npy_load(data)
            elif name == "json":
                item["meta"] = json.loads(data)
        yield key, item


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """A token folder's ``manifest.json`` (the folder local or a URL)."""
    path = shards.join(folder, "manifest.json")
    if not shards.exists(path):
        raise FileNotFoundError(f"{folder}: no manifest.json (not a token folder?)")
    return shards.read_json(path)


def _diff(expected: Any, found: Any, where: str) -> list[str]:
    if isinstance(expected, Mapping):
        if not isinstance(found, Mapping):
            return [f"{where}: expected a mapping, found {found!r}"]
        out = []
        for k, v in expected.items():
            key = f"{where}.{k}" if where else str(k)
            if k not in found:
                out.append(f"{key}: missing in the shards' manifest (expected {v!r})")
            else:
                out.extend(_diff(v, found[k], key))
        return out
    return [] if expected == found else [f"{where}: shards have {found!r}, run expects {expected!r}"]


def check_manifest(folder: str | Path, expected: Mapping[str, Any]) -> dict[str, Any]:
    """Refuse token shards whose manifest differs from ``expected`` (only the keys given).

    Returns the manifest. Raises ManifestMismatch listing every difference.
    """
    manifest = read_manifest(folder)
    problems = _diff(expected, manifest.get("tokenizers", manifest), "")
    if problems:
        raise ManifestMismatch(f"{folder}: token shards do not match the tokenizers this run "
                               "uses:\n  " + "\n  ".join(problems))
    return manifest
