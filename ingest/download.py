"""Download the audio of URLs (or sections of them) with yt-dlp into a cache.

Goes in: requests ``{"url", "start_s", "end_s"}`` (as made by
``cantus.ingest.url_lists`` from a URL list or a MusicCaps CSV; re-exported
here) and the ``ingest.download`` section of ``params.yaml``
(``DownloadConfig``). Comes out: for each request, a file in a download cache,
or a ``DownloadError`` naming the URL and a short reason ("unreachable",
"unavailable (HTTP 404)", "no audio stream").

Cache layout (``cache_dir``), keyed by ``sha256`` of (url, start_s, end_s)::

    <key>.<ext>    the audio: the file as served for a whole download, or FLAC
                   (source rate and channels) for a section
    <key>.json     sidecar: url, section, title, ext, yt-dlp metadata
                   (duration, uploader, licence, ...) and a probe of the file

The media file is moved into place before its sidecar, both with
``os.replace``, so a sidecar marks a finished download and a rerun finds it
without touching the network.

Sections: yt-dlp cuts them with ffmpeg (``download_ranges``); only the bytes
around the section are fetched (HTTP range requests) and the cut is
re-encoded to FLAC, so it is sample-accurate and lossless with respect to the
decoded source. ffmpeg comes from ``PATH`` or from the ``imageio-ffmpeg``
package; ffprobe is not needed. Without ffmpeg (or for a format ffmpeg cannot
cut) the whole file is downloaded and the section is cut locally with PyAV,
with a warning.

Run: ``python -m cantus.ingest.download --params params.yaml --cache DIR
(--urls LIST | --musiccaps CSV)``.
"""

from __future__ import annotations

import argparse
import contextvars
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import av
import numpy as np
import soundfile as sf
import yt_dlp
from tqdm import tqdm
from yt_dlp.utils import download_range_func

from cantus.ingest.params import DownloadConfig
from cantus.ingest.url_lists import parse_aspect_list, read_musiccaps, read_url_list

__all__ = ["DownloadError", "cache_key", "download_all", "fetch", "main",
           "parse_aspect_list", "read_musiccaps", "read_url_list"]  # parsers re-exported

log = logging.getLogger(__name__)
_ydl_log = logging.getLogger(__name__ + ".yt_dlp")  # silence separately if too chatty

# ffmpeg output options for a section: audio only, lossless FLAC. They come
# after yt-dlp's own "-f <ext>", so they win.
_SECTION_FFMPEG_ARGS = ["-vn", "-sn", "-dn", "-c:a", "flac", "-f", "flac"]
# (pattern in yt-dlp's message, short reason, permanent?) checked in order.
_MESSAGE_REASONS = (
    ("cannot be partially downloaded", "section unsupported", True),
    ("downloading the video partially", "section unsupported", True),
    ("requested format is not available", "no audio stream", True),
    ("unsupported url", "unsupported URL", True),
    ("private video", "unavailable (private)", True),
    ("video unavailable", "unavailable", True),
    ("has been removed", "unavailable (removed)", True),
    ("is not available", "unavailable", True),
    ("sign in to confirm", "needs login (cookies)", True),
    ("timed out", "timed out", False),
)
_PERMANENT_HTTP = {400, 401, 404, 410, 451}
_INFO_KEYS = ("id", "title", "uploader", "uploader_id", "channel", "license",
              "duration", "upload_date", "webpage_url", "extractor_key",
              "format_id", "acodec", "abr", "asr", "audio_channels")


class DownloadError(Exception):
    """A URL could not be fetched; ``reason`` is short and stable for rejects tables."""

    def __init__(self, url: str, reason: str, permanent: bool = False):
        super().__init__(url, reason, permanent)
        self.url, self.reason, self.permanent = url, reason, permanent

    def __str__(self) -> str:
        return f"download failed for {self.url}: {self.reason}"


# ---------------------------------------------------------------- cache


def cache_key(url: str, start_s: float | None = None, end_s: float | None = None) -> str:
    """sha256 hex of the URL and the section (None for an open end)."""
    sec = [None if t is None else round(float(t), 6) for t in (start_s, end_s)]
    return hashlib.sha256(json.dumps([url, *sec]).encode()).hexdigest()


def _cached(cache_dir: Path, key: str) -> Path | None:
    sidecar = cache_dir / f"{key}.json"
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    media = cache_dir / str(meta.get("file", ""))
    return media if meta.get("file") and media.is_file() else None


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


# ---------------------------------------------------------------- download


def fetch(url: str, start_s: float | None, end_s: float | None,
          cfg: DownloadConfig, cache_dir: str | Path) -> Path:
    """Download one URL (or its section [start_s, end_s]) into the cache.

    A cached result returns at once without network access. Transient
    failures are retried ``cfg.retries`` times, waiting ``cfg.backoff_s``
    and doubling; permanent ones (HTTP 404, unavailable, no audio) are not.

    Returns:
        Path of the cached audio file.

    Raises:
        DownloadError: naming the URL and a short reason.
    """
    cache_dir = Path(cache_dir)
    key = cache_key(url, start_s, end_s)
    if (hit := _cached(cache_dir, key)) is not None:
        log.debug("cache hit %s -> %s", url, hit.name)
        return hit
    if (start_s or 0) < 0 or (end_s is not None and end_s <= (start_s or 0)):
        raise DownloadError(url, f"empty or negative section [{start_s}, {end_s}]", True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    delay, attempt = cfg.backoff_s, 0
    while True:
        try:
            return _fetch_once(url, start_s, end_s, cfg, cache_dir, key)
        except DownloadError as e:
            attempt += 1
            if e.permanent or attempt > cfg.retries:
                raise
            log.info("retry %d/%d of %s in %.2fs (%s)", attempt, cfg.retries, url, delay, e.reason)
            time.sleep(delay)
            delay *= 2


def _fetch_once(url: str, start_s: float | None, end_s: float | None,
                cfg: DownloadConfig, cache_dir: Path, key: str) -> Path:
    section = start_s is not None or end_s is not None
    ffmpeg = _ffmpeg_exe()
    method = None
    if section:
        method = "ffmpeg" if ffmpeg else "local_trim"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir))
    try:
        try:
            info, media = _ydl_download(url, start_s if method == "ffmpeg" else None,
                                        end_s if method == "ffmpeg" else None, cfg, tmp, ffmpeg)
        except DownloadError as e:
            if method != "ffmpeg" or e.reason != "section unsupported":
                raise
            log.warning("%s: ffmpeg cannot cut this format; downloading it whole", url)
            method = "local_trim"
            info, media = _ydl_download(url, None, None, cfg, tmp, ffmpeg)
        if method == "local_trim":
            if not ffmpeg:
                log.warning("%s: no ffmpeg; downloading whole file to cut the section", url)
            media = _trim_local(url, media, start_s or 0.0, end_s, tmp / "section.flac")
        ext = "flac" if section else (media.suffix.lstrip(".") or "bin")
        probe = _probe(url, media, decode=section)
        final = cache_dir / f"{key}.{ext}"
        os.replace(media, final)
        meta = {k: info.get(k) for k in _INFO_KEYS}
        meta.update(url=url, start_s=start_s, end_s=end_s, key=key, file=final.name,
                    section=[start_s, end_s] if section else None,
                    ext=ext, section_method=method, probe=probe,
                    source_ext=info.get("ext"), ytdlp_version=yt_dlp.version.__version__)
        _write_json_atomic(cache_dir / f"{key}.json", meta)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ydl_download(url: str, start_s: float | None, end_s: float | None,
                  cfg: DownloadConfig, tmp: Path, ffmpeg: str | None) -> tuple[dict, Path]:
    """One yt-dlp run into ``tmp``; returns (info dict, downloaded file)."""
    opts = _ydl_opts(cfg, tmp, ffmpeg)
    if start_s is not None or end_s is not None:
        opts["download_ranges"] = download_range_func(None, [(start_s or 0.0, end_s or math.inf)])
        opts["external_downloader_args"] = {"ffmpeg_o": list(_SECTION_FFMPEG_ARGS)}

    def run() -> dict:
        if ffmpeg:
            # FFmpegFD.available() ignores the ffmpeg_location param and reads
            # this context variable (set only by yt-dlp's CLI); copy_context
            # keeps the setting to this call.
            from yt_dlp.postprocessor.ffmpeg import FFmpegPostProcessor
            FFmpegPostProcessor._ffmpeg_location.set(ffmpeg)
        with yt_dlp.YoutubeDL(opts) as ydl:
            return ydl.extract_info(url, download=True)

    try:
        info = contextvars.copy_context().run(run)
    except yt_dlp.utils.YoutubeDLError as e:
        reason, permanent = _classify(e)
        raise DownloadError(url, reason, permanent) from e
    if info and info.get("_type") == "playlist":
        info = next(iter(info.get("entries") or []), None) or {}
    files = [p for p in tmp.iterdir() if p.is_file() and not p.name.endswith((".part", ".ytdl"))]
    if len(files) != 1:
        raise DownloadError(url, "no file downloaded" if not files else "several files downloaded", True)
    return info or {}, files[0]


def _ydl_opts(cfg: DownloadConfig, tmp: Path, ffmpeg: str | None) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "format": cfg.format,
        "outtmpl": {"default": "media.%(ext)s"},
        "paths": {"home": str(tmp), "temp": str(tmp)},
        "socket_timeout": cfg.timeout_s,
        # fetch() owns retries (with backoff); yt-dlp's own would multiply them
        "retries": 0, "extractor_retries": 0, "fragment_retries": cfg.retries,
        "noplaylist": True, "playlist_items": "1",
        "quiet": True, "noprogress": True, "color": "never",
        "logger": _YdlLogger(),
        "cachedir": False, "overwrites": True, "continuedl": False,
        # YouTube needs a JS runtime (plus the yt-dlp-ejs package); yt-dlp
        # only tries deno unless told, so offer whichever is installed
        "js_runtimes": {n: {} for n in ("deno", "node", "bun") if shutil.which(n)} or {"deno": {}},
    }
    if ffmpeg:
        opts["ffmpeg_location"] = ffmpeg
    if cfg.cookies:
        opts["cookiefile"] = cfg.cookies
    if cfg.proxy:
        opts["proxy"] = cfg.proxy
    return opts


class _YdlLogger:
    """yt-dlp's messages into ``logging``; errors at debug (they are raised)."""

    def debug(self, msg: str) -> None:
        _ydl_log.debug("%s", msg)

    info = debug
    error = debug

    def warning(self, msg: str) -> None:
        _ydl_log.warning("%s", msg)


def _classify(exc: BaseException) -> tuple[str, bool]:
    """(short reason, permanent?) for a yt-dlp error."""
    from yt_dlp.networking.exceptions import HTTPError, TransportError

    causes, seen = [exc], set()
    while causes:
        e = causes.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, HTTPError):
            return f"unavailable (HTTP {e.status})", e.status in _PERMANENT_HTTP
        if isinstance(e, TransportError) and "timed out" not in str(e).lower():
            return "unreachable", False
        exc_info = getattr(e, "exc_info", None)
        causes += [getattr(e, "cause", None), e.__cause__,
                   exc_info[1] if isinstance(exc_info, tuple) and len(exc_info) > 1 else None]
    msg = str(exc).lower()
    for pattern, reason, permanent in _MESSAGE_REASONS:
        if pattern in msg:
            return reason, permanent
    short = re.sub(r"^error:\s*", "", str(exc).splitlines()[0].strip(), flags=re.I)
    return f"failed: {short[:160]}", False


@functools.lru_cache(maxsize=1)
def _ffmpeg_exe() -> str | None:
    """ffmpeg from PATH, else the binary shipped by imageio-ffmpeg, else None."""
    exe = shutil.which("ffmpeg")
    if exe:
        return exe
    try:
        import imageio_ffmpeg
        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        return None


# ---------------------------------------------------------------- audio


def _probe(url: str, path: Path, decode: bool) -> dict[str, Any]:
    """Container facts of a downloaded file; raises if it holds no audio.

    With ``decode`` (sections, which are short) the duration is counted in
    decoded samples: a section past the end of the media leaves a FLAC header
    whose stated length is garbage.
    """
    try:
        with av.open(str(path)) as c:
            if not c.streams.audio:
                raise DownloadError(url, "no audio stream", True)
            st = c.streams.audio[0]
            if decode:
                duration = sum(f.samples for f in c.decode(st)) / st.rate
            else:
                duration = c.duration / 1e6 if c.duration else None
            info = {"codec": st.codec_context.name, "sample_rate": st.rate,
                    "channels": st.channels, "duration_s": duration}
    except av.error.FFmpegError as e:
        raise DownloadError(url, "not a decodable media file", True) from e
    if duration is not None and duration <= 0:
        raise DownloadError(url, "empty audio (section beyond the end?)", True)
    return info


def _trim_local(url: str, src: Path, start_s: float, end_s: float | None, dst: Path) -> Path:
    """Decode [start_s, end_s) of ``src`` with PyAV and write it as FLAC."""
    try:
        with av.open(str(src)) as c:
            if not c.streams.audio:
                raise DownloadError(url, "no audio stream", True)
            st = c.streams.audio[0]
            rate = st.rate
            resampler = av.AudioResampler(format="fltp")  # layout and rate kept
            chunks, pos = [], 0  # pos: samples decoded so far, when frames lack times
            for frame in c.decode(st):
                for out in resampler.resample(frame):
                    t0 = out.time if out.time is not None else pos / rate
                    pos += out.samples
                    chunks.append((t0, out.to_ndarray()))  # (C, N) float32
    except av.error.FFmpegError as e:
        raise DownloadError(url, "not a decodable media file", True) from e
    if not chunks:
        raise DownloadError(url, "empty audio", True)
    t_first = chunks[0][0]
    audio = np.concatenate([a for _, a in chunks], axis=1)  # (C, N)
    i0 = max(0, round((start_s - t_first) * rate))
    i1 = audio.shape[1] if end_s is None else max(i0, round((end_s - t_first) * rate))
    section = audio[:, i0:i1]
    if section.shape[1] == 0:
        raise DownloadError(url, "empty audio (section beyond the end?)", True)
    sf.write(str(dst), np.ascontiguousarray(section.T), rate, format="FLAC", subtype="PCM_24")
    return dst


# ---------------------------------------------------------------- many


def download_all(requests: list[dict[str, Any]], cfg: DownloadConfig,
                 cache_dir: str | Path, progress: bool = True) -> list[Path | DownloadError]:
    """Fetch many requests, at most ``cfg.concurrency`` at once.

    Each request has ``url`` and optional ``start_s``/``end_s``; one that
    already carries an ``error`` (a bad line or row) is not downloaded.
    Identical requests are downloaded once.

    Returns:
        One entry per request, in request order: the cached file's Path, or
        the DownloadError that stopped it.
    """
    results: list[Path | DownloadError | None] = [None] * len(requests)
    by_key: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
        url = str(req.get("url") or "")
        if req.get("error") or not url:
            results[i] = DownloadError(url, str(req.get("error") or "no url"), True)
            continue
        by_key.setdefault(cache_key(url, req.get("start_s"), req.get("end_s")), []).append(i)
    with ThreadPoolExecutor(max_workers=max(1, cfg.concurrency)) as pool, \
            tqdm(total=len(requests), desc="download", unit="file",
                 disable=None if progress else True) as bar:
        bar.update(len(requests) - sum(map(len, by_key.values())))
        futures = {pool.submit(_fetch_guarded, requests[ix[0]], cfg, Path(cache_dir)): ix
                   for ix in by_key.values()}
        for fut in as_completed(futures):
            for i in futures[fut]:
                results[i] = fut.result()
            bar.update(len(futures[fut]))
    failed = sum(isinstance(r, DownloadError) for r in results)
    log.info("downloads: %d ok, %d failed", len(results) - failed, failed)
    return results  # type: ignore[return-value]


def _fetch_guarded(req: dict[str, Any], cfg: DownloadConfig, cache_dir: Path) -> Path | DownloadError:
    url = req["url"]
    try:
        return fetch(url, req.get("start_s"), req.get("end_s"), cfg, cache_dir)
    except DownloadError as e:
        log.warning("%s", e)
        return e
    except Exception as e:  # every input must end in a result or a reject
        log.exception("unexpected error downloading %s", url)
        return DownloadError(url, f"error: {type(e).__name__}: {e}")


def main(argv: list[str] | None = None) -> int:
    """CLI: download a URL list or a MusicCaps CSV into a cache folder."""
    from cantus.config import load_section
    from cantus.ingest.params import IngestConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--cache", required=True, help="download cache folder")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--urls", help="text file: URL[<TAB>caption] per line")
    src.add_argument("--musiccaps", help="MusicCaps-format CSV")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_section(args.params, "ingest", IngestConfig).download
    reqs = (read_url_list(args.urls) if args.urls
            else read_musiccaps(args.musiccaps, cfg.url_template))
    results = download_all(reqs, cfg, args.cache)
    for req, res in zip(reqs, results):
        print(f"{'FAIL' if isinstance(res, DownloadError) else 'ok  '}\t{req.get('url')}\t"
              f"{res.reason if isinstance(res, DownloadError) else res}")
    return 1 if any(isinstance(r, DownloadError) for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
