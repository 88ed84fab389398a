"""Bad inputs end as rejects, never as an aborted run: unexpected exceptions,
streams that change shape, names that are not UTF-8, files that would decode
to more memory than allowed, CSV fields over the csv module's limit, and
secrets in params."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import tracemalloc

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import webdataset as wds

from cantus import audio
from cantus.config import ConfigError, from_dict
from cantus.ingest import run as ingest
from cantus.ingest import sources
from cantus.ingest.params import DownloadConfig
from cantus.ingest.url_lists import read_musiccaps
from conftest import melody, write

RATE = 44100


def _tables(out):
    return (pq.read_table(out / "manifest.parquet").to_pylist(),
            pq.read_table(out / "rejects.parquet").to_pylist())


def _run(cfg, src, tmp_path, name="out"):
    stats = ingest.run(cfg, ingest.Inputs(local=(str(src),)), tmp_path / name, tmp_path / "c")
    return stats, *_tables(tmp_path / name)


def test_unexpected_exception_is_a_reject_naming_input_and_exception(tmp_path, cfg, monkeypatch):
    src = tmp_path / "src"
    write(src / "fine.flac", melody(1, 6))
    write(src / "boom.flac", melody(2, 6, 48000), 48000)  # only this one is resampled from 48 kHz
    real = audio.resample

    def resample(x, rate_in, rate_out):
        if rate_in == 48000:
            raise RuntimeError("resampler exploded")
        return real(x, rate_in, rate_out)

    monkeypatch.setattr(audio, "resample", resample)
    stats, manifest, rejects = _run(cfg, src, tmp_path)
    assert {os.path.basename(m["source"]) for m in manifest} == {"fine.flac"}
    (r,) = rejects
    assert r["input"] == str(src / "boom.flac") and r["reason"] == "process_error"
    assert r["detail"] == f"{src / 'boom.flac'}: unexpected RuntimeError while processing: " \
                          "resampler exploded"
    assert stats["inputs_in_output"] + stats["inputs_rejected"] == 2
    # not cached: once fixed, a rerun processes the input
    monkeypatch.setattr(audio, "resample", real)
    stats, manifest, rejects = _run(cfg, src, tmp_path)
    assert len({m["source"] for m in manifest}) == 2 and rejects == []
    assert stats["inputs_cached"] == 1 and stats["inputs_processed"] == 1


def test_channel_count_changing_mid_stream(tmp_path, cfg):
    src = tmp_path / "src"
    x = melody(3, 3)
    write(tmp_path / "mono.mp3", x, format="MP3")
    write(tmp_path / "stereo.mp3", np.stack([x, x], axis=1), format="MP3")
    src.mkdir()
    (src / "joined.mp3").write_bytes((tmp_path / "mono.mp3").read_bytes()
                                     + (tmp_path / "stereo.mp3").read_bytes())
    write(src / "fine.flac", melody(4, 6))
    _, manifest, rejects = _run(cfg, src, tmp_path)
    assert {os.path.basename(m["source"]) for m in manifest} == {"fine.flac"}
    (r,) = rejects
    assert r["reason"] == "decode_error" and r["input"].endswith("joined.mp3")
    assert "changes from 1 ch" in r["detail"] and "to 2 ch" in r["detail"]


def test_file_name_that_is_not_utf8_is_kept_with_its_name_escaped(tmp_path, cfg):
    src = tmp_path / "src"
    write(src / "plain.flac", melody(5, 6))
    raw = os.path.join(os.fsencode(src), b"caf\xe9 \xff.flac")  # Latin-1 bytes, not UTF-8
    os.rename(write(tmp_path / "tmp.flac", melody(6, 6)), raw)
    (src / "broken.xyz").write_bytes(b"x")  # a reject whose name is fine
    os.rename(src / "broken.xyz", os.path.join(os.fsencode(src), b"junk\xfe.xyz"))
    stats, manifest, rejects = _run(cfg, src, tmp_path)
    escaped = str(src / "caf\\xe9 \\xff.flac")
    assert {m["source"] for m in manifest} == {str(src / "plain.flac"), escaped}
    (r,) = rejects
    assert r["input"] == str(src / "junk\\xfe.xyz") and r["reason"] == "unsupported_type"
    assert r["detail"].startswith(r["input"])
    tars = sorted(str(p) for p in (tmp_path / "out").glob("*.tar"))
    sources_in_shards = {json.loads(s["json"])["source"]
                         for s in wds.WebDataset(tars, shardshuffle=False)}
    assert escaped in sources_in_shards
    assert stats["inputs"] == 3


def test_limits_are_checked_on_the_header_before_decoding(tmp_path, cfg):
    src = tmp_path / "src"
    # 60 s of 8-channel 96 kHz silence: 8 MB of FLAC that decodes to 176 MB of float32
    with sf.SoundFile(src.mkdir() or src / "big silence.flac", "w", 96000, 8, "PCM_16") as f:
        block = np.zeros((96000, 8), np.int16)
        for _ in range(60):
            f.write(block)
    write(src / "many channels.wav", np.zeros((RATE, 20), np.float32) + 0.1)
    write(src / "fast.wav", melody(7, 2, 192000), 192000)
    write(src / "fine.flac", melody(8, 6))
    small = dataclasses.replace(cfg, max_decoded_mb=64.0, max_channels=16, max_sample_rate=96000)
    tracemalloc.start()
    try:
        _, manifest, rejects = _run(small, src, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert {os.path.basename(m["source"]) for m in manifest} == {"fine.flac"}
    got = {os.path.basename(r["input"]): (r["reason"], r["detail"]) for r in rejects}
    assert got["big silence.flac"][0] == "over_limit"
    assert "would decode to 176 MB, over the limit of 64 MB (max_decoded_mb)" in \
        got["big silence.flac"][1]
    assert got["many channels.wav"] == ("over_limit", f"{src / 'many channels.wav'}: 20 "
                                        "channels is over the limit of 16 (max_channels)")
    assert got["fast.wav"] == ("over_limit", f"{src / 'fast.wav'}: sample rate 192000 Hz is "
                               "over the limit of 96000 Hz (max_sample_rate)")
    assert peak < 64 << 20, peak  # nothing near the 176 MB was decoded


def test_decoded_size_limit_holds_when_the_header_states_no_duration(tmp_path, monkeypatch):
    path = write(tmp_path / "x.flac", melody(9, 20))  # 20 s mono: 3.5 MB of float32
    monkeypatch.setattr(audio, "header_seconds", lambda container, stream: None)  # a header
    with pytest.raises(audio.AudioError) as e:                                    # without it
        audio.decode(path, max_decoded_mb=0.5)
    assert e.value.reason == "over_limit"
    assert str(e.value) == f"{path}: decodes to more than 0.5 MB of samples (max_decoded_mb)"
    x, rate = audio.decode(path, max_decoded_mb=16.0)
    assert rate == RATE and x.shape == (1, 20 * RATE)


def _musiccaps(path, captions):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ytid", "start_s", "end_s", "audioset_positive_labels", "aspect_list",
                    "caption", "author_id", "is_balanced_subset", "is_audioset_eval"])
        for i, cap in enumerate(captions):
            w.writerow([f"vid{i}", 0, 10, "", "[]", cap, 1, "False", "False"])
    return path


def test_musiccaps_caption_over_the_csv_field_limit_is_a_bad_row(tmp_path):
    huge = "a very long caption " * 7000  # 140 kB, over csv's 131072-character field limit
    path = _musiccaps(tmp_path / "mc.csv", ["short one", huge, "after it", "multi\nline " + huge,
                                            "last"])
    items = read_musiccaps(path, "http://127.0.0.1:9/{ytid}")
    assert [i.get("error", "")[:20] for i in items] == [
        "", "unreadable CSV row (", "", "unreadable CSV row (", ""]
    assert [i["line"] for i in items] == [2, 3, 4, 6, 7]
    assert [i["ytid"] for i in items if "error" not in i] == ["vid0", "vid2", "vid4"]
    recs = sources.musiccaps_inputs(str(path), "http://127.0.0.1:9/{ytid}")
    bad = [r for r in recs if r["error"]]
    assert [r["uri"] for r in bad] == [f"{path}:3", f"{path}:6"]
    for r in bad:
        assert r["error"][0] == "bad_row"
        assert r["error"][1].startswith(f"{r['uri']}: {path} line ")
        assert "field larger than field limit" in r["error"][1]


def test_captions_csv_over_the_field_limit_names_file_and_line(tmp_path, cfg):
    src = tmp_path / "src"
    write(src / "a.flac", melody(10, 6))
    with (src / "captions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        w.writerow(["a.flac", "x" * 200_000])
    with pytest.raises(ConfigError, match=r"captions.csv:2: bad CSV row \(field larger"):
        ingest.run(cfg, ingest.Inputs(local=(str(src),)), tmp_path / "o", tmp_path / "c")


def _download(**kw):
    base = dict(url_template="u/{ytid}", concurrency=1, retries=0, backoff_s=0.0, timeout_s=1.0,
                deadline_s=10.0, breaker=8, max_bytes=1 << 20, max_seconds=60.0, cookies="",
                proxy="", format="bestaudio")
    return from_dict(DownloadConfig, base | kw, prefix="ingest.download")


def test_secrets_in_params_fail_at_start_naming_the_key():
    with pytest.raises(ConfigError,
                       match="'ingest.download.cookies' must be empty.*CANTUS_COOKIES"):
        _download(cookies="/home/me/cookies.txt")
    for proxy in ("http://user:pw@proxy:3128", "user:pw@proxy:3128", "socks5://u@h:1080"):
        with pytest.raises(ConfigError, match="'ingest.download.proxy' holds credentials.*"
                                              "CANTUS_PROXY"):
            _download(proxy=proxy)
    assert _download(proxy="http://proxy.internal:3128").proxy == "http://proxy.internal:3128"


def test_cli_exits_non_zero_naming_the_count_when_downloads_fail_transiently(tmp_path):
    import subprocess
    import sys

    import yaml

    from conftest import ROOT
    from test_download import closed_port

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"].update(executor="local", num_workers=1)
    params["ingest"]["download"].update(retries=0, breaker=2,
                                        url_template=f"http://127.0.0.1:{closed_port()}/{{ytid}}")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    _musiccaps(tmp_path / "mc.csv", [f"cap {i}" for i in range(6)])
    r = subprocess.run([sys.executable, "-m", "cantus.ingest.run", "--params",
                        str(tmp_path / "params.yaml"), "--musiccaps", str(tmp_path / "mc.csv"),
                        "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "6 of 6 downloads failed transiently (unreachable: 6)" in r.stderr
    assert len(pq.read_table(tmp_path / "out" / "rejects.parquet")) == 6


def test_transient_failures_below_the_fraction_do_not_fail_the_stage(cfg):
    def rec(kind, error=None):
        uri = f"http://h/{kind}-{id(error)}"
        return sources.new_input(uri, kind, error=error and (error[0], f"{uri}: {error[1]}"))

    ok = [rec("musiccaps") for _ in range(2)]
    down = [rec("musiccaps", ("download_transient", "timeout (no answer within 1 s)"))
            for _ in range(2)]
    bad = [rec("musiccaps", ("bad_row", "no ytid")) for _ in range(5)]  # never requested
    local = [rec("local", ("download_transient", "x"))]  # not a download
    assert ingest.transient_failures(cfg, ok + down + bad + local) is None  # 2 of 4 = 0.5
    why = ingest.transient_failures(cfg, ok[:1] + down + bad)
    assert why.startswith("2 of 3 downloads failed transiently (timeout: 2)")
    assert ingest.transient_failures(dataclasses.replace(cfg, max_failed_fraction=1.0),
                                     down) is None
