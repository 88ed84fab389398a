"""Download the audio of URLs (or sections of them) with yt-dlp into a cache.

Goes in: requests ``{"url", "start_s", "end_s"}`` (as made by
``cantus.ingest.url_lists`` from a URL list or a MusicCaps CSV; re-exported
here) and the ``ingest.download`` section of ``params.yaml``
(``DownloadConfig``). Comes out: for each request, a file in a download cache,
or a ``DownloadError`` naming the URL, a short reason ("unreachable",
"timeout (...)", "server error (HTTP 503)", "unavailable (HTTP 404)", "no
audio stream") and whether it is permanent. Only successes are cached: a
failure, permanent or transient, is tried again by the next run.

Cache layout (``cache_dir``), keyed by ``sha256`` of (url, start_s, end_s)::

    <key>.<ext>    the audio: the file as served for a whole download, or FLAC
                   (source rate and channels) for a section
    <key>.json     sidecar: url, section, title, ext, yt-dlp metadata
                   (duration, uploader, licence, ...) and a probe of the file

The media file is moved into place before its sidecar, both with
``os.replace``, so a sidecar marks a finished download and a rerun finds it
without touching the network.

How a request is fetched:

- yt-dlp runs in this process, never with an ffmpeg (it is pointed at an
  empty folder), so it starts no subprocess that could hang or show a cookie
  on its command line. Its sockets time out after ``timeout_s``; a whole
  download is stopped past ``max_bytes`` or ``deadline_s``.
- Sections: yt-dlp finds the media URL (no download), then the ffmpeg binary
  (``PATH`` or ``imageio-ffmpeg``) cuts [start_s, end_s] with HTTP range
  requests into FLAC, with ``-rw_timeout`` (``timeout_s``), ``-fs``
  (``max_bytes``) and a subprocess timeout (``deadline_s``). Its command line
  carries no cookie and no proxy (the proxy goes in its environment). Where
  ffmpeg is missing or cannot cut (or the media URL needs cookies), the whole
  file is downloaded by yt-dlp and the section is decoded from it with PyAV,
  streaming: only the section is ever in memory.
- Caps: a section or media longer than ``max_seconds`` is refused (before
  the download where yt-dlp knows the duration), and so is a file over
  ``max_bytes``.
- Retries: a transient failure is retried ``retries`` times with backoff from
  ``backoff_s``; a permanent one is not. After ``breaker`` network failures in
  a row (unreachable, timeout, HTTP 5xx/429), the circuit breaker opens and
  the remaining requests fail at once as transient, naming the cause.
- Secrets come from the environment, never from params (which land in
  dvc.lock): ``CANTUS_COOKIES`` (a cookies.txt path, read once per process
  and handed to each yt-dlp instance as a private copy, so the original is
  never rewritten) and ``CANTUS_PROXY`` (over ``proxy``).

Run: ``python -m cantus.ingest.download --params params.yaml --cache DIR
(--urls LIST | --musiccaps CSV)``.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import av
import soundfile as sf
import yt_dlp
from tqdm import tqdm

from cantus.config import ConfigError
from cantus.ingest.params import DownloadConfig
from cantus.ingest.url_lists import parse_aspect_list, read_musiccaps, read_url_list

__all__ = ["DownloadError", "cache_key", "download_all", "fetch", "main",
           "parse_aspect_list", "read_musiccaps", "read_url_list"]  # parsers re-exported

log = logging.getLogger(__name__)
_ydl_log = logging.getLogger(__name__ + ".yt_dlp")  # silence separately if too chatty

COOKIES_ENV, PROXY_ENV = "CANTUS_COOKIES", "CANTUS_PROXY"
# (pattern in yt-dlp's message, short reason, permanent?) checked in order.
_MESSAGE_REASONS = (
    ("requested format is not available", "no audio stream", True),
    ("unsupported url", "unsupported URL", True),
    ("private video", "unavailable (private)", True),
    ("video unavailable", "unavailable", True),
    ("has been removed", "unavailable (removed)", True),
    ("is not available", "unavailable", True),
    ("sign in to confirm", "needs login (cookies)", True),
)
_PERMANENT_HTTP = {400, 401, 404, 410, 451}
_SECRET_HEADERS = {"cookie", "authorization", "proxy-authorization"}
_FFMPEG_PROTOCOLS = {"http", "https", "m3u8", "m3u8_native"}
_INFO_KEYS = ("id", "title", "uploader", "uploader_id", "channel", "license",
              "duration", "upload_date", "webpage_url", "extractor_key",
              "format_id", "acodec", "abr", "asr", "audio_channels")


class DownloadError(Exception):
    """A URL could not be fetched; ``reason`` is short and stable for rejects tables.

    ``permanent``: retrying cannot help (HTTP 404, private video, no audio, a
    cap). ``network``: the host or the network failed (unreachable, timeout,
    HTTP 5xx/429); these count towards the circuit breaker.
    """

    def __init__(self, url: str, reason: str, permanent: bool = False, network: bool = False):
        super().__init__(url, reason, permanent, network)
        self.url, self.reason, self.permanent, self.network = url, reason, permanent, network

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


# ---------------------------------------------------------------- session


class _Breaker:
    """Opens after ``limit`` network failures in a row (0: never); any other
    outcome closes the count. ``wait`` sleeps unless and until it opens."""

    def __init__(self, limit: int):
        self.limit, self.run, self.last = limit, 0, ""
        self._open = threading.Event()
        self._lock = threading.Lock()

    def record(self, err: DownloadError | None) -> None:
        with self._lock:
            if err is None or not err.network:
                self.run = 0
                return
            self.run += 1
            self.last = err.reason
            if self.limit and self.run >= self.limit and not self._open.is_set():
                log.warning("circuit breaker open after %d network failures in a row (last: "
                            "%s); the remaining downloads are not tried", self.run, err.reason)
                self._open.set()

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    def error(self, url: str) -> DownloadError:
        return DownloadError(url, f"{self.last.split(' (')[0]}: not tried, the circuit breaker "
                                  f"opened after {self.limit} network failures in a row "
                                  f"(last: {self.last}; ingest.download.breaker)",
                             permanent=False, network=False)

    def wait(self, seconds: float) -> bool:
        """Sleep ``seconds``; True (at once) if the breaker is or becomes open."""
        return self._open.wait(seconds)


@functools.lru_cache(maxsize=4)
def _cookie_bytes(path: str) -> bytes:
    """The cookies file, read once per process."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{COOKIES_ENV}={path}: cannot read the cookies file "
                          f"({e.strerror or e})") from e


@functools.lru_cache(maxsize=1)
def _no_ffmpeg_dir() -> str:
    """An empty folder: yt-dlp pointed at it finds no ffmpeg and starts none."""
    return tempfile.mkdtemp(prefix="cantus-no-ffmpeg-")


class _Session:
    """What the downloads of one ``download_all`` share: the circuit breaker,
    secrets from the environment, private cookie copies and one extracting
    yt-dlp instance per thread. Close it to delete the copies."""

    def __init__(self, cfg: DownloadConfig):
        self.cfg = cfg
        self.breaker = _Breaker(cfg.breaker)
        path = os.environ.get(COOKIES_ENV, "")
        self.cookies = _cookie_bytes(path) if path else None
        self.proxy = os.environ.get(PROXY_ENV) or cfg.proxy
        self._local = threading.local()
        self._lock = threading.Lock()
        self._ydls: list[yt_dlp.YoutubeDL] = []
        self._files: list[str] = []

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            ydls, files, self._ydls, self._files = self._ydls, self._files, [], []
        for ydl in ydls:
            try:
                ydl.close()
            except Exception:  # closing saves cookies into the private copy only
                log.debug("closing yt-dlp failed", exc_info=True)
        for f in files:
            with contextlib.suppress(OSError):
                os.remove(f)

    def opts(self, **extra: Any) -> dict[str, Any]:
        """yt-dlp options; each call with cookies gets its own private copy."""
        cfg = self.cfg
        opts: dict[str, Any] = {
            "format": cfg.format,
            "socket_timeout": cfg.timeout_s,
            # fetch() owns retries (with backoff); yt-dlp's own would multiply them
            "retries": 0, "extractor_retries": 0, "fragment_retries": cfg.retries,
            "noplaylist": True, "playlist_items": "1",
            "quiet": True, "noprogress": True, "color": "never",
            "logger": _YdlLogger(),
            "cachedir": False, "overwrites": True, "continuedl": False,
            "ffmpeg_location": _no_ffmpeg_dir(), "fixup": "never",
            "external_downloader": {"default": "native"}, "hls_prefer_native": True,
            # YouTube needs a JS runtime (plus the yt-dlp-ejs package); yt-dlp
            # only tries deno unless told, so offer whichever is installed
            "js_runtimes": {n: {} for n in ("deno", "node", "bun") if shutil.which(n)}
            or {"deno": {}},
        }
        if self.proxy:
            opts["proxy"] = self.proxy
        if self.cookies is not None:
            fd, copy = tempfile.mkstemp(prefix="cantus-cookies-", suffix=".txt")  # mode 0600
            with os.fdopen(fd, "wb") as f:
                f.write(self.cookies)
            with self._lock:
                self._files.append(copy)
            opts["cookiefile"] = copy
        opts.update(extra)
        return opts

    def extractor(self) -> yt_dlp.YoutubeDL:
        """This thread's yt-dlp for finding media URLs (making one costs ~50 ms)."""
        ydl = getattr(self._local, "ydl", None)
        if ydl is None:
            ydl = self._local.ydl = yt_dlp.YoutubeDL(self.opts())
            with self._lock:
                self._ydls.append(ydl)
        return ydl


# ---------------------------------------------------------------- download


def fetch(url: str, start_s: float | None, end_s: float | None,
          cfg: DownloadConfig, cache_dir: str | Path, session: _Session | None = None) -> Path:
    """Download one URL (or its section [start_s, end_s]) into the cache.

    A cached result returns at once without network access. Transient
    failures are retried ``cfg.retries`` times, waiting ``cfg.backoff_s``
    and doubling; permanent ones (HTTP 404, unavailable, no audio, a cap)
    are not, nor are any once ``session``'s circuit breaker is open.

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
    if end_s is not None and end_s - (start_s or 0) > cfg.max_seconds:
        raise DownloadError(url, f"section of {end_s - (start_s or 0):g} s is over "
                                 f"ingest.download.max_seconds = {cfg.max_seconds:g}", True)
    if session is None:
        with _Session(cfg) as own:
            return fetch(url, start_s, end_s, cfg, cache_dir, own)
    cache_dir.mkdir(parents=True, exist_ok=True)
    delay, attempt = cfg.backoff_s, 0
    while True:
        if session.breaker.is_open:
            raise session.breaker.error(url)
        try:
            path = _fetch_once(url, start_s, end_s, session, cache_dir, key)
        except DownloadError as e:
            session.breaker.record(e)
            attempt += 1
            if e.permanent or attempt > cfg.retries:
                raise
            log.info("retry %d/%d of %s in %.2fs (%s)", attempt, cfg.retries, url, delay, e.reason)
            if session.breaker.wait(delay):
                raise
            delay *= 2
        else:
            session.breaker.record(None)
            return path


def _fetch_once(url: str, start_s: float | None, end_s: float | None,
                session: _Session, cache_dir: Path, key: str) -> Path:
    section = start_s is not None or end_s is not None
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir))
    try:
        method, media, info = None, None, {}
        if section:
            method = "local_trim"
            info, media = _section_ffmpeg(url, start_s or 0.0, end_s, session, tmp)
            if media is not None:
                method = "ffmpeg"
        if media is None:
            info, media = _ydl_whole(url, session, tmp)
            if section:
                media = _trim_local(url, media, start_s or 0.0, end_s, tmp / "section.flac")
        ext = "flac" if section else (media.suffix.lstrip(".") or "bin")
        probe = _probe(url, media, decode=section, max_seconds=session.cfg.max_seconds)
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


def _extract(url: str, session: _Session) -> dict[str, Any]:
    """yt-dlp's info for ``url`` with a format chosen, downloading nothing."""
    try:
        info = session.extractor().extract_info(url, download=False) or {}
    except yt_dlp.utils.YoutubeDLError as e:
        raise _classified(url, e, session.cfg) from e
    if info.get("_type") == "playlist":
        info = next(iter(info.get("entries") or []), None) or {}
    return info


def _section_ffmpeg(url: str, start_s: float, end_s: float | None, session: _Session,
                    tmp: Path) -> tuple[dict[str, Any], Path | None]:
    """Cut the section with the ffmpeg binary; (info, FLAC) or (info, None) where
    ffmpeg is missing or cannot do it (the caller then downloads the file whole)."""
    cfg, ffmpeg = session.cfg, _ffmpeg_exe()
    if not ffmpeg:
        log.warning("%s: no ffmpeg; downloading whole file to cut the section", url)
        return {}, None
    info = _extract(url, session)
    fmt = next((f for f in info.get("requested_formats") or []
                if f.get("acodec") not in (None, "none")), info)
    media_url, protocol = fmt.get("url"), fmt.get("protocol") or info.get("protocol")
    why = None
    if not media_url or protocol not in _FFMPEG_PROTOCOLS:
        why = f"protocol {protocol!r} is not one ffmpeg cuts"
    elif session.proxy and not session.proxy.startswith("http"):
        why = "ffmpeg takes only http proxies"
    elif session.cookies is not None and \
            session.extractor().cookiejar.get_cookies_for_url(media_url):
        why = "the media URL needs cookies, which never go on a command line"
    if why:
        log.warning("%s: %s; downloading it whole to cut the section", url, why)
        return info, None
    headers = {k: v for k, v in (fmt.get("http_headers") or {}).items()
               if k.lower() not in _SECRET_HEADERS}
    dst = tmp / "section.flac"
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
           "-rw_timeout", str(int(cfg.timeout_s * 1e6))]
    if headers:
        cmd += ["-headers", "".join(f"{k}: {v}\r\n" for k, v in headers.items())]
    cmd += ["-ss", f"{start_s:.6f}"]
    if end_s is not None:
        cmd += ["-t", f"{end_s - start_s:.6f}"]
    cmd += ["-i", media_url, "-vn", "-sn", "-dn", "-c:a", "flac", "-fs", str(cfg.max_bytes),
            "-f", "flac", str(dst)]
    env = dict(os.environ)
    if session.proxy:
        env["http_proxy"] = env["HTTP_PROXY"] = session.proxy
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=env, timeout=cfg.deadline_s)
    except subprocess.TimeoutExpired as e:
        raise DownloadError(url, f"timeout (the section cut took over {cfg.deadline_s:g} s; "
                                 f"ingest.download.deadline_s)", network=True) from e
    if done.returncode == 0 and dst.is_file() and dst.stat().st_size > 0:
        if dst.stat().st_size >= cfg.max_bytes:
            raise DownloadError(url, f"too large: the section is over "
                                     f"ingest.download.max_bytes = {cfg.max_bytes}", True)
        return info, dst
    err = done.stderr.decode(errors="replace").strip().splitlines()
    log.warning("%s: ffmpeg could not cut the section (%s); downloading it whole", url,
                err[-1][:200] if err else f"exit {done.returncode}")
    dst.unlink(missing_ok=True)
    return info, None


class _Stop(Exception):
    """Raised from a progress hook to stop a download past a cap."""

    def __init__(self, error: DownloadError):
        super().__init__(error.reason)
        self.error = error


def _ydl_whole(url: str, session: _Session, tmp: Path) -> tuple[dict[str, Any], Path]:
    """Download ``url`` whole into ``tmp`` with yt-dlp's own (in-process) downloaders."""
    cfg = session.cfg
    start = time.monotonic()

    def too_long(info: dict, *, incomplete: bool = False) -> str | None:
        d = info.get("duration")
        if d and d > cfg.max_seconds:
            raise _Stop(DownloadError(url, f"too long: {d:g} s is over "
                                           f"ingest.download.max_seconds = {cfg.max_seconds:g}",
                                      True))
        return None

    def guard(d: dict) -> None:
        size = max(d.get("total_bytes") or 0, d.get("total_bytes_estimate") or 0,
                   d.get("downloaded_bytes") or 0)
        if size > cfg.max_bytes:
            raise _Stop(DownloadError(url, f"too large: over ingest.download.max_bytes = "
                                           f"{cfg.max_bytes} bytes", True))
        if time.monotonic() - start > cfg.deadline_s:
            raise _Stop(DownloadError(url, f"timeout (the download took over "
                                           f"{cfg.deadline_s:g} s; ingest.download.deadline_s)",
                                      network=True))

    opts = session.opts(outtmpl={"default": "media.%(ext)s"},
                        paths={"home": str(tmp), "temp": str(tmp)},
                        progress_hooks=[guard], match_filter=too_long)

    def run() -> dict:
        # FFmpegFD.available() reads this context variable, not the param
        from yt_dlp.postprocessor.ffmpeg import FFmpegPostProcessor
        FFmpegPostProcessor._ffmpeg_location.set(_no_ffmpeg_dir())
        with yt_dlp.YoutubeDL(opts) as ydl:
            return ydl.extract_info(url, download=True)

    try:
        info = contextvars.copy_context().run(run)
    except _Stop as e:
        raise e.error from None
    except yt_dlp.utils.YoutubeDLError as e:
        stop = _find_cause(e, _Stop)
        if stop is not None:
            raise stop.error from None
        raise _classified(url, e, cfg) from e
    if info and info.get("_type") == "playlist":
        info = next(iter(info.get("entries") or []), None) or {}
    files = [p for p in tmp.iterdir() if p.is_file() and not p.name.endswith((".part", ".ytdl"))]
    if len(files) != 1:
        raise DownloadError(url, "no file downloaded" if not files else "several files downloaded", True)
    return info or {}, files[0]


class _YdlLogger:
    """yt-dlp's messages into ``logging``; errors at debug (they are raised)."""

    def debug(self, msg: str) -> None:
        _ydl_log.debug("%s", msg)

    info = debug
    error = debug

    def warning(self, msg: str) -> None:
        _ydl_log.warning("%s", msg)


def _causes(exc: BaseException):
    """``exc`` and what it wraps (yt-dlp keeps causes in three places)."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        exc_info = getattr(e, "exc_info", None)
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__,
                 exc_info[1] if isinstance(exc_info, tuple) and len(exc_info) > 1 else None]


def _find_cause(exc: BaseException, tp: type) -> Any:
    return next((e for e in _causes(exc) if isinstance(e, tp)), None)


def _classified(url: str, exc: BaseException, cfg: DownloadConfig) -> DownloadError:
    """The DownloadError for a yt-dlp error: reason, permanent?, network?"""
    from yt_dlp.networking.exceptions import HTTPError, TransportError

    for e in _causes(exc):
        if isinstance(e, HTTPError):
            if e.status in _PERMANENT_HTTP:
                return DownloadError(url, f"unavailable (HTTP {e.status})", True)
            if e.status == 429:
                return DownloadError(url, "rate limited (HTTP 429)", network=True)
            if e.status >= 500:
                return DownloadError(url, f"server error (HTTP {e.status})", network=True)
            return DownloadError(url, f"refused (HTTP {e.status})")
        timed_out = isinstance(e, TimeoutError) or (
            isinstance(e, TransportError) and "timed out" in str(e).lower())
        if timed_out:
            return DownloadError(url, f"timeout (no answer within {cfg.timeout_s:g} s)",
                                 network=True)
        if isinstance(e, TransportError):
            return DownloadError(url, "unreachable", network=True)
    msg = str(exc).lower()
    if "timed out" in msg:
        return DownloadError(url, f"timeout (no answer within {cfg.timeout_s:g} s)", network=True)
    for pattern, reason, permanent in _MESSAGE_REASONS:
        if pattern in msg:
            return DownloadError(url, reason, permanent)
    short = re.sub(r"^error:\s*", "", str(exc).splitlines()[0].strip(), flags=re.I)
    return DownloadError(url, f"failed: {short[:160]}")


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


def _probe(url: str, path: Path, decode: bool, max_seconds: float) -> dict[str, Any]:
    """Container facts of a downloaded file; raises if it holds no audio or is too long.

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
    if duration is not None and duration > max_seconds * 1.001:
        raise DownloadError(url, f"too long: {duration:.1f} s is over "
                                 f"ingest.download.max_seconds = {max_seconds:g}", True)
    return info


def _trim_local(url: str, src: Path, start_s: float, end_s: float | None, dst: Path) -> Path:
    """Write [start_s, end_s) of ``src`` as FLAC, decoding with PyAV frame by frame.

    Seeks near ``start_s`` first and stops at ``end_s``, and each frame goes
    to the FLAC writer as it is decoded, so memory holds one frame, never the
    file.
    """
    out, written = None, 0
    try:
        with av.open(str(src)) as c:
            if not c.streams.audio:
                raise DownloadError(url, "no audio stream", True)
            st = c.streams.audio[0]
            for rate, t0, a in _frames_from(c, st, start_s):  # a: float32 (N, C)
                if end_s is not None and t0 >= end_s:
                    break
                i0 = max(0, round((start_s - t0) * rate))
                i1 = len(a) if end_s is None else min(len(a), round((end_s - t0) * rate))
                if i1 <= i0:
                    continue
                if out is None:
                    out = sf.SoundFile(str(dst), "w", rate, a.shape[1], "PCM_24", format="FLAC")
                out.write(a[i0:i1])
                written += i1 - i0
    except av.error.FFmpegError as e:
        raise DownloadError(url, "not a decodable media file", True) from e
    finally:
        if out is not None:
            out.close()
    if written == 0:
        raise DownloadError(url, "empty audio (section beyond the end?)", True)
    return dst


def _frames_from(c, st, start_s: float):
    """(rate, start time, float32[N, C]) of each decoded frame that ends after ``start_s``."""
    rate = st.rate
    if start_s > 0 and st.time_base:
        try:  # to the keyframe at or before start_s; frame times say where we are
            c.seek(int(start_s / st.time_base), stream=st, backward=True)
        except av.error.FFmpegError:
            c.seek(0, stream=st)
    resampler = av.AudioResampler(format="flt")  # packed float32; layout and rate kept
    pos = 0.0  # time of the next sample, for frames without a time
    for frame in c.decode(st):
        for fr in resampler.resample(frame):
            t0 = fr.time if fr.time is not None else pos
            pos = t0 + fr.samples / rate
            if pos > start_s:
                yield rate, t0, fr.to_ndarray().reshape(fr.samples, -1)


# ---------------------------------------------------------------- many


def download_all(requests: list[dict[str, Any]], cfg: DownloadConfig,
                 cache_dir: str | Path, progress: bool = True) -> list[Path | DownloadError]:
    """Fetch many requests, at most ``cfg.concurrency`` at once.

    Each request has ``url`` and optional ``start_s``/``end_s``; one that
    already carries an ``error`` (a bad line or row) is not downloaded.
    Identical requests are downloaded once. Once the circuit breaker opens
    (``cfg.breaker`` network failures in a row), the rest fail at once.

    Returns:
        One entry per request, in request order: the cached file's Path, or
        the DownloadError that stopped it.

    Raises:
        ConfigError: ``$CANTUS_COOKIES`` names a file that cannot be read.
    """
    results: list[Path | DownloadError | None] = [None] * len(requests)
    by_key: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
        url = str(req.get("url") or "")
        if req.get("error") or not url:
            results[i] = DownloadError(url, str(req.get("error") or "no url"), True)
            continue
        by_key.setdefault(cache_key(url, req.get("start_s"), req.get("end_s")), []).append(i)
    with _Session(cfg) as session, \
            ThreadPoolExecutor(max_workers=max(1, cfg.concurrency)) as pool, \
            tqdm(total=len(requests), desc="download", unit="file",
                 disable=None if progress else True) as bar:
        bar.update(len(requests) - sum(map(len, by_key.values())))
        futures = {pool.submit(_fetch_guarded, requests[ix[0]], cfg, Path(cache_dir), session): ix
                   for ix in by_key.values()}
        for fut in as_completed(futures):
            for i in futures[fut]:
                results[i] = fut.result()
            bar.update(len(futures[fut]))
    failed = [r for r in results if isinstance(r, DownloadError)]
    log.info("downloads: %d ok, %d failed (%d transient)", len(results) - len(failed),
             len(failed), sum(not r.permanent for r in failed))
    return results  # type: ignore[return-value]


def _fetch_guarded(req: dict[str, Any], cfg: DownloadConfig, cache_dir: Path,
                   session: _Session) -> Path | DownloadError:
    url = req["url"]
    try:
        return fetch(url, req.get("start_s"), req.get("end_s"), cfg, cache_dir, session=session)
    except DownloadError as e:
        (log.debug if session.breaker.is_open else log.warning)("%s", e)
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
