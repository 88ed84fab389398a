"""Ingest with a network that is down, comes back, or stalls (loopback servers only).

- 5,521 MusicCaps rows (the size of MusicCaps) against a host that refuses
  connections: the circuit breaker stops the downloads, every row is a
  ``download_transient`` reject naming the cause, and the stage fails naming
  the count instead of locking an empty dataset;
- the same rows with the server back: retried, and the rows it serves end in
  the manifest;
- a server that accepts connections and never answers: a timeout reject;
- ffmpeg section cuts that stall time out (``-rw_timeout``) and fall back;
- caps on download size and duration, and cookies that never reach ffmpeg.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import http.server
import json
import os
import socket
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cantus.ingest import download as dl
from cantus.ingest import run as ingest
from cantus.ingest.download import DownloadError, download_all, fetch
from conftest import melody, write
from test_download import CFG, SR, _Handler, closed_port, server, tone_steps  # noqa: F401

MUSICCAPS_ROWS = 5521
SERVED = ("yt000000007", "yt000002500", "yt000005520")  # rows the server has audio for
needs_ffmpeg = pytest.mark.skipif(dl._ffmpeg_exe() is None, reason="no ffmpeg (imageio-ffmpeg)")


def musiccaps_csv(path: Path, rows: int) -> Path:
    """A MusicCaps-format CSV of ``rows`` rows, ytids yt000000000.., sections [30, 40]."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ytid", "start_s", "end_s", "audioset_positive_labels", "aspect_list",
                    "caption", "author_id", "is_balanced_subset", "is_audioset_eval"])
        for i in range(rows):
            w.writerow([f"yt{i:09d}", 30, 40, "/m/04rlf", "['piano', 'slow']",
                        f"row {i}: a slow piano piece", i % 10, "False", "False"])
    return path


@contextlib.contextmanager
def http_server(root: Path, port: int = 0, handler: type = _Handler):
    """test_download's media server on 127.0.0.1:``port`` (0: any free port)."""
    h = type("Handler", (handler,), {"root": root, "log": [], "failures": {}})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), h)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.base, srv.log = f"http://127.0.0.1:{srv.server_address[1]}", h.log
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(10)


@contextlib.contextmanager
def silent_server():
    """Accepts connections on 127.0.0.1 and never answers; yields its base URL."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(64)
    lsock.settimeout(0.2)
    held, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                held.append(lsock.accept()[0])
            except OSError:  # timeout: look at stop again
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{lsock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for s in held:
            s.close()
        lsock.close()


def remote_cfg(cfg, **download):
    return dataclasses.replace(cfg, download=dataclasses.replace(cfg.download, **download))


def tables(out: Path):
    return (pq.read_table(out / "manifest.parquet").to_pylist(),
            pq.read_table(out / "rejects.parquet").to_pylist())


@pytest.mark.slow  # about 1 min 20 s on 2 cores, nearly all of it the 5,518 404s of the rerun
@needs_ffmpeg
def test_musiccaps_offline_then_back(tmp_path, cfg, capsys):
    csv_path = musiccaps_csv(tmp_path / "musiccaps.csv", MUSICCAPS_ROWS)
    port = closed_port()  # nothing listens here: connections are refused
    # the project's retry and breaker params; only the host is the test's
    cfg = remote_cfg(cfg, url_template=f"http://127.0.0.1:{port}/{{ytid}}.wav")
    inputs = ingest.Inputs(musiccaps=(str(csv_path),))
    t0 = time.perf_counter()
    with pytest.raises(ingest.IngestError) as e:
        ingest.run(cfg, inputs, tmp_path / "out", tmp_path / "cache")
    offline_s = time.perf_counter() - t0
    assert f"{MUSICCAPS_ROWS} of {MUSICCAPS_ROWS} downloads failed transiently" in str(e.value)
    assert "unreachable" in str(e.value) and "max_failed_fraction" in str(e.value)
    manifest, rejects = tables(tmp_path / "out")
    assert manifest == [] and len(rejects) == MUSICCAPS_ROWS  # every row accounted for
    assert len({r["input"] for r in rejects}) == MUSICCAPS_ROWS
    assert {r["reason"] for r in rejects} == {"download_transient"}
    assert all(r["detail"].startswith(r["input"] + ": unreachable") for r in rejects)
    tripped = [r for r in rejects if "circuit breaker" in r["detail"]]
    assert len(tripped) >= MUSICCAPS_ROWS - 4 * cfg.download.breaker
    assert offline_s < 120, offline_s  # the bound; the time is reported below
    assert not list((tmp_path / "cache" / "downloads").glob("*.json"))  # no failure cached

    # the server is back (on the same port): the same run retries every row
    root = tmp_path / "www"
    for ytid in SERVED:
        write(root / f"{ytid}.wav", melody(int(ytid[2:]), 45, SR), SR, subtype="PCM_16")
    t0 = time.perf_counter()
    with http_server(root, port) as srv:
        stats = ingest.run(cfg, inputs, tmp_path / "out", tmp_path / "cache")
    back_s = time.perf_counter() - t0
    manifest, rejects = tables(tmp_path / "out")
    got = {m["source"] for m in manifest}
    assert got == {f"{srv.base}/{y}.wav#t=30,40" for y in SERVED}
    assert all(abs(m["duration_s"] - 10.0) < 0.05 for m in manifest)
    assert len(rejects) == MUSICCAPS_ROWS - len(SERVED)
    assert {r["reason"] for r in rejects} == {"download_failed"}  # 404: permanent
    assert all("HTTP 404" in r["detail"] for r in rejects)
    assert stats["inputs_in_output"] + stats["inputs_rejected"] == MUSICCAPS_ROWS
    with capsys.disabled():
        print(f"\n{MUSICCAPS_ROWS} MusicCaps rows: unreachable host {offline_s:.1f} s, "
              f"server back {back_s:.1f} s")


def test_server_that_never_answers_is_a_timeout_reject(tmp_path, cfg, server):  # noqa: F811
    write(server.root / "fine.wav", melody(31, 12, SR), SR, subtype="PCM_16")
    with silent_server() as dead:
        urls = tmp_path / "urls.txt"
        urls.write_text(f"{dead}/a.wav\n{dead}/b.wav\n{server.base}/fine.wav\n")
        cfg = remote_cfg(cfg, timeout_s=1.0, retries=1, backoff_s=0.1)
        t0 = time.perf_counter()
        with pytest.raises(ingest.IngestError, match="2 of 3 downloads failed transiently "
                                                     r"\(timeout: 2\)"):
            ingest.run(cfg, ingest.Inputs(urls=(str(urls),)), tmp_path / "out",
                       tmp_path / "cache")
        took = time.perf_counter() - t0
    manifest, rejects = tables(tmp_path / "out")
    assert {m["source"] for m in manifest} == {f"{server.base}/fine.wav"}
    assert sorted(r["input"] for r in rejects) == [f"{dead}/a.wav", f"{dead}/b.wav"]
    for r in rejects:
        assert r["reason"] == "download_transient"
        assert r["detail"] == f"{r['input']}: timeout (no answer within 1 s)"
    assert took < 60, took  # 2 tries of 1 s each per URL, not a hang


class _StallFfmpeg(_Handler):
    """Never answers ffmpeg (known by the ``Icy-MetaData`` header it sends); serves the rest."""

    def _serve(self, body: bool) -> None:
        if self.headers.get("Icy-MetaData"):
            self.log.append((self.command, self.path, "ffmpeg"))
            time.sleep(4)  # past the client's timeout; the server thread then gives up
            return
        super()._serve(body)


@needs_ffmpeg
def test_stalled_ffmpeg_cut_times_out_and_falls_back(tmp_path):
    root = tmp_path / "www"
    write(root / "long.wav", tone_steps(8), SR, subtype="PCM_16")
    with http_server(root, handler=_StallFfmpeg) as srv:
        t0 = time.perf_counter()
        path = fetch(f"{srv.base}/long.wav", 5.0, 7.0,
                     dataclasses.replace(CFG, timeout_s=1.0), tmp_path / "cache")
        took = time.perf_counter() - t0
        stalled = [r for _, _, r in srv.log if r == "ffmpeg"]
    assert stalled  # ffmpeg asked, and was left hanging
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["section_method"] == "local_trim"  # after ffmpeg's -rw_timeout
    assert abs(meta["probe"]["duration_s"] - 2.0) < 0.01
    assert took < 30, took


def test_unreachable_breaker_stops_retries_early(tmp_path):
    port = closed_port()
    cfg = dataclasses.replace(CFG, retries=3, backoff_s=5.0, breaker=3, concurrency=2)
    reqs = [{"url": f"http://127.0.0.1:{port}/{i}.wav"} for i in range(50)]
    t0 = time.perf_counter()
    res = download_all(reqs, cfg, tmp_path, progress=False)
    took = time.perf_counter() - t0
    assert all(isinstance(r, DownloadError) and not r.permanent for r in res)
    assert all(r.reason.startswith("unreachable") for r in res)
    assert sum("circuit breaker" in r.reason for r in res) >= 50 - 2 - 1
    assert took < 5.0 * 3, took  # a backoff sleep is cut short when the breaker opens


def test_caps_on_size_and_duration(server, tmp_path):  # noqa: F811
    url = f"{server.base}/steps.wav"  # 6 s, 288 kB
    with pytest.raises(DownloadError, match="too large.*max_bytes") as e:
        fetch(url, None, None, dataclasses.replace(CFG, max_bytes=1 << 16), tmp_path)
    assert e.value.permanent
    with pytest.raises(DownloadError, match="too long.*max_seconds") as e:
        fetch(url, None, None, dataclasses.replace(CFG, max_seconds=3.0), tmp_path)
    assert e.value.permanent
    server.log.clear()
    with pytest.raises(DownloadError, match="section of 5 s is over"):
        fetch(url, 0.0, 5.0, dataclasses.replace(CFG, max_seconds=3.0), tmp_path)
    assert server.log == []  # refused before any request
    assert not list(tmp_path.glob("*.json"))


def test_local_trim_streams(tmp_path):
    """The fallback cut never holds the file's decoded audio, only the section."""
    import tracemalloc

    src = write(tmp_path / "long.wav", melody(5, 120, 48000), 48000, subtype="PCM_16")
    tracemalloc.start()
    try:
        dl._trim_local("u", src, 60.0, 61.0, tmp_path / "cut.flac")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    import soundfile as sf

    x, rate = sf.read(tmp_path / "cut.flac")
    assert rate == 48000 and len(x) == 48000
    assert peak < 4 << 20, peak  # the whole file decodes to 23 MB of float32


def _cookie_file(path: Path, domain: str, value: str) -> Path:
    path.write_text("# Netscape HTTP Cookie File\n"
                    f"{domain}\tFALSE\t/\tFALSE\t4102444800\tsession\t{value}\n")
    return path


@needs_ffmpeg
@pytest.mark.parametrize("domain", ["127.0.0.1", "example.org"])
def test_cookies_never_reach_ffmpeg_and_file_is_not_rewritten(
        server, tmp_path, monkeypatch, domain):  # noqa: F811
    cookies = _cookie_file(tmp_path / "cookies.txt", domain, "s3cr3t-value")
    before = (cookies.read_bytes(), cookies.stat().st_mtime_ns)
    monkeypatch.setenv(dl.COOKIES_ENV, str(cookies))
    dl._cookie_bytes.cache_clear()
    commands = []
    real_run = dl.subprocess.run

    def spy(cmd, *a, **kw):
        commands.append(cmd)
        return real_run(cmd, *a, **kw)

    monkeypatch.setattr(dl.subprocess, "run", spy)
    path = fetch(f"{server.base}/steps.wav", 1.0, 3.0, CFG, tmp_path / "cache")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert abs(meta["probe"]["duration_s"] - 2.0) < 0.01
    # a cookie for the media host keeps the cut in this process; others let ffmpeg cut
    assert meta["section_method"] == ("local_trim" if domain == "127.0.0.1" else "ffmpeg")
    assert bool(commands) == (domain != "127.0.0.1")
    assert not any("s3cr3t" in arg for cmd in commands for arg in cmd)
    assert (cookies.read_bytes(), cookies.stat().st_mtime_ns) == before
    assert not [p for p in Path(dl.tempfile.gettempdir()).glob("cantus-cookies-*")
                if p.stat().st_mtime_ns >= before[1]]  # private copies removed


def test_unreadable_cookies_env_is_a_config_error(tmp_path, monkeypatch):
    from cantus.config import ConfigError

    monkeypatch.setenv(dl.COOKIES_ENV, str(tmp_path / "nope.txt"))
    dl._cookie_bytes.cache_clear()
    with pytest.raises(ConfigError, match="CANTUS_COOKIES=.*nope.txt"):
        download_all([{"url": "http://127.0.0.1:9/x.wav"}], CFG, tmp_path, progress=False)


def test_proxy_from_the_environment(monkeypatch):
    monkeypatch.setenv(dl.PROXY_ENV, "http://user:pw@127.0.0.1:3128")
    with dl._Session(dataclasses.replace(CFG, proxy="http://127.0.0.1:8080")) as s:
        assert s.proxy == "http://user:pw@127.0.0.1:3128" and s.opts()["proxy"] == s.proxy
    monkeypatch.delenv(dl.PROXY_ENV)
    with dl._Session(dataclasses.replace(CFG, proxy="http://127.0.0.1:8080")) as s:
        assert s.opts()["proxy"] == "http://127.0.0.1:8080"
    assert os.environ.get(dl.PROXY_ENV) is None
