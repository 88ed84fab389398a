"""The embedded demo corpus: seeded music21 renderings, byte-identical reruns."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import yaml

from cantus.config import ConfigError, load_section, to_dict
from cantus.ingest import demo
from cantus.ingest import demo_catalog as catalog
from cantus.ingest.params import DemoConfig
from conftest import ROOT, read_dir_bytes

SECONDS = 4.0
RECORD_KEYS = {"path", "caption", "tags", "licence", "source", "title"}


def tiny(**kw) -> DemoConfig:
    base = load_section(ROOT / "params.yaml", "demo", DemoConfig)
    return dataclasses.replace(base, **{"seed": 7, "num_pieces": 3, "max_seconds": SECONDS, **kw})


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny config rendered twice; the first folder starts with a stale file."""
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    (a / "0042-left-over.flac").write_bytes(b"stale")
    summary = demo.run(tiny(), a)
    demo.run(tiny(), b)
    return summary, a, b


def test_rerun_is_byte_identical(runs):
    summary, a, b = runs
    files_a, files_b = read_dir_bytes(a), read_dir_bytes(b)
    assert files_a == files_b
    assert sorted(files_a) == sorted(r["path"] for r in records(a)) + ["captions.jsonl"]
    assert "0042-left-over.flac" not in files_a
    assert summary["pieces"] == 3 and summary["seconds"] == 3 * SECONDS
    assert summary["by_collection"] == {"bach": 1, "palestrina": 1, "essenFolksong": 1,
                                        "ryansMammoth": 0, "oneills1850": 0}


def test_cli_in_another_process_with_other_hash_seed_matches(runs, tmp_path):
    _, a, _ = runs
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"demo": to_dict(tiny())}))
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-m", "cantus.ingest.demo", "--params", str(params),
                    "--out", str(tmp_path / "out")], check=True, env=env, cwd=tmp_path,
                   capture_output=True)
    assert read_dir_bytes(tmp_path / "out") == read_dir_bytes(a)


def test_audio_is_24k_mono_16bit_and_sounds(runs):
    _, a, _ = runs
    for r in records(a):
        info = sf.info(a / r["path"])
        assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "PCM_16")
        assert info.frames == int(SECONDS * 24000)
        x, _ = sf.read(a / r["path"])
        assert 0.5 < np.max(np.abs(x)) <= 0.9
        windows = np.sqrt((x.reshape(-1, 6000) ** 2).mean(axis=1))  # 250 ms RMS
        assert (windows > 1e-3).mean() >= 0.75, r["path"]
        tail = np.sqrt((x[-240:] ** 2).mean())  # last 10 ms, inside the fade-out
        assert tail < 0.1 * np.sqrt((x ** 2).mean())


def test_captions_and_tags_are_well_formed(runs):
    _, a, _ = runs
    recs = records(a)
    assert [r["path"] for r in recs] == sorted(r["path"] for r in recs)
    for r in recs:
        assert set(r) == RECORD_KEYS
        assert re.fullmatch(r"\d{4}-[a-z0-9-]+\.flac", r["path"]) and r["path"].isascii()
        corpus_path = r["source"].removeprefix("music21:").split("#")[0]
        assert (demo.CORPUS_DIR / corpus_path).is_file()
        assert r["licence"] and r["title"]
        t = r["tags"]
        assert t["tempo"] == catalog.tempo_word(t["tempo_bpm"])
        assert isinstance(t["tempo_bpm"], int) and 30 <= t["tempo_bpm"] <= 200
        assert re.fullmatch(r"[A-G][b#]? (major|minor)", t["key"])
        assert t["key"].endswith(t["mode"])
        assert t["texture"] in ("solo", "ensemble")
        assert t["instruments"] and all(isinstance(i, str) for i in t["instruments"])
        assert all(i in t["scoring"] or t["scoring"].endswith(("quartet", "consort"))
                   for i in t["instruments"])
        assert t["scoring"] in r["caption"] and t["tempo"] in r["caption"]
        assert t["key"] in r["caption"]
    genres = [r["tags"]["genre"] for r in recs]
    assert genres[:2] == ["chorale", "renaissance polyphony"]
    assert genres[2].endswith("folk song")
    assert recs[0]["tags"]["composer"] == "Johann Sebastian Bach"
    assert recs[0]["tags"]["texture"] == ("solo" if recs[0]["tags"]["scoring"] in (
        "organ", "piano", "harpsichord", "guitar", "harp") else "ensemble")


def test_other_seed_makes_other_choices(runs, tmp_path):
    _, a, _ = runs
    demo.run(tiny(seed=8), tmp_path)
    mine, other = records(a), records(tmp_path)
    assert [r["source"] for r in mine] != [r["source"] for r in other]
    assert read_dir_bytes(a) != read_dir_bytes(tmp_path)


def test_fewer_pieces_render_the_same_first_pieces(runs, tmp_path):
    _, a, _ = runs
    demo.run(tiny(num_pieces=2), tmp_path)
    for r in records(tmp_path):
        assert (tmp_path / r["path"]).read_bytes() == (a / r["path"]).read_bytes()
    assert records(tmp_path) == records(a)[:2]


def test_rendering_choices_vary_with_the_rng():
    piece = demo.load_piece(demo.candidates("bach")[0])
    assert len(piece.parts) >= 4 and piece.mode in ("major", "minor")
    choices = [demo.choose_rendering(piece, "bach", np.random.default_rng(s)) for s in range(40)]
    assert len({c.scoring for c in choices}) >= 5
    assert {c.transpose for c in choices} <= set(range(-3, 4))
    assert len({c.transpose for c in choices}) >= 4
    assert all(54 <= c.bpm <= 100 for c in choices) and len({c.bpm for c in choices}) > 10
    assert all(len(c.voices) == len(piece.parts) for c in choices)


def test_a_failing_piece_is_replaced(tmp_path, monkeypatch):
    real, calls = demo.load_piece, []

    def flaky(cand):
        calls.append(cand.source)
        if len(calls) == 1:
            raise ValueError("unparsable")
        return real(cand)

    monkeypatch.setattr(demo, "load_piece", flaky)
    summary = demo.run(tiny(num_pieces=2, max_seconds=1.0), tmp_path)
    assert summary["pieces"] == 2 and summary["skipped"] == 1
    recs = records(tmp_path)
    assert len(recs) == 2 and recs[0]["source"] == calls[1] != calls[0]
    assert calls[1].startswith("music21:bach/")


def test_main_reads_the_demo_section(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("demo:\n  seed: 3\n  num_pieces: 1\n  max_seconds: 1.0\n"
                      "  sample_rate: 16000\n  collections: [oneills1850]\n")
    demo.main(["--params", str(params), "--out", str(tmp_path / "out")])
    assert json.loads(capsys.readouterr().out)["by_collection"] == {"oneills1850": 1}
    (rec,) = records(tmp_path / "out")
    assert sf.info(tmp_path / "out" / rec["path"]).samplerate == 16000
    assert rec["tags"]["genre"] in ("irish folk", "scottish folk")


def test_bad_config_is_named():
    with pytest.raises(ConfigError, match="demo.collections"):
        demo.run(tiny(collections=("bach", "mozartt")), ROOT / "never-written")
    with pytest.raises(ConfigError, match="demo.max_seconds"):
        demo.run(tiny(max_seconds=0.0), ROOT / "never-written")
    assert not (ROOT / "never-written").exists()


def test_abc_headers_titles_and_genres():
    text = "X:1\nT:PICNIC -- REEL.\nC:Jas. Hand\nK:D\nabc|\nT:not a header\n\nX:2\n" \
           "T:Huaishu kaihua\nO:China, Shaanxi\nR:Lied\nK:C\ncde|\n"
    tunes = demo._abc_tunes(text)
    assert [n for n, _ in tunes] == [1, 2]
    assert dict(tunes[0][1]) == {"T": "Picnic Reel", "C": "Jas. Hand"}
    reel = demo.Candidate("ryansMammoth", "ryansMammoth/x.abc", None, tunes[0][1])
    assert demo._describe(reel, None) == ("Picnic Reel", "Jas. Hand", "irish folk", "reel")
    song = demo.Candidate("essenFolksong", "essenFolksong/han1.abc", 2, tunes[1][1])
    assert demo._describe(song, None)[2] == "chinese folk song"
    assert demo._clean("Ich hab die Nacht getr\x84umet") == "Ich hab die Nacht geträumet"
    assert demo.slug("Ich hab die Nacht geträumet!") == "ich-hab-die-nacht-getraumet"


def test_key_tempo_and_caption_words():
    assert catalog.key_name(9, "minor", 3) == "C minor"
    assert catalog.key_name(9, "minor", -2) == "G minor"
    assert catalog.key_name(2, "major", 6) == "Ab major"
    assert [catalog.tempo_word(b) for b in (60, 90, 130)] == ["slow", "moderate", "fast"]
    tags = {"genre": "irish folk", "form": "jig", "tempo": "fast", "tempo_bpm": 120,
            "key": "D major", "scoring": "fiddle and flute", "texture": "ensemble"}
    caps = {catalog.caption_for(tags, np.random.default_rng(s)) for s in range(30)}
    assert len(caps) >= 5
    assert all("fiddle and flute" in c and "fast" in c and "Irish jig" in c for c in caps)
    assert not any(re.search(r"\ba [aeiouAEIOU]|\ban [^aeiouAEIOU]", c) for c in caps)


def test_finish_normalises_fades_and_rejects_silence():
    x = np.ones(24000, np.float32) * 0.3
    y = demo.finish(x, 24000)
    assert y.dtype == np.int16 and y[0] == round(demo.PEAK * 32767) and abs(int(y[-1])) < 50
    with pytest.raises(ValueError, match="silent"):
        demo.finish(np.zeros(100, np.float32), 24000)


def test_demo_folder_ingests_with_its_captions_and_tags(runs, tmp_path):
    from cantus.ingest import run as ingest
    from cantus.ingest.params import IngestConfig

    _, a, _ = runs
    cfg = dataclasses.replace(load_section(ROOT / "params.yaml", "ingest", IngestConfig),
                              executor="local")
    stats = ingest.run(cfg, ingest.Inputs(local=(str(a),)), tmp_path / "out", tmp_path / "c")
    import pyarrow.parquet as pq

    manifest = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    by_name = {os.path.basename(m["source"]): m for m in manifest}
    assert stats["inputs"] == 3 and set(by_name) == {r["path"] for r in records(a)}
    for r in records(a):
        m = by_name[r["path"]]
        assert m["caption"] == r["caption"] and m["licence"] == r["licence"]
        assert set(r["tags"]["instruments"]) <= set(m["tags"])


def test_a_tune_of_strains_ending_in_end_repeats_plays_each_strain_twice():
    """O'Neill's 1010 writes seven strains as ``...:|`` with no ``|:``; each repeats back
    to the previous ``:|``, so it expands to twice its length (not 36 times, as music21
    alone expands it, which held 270 MiB for one 20 s rendering)."""
    cand = next(c for c in demo.candidates("oneills1850") if c.number == 1010)
    from music21 import corpus, stream

    score = corpus.parse(cand.path, forceSource=True, number=cand.number)
    if isinstance(score, stream.Opus):
        score = score.scores[0]
    written = score.highestTime
    piece = demo.load_piece(cand)
    assert piece.title == "Biddy Maloney" and written == 168.0
    assert piece.length_ql == 2 * written
