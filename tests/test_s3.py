"""Object storage: every stage reads and writes ``s3://`` URLs on a real S3 server.

SeaweedFS runs on 127.0.0.1 (``tests/s3_server.py``); stages get its endpoint and
credentials from the environment only. The chain ingest -> tokenize -> pack -> LM data
loader on S3 gives the bytes (and batches) of the same chain on local disk; generation
loads its models from an S3 folder; a DVC remote on the server pushes and pulls.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cantus.tokenize.fields import FIELDS
from conftest import ROOT, melody, read_dir_bytes, tiny_tokenizer_models, write
from s3_server import s3_env, s3_server  # noqa: F401  (fixtures)

FIELD_ARGS = {"acoustic": ("codec",), "semantic": ("semantic", "semantic_kmeans"),
              "mulan": ("mulan", "mulan_rvq")}


def s3_bytes(server, url: str) -> dict[str, bytes]:
    """Every object under ``url`` (relative name -> bytes), as ``read_dir_bytes`` does."""
    fs = server.fs()
    root = url[len("s3://"):].rstrip("/")
    return {p[len(root) + 1:]: fs.cat_file(p) for p in sorted(fs.find(root))}


def put_folder(server, local: str | Path, url: str) -> None:
    fs = server.fs()
    for p in sorted(Path(local).rglob("*")):
        if p.is_file():
            fs.put_file(str(p), f"{url[len('s3://'):]}/{p.relative_to(local)}")


def _ingest_params(tmp: Path) -> Path:
    """params.yaml with a quick, in-process ingest (as ``audio_shards`` in conftest)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"].update(executor="local", chunk_seconds=3.0, hop_seconds=3.0,
                            min_chunk_seconds=0.9, shard_max_samples=4, valid_fraction=0.3)
    params["tokenize"]["executor"] = "local"
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Sources, their local ingest (in-process) and tiny tokenizer models."""
    from cantus.config import load_section
    from cantus.ingest import run as ingest
    from cantus.ingest.params import IngestConfig

    tmp = tmp_path_factory.mktemp("s3chain")
    for i in range(4):
        write(tmp / "src" / f"t{i}.flac", melody(410 + i, 7.0))
    params = _ingest_params(tmp)
    cfg = load_section(params, "ingest", IngestConfig)
    ingest.run(cfg, ingest.Inputs(local=(str(tmp / "src"),)), tmp / "audio", tmp / "cache")
    return tmp, params, tiny_tokenizer_models(tmp, tmp / "audio")


def _tok_cfg():
    from cantus.tokenize.run import load_config

    return dataclasses.replace(load_config(ROOT / "params.yaml"), executor="local")


def test_ingest_tokenize_pack_and_the_lm_loader_on_s3_equal_local_disk(chain, s3_env,
                                                                        monkeypatch):
    from cantus import shards
    from cantus.audio_stream import shard_paths
    from cantus.tokenize import pack
    from cantus.tokenize import run as tokenize
    from cantus.train.data import TokenBatches
    from cantus.train.layout import Layout, stage_spec
    from cantus.training import run_id

    tmp, params, models = chain
    monkeypatch.setenv("CANTUS_CACHE", str(tmp / "fetched"))
    base = s3_env.url("chain")
    # ingest through its command, credentials and endpoint from the environment only
    proc = subprocess.run([sys.executable, "-m", "cantus.ingest.run", "--params", str(params),
                           "--source", str(tmp / "src"), "--out", f"{base}/audio",
                           "--cache", str(tmp / "cache_s3")],
                          capture_output=True, text=True, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert s3_bytes(s3_env, f"{base}/audio") == read_dir_bytes(tmp / "audio")

    # tokenize one field from S3 audio, with the codec folder fetched from S3, into S3
    put_folder(s3_env, models["codec"], f"{base}/models/codec")
    tokenize.run(_tok_cfg(), FIELDS["acoustic"], tmp / "audio", {"codec": models["codec"]},
                 tmp / "tokens_acoustic")
    s = tokenize.run(_tok_cfg(), FIELDS["acoustic"], f"{base}/audio",
                     {"codec": f"{base}/models/codec"}, f"{base}/tokens_acoustic")
    assert s["chunks"] > 0 and s["shards_skipped"] == 0
    assert s3_bytes(s3_env, f"{base}/tokens_acoustic") == read_dir_bytes(tmp / "tokens_acoustic")
    fetched = list((tmp / "fetched" / "models").iterdir())
    assert [p.name.split("-")[0] for p in fetched] == ["codec"]
    assert read_dir_bytes(fetched[0]) == read_dir_bytes(Path(models["codec"]))
    again = tokenize.run(_tok_cfg(), FIELDS["acoustic"], f"{base}/audio",
                         {"codec": f"{base}/models/codec"}, f"{base}/tokens_acoustic")
    assert again["shards_skipped"] == s["shards"]  # a rerun finds its finished S3 shards

    # the other two fields made locally and uploaded; pack reads and writes S3
    local = {"acoustic": tmp / "tokens_acoustic"}
    for field in ("semantic", "mulan"):
        local[field] = tmp / f"tokens_{field}"
        tokenize.run(_tok_cfg(), FIELDS[field], tmp / "audio",
                     {n: models[n] for n in FIELD_ARGS[field]}, local[field])
        put_folder(s3_env, local[field], f"{base}/tokens_{field}")
    pack.run(tmp / "audio", local, tmp / "tokens")
    pack.run(f"{base}/audio", {f: f"{base}/tokens_{f}" for f in FIELDS}, f"{base}/tokens")
    assert s3_bytes(s3_env, f"{base}/tokens") == read_dir_bytes(tmp / "tokens")

    # the LM loader streams the S3 shards (2 forked DataLoader workers) batch for batch
    lay = Layout(stage_spec("coarse"), 1024, 1.0, False)
    paths = {"local": shard_paths(tmp / "tokens", "train"),
             "s3": shard_paths(f"{base}/tokens", "train")}
    assert all(p.startswith(f"{base}/tokens/train-") for p in paths["s3"])
    assert [Path(p).name for p in paths["s3"]] == [Path(p).name for p in paths["local"]]
    batches = {}
    for where, p in paths.items():
        it = iter(TokenBatches(p, lay, batch_size=2, seed=3, num_workers=2, shuffle_buffer=4))
        batches[where] = [next(it) for _ in range(6)]  # more than one epoch
    for a, b in zip(batches["local"], batches["s3"]):
        assert a["key"] == b["key"]
        assert all(torch.equal(a[k], b[k]) for k in ("ids", "block", "target"))
    # the same shards give the same run id (what a checkpoint must match to resume)
    assert run_id("h", "cantus.train.run", paths["s3"]) == \
        run_id("h", "cantus.train.run", paths["local"])
    assert shards.is_dir(f"{base}/tokens") and not shards.is_dir(f"{base}/nowhere")


def test_a_model_folder_at_a_url_is_fetched_once_keyed_by_its_content(chain, s3_env,
                                                                      tmp_path):
    from cantus.model_cache import local_folder

    _, _, models = chain
    url = s3_env.url("cache", "codec")
    put_folder(s3_env, models["codec"], url)
    first = local_folder(url, tmp_path)
    assert read_dir_bytes(Path(first)) == read_dir_bytes(Path(models["codec"]))
    marker = Path(first) / "config.json"
    os.utime(marker, (1, 1))
    assert local_folder(url, tmp_path) == first and marker.stat().st_mtime == 1  # not fetched
    put_folder(s3_env, models["codec"], s3_env.url("cache", "copy", "codec"))
    assert local_folder(s3_env.url("cache", "copy", "codec"), tmp_path) == first  # same content
    s3_env.fs().pipe_file(f"{url[5:]}/config.json", b'{"changed": true}')
    changed = local_folder(url, tmp_path)
    assert changed != first and (Path(changed) / "config.json").read_bytes() == \
        b'{"changed": true}'
    assert local_folder(models["codec"]) == models["codec"]  # a local folder as it is
    with pytest.raises(FileNotFoundError, match="cache/nothing: no model folder there"):
        local_folder(s3_env.url("cache", "nothing"), tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_generation_loads_its_models_from_s3_and_generates_as_from_disk(s3_env, tmp_path,
                                                                        monkeypatch):
    from test_generate import CAPTIONS, K, gen_cfg, tiny_lm, tokens_cfg

    from conftest import audio_shards
    from cantus.generate.run import Generator, main, model_paths
    from cantus.tokenize.codec.model import CodecConfig
    from cantus.train.stage import save_stage

    monkeypatch.setenv("CANTUS_CACHE", str(tmp_path / "fetched"))
    audio = audio_shards(tmp_path, 4, 4.0, seed=930, chunk_seconds=2.0, valid_fraction=0.4,
                         min_chunk_seconds=1.0, rate=24000, sidecars=CAPTIONS)
    root = tmp_path / "models"
    tiny_tokenizer_models(root, audio, dataclasses.replace(CodecConfig.tiny(), n_q=12,
                                                           codebook_size=K))
    for i, stage in enumerate(("semantic", "coarse", "fine")):
        model, lay = tiny_lm(stage, seed=i)
        save_stage(model, lay, tokens_cfg(), root / f"lm_{stage}")
    url = s3_env.url("gen", "models")
    put_folder(s3_env, root, url)
    prompts = ["a harp piece", "banjo, fast"]
    local = Generator(model_paths(root)).generate(prompts, gen_cfg(), seconds=0.6, samples=1)
    gen = Generator(model_paths(url))
    assert all(Path(p).is_relative_to(tmp_path / "fetched") for k, p in gen.paths.items()
               if k not in ("semantic", "semantic_kmeans"))  # fetched when first needed
    np.testing.assert_array_equal(gen.generate(prompts, gen_cfg(), seconds=0.6, samples=1),
                                  local)
    # the command line takes the URL too; a missing folder there is exit 2, naming it
    assert main(["a harp piece", "--seconds", "0.4", "--models", url, "--out",
                 str(tmp_path / "out.wav"), "--device", "cpu"]) == 0
    assert (tmp_path / "out.wav").stat().st_size > 44
    with pytest.raises(SystemExit) as e:
        main(["a harp piece", "--models", s3_env.url("gen", "nowhere"), "--out",
              str(tmp_path / "x.wav"), "--device", "cpu"])
    assert e.value.code == 2


def _git(*args, cwd):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, env=env)


def _dvc(*args, cwd):
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True,
                          text=True, env=os.environ.copy())
    assert proc.returncode == 0, f"dvc {' '.join(args)}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc.stdout


def test_a_dvc_remote_on_s3_pushes_and_a_fresh_clone_pulls_the_same_files(s3_env, tmp_path):
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    rng = np.random.default_rng(5)
    for i in range(3):
        (repo / "data" / f"part-{i}.bin").write_bytes(rng.bytes(10_000 + i))
    (repo / "data" / "notes.txt").write_text("three parts\n")
    _git("init", "-q", cwd=repo)
    _dvc("init", "-q", cwd=repo)
    _dvc("add", "data", cwd=repo)
    _dvc("remote", "add", "-d", "store", s3_env.url("dvc-store"), cwd=repo)
    _dvc("remote", "modify", "store", "endpointurl", s3_env.endpoint, cwd=repo)
    config = (repo / ".dvc" / "config").read_text()
    assert s3_env.endpoint in config and s3_env.secret not in config and s3_env.key not in config
    _git("add", ".", cwd=repo)
    _git("commit", "-q", "-m", "data", cwd=repo)
    _dvc("push", cwd=repo)
    assert len(s3_env.fs().find(f"{s3_env.bucket}/dvc-store")) >= 5  # 4 files + the .dir
    clone = tmp_path / "clone"
    _git("clone", "-q", str(repo), str(clone), cwd=tmp_path)
    assert not (clone / "data").exists()
    _dvc("pull", cwd=clone)
    assert read_dir_bytes(clone / "data") == read_dir_bytes(repo / "data")
    assert "up to date" in _dvc("status", cwd=clone)


def test_the_lm_trainer_streams_s3_token_shards_to_the_model_it_trains_from_disk(
        s3_env, tmp_path, one_thread):
    from test_lm_train import tiny_cfg

    from cantus.train.run import Inputs, run
    from cantus.train.synthetic import write_synthetic_tokens

    folder = write_synthetic_tokens(tmp_path / "tokens", chunks=8, seconds=2.0, valid=2,
                                    shards_train=2)
    url = s3_env.url("train", "tokens")
    put_folder(s3_env, folder, url)
    cfg = tiny_cfg("coarse")
    local = run(cfg, "coarse", Inputs(str(folder), str(tmp_path / "ck_a")), tmp_path / "a")
    remote = run(cfg, "coarse", Inputs(url, str(tmp_path / "ck_b")), tmp_path / "b")
    assert remote["losses"] == local["losses"] and remote["steps"] == local["steps"] == 7
    assert read_dir_bytes(tmp_path / "b") == read_dir_bytes(tmp_path / "a")
    # and writes its trained stage to S3 (the same bytes), which generation fetches
    again = run(cfg, "coarse", Inputs(url, str(tmp_path / "ck_b")), s3_env.url("train", "lm"))
    assert again["steps"] == 7 and again["losses"] == []  # resumed from the last checkpoint
    assert s3_bytes(s3_env, s3_env.url("train", "lm")) == read_dir_bytes(tmp_path / "a")
