"""Audio I/O shared by every stage: decode any container, resample, FLAC bytes.

``decode`` reads wav, flac, mp3, ogg/vorbis, opus, m4a/aac (anything FFmpeg
reads, through PyAV) into ``float32[C, N]`` at the file's own rate. Failures
raise ``AudioError`` with a short reason code and a message naming the file.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np

# Integer sample formats and the value that maps to full scale.
_INT_SCALE = {"s16": 32768.0, "s16p": 32768.0, "s32": 2147483648.0, "s32p": 2147483648.0,
              "s64": 9.223372036854776e18, "s64p": 9.223372036854776e18}


class AudioError(Exception):
    """An input that cannot be used as audio; ``reason`` is a short code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _frame_to_array(frame) -> np.ndarray:
    """One PyAV audio frame -> float32[C, n]."""
    a = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if not frame.format.is_planar:
        a = a.reshape(-1, channels).T  # packed (1, n*C) -> (C, n)
    name = frame.format.name
    if name in ("u8", "u8p"):
        return ((a.astype(np.float32) - 128.0) / 128.0)
    if name in _INT_SCALE:
        return (a.astype(np.float64) / _INT_SCALE[name]).astype(np.float32)
    return a.astype(np.float32, copy=False)


def decode(path: str | Path, max_seconds: float | None = None, *,
           max_sample_rate: int | None = None, max_channels: int | None = None,
           max_decoded_mb: float | None = None) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of ``path``.

    Args:
        path: any file FFmpeg can read.
        max_seconds: stop after this much audio (None reads all of it).
        max_sample_rate, max_channels, max_decoded_mb: limits checked on the
            container header before any sample is decoded (the decoded size is
            float32 samples up to ``max_seconds``), and the size again while
            decoding, for headers that lie or state no duration. None: no limit.

    Returns:
        (float32[C, N], sample_rate) at the file's own rate and channel count.

    Raises:
        AudioError: reason ``decode_error`` (not a readable media file, or a
            stream whose rate or channel count changes mid-stream), ``no_audio``
            (no audio stream), ``empty`` (a 0-byte file), ``truncated`` (a
            lossless file shorter than its header says) or ``over_limit``
            (a limit above exceeded; the message names it).
    """
    import av  # deferred: PyAV loads FFmpeg, which is slow to import

    name = str(path)
    if Path(name).is_file() and Path(name).stat().st_size == 0:
        raise AudioError("empty", f"{name}: the file is empty (0 bytes)")
    try:
        container = av.open(name)
    except Exception as e:  # PyAV raises many FFmpeg error types
        raise AudioError("decode_error", f"{name}: not a readable audio file ({_short(e)})") from e
    with container:
        if not container.streams.audio:
            raise AudioError("no_audio", f"{name}: the file has no audio stream")
        stream = container.streams.audio[0]
        rate = stream.rate or stream.codec_context.sample_rate
        channels = stream.channels or stream.codec_context.channels
        budget = None if max_decoded_mb is None else int(max_decoded_mb * 2**20)
        _check_header(name, container, stream, rate, channels, max_seconds,
                      max_sample_rate, max_channels, budget)
        limit = int(max_seconds * rate) if max_seconds and rate else None
        parts, total, first = [], 0, None
        try:
            for frame in container.decode(stream):
                a = _frame_to_array(frame)
                if first is None:
                    first = (a.shape[0], frame.sample_rate)
                elif (a.shape[0], frame.sample_rate) != first:
                    raise AudioError("decode_error", f"{name}: the stream changes from "
                                     f"{first[0]} ch at {first[1]} Hz to {a.shape[0]} ch at "
                                     f"{frame.sample_rate} Hz after {total / first[1]:.2f} s")
                parts.append(a)
                total += a.shape[1]
                if budget is not None and 4 * total * a.shape[0] > budget:
                    raise AudioError("over_limit", f"{name}: decodes to more than "
                                     f"{budget / 2**20:g} MB of samples (max_decoded_mb)")
                if limit is not None and total >= limit:
                    break
        except AudioError:
            raise
        except Exception as e:
            if not parts:
                raise AudioError("decode_error", f"{name}: decoding failed ({_short(e)})") from e
            # A truncated file decodes up to the damage; keep what was readable.
        if not parts or total == 0:
            raise AudioError("decode_error", f"{name}: no decodable audio samples "
                                             "(damaged, or not audio)")
        rate = frame.sample_rate or rate
        declared = _declared_samples(name, stream)
    expected = min(declared, limit) if declared and limit else declared
    if expected and total < 0.99 * expected - 0.05 * rate:
        raise AudioError("truncated", f"{name}: truncated: the header declares "
                                      f"{declared / rate:.2f} s but only {total / rate:.2f} s "
                                      f"could be decoded")
    x = np.concatenate(parts, axis=1)
    if limit is not None:
        x = x[:, :limit]
    return x, int(rate)


def header_seconds(container, stream) -> float | None:
    """Duration a container's header states (None where it states none)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1e6  # AV_TIME_BASE
    return None


def _check_header(name: str, container, stream, rate: int, channels: int,
                  max_seconds: float | None, max_sample_rate: int | None,
                  max_channels: int | None, budget: int | None) -> None:
    """Raise ``over_limit`` when the header alone shows a limit is exceeded."""
    if max_sample_rate is not None and rate and rate > max_sample_rate:
        raise AudioError("over_limit", f"{name}: sample rate {rate} Hz is over the limit "
                                       f"of {max_sample_rate} Hz (max_sample_rate)")
    if max_channels is not None and channels and channels > max_channels:
        raise AudioError("over_limit", f"{name}: {channels} channels is over the limit "
                                       f"of {max_channels} (max_channels)")
    seconds = header_seconds(container, stream)
    if budget is None or not seconds or not rate:
        return
    seconds = min(seconds, max_seconds) if max_seconds else seconds
    size = 4 * seconds * rate * max(1, channels or 1)
    if size > budget:
        raise AudioError("over_limit", f"{name}: {seconds:.1f} s x {rate} Hz x {channels} ch "
                                       f"would decode to {size / 2**20:.0f} MB, over the limit "
                                       f"of {budget / 2**20:g} MB (max_decoded_mb)")


def _declared_samples(name: str, stream) -> int | None:
    """Sample count a lossless file's header promises (None where unknown or inexact)."""
    codec = stream.codec_context.name
    if codec == "flac" and stream.duration and stream.time_base:
        return int(stream.duration * stream.time_base * stream.rate)
    if codec.startswith("pcm_") and name.lower().endswith((".wav", ".wave")):
        return _riff_data_frames(name, stream)
    return None


def _riff_data_frames(name: str, stream) -> int | None:
    """Frames the WAV 'data' chunk header declares (FFmpeg trusts the file size)."""
    with open(name, "rb") as f:
        head = f.read(1 << 16)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, block = 12, None
    while pos + 8 <= len(head):
        cid, size = head[pos:pos + 4], int.from_bytes(head[pos + 4:pos + 8], "little")
        if cid == b"fmt ":
            block = int.from_bytes(head[pos + 20:pos + 22], "little")  # bytes per frame
        if cid == b"data":
            if not block or size in (0, 0xFFFFFFFF):  # streamed WAVs leave it unset
                return None
            return size // block
        pos += 8 + size + (size & 1)
    return None


def _short(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Resample ``float32[N]`` with soxr (high quality, deterministic)."""
    if rate_in == rate_out:
        return x.astype(np.float32, copy=False)
    import soxr

    return soxr.resample(x.astype(np.float32, copy=False), rate_in, rate_out, quality="HQ")


def quantize(x: np.ndarray, bits: int = 16) -> np.ndarray:
    """float32 in [-1, 1] -> int16 or int32 PCM (24-bit values in int32), rounded."""
    if bits == 16:
        return np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)
    if bits == 24:
        return np.clip(np.round(x * 8388607.0), -8388608, 8388607).astype(np.int32) << 8
    raise ValueError(f"flac_bits must be 16 or 24, got {bits}")


def encode_flac(pcm: np.ndarray, rate: int, bits: int = 16) -> bytes:
    """int PCM from ``quantize`` -> FLAC bytes (deterministic for the same input)."""
    import soundfile as sf

    buf = io.BytesIO()
    subtype = "PCM_16" if bits == 16 else "PCM_24"
    sf.write(buf, pcm, rate, format="FLAC", subtype=subtype)
    return buf.getvalue()


def decode_flac(data: bytes) -> tuple[np.ndarray, int]:
    """FLAC bytes -> (float32[N] mono or float32[N, C], rate)."""
    import soundfile as sf

    x, rate = sf.read(io.BytesIO(data), dtype="float32")
    return x, int(rate)


def decode_sample(fields: dict[str, bytes]) -> tuple[np.ndarray, dict[str, Any]]:
    """One audio-shard sample ({key}.flac, {key}.json) -> (float32[N] mono, its metadata).

    Torch-free on purpose: Ray's decode tasks run it in fresh worker processes.
    """
    import json

    import soundfile as sf

    x, _ = sf.read(io.BytesIO(fields["flac"]), dtype="float32")
    if x.ndim == 2:
        x = x.mean(axis=1)
    return x, json.loads(fields["json"])


def pcm_hash(pcm: np.ndarray) -> str:
    """sha256 of the PCM bytes: equal for exactly equal decoded audio."""
    return hashlib.sha256(np.ascontiguousarray(pcm).tobytes()).hexdigest()


def file_hash(path: str | Path, block: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
