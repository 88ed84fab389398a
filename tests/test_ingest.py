"""The ingest stage on inputs made in code: every input accounted for."""

import dataclasses
import json
import os

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from cantus import audio
from cantus.ingest import run as ingest
from conftest import melody, read_dir_bytes, write

RATE = 44100


def _m4a(path, x, rate=RATE):
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=rate)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray(x[None, :], format="fltp", layout="mono")
        frame.sample_rate = rate
        for p in [*s.encode(frame), *s.encode(None)]:
            c.mux(p)
    return path


def make_bad_and_good(src):
    """One file per case of the issue's list; returns {file name: expected reason or None}."""
    t = np.arange(3 * RATE) / RATE
    tone = (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    expect = {}

    def case(name, reason):
        expect[name] = reason
        return src / name

    write(case("good piece.flac", None), melody(1, 25))
    write(case("ogg tune.ogg", None), melody(2, 6), format="OGG", subtype="VORBIS")
    write(case("opus tune.opus", None), melody(3, 5), 48000, format="OGG", subtype="OPUS")
    write(case("mp3 tune.mp3", None), melody(4, 5), format="MP3")
    _m4a(case("aac tune.m4a", None), melody(5, 5))
    write(case("six channels.wav", None), np.tile(melody(6, 4)[:, None], (1, 6)) * 0.5)
    write(case("hires 192k.wav", None), melody(7, 3, 192000), 192000)
    write(case("it's \"quoted\"; ünïcødé 曲.wav", None), melody(8, 4))
    write(case("telephone 8k.wav", "low_sample_rate"), melody(9, 3, 8000), 8000)
    nan = tone.copy()
    nan[1000:1010] = np.nan
    nan[2000] = np.inf
    write(case("nan inf.wav", "non_finite"), nan, subtype="FLOAT")
    write(case("silent.wav", "silent"), np.zeros(3 * RATE, np.float32))
    write(case("tenth of a second.wav", "too_short"), melody(10, 0.1))
    write(case("clipped.wav", "clipped"), np.clip(tone * 20, -1, 1))
    case("corrupt.flac", "decode_error").write_bytes(np.random.default_rng(0).bytes(4000))
    case("empty.wav", "empty").write_bytes(b"")
    case("not audio.mp3", "decode_error").write_text("this is a text file, not audio\n" * 50)
    case("headerless.raw", "unsupported_type").write_bytes(audio.quantize(tone).tobytes())
    case("raw pcm named.wav", "decode_error").write_bytes(audio.quantize(tone).tobytes())
    case("cover.jpg", "unsupported_type").write_bytes(b"\xff\xd8\xff\xe0" + b"0" * 100)
    full = write(src / "whole.wav", tone, subtype="PCM_16").read_bytes()
    (src / "whole.wav").unlink()
    case("truncated.wav", "truncated").write_bytes(full[: len(full) // 3])
    write(src / "good piece.txt", None) if False else (src / "good piece.txt").write_text(
        "a test melody on sines")
    return expect


def _tables(out):
    return (pq.read_table(out / "manifest.parquet").to_pylist(),
            pq.read_table(out / "rejects.parquet").to_pylist())


def test_every_bad_input_is_rejected_with_its_reason(tmp_path, cfg):
    src = tmp_path / "src"
    expect = make_bad_and_good(src)
    stats = ingest.run(cfg, ingest.Inputs(local=(str(src),)), tmp_path / "out", tmp_path / "c")
    manifest, rejects = _tables(tmp_path / "out")
    got = {os.path.basename(r["input"]): r["reason"] for r in rejects if r["chunk_key"] is None}
    accepted = {os.path.basename(m["source"]) for m in manifest}
    for name, reason in expect.items():
        if reason is None:
            assert name in accepted, (name, got.get(name))
            assert name not in got
        else:
            assert got.get(name) == reason, (name, got.get(name))
            assert name not in accepted
    # every input is in exactly one of the two tables; the sidecar is not an input
    assert accepted | set(got) == set(expect) and not accepted & set(got)
    assert stats["inputs"] == len(expect)
    assert stats["inputs_in_output"] + stats["inputs_rejected"] == len(expect)
    for r in rejects:
        assert r["detail"].startswith(r["input"])  # the message names the input
    cap = {os.path.basename(m["source"]): m["caption"] for m in manifest}
    assert cap["good piece.flac"] == "a test melody on sines"


def test_shards_are_webdataset_with_24k_mono_flac(tmp_path, cfg):
    src = tmp_path / "src"
    write(src / "a.flac", melody(1, 25))
    write(src / "b.wav", melody(2, 13, 48000), 48000)
    write(src / "c.ogg", melody(3, 7), format="OGG", subtype="VORBIS")
    stats = ingest.run(cfg, ingest.Inputs(local=(str(src),)), tmp_path / "out", tmp_path / "c")
    out = tmp_path / "out"
    manifest, _ = _tables(out)
    tars = sorted(str(p) for p in out.glob("*.tar"))
    assert {m["shard"] for m in manifest} == {os.path.basename(t) for t in tars}
    seen = {}
    for sample in wds.WebDataset(tars, shardshuffle=False):
        meta = json.loads(sample["json"])
        x, rate = audio.decode_flac(sample["flac"])
        assert rate == 24000 and x.ndim == 1
        assert abs(len(x) / rate - meta["duration_s"]) < 1e-6
        assert sample["__key__"] == meta["key"]
        seen[meta["key"]] = meta
    assert set(seen) == {m["key"] for m in manifest}
    # a.flac (25 s) -> chunks at 0, 10, 20 s of 10, 10, 5 s
    a = sorted((m["offset_s"], m["duration_s"]) for m in manifest if m["source"].endswith("a.flac"))
    assert a == [(0.0, 10.0), (10.0, 10.0), (20.0, 5.0)]
    assert stats["chunks"] == len(manifest) == 3 + 2 + 1
    # loudness normalised to the target within a dB on a full chunk
    import pyloudnorm
    x, rate = audio.decode_flac(next(iter(wds.WebDataset(tars, shardshuffle=False)))["flac"])
    assert abs(pyloudnorm.Meter(rate).integrated_loudness(x.astype(np.float64))
               - cfg.loudness_lufs) < 1.0


def test_duplicates_name_the_chunk_they_duplicate(tmp_path, cfg):
    src = tmp_path / "src"
    tune = audio.quantize(melody(11, 14))
    write(src / "a original.flac", tune)
    write(src / "b exact copy.wav", tune, subtype="PCM_16")  # same PCM after decoding
    write(src / "c reencode.ogg", tune.astype(np.float32) / 32768, format="OGG",
          subtype="VORBIS")
    write(src / "d other.flac", melody(12, 14))
    # uploaded again: 0.7 s of leading silence, 6 dB quieter, MP3
    pad = np.concatenate([np.zeros(int(0.7 * RATE)), tune.astype(np.float32) / 65536])
    write(src / "e reupload.mp3", pad, format="MP3")
    ingest.run(cfg, ingest.Inputs(local=(str(src),)), tmp_path / "out", tmp_path / "c")
    manifest, rejects = _tables(tmp_path / "out")
    orig = {m["offset_s"]: m["key"] for m in manifest if "original" in m["source"]}
    assert {os.path.basename(m["source"]) for m in manifest} == {"a original.flac",
                                                                  "d other.flac"}
    by_input = {}
    for r in rejects:
        by_input.setdefault(os.path.basename(r["input"]), []).append(r)
    assert {r["reason"] for r in by_input["c reencode.ogg"]} == {"near_duplicate"}
    assert {r["reason"] for r in by_input["e reupload.mp3"]} == {"near_duplicate"}
    assert {r["reason"] for r in by_input["b exact copy.wav"]} == {"exact_duplicate"}
    for r in by_input["b exact copy.wav"] + by_input["c reencode.ogg"] + by_input["e reupload.mp3"]:
        assert r["duplicate_of"] in orig.values()
        assert r["duplicate_of_input"].endswith("a original.flac")
        assert r["duplicate_of"] in r["detail"]


def test_exact_duplicate_by_pcm_hash(tmp_path, cfg):
    src = tmp_path / "src"
    tune = audio.quantize(melody(13, 6))  # int16, so both files hold the same PCM
    write(src / "x.flac", tune)
    write(src / "y.wav", tune, subtype="PCM_16")  # other file bytes, same decoded PCM
    ingest.run(cfg, ingest.Inputs(local=(str(src),)), tmp_path / "out", tmp_path / "c")
    _, rejects = _tables(tmp_path / "out")
    assert [(os.path.basename(r["input"]), r["reason"]) for r in rejects] == [
        ("y.wav", "exact_duplicate")]


def test_splits_by_track_and_ids_stable_when_sources_are_added(tmp_path, cfg):
    src = tmp_path / "src"
    for i in range(8):
        write(src / f"t{i}.flac", melody(100 + i, 25))
    ingest.run(cfg, ingest.Inputs(local=(str(src),)), tmp_path / "o1", tmp_path / "c")
    m1, _ = _tables(tmp_path / "o1")
    split_of = {}
    for m in m1:
        split_of.setdefault(m["source"], set()).add(m["split"])
    assert all(len(s) == 1 for s in split_of.values())  # no track spans two splits
    assert {"train", "valid"} == set().union(*split_of.values())
    write(src / "t_new.flac", melody(999, 25))
    ingest.run(cfg, ingest.Inputs(local=(str(src),)), tmp_path / "o2", tmp_path / "c")
    m2, _ = _tables(tmp_path / "o2")
    before = {(m["key"], m["split"]) for m in m1}
    after = {(m["key"], m["split"]) for m in m2}
    assert before <= after and len(after) == len(before) + 3


def test_rerun_is_byte_identical_and_uses_the_cache(tmp_path, cfg):
    src = tmp_path / "src"
    make_bad_and_good(src)
    a = ingest.run(cfg, ingest.Inputs(local=(str(src),)), tmp_path / "a", tmp_path / "c1")
    ingest.run(cfg, ingest.Inputs(local=(str(src),)), tmp_path / "b", tmp_path / "c2")
    c = ingest.run(cfg, ingest.Inputs(local=(str(src),)), tmp_path / "b", tmp_path / "c2")
    assert read_dir_bytes(tmp_path / "a") == read_dir_bytes(tmp_path / "b")
    assert a["inputs_cached"] == 0 and a["inputs_processed"] > 10
    # the third run finds every input in the cache and every shard in place
    assert c["inputs_processed"] == 0 and c["inputs_cached"] == a["inputs_processed"]
    assert c["shards_written"] == 0 and c["shards_skipped"] == a["shards_written"]


def test_changed_params_rewrite_shards(tmp_path, cfg):
    src = tmp_path / "src"
    write(src / "a.flac", melody(1, 12))
    ingest.run(cfg, ingest.Inputs(local=(str(src),)), tmp_path / "o", tmp_path / "c")
    first = read_dir_bytes(tmp_path / "o")
    louder = dataclasses.replace(cfg, loudness_lufs=-14.0)
    s = ingest.run(louder, ingest.Inputs(local=(str(src),)), tmp_path / "o", tmp_path / "c")
    assert s["inputs_cached"] == 0 and s["shards_skipped"] == 0
    now = read_dir_bytes(tmp_path / "o")
    tars = [n for n in first if n.endswith(".tar")]
    assert tars and [n for n in now if n.endswith(".tar")] == tars
    assert all(now[n] != first[n] for n in tars)


def test_all_inputs_failing_is_an_error_with_rejects_written(tmp_path, cfg):
    src = tmp_path / "src"
    write(src / "silent.wav", np.zeros(RATE * 2, np.float32))
    (src / "junk.mp3").write_bytes(b"junk" * 100)
    with pytest.raises(ingest.IngestError, match="all 2 inputs were rejected"):
        ingest.run(cfg, ingest.Inputs(local=(str(src),)), tmp_path / "o", tmp_path / "c")
    _, rejects = _tables(tmp_path / "o")
    assert sorted(r["reason"] for r in rejects) == ["decode_error", "silent"]


def test_missing_source_is_a_clear_error(tmp_path, cfg):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ingest.run(cfg, ingest.Inputs(local=(str(tmp_path / "nowhere"),)), tmp_path / "o",
                   tmp_path / "c")


def test_outputs_and_cache_through_an_fsspec_filesystem(tmp_path, cfg):
    import fsspec

    src = tmp_path / "src"
    write(src / "a.flac", melody(1, 12))
    write(src / "b.flac", melody(2, 12))
    local = ingest.run(cfg, ingest.Inputs(local=(str(src),)), tmp_path / "o", tmp_path / "c")
    mem = ingest.run(cfg, ingest.Inputs(local=(str(src),)), "memory://cantus-test/out",
                     "memory://cantus-test/cache")
    fs = fsspec.filesystem("memory")
    for name, data in read_dir_bytes(tmp_path / "o").items():
        assert fs.cat(f"/cantus-test/out/{name}") == data, name
    assert mem["chunks"] == local["chunks"] == 4
    fs.rm("/cantus-test", recursive=True)


# --- ingest.sources in params.yaml ---------------------------------------------------------

def _params_with(tmp_path, cfg, sources) -> str:
    """A params file: the project's, made quick as the ``cfg`` fixture is, listing ``sources``."""
    import yaml

    from cantus.config import to_dict
    from conftest import ROOT

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"] = {**to_dict(cfg), "sources": sources}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


def test_sources_come_from_params_and_the_command_line_replaces_them(tmp_path, cfg, caplog):
    write(tmp_path / "a" / "one.flac", melody(1, 6))
    write(tmp_path / "b" / "x" / "two.wav", melody(2, 6))
    write(tmp_path / "b" / "x" / "skip.flac", melody(3, 6))
    (tmp_path / "caps.csv").write_text("path,caption\na/one.flac,a calm one\n")
    params = _params_with(tmp_path, cfg, [
        {"kind": "folder", "path": str(tmp_path / "a"), "captions": str(tmp_path / "caps.csv")},
        {"kind": "glob", "path": str(tmp_path / "b" / "**" / "*.wav")}])
    assert ingest.main(["--params", params, "--out", str(tmp_path / "o"),
                        "--cache", str(tmp_path / "c")]) == 0
    rows, _ = _tables(tmp_path / "o")
    got = {os.path.basename(r["source"]): r["caption"] for r in rows}
    assert got == {"one.flac": "a calm one", "two.wav": ""}
    assert "is outside data/demo and data/sources" in caplog.text  # DVC would not see it
    assert ingest.main(["--params", params, "--source", str(tmp_path / "b"), "--out",
                        str(tmp_path / "o2"), "--cache", str(tmp_path / "c")]) == 0
    rows, _ = _tables(tmp_path / "o2")
    assert sorted(os.path.basename(r["source"]) for r in rows) == ["skip.flac", "two.wav"]


@pytest.mark.parametrize("entry, says", [
    ({"kind": "folder", "path": "{tmp}/nowhere"}, "ingest.sources[1].path: {tmp}/nowhere: "
                                                  "no such folder"),
    ({"kind": "glob", "path": "{tmp}/a/*.mp3"}, "ingest.sources[1].path: {tmp}/a/*.mp3: "
                                                "the glob matches no file"),
    ({"kind": "url_list", "path": "{tmp}/urls.txt"}, "ingest.sources[1].path: "
                                                     "{tmp}/urls.txt: no such file"),
    ({"kind": "folder", "path": "{tmp}/a", "captions": "{tmp}/c.csv"},
     "ingest.sources[1].captions: {tmp}/c.csv: no such file"),
    ({"kind": "musiccaps", "path": "{tmp}/a"}, "'ingest.sources[1].kind' must be one of"),
])
def test_a_bad_source_entry_exits_2_at_start_up_naming_it(tmp_path, cfg, capsys, entry, says):
    write(tmp_path / "a" / "one.flac", melody(1, 3))
    entry = {k: v.format(tmp=tmp_path) for k, v in entry.items()}
    params = _params_with(tmp_path, cfg, [{"kind": "folder", "path": str(tmp_path / "a")},
                                          entry])
    assert ingest.main(["--params", params, "--out", str(tmp_path / "o")]) == 2
    assert says.format(tmp=tmp_path) in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_no_sources_at_all_exits_2(tmp_path, cfg, capsys):
    params = _params_with(tmp_path, cfg, [])
    assert ingest.main(["--params", params, "--out", str(tmp_path / "o")]) == 2
    assert "no sources given: list them in ingest.sources" in capsys.readouterr().err


def test_a_source_in_params_gives_the_bytes_the_same_source_flag_gives(tmp_path, cfg):
    src = tmp_path / "src"
    write(src / "a.flac", melody(4, 7))
    write(src / "b.wav", melody(5, 5))
    params = _params_with(tmp_path, cfg, [{"kind": "folder", "path": str(src)}])
    assert ingest.main(["--params", params, "--out", str(tmp_path / "p"),
                        "--cache", str(tmp_path / "c1")]) == 0
    assert ingest.main(["--params", params, "--source", str(src), "--out", str(tmp_path / "f"),
                        "--cache", str(tmp_path / "c2")]) == 0
    assert read_dir_bytes(tmp_path / "p") == read_dir_bytes(tmp_path / "f")
