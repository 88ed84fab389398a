"""cantus.ingest.download and .url_lists: yt-dlp downloads against a local HTTP server, and the URL-list / MusicCaps parsers.

The server runs on 127.0.0.1 in a thread, serves media made here (tone steps:
second ``i`` of ``steps.wav`` is a sine at ``200 + 100 * i`` Hz, so a section's
offset can be read off its pitch), supports HTTP range requests like a real
media host, and records every request so tests can count network access.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import pickle
import re
import socket
import threading
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from cantus.ingest import download as dl
from cantus.ingest.download import DownloadError, download_all, fetch
from cantus.ingest.params import DownloadConfig
from cantus.ingest.url_lists import parse_aspect_list, read_musiccaps, read_url_list

SR = 24000
STEP_S = 6

CFG = DownloadConfig(url_template="unused/{ytid}", concurrency=2, retries=0, backoff_s=0.01,
                     timeout_s=5.0, deadline_s=60.0, breaker=8, max_bytes=1 << 26,
                     max_seconds=3600.0, cookies="", proxy="", format="bestaudio/best")

_TYPES = {".wav": "audio/wav", ".ogg": "audio/ogg", ".flac": "audio/flac",
          ".mkv": "video/x-matroska", ".html": "text/html"}


def tone_steps(seconds: int = STEP_S) -> np.ndarray:
    t = np.arange(SR) / SR
    return np.concatenate([0.3 * np.sin(2 * np.pi * (200 + 100 * i) * t)
                           for i in range(seconds)]).astype(np.float32)


def pitch(x: np.ndarray, rate: int) -> float:
    """Dominant frequency (Hz) of a mono signal."""
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * rate / len(x))


def decode(path: Path) -> tuple[np.ndarray, int]:
    """Mono float audio and rate of any file PyAV reads."""
    with av.open(str(path)) as c:
        st = c.streams.audio[0]
        frames = [f.to_ndarray().astype(np.float64) for f in c.decode(st)]
        rate = st.rate
    x = np.concatenate(frames, axis=1)
    if x.dtype.kind == "i" or np.abs(x).max() > 2:  # packed integer PCM
        x = x / 32768.0
    return x.mean(axis=0), rate


class _Handler(http.server.BaseHTTPRequestHandler):
    root: Path
    log: list[tuple[str, str, str | None]]
    failures: dict[str, int]  # path -> remaining 503 answers before it is served

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        self.log.append((self.command, self.path, self.headers.get("Range")))
        name = self.path.split("?")[0].lstrip("/")
        if name.startswith("flaky/"):
            name = name.removeprefix("flaky/")
            if self.failures.get(name, 0) > 0:
                self.failures[name] -= 1
                self.send_error(503)
                return
        if name.startswith("down/"):
            self.send_error(503)
            return
        path = self.root / name
        if not name or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range") or "")
        if m and m[1]:
            a, b = int(m[1]), min(int(m[2]) if m[2] else len(data) - 1, len(data) - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {a}-{b}/{len(data)}")
            data = data[a:b + 1]
        else:
            self.send_response(200)
        self.send_header("Content-Type", _TYPES.get(path.suffix, "application/octet-stream"))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # ffmpeg stops reading after -t
                pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    sf.write(root / "steps.wav", tone_steps(), SR, subtype="PCM_16")
    sf.write(root / "steps.ogg", tone_steps(), SR, format="OGG")
    sf.write(root / "short.wav", tone_steps(2), SR, subtype="PCM_16")
    _video_only(root / "silent.mkv")
    (root / "page.html").write_text("<html><body>no media here</body></html>")
    handler = type("Handler", (_Handler,), {"root": root, "log": [], "failures": {}})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    srv.root, srv.log, srv.failures = root, handler.log, handler.failures
    yield srv
    srv.shutdown()
    srv.server_close()


def _video_only(path: Path) -> None:
    with av.open(str(path), "w") as c:
        st = c.add_stream("ffv1", rate=5)
        st.width, st.height, st.pix_fmt = 16, 16, "yuv420p"
        for _ in range(5):
            frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
            for p in st.encode(frame):
                c.mux(p)
        for p in st.encode():
            c.mux(p)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requests_for(server, name: str) -> int:
    return sum(1 for _, p, _ in server.log if p.lstrip("/").endswith(name))


# ---------------------------------------------------------------- parsers


def test_read_url_list_keeps_every_line(tmp_path):
    f = tmp_path / "urls.txt"
    f.write_text("# a comment\n\nhttps://example.org/a.mp3\n"
                 "http://example.org/b.ogg\tSolo piano, slow\n"
                 "  ftp://example.org/c.wav  \nnot a url\tcaption\n")
    items = read_url_list(f)
    assert [i["url"] for i in items] == ["https://example.org/a.mp3", "http://example.org/b.ogg",
                                         "ftp://example.org/c.wav", "not a url"]
    assert [i["caption"] for i in items] == ["", "Solo piano, slow", "", "caption"]
    assert [i["line"] for i in items] == [3, 4, 5, 6]
    assert ["error" in i for i in items] == [False, False, True, True]


@pytest.mark.parametrize("text, expected", [
    ("['low quality', \"80's pop\", 'guitar']", ["low quality", "80's pop", "guitar"]),
    ("[]", []),
    ("", []),
    (None, []),
    ("   ", []),
    ("[low quality, guitar]", ["low quality", "guitar"]),           # unquoted words
    ("['low quality', 'guitar'", ["low quality", "guitar"]),        # truncated
    ("['80's pop', 'rock']", ["80's pop", "rock"]),                 # bad quoting
    ("'just one'", ["just one"]),
    ("[1, 2.5, None]", ["1", "2.5", "None"]),
    ("['a', ' a ', 'b', '']", ["a", "b"]),                          # trimmed, de-duplicated
    ("[['nested'], 'x']", ["nested", "x"]),
    ("[" * 500 + "]" * 500, []),                                     # deep nesting: no crash
    ("__import__('os').system('true')", ["__import__('os').system('true')"]),  # never evaluated
])
def test_parse_aspect_list(text, expected):
    assert parse_aspect_list(text) == expected


def _write_csv(path: Path, rows: list[str], header: str | None = None) -> None:
    header = header or ("ytid,start_s,end_s,audioset_positive_labels,aspect_list,caption,"
                        "author_id,is_balanced_subset,is_audioset_eval")
    path.write_text("\n".join([header, *rows]) + "\n")


def test_read_musiccaps_rows_and_rejects(tmp_path):
    f = tmp_path / "mc.csv"
    _write_csv(f, [
        '-0Gj8-vB1q4,30,40,"/m/0140xf,/m/02cjck","[\'low quality\', ""80\'s pop""]",'
        '"A guitar, a drum.",4,False,True,cc-by',
        ',30,40,,[],no id,1,False,False,',
        'abcdefghijk,ten,40,,[],bad time,1,False,False,',
        'abcdefghijk,40,40,,[],empty,1,False,False,',
        'abcdefghijk,-1,5,,[],negative,1,False,False,',
        'abcdefghijk,nan,5,,[],nan,1,False,False,',
        'short,1,2',
    ], header="ytid,start_s,end_s,audioset_positive_labels,aspect_list,caption,"
              "author_id,is_balanced_subset,is_audioset_eval,license")
    items = read_musiccaps(f, "http://127.0.0.1:9/{ytid}.wav")
    assert len(items) == 7  # every row comes back
    good = items[0]
    assert good["url"] == "http://127.0.0.1:9/-0Gj8-vB1q4.wav"
    assert (good["start_s"], good["end_s"]) == (30.0, 40.0)
    assert good["aspect_list"] == ["low quality", "80's pop"]
    assert good["audioset_labels"] == ["/m/0140xf", "/m/02cjck"]
    assert good["caption"] == "A guitar, a drum."
    assert good["licence"] == "cc-by" and good["is_audioset_eval"] and not good["is_balanced_subset"]
    assert "error" not in good
    errors = [i.get("error", "") for i in items[1:]]
    assert "missing ytid" in errors[0]
    assert "non-numeric" in errors[1] and "non-numeric" in errors[4]
    assert "empty" in errors[2] and "negative" in errors[3]
    assert "error" not in items[6] and items[6]["aspect_list"] == [] and items[6]["caption"] == ""
    assert [i["line"] for i in items] == [2, 3, 4, 5, 6, 7, 8]


def test_read_musiccaps_rejects_bad_files(tmp_path):
    f = tmp_path / "mc.csv"
    _write_csv(f, ["x,1,2"], header="ytid,start_s,caption")
    with pytest.raises(ValueError, match="end_s"):
        read_musiccaps(f, "http://h/{ytid}")
    _write_csv(f, ["x,1,2"])
    with pytest.raises(ValueError, match="ytid"):
        read_musiccaps(f, "http://h/no-placeholder")


# ---------------------------------------------------------------- downloads


def test_url_list_download_whole_files(server, tmp_path):
    lst = tmp_path / "urls.txt"
    lst.write_text(f"{server.base}/steps.wav\tsteps\n{server.base}/steps.ogg\nnot-a-url\n")
    items = read_url_list(lst)
    results = download_all(items, CFG, tmp_path / "cache", progress=False)
    wav, ogg, bad = results
    assert wav.read_bytes() == (server.root / "steps.wav").read_bytes()  # no transcode
    assert ogg.suffix == ".ogg" and abs(decode(ogg)[0].size / SR - STEP_S) < 0.05
    assert isinstance(bad, DownloadError) and bad.reason == "not an http(s) URL"
    meta = json.loads(wav.with_suffix(".json").read_text())
    assert meta["url"] == items[0]["url"] and meta["ext"] == "wav" and meta["section"] is None
    assert meta["probe"]["sample_rate"] == SR and abs(meta["probe"]["duration_s"] - STEP_S) < 0.01
    assert not list((tmp_path / "cache").glob(".tmp-*"))  # temp dirs cleaned


def _section_checks(path: Path, start: float, end: float) -> None:
    x, rate = decode(path)
    assert rate == SR
    assert abs(x.size / rate - (end - start)) < 0.05
    head, tail = x[: int(0.4 * rate)], x[-int(0.4 * rate):]
    # second i of steps.wav is a tone at 200 + 100 i Hz
    assert abs(pitch(head, rate) - (200 + 100 * int(start))) < 15
    assert abs(pitch(tail, rate) - (200 + 100 * int(end - 0.01))) < 15


@pytest.mark.skipif(dl._ffmpeg_exe() is None, reason="no ffmpeg (install imageio-ffmpeg)")
def test_musiccaps_section_via_ffmpeg(server, tmp_path):
    f = tmp_path / "mc.csv"
    _write_csv(f, ["steps,1.0,3.5,,\"['tones']\",rising tones,1,False,False"])
    items = read_musiccaps(f, server.base + "/{ytid}.wav")
    server.log.clear()
    (path,) = download_all(items, CFG, tmp_path / "cache", progress=False)
    assert path.suffix == ".flac"
    _section_checks(path, 1.0, 3.5)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["section_method"] == "ffmpeg" and meta["section"] == [1.0, 3.5]
    assert meta["source_ext"] == "wav"
    # ffmpeg seeks with a range request instead of reading from byte 0
    assert any(r and not r.startswith("bytes=0-") for _, _, r in server.log)


def test_section_local_trim_without_ffmpeg(server, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(dl, "_ffmpeg_exe", lambda: None)
    path = fetch(f"{server.base}/steps.ogg", 2.0, 4.5, CFG, tmp_path)
    _section_checks(path, 2.0, 4.5)
    assert json.loads(path.with_suffix(".json").read_text())["section_method"] == "local_trim"
    assert any("no ffmpeg" in r.message for r in caplog.records)


def test_cache_hit_makes_no_requests(server, tmp_path):
    url = f"{server.base}/short.wav"
    first = fetch(url, None, None, CFG, tmp_path)
    n = requests_for(server, "short.wav")
    assert n >= 1
    assert fetch(url, None, None, CFG, tmp_path) == first
    assert download_all([{"url": url}] * 3, CFG, tmp_path, progress=False) == [first] * 3
    assert requests_for(server, "short.wav") == n
    # a section is a different cache entry
    assert dl.cache_key(url, 0.0, 1.0) != dl.cache_key(url) != dl.cache_key(url, 0.0, 1.5)


def test_duplicates_downloaded_once_and_order_kept(server, tmp_path):
    url = f"{server.base}/short.wav"
    server.log.clear()
    fetch(url, None, None, CFG, tmp_path / "one")  # what one download asks of the server
    once = requests_for(server, "short.wav")
    assert once >= 1
    server.log.clear()
    reqs = [{"url": url}, {"url": f"{server.base}/nope.wav"}, {"url": url}, {"url": url, "error": "x"}]
    res = download_all(reqs, dataclasses.replace(CFG, concurrency=3), tmp_path, progress=False)
    assert isinstance(res[0], Path) and res[0] == res[2]
    assert res[1].reason == "unavailable (HTTP 404)" and res[3].reason == "x"
    assert requests_for(server, "short.wav") == once  # three requests, one download


def test_download_all_bounds_concurrency(tmp_path, monkeypatch):
    lock, active, peak = threading.Lock(), [0], [0]

    def fake_fetch(url, start_s, end_s, cfg, cache_dir, session=None):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        threading.Event().wait(0.05)
        with lock:
            active[0] -= 1
        return Path(url)

    monkeypatch.setattr(dl, "fetch", fake_fetch)
    reqs = [{"url": f"http://h/{i}"} for i in range(8)]
    res = download_all(reqs, dataclasses.replace(CFG, concurrency=3), tmp_path, progress=False)
    assert res == [Path(r["url"]) for r in reqs] and peak[0] == 3


def test_unreachable(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/x.wav"
    with pytest.raises(DownloadError) as e:
        fetch(url, None, None, dataclasses.replace(CFG, retries=1), tmp_path)
    assert e.value.reason == "unreachable" and url in str(e.value)
    assert list(tmp_path.iterdir()) == []  # nothing cached, temp dirs removed


def test_404_is_permanent_and_not_retried(server, tmp_path):
    server.log.clear()
    url = f"{server.base}/missing.wav"
    with pytest.raises(DownloadError) as e:
        fetch(url, None, None, dataclasses.replace(CFG, retries=3), tmp_path)
    assert e.value.reason == "unavailable (HTTP 404)" and e.value.permanent
    assert "missing.wav" in str(e.value)
    assert requests_for(server, "missing.wav") == 1


def test_transient_errors_retried_with_bounded_backoff(server, tmp_path):
    server.log.clear()
    with pytest.raises(DownloadError) as e:
        fetch(f"{server.base}/down/a.wav", None, None, dataclasses.replace(CFG, retries=2), tmp_path)
    assert e.value.reason == "server error (HTTP 503)" and not e.value.permanent
    assert requests_for(server, "down/a.wav") == 3  # first try + 2 retries
    server.failures["short.wav"] = 2
    path = fetch(f"{server.base}/flaky/short.wav", None, None,
                 dataclasses.replace(CFG, retries=2), tmp_path)
    assert abs(decode(path)[0].size / SR - 2.0) < 0.01


def test_no_audio_stream_and_unsupported(server, tmp_path):
    with pytest.raises(DownloadError) as e:
        fetch(f"{server.base}/silent.mkv", None, None, CFG, tmp_path)
    assert e.value.reason == "no audio stream"
    with pytest.raises(DownloadError) as e:
        fetch(f"{server.base}/page.html", None, None, CFG, tmp_path)
    assert e.value.reason == "unsupported URL" and e.value.permanent
    assert not list(tmp_path.glob("*.json"))


def test_bad_section_rejected_without_network(server, tmp_path):
    server.log.clear()
    with pytest.raises(DownloadError, match="empty or negative section"):
        fetch(f"{server.base}/steps.wav", 3.0, 2.0, CFG, tmp_path)
    with pytest.raises(DownloadError, match="empty or negative section"):
        fetch(f"{server.base}/steps.wav", None, 0.0, CFG, tmp_path)
    assert server.log == []


@pytest.mark.parametrize("ffmpeg", [True, False])
def test_section_past_the_end(server, tmp_path, monkeypatch, ffmpeg):
    if not ffmpeg:
        monkeypatch.setattr(dl, "_ffmpeg_exe", lambda: None)
    elif dl._ffmpeg_exe() is None:
        pytest.skip("no ffmpeg")
    with pytest.raises(DownloadError, match="empty audio"):
        fetch(f"{server.base}/short.wav", 10.0, 12.0, CFG, tmp_path)
    assert not list(tmp_path.glob("*.json"))


def test_main_downloads_a_url_list(server, tmp_path, capsys):
    lst = tmp_path / "urls.txt"
    lst.write_text(f"{server.base}/short.wav\n")
    params = Path(__file__).resolve().parents[1] / "params.yaml"
    assert dl.main(["--params", str(params), "--cache", str(tmp_path / "c"), "--urls", str(lst)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok") and "short.wav" in out and len(list((tmp_path / "c").glob("*.json"))) == 1


def test_download_error_pickles():
    e = pickle.loads(pickle.dumps(DownloadError("http://h/x", "unreachable", False)))
    assert (e.url, e.reason, e.permanent) == ("http://h/x", "unreachable", False)
    assert str(e) == "download failed for http://h/x: unreachable"
