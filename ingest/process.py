"""Turn one input file into cleaned, chunked, fingerprinted audio.

Goes in: an input record (``cantus.ingest.sources``) whose ``path`` is a local
file, and the ``IngestConfig``. Comes out: either a reject ``(reason,
message)`` or the input's chunks, each with its content-derived key, FLAC
bytes, PCM hash and a spectral fingerprint for near-duplicate search.

Steps: check the header's rate, channels and duration against the limits ->
decode -> check rate, finiteness and clipping -> downmix to mono ->
resample -> check length and silence -> loudness-normalise (ITU-R BS.1770) ->
cut into chunks. Pure computation on one file: no shared state, so it runs
the same in-process, in a Ray task or on another machine.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from cantus import audio
from cantus.ingest.params import IngestConfig

FINGERPRINT_BANDS = 16
FINGERPRINT_FRAMES = 16
FINGERPRINT_DIM = FINGERPRINT_BANDS * FINGERPRINT_FRAMES


@dataclass
class Chunk:
    key: str
    offset: int            # first sample, at the output rate
    length: int            # samples
    flac: bytes
    pcm_hash: str
    fingerprint: np.ndarray  # float32[FINGERPRINT_DIM], L2-normalised


@dataclass
class Processed:
    source_hash: str = ""
    seconds_in: float = 0.0          # decoded duration of the input
    sample_rate_in: int = 0
    channels_in: int = 0
    loudness_in: float = float("nan")  # LUFS before normalisation
    trim_start: int = 0              # leading silence removed, in output samples
    chunks: list[Chunk] = field(default_factory=list)
    reject: tuple[str, str] | None = None  # (reason, message)


def chunk_key(source_hash: str, offset: int, length: int, rate: int) -> str:
    """Content-derived chunk id: the same source audio and span give the same key."""
    blob = f"{source_hash}:{rate}:{offset}:{length}".encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def process_file(rec: dict[str, Any], cfg: IngestConfig, source_hash: str) -> Processed:
    """Decode, check, normalise and chunk the file of input record ``rec``.

    ``source_hash`` is the sha256 of the file's bytes (``audio.file_hash``).
    """
    path = rec["path"]
    out = Processed(source_hash=source_hash)
    try:  # a downloaded section is already cut to [start_s, end_s]
        x, rate = audio.decode(path, max_seconds=cfg.max_seconds,
                               max_sample_rate=cfg.max_sample_rate,
                               max_channels=cfg.max_channels,
                               max_decoded_mb=cfg.max_decoded_mb)
    except audio.AudioError as e:
        out.reject = (e.reason, str(e))
        return out
    out.sample_rate_in, out.channels_in = rate, x.shape[0]
    out.seconds_in = x.shape[1] / rate
    out.reject = _check_raw(path, x, rate, cfg)
    if out.reject:
        return out
    mono = audio.resample(x.mean(axis=0), rate, cfg.sample_rate)
    out.reject = _check_mono(path, mono, cfg)
    if out.reject:
        return out
    mono, out.loudness_in = normalise(mono, cfg)
    out.trim_start = leading_silence(mono, cfg)
    end = mono.shape[0] - leading_silence(mono[::-1], cfg)
    if end - out.trim_start < cfg.min_seconds * cfg.sample_rate:
        out.reject = ("too_short", f"{path}: {(end - out.trim_start) / cfg.sample_rate:.2f} s "
                                   f"of sound after trimming silence (minimum {cfg.min_seconds} s)")
        return out
    out.chunks = _chunks(mono[out.trim_start:end], out.source_hash, cfg, out.trim_start)
    if not out.chunks:
        out.reject = ("too_short", f"{path}: {out.seconds_in:.2f} s gives no chunk of at least "
                                   f"{cfg.min_chunk_seconds} s")
    return out


def _check_raw(path: str, x: np.ndarray, rate: int, cfg: IngestConfig) -> tuple[str, str] | None:
    """Checks on the decoded multichannel signal at its own rate."""
    if x.shape[1] == 0:
        return ("empty", f"{path}: no samples in the requested section")
    if rate < cfg.min_sample_rate:
        return ("low_sample_rate",
                f"{path}: sample rate {rate} Hz is below the minimum {cfg.min_sample_rate} Hz")
    finite = np.isfinite(x)
    if not finite.all():
        bad = int(x.size - finite.sum())
        return ("non_finite", f"{path}: {bad} samples are NaN or infinite")
    peak = np.abs(x).max(axis=0)  # loudest channel per sample
    clipped = float((peak >= 0.999).mean())
    if clipped > cfg.clip_fraction:
        return ("clipped", f"{path}: {100 * clipped:.1f}% of samples are at full scale "
                           f"(limit {100 * cfg.clip_fraction:.1f}%)")
    seconds = x.shape[1] / rate
    if seconds < cfg.min_seconds:
        return ("too_short", f"{path}: {seconds:.2f} s is shorter than the minimum "
                             f"{cfg.min_seconds} s")
    return None


def _check_mono(path: str, mono: np.ndarray, cfg: IngestConfig) -> tuple[str, str] | None:
    rms = float(np.sqrt(np.mean(np.square(mono, dtype=np.float64))))
    dbfs = 20 * math.log10(rms) if rms > 0 else -math.inf
    if dbfs < cfg.silence_dbfs:
        return ("silent", f"{path}: RMS level {dbfs:.1f} dBFS is below the silence "
                          f"threshold {cfg.silence_dbfs} dBFS")
    return None


@lru_cache(maxsize=4)
def _meter(rate: int):
    import pyloudnorm

    return pyloudnorm.Meter(rate)


def normalise(mono: np.ndarray, cfg: IngestConfig) -> tuple[np.ndarray, float]:
    """Gain to ``cfg.loudness_lufs`` integrated loudness, then cap the peak.

    Returns the normalised float32 signal and the input's loudness in LUFS
    (RMS level is used for clips shorter than the 400 ms BS.1770 block).
    """
    x = mono.astype(np.float64)
    if x.size >= int(0.4 * cfg.sample_rate):
        loud = float(_meter(cfg.sample_rate).integrated_loudness(x))
    else:
        loud = -math.inf
    if not math.isfinite(loud):  # everything gated away: fall back to RMS level
        loud = 20 * math.log10(max(float(np.sqrt(np.mean(x * x))), 1e-12))
    y = x * 10 ** ((cfg.loudness_lufs - loud) / 20)
    peak = float(np.abs(y).max())
    if peak > cfg.peak_limit:
        y *= cfg.peak_limit / peak
    return y.astype(np.float32), loud


def leading_silence(x: np.ndarray, cfg: IngestConfig) -> int:
    """Samples of silence at the start: 10 ms frames whose RMS is more than
    ``trim_db`` under the loudest frame's.

    Trimming both ends aligns two uploads of one song that differ only in
    padding, so their chunks line up for duplicate search.
    """
    if cfg.trim_db <= 0 or x.size == 0:
        return 0
    frame = max(1, cfg.sample_rate // 100)
    n = x.shape[0] // frame
    if n == 0:
        return 0
    frames = x[: n * frame].reshape(n, frame).astype(np.float64)
    level = np.sqrt(np.mean(frames * frames, axis=1))  # (n,) RMS per frame
    loud = np.flatnonzero(level > float(level.max()) * 10 ** (-cfg.trim_db / 20))
    return int(loud[0] * frame) if loud.size else 0


def _chunks(mono: np.ndarray, source_hash: str, cfg: IngestConfig, start: int = 0
            ) -> list[Chunk]:
    """Cut ``mono`` (which begins ``start`` samples into the source) into chunks."""
    rate = cfg.sample_rate
    size, hop = int(cfg.chunk_seconds * rate), int(cfg.hop_seconds * rate)
    min_len = int(cfg.min_chunk_seconds * rate)
    chunks, n = [], mono.shape[0]
    for offset in range(0, n, hop):
        piece = mono[offset:offset + size]
        if piece.shape[0] < min_len and offset > 0:
            break
        pcm = audio.quantize(piece, cfg.flac_bits)
        chunks.append(Chunk(
            key=chunk_key(source_hash, start + offset, piece.shape[0], rate),
            offset=start + offset, length=piece.shape[0],
            flac=audio.encode_flac(pcm, rate, cfg.flac_bits),
            pcm_hash=audio.pcm_hash(pcm),
            fingerprint=fingerprint(piece, rate)))
        if offset + size >= n:
            break
    return chunks


@lru_cache(maxsize=4)
def _mel_basis(rate: int, n_fft: int) -> np.ndarray:
    import librosa

    return librosa.filters.mel(sr=rate, n_fft=n_fft, n_mels=FINGERPRINT_BANDS,
                               fmin=60.0, fmax=min(8000.0, rate / 2))


def fingerprint(x: np.ndarray, rate: int) -> np.ndarray:
    """Compact spectral fingerprint of a chunk: float32[256], unit norm.

    A 16-band log-mel spectrogram pooled into 16 equal time segments, with
    each band's mean over time removed, so it captures how the music moves
    rather than the instrument's timbre or the loudness. Re-encodes and
    re-uploads of the same audio land within a small cosine distance.
    """
    n_fft, hop = 2048, max(1, rate // 20)
    if x.shape[0] < n_fft:
        x = np.pad(x, (0, n_fft - x.shape[0]))
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop]  # (F, n_fft)
    spec = np.abs(np.fft.rfft(frames * np.hanning(n_fft), axis=1)) ** 2  # (F, n_fft/2+1)
    mel = _mel_basis(rate, n_fft) @ spec.T  # (bands, F)
    # A floor 40 dB under the loudest bin keeps codec noise and dither in quiet
    # passages from deciding the fingerprint.
    mel = np.log(mel + 1e-4 * float(mel.max()) + 1e-12)
    edges = np.linspace(0, mel.shape[1], FINGERPRINT_FRAMES + 1).astype(int)
    pooled = np.stack([mel[:, a:max(b, a + 1)].mean(axis=1)
                       for a, b in zip(edges[:-1], edges[1:])], axis=1)  # (bands, frames)
    pooled -= pooled.mean(axis=1, keepdims=True)
    v = pooled.reshape(-1).astype(np.float32)
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v
