"""Dataset versions (cantus.dataset): show / diff / open_version through DVC from a fresh
clone reading a local remote, and the card the dataset_card stage writes.

The repository is made in the test: tiny fake ingest and token tables (pyarrow), two
git revisions ``v1`` and ``v2`` (a track removed, two added, the acoustic tokenizer
changed), ``dvc add`` + ``dvc push`` to a directory remote, then the original
repository's cache is deleted so only the remote holds the data.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from cantus import dataset, shards
from cantus.tokens import ManifestMismatch, sample_fields
from conftest import ROOT

ESSEN = "non-commercial use (Essen folksong collection, music21 corpus)"
PD = "public domain (music21 corpus)"
# track -> (source, split, licence, chunk seconds, ytid)
V1 = {"a": ("data/demo/a.flac", "train", PD, (30.0, 12.0), None),
      "b": ("data/demo/b.flac", "valid", PD, (20.0,), None),
      "c": ("data/demo/c.flac", "train", ESSEN, (18.0,), None)}
V2 = {k: v for k, v in V1.items() if k != "b"} | {
    "d": ("data/demo/d.flac", "valid", ESSEN, (30.0, 30.0, 6.0), None),
    "e": ("https://www.youtube.com/watch?v=xyz", "train", "", (10.0,), "xyz")}
TOK1 = {"acoustic": {"checkpoint_hash": "aa", "frame_rate": 50.0},
        "semantic": {"centroid_hash": "cc", "frame_rate": 25}, "mulan": {"rvq_hash": "mm"}}
TOK2 = {**TOK1, "acoustic": {"checkpoint_hash": "bb", "frame_rate": 50.0}}


def write_version(root: Path, spec: dict, tokenizers: dict, rejects: list[str]) -> None:
    """Ingest and token tables (and token shards) of ``spec`` under ``root``/data."""
    audio, tokens = root / "data" / "audio", root / "data" / "tokens"
    for d in (audio, tokens):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    rows, index, samples = [], [], {"train": [], "valid": []}
    for track, (source, split, licence, secs, ytid) in sorted(spec.items()):
        for i, s in enumerate(secs):
            key = f"{track}{i:03d}"
            rows.append({"key": key, "split": split, "shard": f"{split}-000000.tar",
                         "source": source, "source_kind": "musiccaps" if ytid else "local",
                         "source_hash": f"hash-{track}", "offset_s": 30.0 * i,
                         "duration_s": s, "sample_rate": 24000, "caption": f"{track} tune",
                         "licence": licence, "pcm_hash": f"pcm-{key}", "tags": ["folk"],
                         "meta_json": json.dumps({"ytid": ytid} if ytid else {})})
            ts = int(s * 25)
            toks = {"acoustic": np.full((12, 2 * ts), i, np.uint16),
                    "semantic": np.arange(ts, dtype=np.uint16),
                    "mulan": np.full(12, 7, np.uint16)}
            samples[split].append((key, sample_fields(toks, {"caption": f"{track} tune"})))
            index.append({"key": key, "split": split, "shard": f"{split}-000000.tar",
                          "acoustic_frames": 2 * ts, "semantic_frames": ts, "seconds": ts / 25})
    shards.write_parquet(audio / "manifest.parquet", pa.Table.from_pylist(rows))
    shards.write_parquet(audio / "rejects.parquet", pa.table({
        "input": [f"data/demo/r{i}.flac" for i in range(len(rejects))],
        "reason": pa.array(rejects, pa.string())}))
    for split, got in samples.items():
        shards.write_shard(tokens / f"{split}-000000.tar", got)
    shards.write_parquet(tokens / "index.parquet", pa.Table.from_pylist(index))
    shards.write_parquet(tokens / "rejects.parquet", pa.table(
        {c: pa.array([], pa.string()) for c in ("key", "reason", "detail")}))
    (tokens / "manifest.json").write_text(json.dumps({"tokenizers": tokenizers}))


def sh(*args: str, cwd: Path) -> str:
    p = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True)
    assert p.returncode == 0, f"{args}: {p.stdout}\n{p.stderr}"
    return p.stdout


def dvc(*args: str, cwd: Path) -> str:
    return sh(sys.executable, "-m", "dvc", *args, cwd=cwd)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A fresh clone (no DVC cache) of a repo with tags v1 and v2 pushed to a dir remote."""
    tmp = tmp_path_factory.mktemp("versions")
    repo, remote = tmp / "repo", tmp / "remote"
    repo.mkdir()
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    sh("git", "config", "user.email", "t@example.com", cwd=repo)
    sh("git", "config", "user.name", "t", cwd=repo)
    dvc("init", "-q", cwd=repo)
    dvc("config", "core.analytics", "false", cwd=repo)
    dvc("remote", "add", "-d", "store", str(remote), cwd=repo)
    for tag, spec, toks, rejects in (("v1", V1, TOK1, ["too_short"]),
                                     ("v2", V2, TOK2, ["too_short", "silent", "silent"])):
        write_version(repo, spec, toks, rejects)
        dvc("add", "-q", "data/audio", "data/tokens", cwd=repo)
        sh("git", "add", ".", cwd=repo)
        sh("git", "commit", "-q", "-m", tag, cwd=repo)
        sh("git", "tag", tag, cwd=repo)
        dvc("push", "-q", cwd=repo)
    shutil.rmtree(repo / ".dvc" / "cache")  # only the remote holds the data now
    shutil.rmtree(repo / "data")
    out = tmp / "clone"
    sh("git", "clone", "-q", str(repo), str(out), cwd=tmp)
    assert not (out / ".dvc" / "cache").exists() and not (out / "data" / "audio").exists()
    return out


def cantus(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cantus.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_show_reads_a_revision_from_the_remote(clone):
    p = cantus("dataset", "show", "--rev", "v1", "--repo", str(clone), "--json", cwd=clone.parent)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["splits"] == {"train": {"tracks": 2, "chunks": 3, "hours": 0.016667},
                           "valid": {"tracks": 1, "chunks": 1, "hours": 0.005556}}
    assert s["total"] == {"tracks": 3, "chunks": 4, "hours": 0.022222}
    assert s["licences"] == {ESSEN: {"tracks": 1, "chunks": 1, "non_commercial": True},
                             PD: {"tracks": 2, "chunks": 3, "non_commercial": False}}
    assert s["rejects"] == {"ingest": {"too_short": 1}, "tokens": {}}
    assert s["tokens"]["tokenizers"] == TOK1
    assert s["tokens"]["splits"] == {"train": {"chunks": 3, "hours": 0.016667},
                                     "valid": {"chunks": 1, "hours": 0.005556}}
    text = cantus("dataset", "show", "--rev", "v2", "--repo", str(clone), cwd=clone.parent)
    assert text.returncode == 0, text.stderr
    assert "total       4 tracks       7 chunks" in text.stdout, text.stdout
    assert "(none given)" in text.stdout and "rejects (ingest): silent 2, too_short 1" in text.stdout


def test_diff_names_the_tracks_added_and_removed(clone):
    p = cantus("dataset", "diff", "v1", "v2", "--repo", str(clone), "--json", cwd=clone.parent)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert [t["source"] for t in d["removed"]] == ["data/demo/b.flac"]
    assert {t["track"]: t["chunks"] for t in d["added"]} == {"hash-d": 3, "yt:xyz": 1}
    assert d["tokenizers_changed"] == ["acoustic"]
    assert d["a"]["total"]["tracks"] == 3 and d["b"]["total"]["tracks"] == 4
    assert d["b"]["splits"]["valid"] == {"tracks": 1, "chunks": 3, "hours": 0.018333}
    text = cantus("dataset", "diff", "v1", "v2", "--repo", str(clone), cwd=clone.parent).stdout
    assert "- data/demo/b.flac (valid, 1 chunks" in text and "added: 2 tracks" in text
    assert "tokenizers changed: acoustic" in text


def test_bad_revision_or_repo_exits_2_naming_it(clone, tmp_path):
    p = cantus("dataset", "show", "--rev", "v9", "--repo", str(clone), cwd=clone.parent)
    assert p.returncode == 2 and "v9" in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = cantus("dataset", "diff", "v1", "v2", "--repo", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert p.returncode == 2 and "nowhere: no such repository" in p.stderr, p.stderr


def test_open_version_yields_the_token_samples_of_a_revision(clone):
    got = dict(dataset.open_version(str(clone), rev="v2", split="valid"))
    assert sorted(got) == ["d000", "d001", "d002"]
    assert got["d002"]["semantic"].shape == (150,) and got["d002"]["acoustic"].shape == (12, 300)
    assert got["d001"]["acoustic"].dtype == np.uint16 and got["d001"]["meta"]["caption"] == "d tune"
    assert sorted(k for k, _ in dataset.open_version(str(clone), rev="v1")) == [
        "a000", "a001", "b000", "c000"]
    with pytest.raises(ValueError, match="split 'test'.*splits: train, valid"):
        next(dataset.open_version(str(clone), rev="v1", split="test"))
    with pytest.raises(ManifestMismatch, match="acoustic.checkpoint_hash: shards have 'bb'"):
        next(dataset.open_version(str(clone), rev="v2", expect={"acoustic": TOK1["acoustic"]}))


# --- the card -----------------------------------------------------------------------------

def _params(tmp: Path, **change) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"].update(change)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def card_argv(tmp: Path, params: Path, out: str = "card") -> list[str]:
    return ["-m", "cantus.dataset", "card", "--audio", str(tmp / "data" / "audio"), "--tokens",
            str(tmp / "data" / "tokens"), "--params", str(params), "--out", str(tmp / out)]


def test_card_summarises_the_version_and_is_reproducible(tmp_path):
    write_version(tmp_path, V2, TOK2, ["silent"])
    params = _params(tmp_path)
    for out in ("card", "again"):
        p = subprocess.run([sys.executable, *card_argv(tmp_path, params, out)],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
    c = json.loads((tmp_path / "card" / "dataset.json").read_text())
    for name in ("dataset.json", "DATASET.md"):  # no clock in a cached output
        assert (tmp_path / "card" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    assert c["git_revision"] is None  # tmp is no git checkout
    assert c["total"] == {"tracks": 4, "chunks": 7, "hours": 0.037778}
    assert c["commercial_use"] == "no" and c["non_commercial_tracks"] == {ESSEN: 2}
    assert [(s["kind"], s["source"], s["tracks"]) for s in c["sources"]] == [
        ("local", "data/demo", 3), ("musiccaps", "https://www.youtube.com", 1)]
    assert c["rejects"]["ingest"] == {"silent": 1} and c["tokens"]["tokenizers"] == TOK2
    assert sorted(c["params"]) == sorted(dataset.DATA_PARAMS)
    md = (tmp_path / "card" / "DATASET.md").read_text()
    assert "**2 tracks are licensed for non-commercial use only**" in md
    assert f"| {ESSEN} | 2 | 4 | yes |" in md and "| total | 4 | 7 | 0.0378 |" in md


def test_card_changes_with_the_params_and_sources_and_records_the_revision(tmp_path):
    write_version(tmp_path, V1, TOK1, [])
    before = dataset.write_card(tmp_path / "data" / "audio", tmp_path / "data" / "tokens",
                                _params(tmp_path), tmp_path / "card")
    sh("git", "init", "-q", cwd=tmp_path)
    sh("git", "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-q", "--allow-empty",
       "-m", "x", cwd=tmp_path)
    head = sh("git", "rev-parse", "HEAD", cwd=tmp_path).strip()
    write_version(tmp_path, V1 | {"c": V1["c"][:2] + (PD,) + V1["c"][3:]}, TOK1, [])
    shards.write_parquet(tmp_path / "data" / "audio" / "manifest.parquet", pa.Table.from_pylist(
        [r | {"source_hash": "new"} if r["key"] == "c000" else r for r in
         shards.read_parquet(tmp_path / "data" / "audio" / "manifest.parquet").to_pylist()]))
    after = dataset.write_card(tmp_path / "data" / "audio", tmp_path / "data" / "tokens",
                               _params(tmp_path, min_seconds=2.0), tmp_path / "card")
    assert after["git_revision"] == head and before["git_revision"] is None
    changed = [k for k in dataset.DATA_PARAMS if before["params"][k] != after["params"][k]]
    assert changed == ["ingest"]
    assert before["sources"][0]["sha256"] != after["sources"][0]["sha256"]
    assert before["commercial_use"] == "no" and after["commercial_use"] == "as licensed"


def test_card_refuses_missing_inputs_and_params_sections(tmp_path):
    p = subprocess.run([sys.executable, *card_argv(tmp_path, _params(tmp_path))],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "--audio" in p.stderr and "no such folder" in p.stderr
    write_version(tmp_path, V1, TOK1, [])
    params = yaml.safe_load(_params(tmp_path).read_text())
    del params["mulan"]["rvq"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    p = subprocess.run([sys.executable, *card_argv(tmp_path, tmp_path / "params.yaml")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "missing section 'mulan.rvq'" in p.stderr, p.stderr
    assert not (tmp_path / "card").exists()


def test_the_card_stage_declares_the_params_it_hashes():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["dataset_card"]
    assert tuple(stage["params"]) == dataset.DATA_PARAMS
    assert {"data/audio", "data/tokens"} <= set(stage["deps"]) and stage["outs"] == ["data/card"]


# --- the dataset version a model was trained on -------------------------------------------

def test_show_prints_the_version_id_of_each_revision(clone, tmp_path):
    from cantus.dataset_version import of_folder

    ids = {}
    for tag, spec, toks in (("v1", V1, TOK1), ("v2", V2, TOK2)):
        write_version(tmp_path / tag, spec, toks, [])  # the same token tables, bytes and all
        ids[tag] = of_folder(str(tmp_path / tag / "data" / "tokens"))
        p = cantus("dataset", "show", "--rev", tag, "--repo", str(clone), cwd=clone.parent)
        assert p.returncode == 0, p.stderr
        assert f"version: {ids[tag]}  " in p.stdout, p.stdout
        assert "local     data/demo" in p.stdout
    assert ids["v1"] != ids["v2"]
    d = cantus("dataset", "diff", "v1", "v2", "--repo", str(clone), cwd=clone.parent).stdout
    assert f"version {ids['v1']} -> {ids['v2']}" in d


def test_a_trained_stage_records_the_version_and_generate_prints_it(tmp_path, capsys,
                                                                      monkeypatch):
    """The LM trainer writes the id of the token folder it read into config.json, and
    `cantus generate` prints the ids its stages recorded, and its real-time factor."""
    from cantus.dataset_version import of_folder
    from cantus.generate import run as generate
    from cantus.train.run import Inputs, run
    from cantus.train.synthetic import write_synthetic_tokens
    from test_lm_train import tiny_cfg

    tokens = write_synthetic_tokens(tmp_path / "tokens", chunks=4, seconds=2.0, valid=1,
                                    shards_train=1)
    run(tiny_cfg("fine", steps=2, dedup=False), "fine",
        Inputs(str(tokens), str(tmp_path / "ck")), tmp_path / "lm_fine")
    version = of_folder(str(tokens))
    assert json.loads((tmp_path / "lm_fine" / "config.json").read_text())[
        "dataset_version"] == version

    class Chain:  # the models a run of `dvc repro` leaves, as the command sees them
        sample_rate = 100

        def __init__(self, paths, device):
            self.dataset_versions = {s: version for s in ("semantic", "coarse", "fine")}

        def generate(self, prompts, cfg, seconds, samples, seed):
            return np.zeros((2, int(seconds * self.sample_rate)), np.float32)

    monkeypatch.setattr(generate, "Generator", Chain)
    assert generate.main(["a harp piece", "--out", str(tmp_path / "x.wav"), "--seconds", "3",
                          "--params", str(ROOT / "params.yaml")]) == 0
    out = capsys.readouterr().out
    assert f"trained on dataset version {version} " in out, out
    assert "generated 6.0 s of audio in " in out and "real-time factor " in out
    assert generate.trained_on({"semantic": None, "coarse": None}).startswith(
        "dataset version: not recorded")
    assert generate.trained_on({"semantic": "a", "coarse": None}) == (
        "LM stages trained on different dataset versions: semantic a, coarse not recorded")
