"""``ingest.sources`` in params.yaml and ``cantus add-source`` (cantus.ingest.add_source).

The params tests load the entries as ``dvc exp run -S`` writes them (DVC's own override
code on a copy of params.yaml). The add-source tests run in a git + DVC repository made
in the test, with a folder of music outside it: the import, the params edit (comments
kept), the refusals, and a change in the original folder reaching ``dvc status`` of a
stage that depends on ``data/sources``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cantus.config import ConfigError, from_dict, load_section
from cantus.ingest.params import IngestConfig, SourceConfig
from cantus.ingest.sources import read_caption_table
from conftest import ROOT, melody, write


def _ingest() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())["ingest"]


def test_the_default_source_is_the_demo_corpus():
    cfg = load_section(ROOT / "params.yaml", "ingest", IngestConfig)
    assert cfg.sources == (SourceConfig(kind="folder", path="data/demo", captions=""),)


@pytest.mark.parametrize("sources, key", [
    ([{"kind": "folder", "path": "data/demo"}, {"kind": "dir", "path": "x"}],
     "'ingest.sources[1].kind' must be one of"),
    ([{"kind": "folder"}], "missing key 'ingest.sources[0].path'"),
    ([{"kind": "folder", "path": "a", "name": "a"}], "unknown key 'ingest.sources[0].name'"),
    ([{"kind": "folder", "path": ""}], "'ingest.sources[0].path' must not be empty"),
    ([{"kind": "folder", "path": "a"}, {"kind": "url_list", "path": "u.txt",
                                        "captions": "c.csv"}], "'ingest.sources[1].captions'"),
    ([{"kind": "glob", "path": "a/*.wav", "captions": "c.txt"}],
     "'ingest.sources[0].captions' must be a .csv or .jsonl"),
    ("data/demo", "'ingest.sources' must be a list"),
])
def test_bad_source_entries_are_named(sources, key):
    d = {**_ingest(), "sources": sources}
    with pytest.raises(ConfigError) as e:
        from_dict(IngestConfig, d, prefix="ingest")
    assert key in str(e.value)


def test_sources_set_as_dvc_exp_run_sets_them(tmp_path):
    """`dvc exp run -S 'ingest.sources=[...]'` rewrites params.yaml with DVC's hydra
    override code (dvc.utils.hydra.apply_overrides, what -S calls); the entries load."""
    from dvc.utils.hydra import apply_overrides, get_hydra_sweeps

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    value = ("ingest.sources=[{kind:folder,path:data/demo},"
             "{kind:glob,path:'data/sources/mine/**/*.flac',captions:data/sources/m.csv},"
             "{kind:url_list,path:data/sources/urls.txt}]")
    assert get_hydra_sweeps({"params.yaml": [value]}) == [{"params.yaml": [value]}]  # no sweep
    apply_overrides(params, [value])
    cfg = load_section(params, "ingest", IngestConfig)
    assert cfg.sources == (
        SourceConfig("folder", "data/demo"),
        SourceConfig("glob", "data/sources/mine/**/*.flac", "data/sources/m.csv"),
        SourceConfig("url_list", "data/sources/urls.txt"))
    before = yaml.safe_load((ROOT / "params.yaml").read_text())
    after = yaml.safe_load(params.read_text())
    assert {k: v for k, v in after["ingest"].items() if k != "sources"} == {
        k: v for k, v in before["ingest"].items() if k != "sources"}
    assert {k: v for k, v in after.items() if k != "ingest"} == {
        k: v for k, v in before.items() if k != "ingest"}
    assert "# Cantus hyperparameters" in params.read_text()  # DVC keeps the comments


# --- cantus add-source ----------------------------------------------------------------------

def sh(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    p = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True)
    assert p.returncode == 0, f"{args}: {p.stdout}\n{p.stderr}"
    return p


def dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return sh(sys.executable, "-m", "dvc", *args, cwd=cwd)


def cantus(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cantus.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture
def repo(tmp_path) -> Path:
    """A git + DVC repository holding the project's params.yaml and a stage that depends on
    data/sources (recorded with `dvc commit`, never run), and a folder of music beside it."""
    repo = tmp_path / "repo"
    (repo / "data" / "sources").mkdir(parents=True)
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    sh("git", "config", "user.email", "t@example.com", cwd=repo)
    sh("git", "config", "user.name", "t", cwd=repo)
    dvc("init", "-q", cwd=repo)
    dvc("config", "core.analytics", "false", cwd=repo)
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    shutil.copy(ROOT / "data" / "sources" / "README.md", repo / "data" / "sources")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"ingest": {
        "cmd": "echo ingest", "deps": ["data/sources"]}}}))
    dvc("commit", "-q", "-f", "ingest", cwd=repo)
    music = tmp_path / "music"
    for i in range(2):
        write(music / "album" / f"t{i}.wav", melody(i, 1.0, rate=8000), rate=8000)
    (tmp_path / "captions.csv").write_text("path,caption\nmusic/album/t0.wav,a calm tune\n"
                                           "music/album/t1.wav,a fast tune\n")
    return repo


def test_add_source_imports_a_folder_and_lists_it_in_params(repo):
    music, table = repo.parent / "music", repo.parent / "captions.csv"
    text_before = (repo / "params.yaml").read_text()
    p = cantus("add-source", str(music), "--captions", str(table), cwd=repo)
    assert p.returncode == 0, p.stderr
    assert "added data/sources/music (folder, md5 " in p.stdout
    assert "git add data/sources/music.dvc data/sources/.gitignore params.yaml" in p.stdout
    assert "dvc repro" in p.stdout
    dvc_file = yaml.safe_load((repo / "data/sources/music.dvc").read_text())
    assert dvc_file["deps"][0]["path"] == str(music.resolve())
    assert (repo / "data/sources/music/album/t1.wav").read_bytes() == (
        music / "album/t1.wav").read_bytes()
    assert "/music" in (repo / "data/sources/.gitignore").read_text()
    # the entry is appended, every comment and every other value kept
    text = (repo / "params.yaml").read_text()
    comments = [ln.strip() for ln in text_before.splitlines() if ln.strip().startswith("#")]
    assert comments and all(c in text for c in comments)
    old, new = yaml.safe_load(text_before), yaml.safe_load(text)
    assert new["ingest"].pop("sources") == [*old["ingest"].pop("sources"), {
        "kind": "folder", "path": "data/sources/music",
        "captions": "data/sources/music.captions.csv"}]
    assert new == old
    cfg = load_section(repo / "params.yaml", "ingest", IngestConfig)
    assert cfg.sources[-1].captions == "data/sources/music.captions.csv"
    # the rewritten table names the imported files
    got = read_caption_table(repo / "data/sources/music.captions.csv")
    assert {Path(k).relative_to(repo).as_posix(): v["caption"] for k, v in got.items()} == {
        "data/sources/music/album/t0.wav": "a calm tune",
        "data/sources/music/album/t1.wav": "a fast tune"}


def test_add_source_refuses_clearly(repo):
    music = repo.parent / "music"
    p = cantus("add-source", str(repo.parent / "nowhere"), cwd=repo)
    assert p.returncode == 2 and "nowhere: no such file or folder" in p.stderr, p.stderr
    p = cantus("add-source", str(repo / "data"), cwd=repo)
    assert p.returncode == 2 and "inside the repository" in p.stderr, p.stderr
    assert cantus("add-source", str(music), cwd=repo).returncode == 0
    before = (repo / "params.yaml").read_text()
    p = cantus("add-source", str(music), "--name", "other", cwd=repo)
    assert p.returncode == 2 and "was added already, as data/sources/music.dvc" in p.stderr
    assert "cantus add-source --update music" in p.stderr
    other = repo.parent / "elsewhere" / "music"
    write(other / "x.wav", melody(5, 1.0, rate=8000), rate=8000)
    p = cantus("add-source", str(other), cwd=repo)
    assert p.returncode == 2 and "name clash: data/sources/music exists" in p.stderr, p.stderr
    p = cantus("add-source", str(other), "--name", "../x", cwd=repo)
    assert p.returncode == 2 and "--name '../x'" in p.stderr, p.stderr
    p = cantus("add-source", str(music / "album" / "t0.wav"), "--captions", "c.csv", cwd=repo)
    assert p.returncode == 2 and "carries its own captions" in p.stderr, p.stderr
    assert (repo / "params.yaml").read_text() == before  # no refusal wrote anything
    assert sorted(f.name for f in (repo / "data/sources").glob("*.dvc")) == ["music.dvc"]


def test_a_change_in_the_original_folder_reaches_dvc_status(repo):
    music = repo.parent / "music"
    assert cantus("add-source", str(music), cwd=repo).returncode == 0
    dvc("commit", "-q", "-f", "ingest", cwd=repo)
    assert "changed deps" not in dvc("status", "ingest", cwd=repo).stdout
    md5 = yaml.safe_load((repo / "data/sources/music.dvc").read_text())["outs"][0]["md5"]
    p = cantus("add-source", "--update", "music", cwd=repo)
    assert p.returncode == 0 and "unchanged" in p.stdout, p.stdout + p.stderr
    write(music / "album" / "t0.wav", melody(9, 1.0, rate=8000), rate=8000)  # edited in place
    p = cantus("add-source", "--update", "music", cwd=repo)
    assert p.returncode == 0, p.stderr
    new = yaml.safe_load((repo / "data/sources/music.dvc").read_text())["outs"][0]["md5"]
    assert new != md5 and f"md5 {md5} -> {new}" in p.stdout
    assert np.array_equal(np.frombuffer((repo / "data/sources/music/album/t0.wav").read_bytes(),
                                        np.uint8),
                          np.frombuffer((music / "album/t0.wav").read_bytes(), np.uint8))
    status = dvc("status", "ingest", cwd=repo).stdout
    assert "modified:" in status and "data/sources" in status, status
    p = cantus("add-source", "--update", "nothing", cwd=repo)
    assert p.returncode == 2 and "no source of that name" in p.stderr, p.stderr


def test_add_source_takes_a_url_list_and_a_glob(repo):
    urls = repo.parent / "lists" / "urls.txt"
    urls.parent.mkdir()
    urls.write_text("https://example.com/a.mp3\tsomething\n")
    p = cantus("add-source", str(urls), cwd=repo)
    assert p.returncode == 0, p.stderr
    assert (repo / "data/sources/urls.txt").read_text() == urls.read_text()
    pattern = str(repo.parent / "music" / "**" / "*.wav")
    p = cantus("add-source", pattern, "--name", "wavs", cwd=repo)
    assert p.returncode == 0, p.stderr
    cfg = load_section(repo / "params.yaml", "ingest", IngestConfig)
    assert cfg.sources[-2:] == (SourceConfig("url_list", "data/sources/urls.txt"),
                                SourceConfig("glob", "data/sources/wavs/**/*.wav"))
    assert (repo / "data/sources/wavs/album/t0.wav").is_file()
