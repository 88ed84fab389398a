"""End to end: the whole dvc.yaml chain on configs/tiny.yaml, in a copy of this checkout.

The copy holds what git would commit (tracked files plus untracked, not
ignored ones), so stages added to dvc.yaml are run too. One module fixture
runs ``dvc repro`` once; the tests then check a no-op rerun, a DVC remote
round trip into a fresh clone, and (last, as it changes the workspace) that a
k-means parameter re-runs only what depends on it. Stages run as subprocesses
with this interpreter first on PATH, so dvc.yaml's ``python`` is this one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

pytestmark = pytest.mark.slow

MODELS = ("codec", "semantic", "semantic_kmeans", "mulan", "mulan_rvq",
          "lm_semantic", "lm_coarse", "lm_fine")
_GIT = ["git", "-c", "user.name=cantus-test", "-c", "user.email=test@cantus.invalid",
        "-c", "commit.gpgsign=false"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("RAY_ADDRESS", None)  # never join someone's cluster; a local Ray binds loopback
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env["DVC_NO_ANALYTICS"] = "1"
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    return env


def sh(cwd: Path, *cmd: str) -> str:
    """Run a command in ``cwd``; its stdout and stderr, or a failure showing both."""
    p = subprocess.run(list(cmd), cwd=cwd, env=_env(), capture_output=True, text=True)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{out[-6000:]}"
    return out


def dvc(cwd: Path, *args: str) -> str:
    return sh(cwd, sys.executable, "-m", "dvc", *args)


def git(cwd: Path, *args: str) -> str:
    return sh(cwd, *_GIT, *args)


def copy_checkout(src: Path, dst: Path) -> None:
    """The files git would commit from ``src`` (tracked and untracked-not-ignored)."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=src, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in names)):
        if (src / name).is_file():  # a deleted-but-tracked file is listed too
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def ran(log: str) -> set[str]:
    return {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage '")}


@pytest.fixture(scope="module")
def default_data(tmp_path_factory) -> tuple[dict, dict]:
    """(committed, fresh) dvc.lock stages after `dvc repro ingest` at the embedded default
    in a copy of this checkout (demo_corpus + ingest, about a minute)."""
    repo = tmp_path_factory.mktemp("default") / "repo"
    repo.mkdir()
    copy_checkout(ROOT, repo)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "copy")
    committed = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    dvc(repo, "repro", "ingest")
    return committed, yaml.safe_load((repo / "dvc.lock").read_text())["stages"]


def _same_outs(default_data, stage: str) -> None:
    committed, fresh = default_data
    assert fresh[stage]["params"] == committed[stage]["params"], (
        f"dvc.lock is stale: params.yaml's '{stage}' params differ; run dvc repro and "
        "commit dvc.lock")
    want = {o["path"]: o["md5"] for o in committed[stage]["outs"]}
    assert {o["path"]: o["md5"] for o in fresh[stage]["outs"]} == want, stage


def test_demo_corpus_reproduces_the_committed_lock_bit_for_bit(default_data):
    _same_outs(default_data, "demo_corpus")


def test_ingest_reproduces_the_committed_lock_bit_for_bit(default_data):
    _same_outs(default_data, "ingest")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A git repo copied from this checkout, with configs/tiny.yaml applied and repro'd."""
    root = tmp_path_factory.mktemp("pipeline")
    repo = root / "run"
    repo.mkdir()
    copy_checkout(ROOT, repo)
    git(repo, "init", "-q")
    sh(repo, sys.executable, "-m", "cantus.overlay", "apply", "configs/tiny.yaml")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "tiny")
    log = dvc(repo, "repro")
    assert {"demo_corpus", "ingest", "codec_train", "semantic_kmeans", "tokenize_pack",
            "lm_train@semantic", "lm_train@coarse", "lm_train@fine", "generate",
            "evaluate"} <= ran(log)
    git(repo, "add", "-A")  # dvc.lock, metrics, the .gitignore files dvc wrote
    git(repo, "commit", "-qm", "repro")
    return repo


def test_repro_builds_every_output_and_the_metrics_parse(run_dir):
    for name in MODELS:
        assert any((run_dir / "models" / name).iterdir()), name
    assert (run_dir / "data/audio/manifest.parquet").is_file()
    manifest = json.loads((run_dir / "data/tokens/manifest.json").read_text())
    assert manifest["tokenizers"]["acoustic"]["codebook_size"] == 16
    assert sorted((run_dir / "data/tokens").glob("train-*.tar"))
    # every output of every stage in the lock, whichever stages dvc.yaml has now
    lock = yaml.safe_load((run_dir / "dvc.lock").read_text())
    outs = [o["path"] for st in lock["stages"].values() for o in st.get("outs", [])]
    assert outs and all((run_dir / p).exists() for p in outs), outs
    shown = json.loads(dvc(run_dir, "metrics", "show", "--json"))
    files = shown[""]["data"]
    assert files and all("error" not in v for v in files.values()), files
    for name in files:
        assert json.loads((run_dir / name).read_text()), name
    assert {"metrics/codec.json", "metrics/semantic.json", "metrics/mulan.json"} <= set(files)
    lm = json.loads((run_dir / "metrics/lm_fine/metrics.json").read_text())
    assert lm["step"] == 6 and lm["val_ppl"] < 16  # below uniform over the tiny K = 16 codes
    report = json.loads((run_dir / "reports/metrics.json").read_text())
    assert report["generation"]["n_prompts"] == len(list((run_dir / "data/generated")
                                                         .glob("gen-*.wav")))
    assert {"codec", "mulan", "lm_fine"} <= set(report["stages"])
    assert "id='examples'" in (run_dir / "reports/report.html").read_text()


def test_second_repro_does_nothing(run_dir):
    log = dvc(run_dir, "repro")
    assert "Data and pipelines are up to date" in log and not ran(log)
    assert json.loads(dvc(run_dir, "status", "--json")) == {}


def test_retraining_from_the_same_inputs_gives_the_same_outputs(run_dir):
    """Outputs are functions of their inputs: a trainer run afresh (checkpoints gone) and
    generation run again write the same bytes, so nothing below them is left to run."""
    before = {f: tree_digest(run_dir / f) for f in ("models/codec", "models/lm_fine",
                                                     "data/generated")}
    for folder in ("checkpoints/codec", "checkpoints/lm_fine"):
        shutil.rmtree(run_dir / folder)
    log = dvc(run_dir, "repro", "-f", "-s", "codec_train")
    assert ran(log) == {"codec_train"}
    dvc(run_dir, "repro", "-f", "-s", "lm_train@fine")
    dvc(run_dir, "repro", "-f", "-s", "generate")
    for folder, digest in before.items():
        assert tree_digest(run_dir / folder) == digest, folder
    assert json.loads(dvc(run_dir, "status", "--json")) == {}


def test_push_then_pull_in_a_fresh_clone_needs_no_recompute(run_dir, tmp_path):
    dvc(run_dir, "remote", "add", "-d", "-f", "store", str(tmp_path / "remote"))
    git(run_dir, "commit", "-qam", "remote")
    dvc(run_dir, "push")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(run_dir), str(clone))
    dvc(clone, "pull")
    assert json.loads(dvc(clone, "status", "--json")) == {}
    for folder in ["data/tokens", "data/audio", *(f"models/{m}" for m in MODELS)]:
        assert tree_digest(clone / folder) == tree_digest(run_dir / folder), folder
    log = dvc(clone, "repro")
    assert "Data and pipelines are up to date" in log and not ran(log)


def test_kmeans_k_reruns_only_what_depends_on_it(run_dir, tmp_path):
    """Last: leaves the workspace on the experiment. A semantic K of its own runs through
    the LM stages that read semantic tokens (each field's K comes from the manifest)."""
    codec = tree_digest(run_dir / "models/codec")
    log = dvc(run_dir, "exp", "run", "-S", "semantic.kmeans.clusters=8",
              "lm_train@semantic", "lm_train@coarse", "semantic_eval")
    assert ran(log) == {"semantic_kmeans", "semantic_eval", "tokenize_semantic", "tokenize_pack",
                        "lm_train@semantic", "lm_train@coarse"}
    assert "Stage 'codec_train' didn't change, skipping" in log
    assert tree_digest(run_dir / "models/codec") == codec
    status = json.loads(dvc(run_dir, "status", "--json"))
    assert {"lm_train@fine", "generate"} <= set(status)  # downstream, not asked for
    assert not {"codec_train", "codec_eval", "tokenize_acoustic", "mulan_train",
                "lm_train@semantic", "lm_train@coarse"} & set(status)
    for stage in ("semantic", "coarse"):
        layout = json.loads((run_dir / f"models/lm_{stage}/config.json").read_text())["layout"]
        assert layout["sizes"] == {"acoustic": 16, "semantic": 8, "mulan": 16}
    tokens = json.loads((run_dir / "data/tokens/manifest.json").read_text())["tokenizers"]
    assert tokens["semantic"]["k"] == 8 and tokens["acoustic"]["codebook_size"] == 16
    diff = json.loads(dvc(run_dir, "metrics", "diff", "--json"))
    assert "metrics/semantic.json" in diff and diff["metrics/semantic.json"]
    assert "metrics/codec.json" not in diff
    dvc(run_dir, "plots", "diff", "-o", str(tmp_path / "plots"))
    assert (tmp_path / "plots" / "index.html").is_file()
