"""Hyperparameter dataclasses of the ingest stage (sections ``demo`` and ``ingest``).

Loaded from ``params.yaml`` with ``cantus.config.load_section``; every key is
required (but a source entry's ``captions``) and unknown keys are rejected by name,
``ingest.sources[1].kind`` for an entry of the sources list.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Literal

from cantus.config import ConfigError

SOURCE_KINDS = ("folder", "glob", "url_list", "musiccaps_csv")


def _require(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"'{key}' {why}")


@dataclass(frozen=True)
class DemoConfig:
    """The embedded demo corpus: music21 scores rendered through a GM SoundFont."""

    seed: int                 # every random choice (pieces, instruments, tempo, transposition)
    num_pieces: int           # how many renderings to make
    max_seconds: float        # each rendering is cut at this length
    sample_rate: int          # render rate (24 kHz for the MusicLM stages)
    collections: tuple[str, ...]  # music21 corpus collections to draw from

    def __post_init__(self):
        _require(self.num_pieces > 0, "demo.num_pieces", "must be positive")
        _require(self.max_seconds > 0, "demo.max_seconds", "must be positive")
        _require(self.sample_rate >= 8000, "demo.sample_rate", "must be at least 8000")
        _require(len(self.collections) > 0, "demo.collections", "must name a collection")


@dataclass(frozen=True)
class DownloadConfig:
    """yt-dlp downloads of URL lists and MusicCaps sections."""

    url_template: str         # MusicCaps ytid -> URL, e.g. https://www.youtube.com/watch?v={ytid}
    concurrency: int          # downloads in flight at once
    retries: int              # attempts after the first failure
    backoff_s: float          # first retry delay; doubles after each failure
    timeout_s: float          # socket and ffmpeg read timeout per request
    deadline_s: float         # longest one ffmpeg section cut or whole download may take
    breaker: int              # consecutive network failures that stop all downloads (0: off)
    max_bytes: int            # largest download (whole file or cut section)
    max_seconds: float        # longest media (or section) downloaded
    cookies: str              # must be "": the cookies file comes from $CANTUS_COOKIES
    proxy: str                # proxy URL without credentials, "" for none ($CANTUS_PROXY wins)
    format: str               # yt-dlp format selector (audio only)

    def __post_init__(self):
        k = "ingest.download."
        _require("{ytid}" in self.url_template, k + "url_template", "must contain {ytid}")
        _require(self.concurrency >= 1, k + "concurrency", "must be at least 1")
        _require(self.retries >= 0, k + "retries", "must be >= 0")
        _require(self.backoff_s >= 0, k + "backoff_s", "must be >= 0")
        _require(self.timeout_s > 0, k + "timeout_s", "must be positive")
        _require(self.deadline_s >= self.timeout_s, k + "deadline_s", "must be >= timeout_s")
        _require(self.breaker >= 0, k + "breaker", "must be >= 0 (0 turns it off)")
        _require(self.max_bytes >= 1 << 16, k + "max_bytes", "must be at least 65536")
        _require(self.max_seconds > 0, k + "max_seconds", "must be positive")
        # params land in dvc.lock, so they must hold no secret
        _require(self.cookies == "", k + "cookies",
                 "must be empty: a cookies path in params lands in dvc.lock; "
                 "set the environment variable CANTUS_COOKIES instead")
        proxy = urllib.parse.urlsplit(self.proxy if "://" in self.proxy else "//" + self.proxy)
        _require(not (proxy.username or proxy.password), k + "proxy",
                 "holds credentials, which would land in dvc.lock; "
                 "set the environment variable CANTUS_PROXY instead")


@dataclass(frozen=True)
class SourceConfig:
    """One entry of ``ingest.sources``. Relative paths are taken from the working directory
    (the repository root under DVC); DVC tracks the content of ``data/demo`` and
    ``data/sources`` (``cantus add-source``) only."""

    kind: Literal["folder", "glob", "url_list", "musiccaps_csv"]
    path: str                 # folder (recursive), glob pattern, URL list or MusicCaps CSV
    captions: str = ""        # captions table (.csv/.jsonl, paths relative to it); "" for none

    def check(self, key: str) -> None:
        """ConfigError naming ``key.path`` / ``key.captions`` (``key``: ``ingest.sources[i]``)."""
        _require(self.path.strip() != "", f"{key}.path", "must not be empty")
        if self.captions:
            _require(self.kind in ("folder", "glob"), f"{key}.captions",
                     f"is for folder and glob sources; a {self.kind} carries its own captions")
            _require(self.captions.endswith((".csv", ".jsonl")), f"{key}.captions",
                     "must be a .csv or .jsonl table")


@dataclass(frozen=True)
class IngestConfig:
    """Decode, clean, chunk, de-duplicate, split and shard."""

    sources: tuple[SourceConfig, ...]  # where the audio comes from (--source etc. replace it)
    seed: int
    sample_rate: int          # output rate
    min_sample_rate: int      # inputs recorded below this rate are rejected
    loudness_lufs: float      # integrated loudness target
    peak_limit: float         # after gain, peaks are scaled down to this
    silence_dbfs: float       # an input whose RMS is below this is silent
    clip_fraction: float      # fraction of samples at full scale that counts as clipped
    trim_db: float            # leading/trailing audio this far under the peak is cut (0: off)
    min_seconds: float        # shortest input kept
    max_seconds: float        # longest input read (the rest is ignored)
    max_sample_rate: int      # inputs whose header states a higher rate are rejected undecoded
    max_channels: int         # ... more channels than this
    max_decoded_mb: float     # ... decoded float32 audio (up to max_seconds) larger than this
    chunk_seconds: float      # chunk length
    hop_seconds: float        # distance between chunk starts
    min_chunk_seconds: float  # a trailing chunk shorter than this is dropped
    near_dup_threshold: float # cosine similarity of fingerprints above which chunks are duplicates
    valid_fraction: float     # share of source tracks in the valid split
    shard_max_samples: int    # chunks per shard
    flac_bits: int            # 16 or 24
    num_workers: int          # parallel workers; 0 = all cores
    executor: str             # "ray" or "local" (in-process, for debugging)
    max_failed_fraction: float  # the stage fails when more downloads than this failed transiently
    download: DownloadConfig

    def __post_init__(self):
        k = "ingest."
        for i, source in enumerate(self.sources):
            source.check(f"{k}sources[{i}]")
        _require(self.sample_rate >= 8000, k + "sample_rate", "must be at least 8000")
        _require(self.chunk_seconds > 0, k + "chunk_seconds", "must be positive")
        _require(0 < self.hop_seconds, k + "hop_seconds", "must be positive")
        _require(0 < self.min_chunk_seconds <= self.chunk_seconds, k + "min_chunk_seconds",
                 "must be in (0, chunk_seconds]")
        _require(0 < self.min_seconds <= self.max_seconds, k + "min_seconds",
                 "must be in (0, max_seconds]")
        _require(0 < self.near_dup_threshold <= 1, k + "near_dup_threshold", "must be in (0, 1]")
        _require(0 <= self.valid_fraction < 1, k + "valid_fraction", "must be in [0, 1)")
        _require(0 < self.clip_fraction <= 1, k + "clip_fraction", "must be in (0, 1]")
        _require(0 < self.peak_limit <= 1, k + "peak_limit", "must be in (0, 1]")
        _require(self.shard_max_samples >= 1, k + "shard_max_samples", "must be at least 1")
        _require(self.flac_bits in (16, 24), k + "flac_bits", "must be 16 or 24")
        _require(self.trim_db >= 0, k + "trim_db", "must be >= 0 (0 turns trimming off)")
        _require(self.num_workers >= 0, k + "num_workers", "must be >= 0 (0 = all cores)")
        _require(self.executor in ("ray", "local"), k + "executor", "must be 'ray' or 'local'")
        _require(self.max_sample_rate >= self.min_sample_rate, k + "max_sample_rate",
                 "must be >= min_sample_rate")
        _require(self.max_channels >= 1, k + "max_channels", "must be at least 1")
        _require(self.max_decoded_mb > 0, k + "max_decoded_mb", "must be positive")
        _require(0 <= self.max_failed_fraction <= 1, k + "max_failed_fraction",
                 "must be in [0, 1]")
