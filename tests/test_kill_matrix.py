"""SIGKILL at seeded random points of each stage; the rerun's outputs equal an uninterrupted run's.

One tiny chain (seeded melodies with captions, configs/tiny.yaml plus a few
overrides below) is run uninterrupted once, every stage as ``cantus ...`` in a
subprocess: those outputs are the references. Then, for each stage of the
matrix and each of 3 kill points ``k`` (distinct, drawn by a seeded RNG), the
stage runs again into a fresh folder as a child that is held after its k-th
item (an input, a shard, a trainer's step, a generation: a call of the
function in ``TARGETS``), killed there with SIGKILL, so the kill lands
mid-stage, between two items, and then rerun. A trainer is killed after step
k logged its curves and before its checkpoint (one every 2 steps), so the
rerun redoes 1 or 2 steps. The harness asserts:

- the kill landed before the stage finished (killed by the signal, no final output);
- the rerun resumed where the stage promises it: ingest takes the finished
  inputs from its cache, tokenize skips the finished shards, the trainers load
  the newest checkpoint the killed run left (pack and generate-eval promise no
  resume and redo everything);
- the rerun's outputs equal the reference byte for byte (``read_dir_bytes``),
  and the trainers' dvclive curves too; the one field left out is
  ``checkpoint`` in the w2v-BERT manifest, the output folder's own path.

Children run with one torch thread (bit-reproducible, and the CPU is shared).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, melody, read_dir_bytes, write

pytestmark = pytest.mark.slow

KILLS_PER_STAGE = 3
# What the matrix adds to configs/tiny.yaml: more shards (more kill points between them),
# the trainers' curves at every step and a checkpoint every CHECKPOINT_EVERY steps (a kill
# after step k's curves loses the steps since the newest checkpoint), one generation a batch.
CHECKPOINT_EVERY = 2
OVERRIDES = f"""
ingest: {{shard_max_samples: 2}}
codec: {{train: {{checkpoint_every: {CHECKPOINT_EVERY}, log_every: 1}}}}
semantic: {{pretrain: {{checkpoint_every: {CHECKPOINT_EVERY}, log_every: 1}}}}
mulan: {{train: {{checkpoint_every: {CHECKPOINT_EVERY}, log_every: 1}}}}
lm:
  semantic: {{train: {{checkpoint_every: {CHECKPOINT_EVERY}, log_every: 1}}}}
  coarse: {{train: {{checkpoint_every: {CHECKPOINT_EVERY}, log_every: 1}}}}
  fine: {{train: {{checkpoint_every: {CHECKPOINT_EVERY}, log_every: 1}}}}
generate: {{batch_size: 1}}
"""
CAPTIONS = [{"caption": "a slow piece on harp", "tags": {"instruments": ["harp"]}},
            {"caption": "a fast reel on banjo", "tags": {"instruments": ["banjo"]}},
            {"caption": "banjo and harp duet", "tags": {"instruments": ["banjo", "harp"]}}]

# stage -> the function of one item ("module:attribute"); its k-th call is the kill point
TARGETS = {
    "ingest": "cantus.ingest.staging:process_task",
    "tokenize acoustic": "cantus.tokenize.run:ShardTokenizer.run",
    "tokenize semantic": "cantus.tokenize.run:ShardTokenizer.run",
    "tokenize mulan": "cantus.tokenize.run:ShardTokenizer.run",
    "pack": "cantus.tokenize.pack:pack_shard",
    "codec train": "cantus.training:Metrics.log",    # step k's curves, before its checkpoint
    "semantic pretrain": "cantus.training:Metrics.log",
    "mulan train": "cantus.training:Metrics.log",
    "train coarse": "cantus.training:Metrics.log",
    "generate-eval": "cantus.generate.run:Generator._chain",
}
TRAINERS = {"codec train": "codec", "semantic pretrain": "semantic", "mulan train": "mulan",
            "train coarse": "lm_coarse"}

# The child: `cantus ARGS`; with $KILL_TARGET, held after its $KILL_AT-th call returns
# (once $KILL_PROGRESS is written) until killed; with $KILL_RESUMED, the step of every
# checkpoint loaded appended to that file.
CHILD = r"""
import functools, importlib, os, sys, time

def patch(spec, wrap):
    mod, _, attr = spec.partition(":")
    owner = importlib.import_module(mod)
    *path, name = attr.split(".")
    for p in path:
        owner = getattr(owner, p)
    setattr(owner, name, functools.wraps(getattr(owner, name))(wrap(getattr(owner, name))))

def paused(real):
    calls = []
    def call(*a, **kw):
        out = real(*a, **kw)
        calls.append(1)
        if len(calls) == int(os.environ["KILL_AT"]):
            with open(os.environ["KILL_PROGRESS"], "w") as f:
                f.write(f"{len(calls)}\n")
            while True:  # held here until the harness kills it
                time.sleep(1)
        return out
    return call

def recorded(real):
    def call(*a, **kw):
        state = real(*a, **kw)
        with open(os.environ["KILL_RESUMED"], "a") as f:
            f.write(f"{-1 if state is None else int(state['step'])}\n")
        return state
    return call

if os.environ.get("KILL_TARGET"):
    patch(os.environ["KILL_TARGET"], paused)
if os.environ.get("KILL_RESUMED"):
    patch("cantus.training:Checkpoints.latest", recorded)
from cantus.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def cantus(args: list[str], log: Path, **env: str) -> subprocess.CompletedProcess:
    """``cantus ARGS`` (through CHILD) to completion; stdout returned, both kept in ``log``."""
    p = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True,
                       env=_env(**env))
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ cantus {' '.join(args)}\n{p.stdout}\n{p.stderr}")
    assert p.returncode == 0, f"cantus {' '.join(args)} exited {p.returncode}:\n{p.stderr[-4000:]}"
    return p


def stage_args(name: str, c: Path, r: Path) -> list[str]:
    """The ``cantus`` arguments of stage ``name``: inputs from the chain folder ``c``,
    outputs under ``r`` (``c`` itself for the reference run)."""
    p, audio, m = ["--params", str(c / "params.yaml")], ["--audio", str(c / "audio")], c / "models"

    def trainer(words: list[str], model: str, inputs: list[str]) -> list[str]:
        return [*words, *p, *inputs, "--out", str(r / "models" / model), "--checkpoints",
                str(r / "ck" / model), "--live", str(r / "live" / model)]

    if name.startswith("train "):
        stage = name.split()[1]
        return trainer(["train", "--stage", stage], f"lm_{stage}",
                       ["--tokens", str(c / "tokens")])
    return {
        "ingest": ["ingest", *p, "--source", str(c / "src"), "--out", str(r / "audio"),
                   "--cache", str(r / "cache")],
        "codec train": trainer(["codec", "train"], "codec", audio),
        "semantic pretrain": trainer(["semantic", "pretrain"], "semantic", audio),
        "mulan train": trainer(["mulan", "train"], "mulan", audio),
        "semantic kmeans": ["semantic", "kmeans", *p, *audio, "--model", str(m / "semantic"),
                            "--out", str(r / "models" / "semantic_kmeans")],
        "mulan rvq": ["mulan", "rvq", *p, *audio, "--model", str(m / "mulan"), "--out",
                      str(r / "models" / "mulan_rvq")],
        "tokenize acoustic": ["tokenize", "acoustic", *p, *audio, "--codec", str(m / "codec"),
                              "--out", str(r / "tokens_acoustic")],
        "tokenize semantic": ["tokenize", "semantic", *p, *audio, "--semantic",
                              str(m / "semantic"), "--semantic-kmeans",
                              str(m / "semantic_kmeans"), "--out", str(r / "tokens_semantic")],
        "tokenize mulan": ["tokenize", "mulan", *p, *audio, "--mulan", str(m / "mulan"),
                           "--mulan-rvq", str(m / "mulan_rvq"), "--out", str(r / "tokens_mulan")],
        "pack": ["pack", *audio, *[a for f in ("acoustic", "semantic", "mulan")
                                   for a in (f"--{f}", str(c / f"tokens_{f}"))],
                 "--out", str(r / "tokens")],
        "generate-eval": ["generate-eval", *p, *audio, "--models", str(m), "--out",
                          str(r / "generated"), "--timing", str(r / "generate.json")],
    }[name]


def outputs(name: str, r: Path) -> Path:
    """The folder stage ``name`` writes under ``r`` (the one compared)."""
    if name in TRAINERS:
        return r / "models" / TRAINERS[name]
    return r / {"ingest": "audio", "pack": "tokens", "generate-eval": "generated"}.get(
        name, name.replace("tokenize ", "tokens_"))


CHAIN = ("ingest", "codec train", "semantic pretrain", "mulan train", "semantic kmeans",
         "mulan rvq", "tokenize acoustic", "tokenize semantic", "tokenize mulan", "pack",
         "train semantic", "train coarse", "train fine", "generate-eval")


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    """Every stage of the tiny chain run once, uninterrupted, into one folder."""
    c = tmp_path_factory.mktemp("chain")
    for i in range(8):  # 6 s each: 2 chunks of 3 s
        write(c / "src" / f"piece{i}.flac", melody(1800 + i, 6.0))
        (c / "src" / f"piece{i}.json").write_text(json.dumps(CAPTIONS[i % 3]))
    (c / "matrix.yaml").write_text(OVERRIDES)
    for overlay, base in ((ROOT / "configs" / "tiny.yaml", ROOT / "params.yaml"),
                          (c / "matrix.yaml", c / "params.yaml")):
        subprocess.run([sys.executable, "-m", "cantus.overlay", "apply", str(overlay),
                        "--params", str(base), "--out", str(c / "params.yaml")], check=True,
                       capture_output=True)
    for name in CHAIN:
        cantus(stage_args(name, c, c), c / "logs" / f"{name}.log")
    return c


def items(name: str, c: Path) -> int:
    """How many items (inputs, shards, steps, generations) stage ``name`` has."""
    import yaml

    params = yaml.safe_load((c / "params.yaml").read_text())
    if name == "ingest":
        return len(list((c / "src").glob("*.flac")))
    if name.startswith("tokenize") or name == "pack":
        return len(list((c / "audio").glob("*.tar")))
    if name == "generate-eval":
        return len(json.loads((c / "generated" / "prompts.json").read_text())["prompts"])
    section = {"codec train": ("codec", "train"), "semantic pretrain": ("semantic", "pretrain"),
               "mulan train": ("mulan", "train"), "train coarse": ("lm", "coarse", "train")}
    for key in section[name]:
        params = params[key]
    assert params["log_every"] == 1 and params["checkpoint_every"] == CHECKPOINT_EVERY
    return params["steps"]


def kill_points(name: str, n: int) -> list[int]:
    """KILLS_PER_STAGE distinct k in [first, n) (after the k-th of n items), seeded by the
    stage; a trainer's first kill point comes after its first checkpoint."""
    first = CHECKPOINT_EVERY + 1 if name in TRAINERS else 1
    assert n - first >= KILLS_PER_STAGE, f"{name}: {n} items leave too few kill points"
    rng = np.random.default_rng([18, *name.encode()])
    return sorted(int(k) for k in rng.choice(np.arange(first, n), KILLS_PER_STAGE,
                                             replace=False))


def kill_after(args: list[str], target: str, k: int, r: Path) -> None:
    """Run ``cantus ARGS`` as a child held after its k-th call of ``target``; SIGKILL it
    there. Fails when the child ends first (the kill would not land mid-stage)."""
    progress = r / "progress"
    r.mkdir(parents=True)
    with (r / "killed.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=log, stderr=log,
                                env=_env(KILL_TARGET=target, KILL_PROGRESS=str(progress),
                                         KILL_AT=str(k)))
        while proc.poll() is None and not progress.exists():
            time.sleep(0.02)
        alive = proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert alive and proc.returncode == -signal.SIGKILL, (
        f"the child ended (exit {proc.returncode}) before its item {k}:\n"
        + (r / "killed.log").read_text()[-3000:])


def comparable(name: str, folder: Path) -> dict[str, bytes]:
    """The stage's output bytes; the w2v-BERT manifest without its own folder's path."""
    files = read_dir_bytes(folder)
    if name == "semantic pretrain":
        manifest = json.loads(files["manifest.json"])
        assert manifest.pop("checkpoint") == str(folder)
        files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files


def curves(folder: Path) -> dict[str, bytes]:
    """A dvclive folder's step curves (``plots/metrics/*.tsv``)."""
    return {k: v for k, v in read_dir_bytes(folder).items() if k.startswith("plots/")}


def check_resumed(name: str, r: Path, rerun: subprocess.CompletedProcess, k: int) -> str:
    """Assert the rerun took up what the killed run finished; returns what it resumed."""
    if name == "ingest":
        cached = int(re.search(r"(\d+) inputs from the cache", rerun.stdout).group(1))
        assert cached == int(r.joinpath("finished").read_text()) >= k, (cached, k)
        return f"{cached} inputs cached"
    if name.startswith("tokenize"):
        done = int(re.search(r"\((\d+) already done\)", rerun.stdout).group(1))
        assert done == r.joinpath("finished").read_text().count("\n") >= k, (done, k)
        return f"{done} shards skipped"
    if name in TRAINERS:
        loaded = [int(s) for s in (r / "resumed").read_text().split()]
        left = int(r.joinpath("finished").read_text())  # the newest checkpoint the kill left
        assert loaded[0] == left == CHECKPOINT_EVERY * ((k - 1) // CHECKPOINT_EVERY), (
            loaded, left, k)  # killed after step k's curves, before its checkpoint
        return f"resumed from step {left}, {k - left} step(s) redone"
    return "recomputed (no resume promised)"


def _record_left(name: str, r: Path) -> None:
    """What the killed run left that the rerun may take up (written to ``r/finished``):
    the inputs in the cache, the finished shards, the newest checkpoint's step."""
    if name.startswith("tokenize"):
        out = outputs(name, r)
        assert not (out / "index.parquet").exists()
        r.joinpath("finished").write_text("".join(f"{p.name}\n" for p in out.glob("*.tar")))
    elif name in TRAINERS:
        assert not (outputs(name, r) / "model.safetensors").exists()
        steps = [int(p.stem.split("-")[1]) for p in (r / "ck").rglob("step-*.pt")]
        r.joinpath("finished").write_text(str(max(steps)))
    elif name == "ingest":
        assert not (outputs(name, r) / "manifest.parquet").exists()
        r.joinpath("finished").write_text(str(len(list((r / "cache").rglob("*.tar")))))
    elif name == "pack":
        assert not (outputs(name, r) / "manifest.json").exists()
    else:
        assert not (outputs(name, r) / "prompts.json").exists()


@pytest.mark.parametrize("name", list(TARGETS))
def test_killed_stage_reruns_to_the_uninterrupted_outputs(chain, name, tmp_path):
    ref = comparable(name, outputs(name, chain))
    report = []
    for k in kill_points(name, items(name, chain)):
        r = tmp_path / f"kill-{k}"
        args = stage_args(name, chain, r)
        kill_after(args, TARGETS[name], k, r)
        _record_left(name, r)
        rerun = cantus(args, r / "rerun.log", KILL_RESUMED=str(r / "resumed"))
        how = check_resumed(name, r, rerun, k)
        assert comparable(name, outputs(name, r)) == ref, f"{name}, killed after item {k}"
        if name in TRAINERS:
            model = TRAINERS[name]
            assert curves(r / "live" / model) == curves(chain / "live" / model), (name, k)
        report.append(f"k={k}: {how}")
    print(f"{name}: " + "; ".join(report))
