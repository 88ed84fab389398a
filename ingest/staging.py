"""Per-input results cached on disk, so a rerun never redoes finished inputs.

``process_task(record, cfg, staging_dir)`` runs ``process_file`` on one input
and stores the outcome as ``{staging_dir}/{key}.tar``: the chunks' FLAC bytes,
their fingerprints and a JSON summary. The key is the file's content hash
(a downloaded section is its own file); ``staging_dir`` is named by
``processing_hash(cfg)``: the params that change per-input results and the code
that makes them (this module's imports, ``cantus.code_closure``), so changing
e.g. the loudness target or the decoder recomputes while changing the split
fraction or the shard writer does not. It returns the small summary only;
audio stays on disk until shards are written.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from cantus import audio, shards
from cantus.code_closure import code_digest
from cantus.config import config_hash
from cantus.ingest.params import IngestConfig
from cantus.ingest.process import process_file

# Params that change what process_file produces for one input.
_PROCESSING_KEYS = ("sample_rate", "min_sample_rate", "loudness_lufs", "peak_limit",
                    "silence_dbfs", "clip_fraction", "trim_db", "min_seconds", "max_seconds",
                    "max_sample_rate", "max_channels", "max_decoded_mb",
                    "chunk_seconds", "hop_seconds", "min_chunk_seconds", "flac_bits")


def processing_hash(cfg: IngestConfig) -> str:
    picked = {k: getattr(cfg, k) for k in _PROCESSING_KEYS}
    picked["code"] = code_digest("cantus.ingest.staging")  # process_file and what it imports
    return config_hash(picked)


def _failed(reason: str, detail: str, source_hash: str | None = None) -> dict[str, Any]:
    return {"reject": [reason, detail], "chunks": [], "seconds_in": 0.0, "cached": False,
            "staging": None, "source_hash": source_hash}


def process_task(rec: dict[str, Any], cfg: IngestConfig, staging_dir: str) -> dict[str, Any]:
    """Process (or load from the cache) one input; returns its summary.

    Never raises for a bad input: an unreadable file is a ``read_error``
    reject and any unexpected exception while decoding or cleaning it is a
    ``process_error`` reject naming the input and the exception. Neither is
    cached, so a rerun tries the input again.
    """
    try:
        source_hash = audio.file_hash(rec["path"])
    except OSError as e:
        return _failed("read_error", f"{rec['uri']}: cannot read ({e.strerror or e})")
    path = f"{staging_dir}/{source_hash[:32]}.tar"
    if shards.exists(path):
        try:
            summary = load_summary(path)
        except Exception:  # an unreadable cache entry is recomputed and rewritten
            summary = None
        if summary is not None:
            summary["cached"] = True
            return summary
    try:
        res = process_file(rec, cfg, source_hash)
    except Exception as e:  # one bad input must not abort the run
        return _failed("process_error", f"{rec['uri']}: unexpected {type(e).__name__} while "
                                        f"processing: {str(e)[:300]}", source_hash)
    summary = {
        "source_hash": res.source_hash, "seconds_in": res.seconds_in,
        "sample_rate_in": res.sample_rate_in, "channels_in": res.channels_in,
        "loudness_in": None if res.loudness_in != res.loudness_in else res.loudness_in,
        "reject": list(res.reject) if res.reject else None,
        "chunks": [{"key": c.key, "offset": c.offset, "length": c.length,
                    "pcm_hash": c.pcm_hash} for c in res.chunks],
    }
    fp = np.stack([c.fingerprint for c in res.chunks]) if res.chunks else np.zeros((0, 0))
    buf = io.BytesIO()
    np.save(buf, fp.astype(np.float32))
    samples = [("summary", {"json": json.dumps(summary, sort_keys=True).encode(),
                            "npy": buf.getvalue()})]
    samples += [(c.key, {"flac": c.flac}) for c in res.chunks]
    shards.write_shard(path, samples)
    summary["fingerprints"] = fp.astype(np.float32)
    summary.update(cached=False, staging=path)
    return summary


def load_summary(path: str) -> dict[str, Any]:
    """Read the summary (with fingerprints) of a staging file, skipping the audio."""
    for key, fields in shards.iter_samples(path):
        if key == "summary":
            summary = json.loads(fields["json"])
            summary["fingerprints"] = np.load(io.BytesIO(fields["npy"]))
            summary["staging"] = path
            return summary
    raise ValueError(f"{path}: staging file has no summary")


class FlacReader:
    """Single chunks' FLAC bytes from one staging file: its tar headers are read once,
    then each chunk is one seek and read, so a shard writer holds one chunk at a time."""

    def __init__(self, path: str):
        self.path = path
        self.index = shards.member_index(path)

    def read(self, key: str) -> bytes:
        if f"{key}.flac" not in self.index:
            raise KeyError(f"{self.path}: staging file has no chunk {key}")
        return shards.read_range(self.path, *self.index[f"{key}.flac"])
