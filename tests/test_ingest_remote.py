"""URL lists and MusicCaps CSVs through the whole ingest stage (real yt-dlp, loopback only)."""

import csv as csvmod
import dataclasses
import json
import os

import pyarrow.parquet as pq

from cantus.ingest import run as ingest
from conftest import melody, write
from test_download import closed_port, requests_for, server  # noqa: F401 (fixture)


def test_url_list_and_musiccaps_end_in_manifest_or_rejects(server, tmp_path, cfg):  # noqa: F811
    write(server.root / "tune_a.wav", melody(21, 14), subtype="PCM_16")
    # an OGG body behind a .wav name: the decoder goes by content, not by name
    write(server.root / "vid1.wav", melody(22, 30), format="OGG", subtype="VORBIS")
    write(server.root / "vid2.wav", melody(23, 20), subtype="PCM_16")
    dead = f"http://127.0.0.1:{closed_port()}/gone.wav"
    urls = tmp_path / "urls.txt"
    urls.write_text(f"# a list\n{server.base}/tune_a.wav\tan upbeat test tune\n"
                    f"{server.base}/missing.wav\n{dead}\nnot a url\n")
    csv = tmp_path / "musiccaps.csv"
    with csv.open("w", newline="") as f:
        w = csvmod.writer(f)
        w.writerow(["ytid", "start_s", "end_s", "audioset_positive_labels", "aspect_list",
                    "caption", "author_id", "is_balanced_subset", "is_audioset_eval"])
        w.writerow(["vid1", 5, 15, "/m/04rlf", "['piano', \"80's pop\", 'slow']",
                    "a slow pop song", 4, "False", "True"])
        w.writerow(["vid2", 2, 12, "/m/04rlf", "['guitar']", "a guitar riff", 7, "True", "False"])
        w.writerow(["vid404", 0, 10, "/m/04rlf", "['x']", "unavailable video", 1, "False", "False"])
        w.writerow(["vid2", 9, 3, "/m/04rlf", "['x']", "backwards section", 1, "False", "False"])
    cfg = dataclasses.replace(cfg, download=dataclasses.replace(
        cfg.download, url_template=server.base + "/{ytid}.wav", retries=1, backoff_s=0.01,
        timeout_s=5.0))
    inputs = ingest.Inputs(urls=(str(urls),), musiccaps=(str(csv),))
    stats = ingest.run(cfg, inputs, tmp_path / "out", tmp_path / "cache")
    manifest = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    rejects = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    reasons = {r["input"]: (r["reason"], r["detail"]) for r in rejects}
    assert reasons[f"{server.base}/missing.wav"][0] == "download_failed"
    assert "unavailable" in reasons[f"{server.base}/missing.wav"][1]
    assert reasons[dead] == ("download_transient", f"{dead}: unreachable")  # retried next run
    assert [k for k, v in reasons.items() if v[0] == "bad_row"] == sorted(
        ["not a url", f"{server.base}/vid2.wav#t=9,3"])
    assert reasons[f"{server.base}/vid404.wav#t=0,10"][0] == "download_failed"
    assert "unavailable (HTTP 404)" in reasons[f"{server.base}/vid404.wav#t=0,10"][1]
    got = {m["source"]: m for m in manifest}
    assert got[f"{server.base}/tune_a.wav"]["caption"] == "an upbeat test tune"
    sec = [m for m in manifest if m["source"] == f"{server.base}/vid1.wav#t=5,15"]
    assert len(sec) == 1 and abs(sec[0]["duration_s"] - 10.0) < 0.05  # only the section
    assert sec[0]["tags"] == ["piano", "80's pop", "slow"]
    assert json.loads(sec[0]["meta_json"])["ytid"] == "vid1"
    assert stats["inputs"] == 8
    assert stats["inputs_in_output"] + stats["inputs_rejected"] == 8
    # a rerun downloads nothing: every request is answered from the cache
    before = len(server.log)
    ingest.run(cfg, inputs, tmp_path / "out2", tmp_path / "cache")
    new = server.log[before:]
    assert all(("missing" in p or "vid404" in p) for _, p, _ in new), new
    assert os.listdir(tmp_path / "out2")
