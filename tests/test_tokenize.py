"""ingest -> tokenize (three fields) -> pack, on a tiny corpus with tiny models."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import yaml

from cantus.tokenize.fields import FIELDS
from cantus.tokens import ManifestMismatch, check_manifest, iter_token_samples
from conftest import ROOT, audio_shards, read_dir_bytes, tiny_tokenizer_models

FIELD_ARGS = {"acoustic": ("codec",), "semantic": ("semantic", "semantic_kmeans"),
              "mulan": ("mulan", "mulan_rvq")}
ACOUSTIC_CMD = "cantus.tokenize.codec.tokenizer"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    audio = audio_shards(tmp, 5, 7.0, seed=700, chunk_seconds=3.0, valid_fraction=0.3,
                         min_chunk_seconds=0.9)
    return tmp, audio, tiny_tokenizer_models(tmp, audio)


def _cfg(**kw):
    from cantus.tokenize.run import load_config

    return dataclasses.replace(load_config(ROOT / "params.yaml"), **{"executor": "local", **kw})


def _tokenize_all(tmp, audio, models, tag=""):
    from cantus.tokenize import pack
    from cantus.tokenize import run as tokenize

    folders = {}
    for field, names in FIELD_ARGS.items():
        folders[field] = tmp / f"tokens_{field}{tag}"
        tokenize.run(_cfg(), FIELDS[field], audio, {n: models[n] for n in names}, folders[field])
    pack.run(audio, folders, tmp / f"tokens{tag}")
    return folders, tmp / f"tokens{tag}"


def test_chain_gives_aligned_tokens_for_every_chunk(corpus):
    import pyarrow.parquet as pq

    tmp, audio, models = corpus
    _, out = _tokenize_all(tmp, audio, models)
    manifest = pq.read_table(audio / "manifest.parquet").to_pylist()
    index = {r["key"]: r for r in pq.read_table(out / "index.parquet").to_pylist()}
    assert set(index) == {m["key"] for m in manifest}
    for m in manifest:
        r = index[m["key"]]
        assert r["split"] == m["split"]
        assert r["acoustic_frames"] == 2 * r["semantic_frames"]
        assert abs(r["semantic_frames"] - 25 * m["duration_s"]) <= 1  # 3 s -> 75 (150 at 50 Hz)
    full = [r for r in index.values() if abs(r["seconds"] - 3.0) < 1e-9]
    assert full and all(r["acoustic_frames"] == 150 for r in full)
    tok = json.loads((out / "manifest.json").read_text())["tokenizers"]
    for path in sorted(out.glob("*.tar")):
        for key, item in iter_token_samples(path):
            assert item["acoustic"].dtype == np.uint16
            assert item["acoustic"].shape[0] == tok["acoustic"]["n_q"]
            assert item["acoustic"].max() < 1024 and item["semantic"].max() < 8
            assert item["mulan"].shape == (12,) and item["mulan"].max() < 4
            assert item["meta"]["caption"] == "" and item["meta"]["split"] in ("train", "valid")
    # plain webdataset reads the packed shards as they are
    sample = next(iter(wds.WebDataset(str(sorted(out.glob("train-*.tar"))[0]),
                                      shardshuffle=False).decode()))
    assert sample["semantic.npy"].dtype == np.uint16 and "split" in sample["json"]
    # a trainer told to use other tokenizers is refused, with what differs
    assert tok["semantic"]["k"] == 8 and tok["acoustic"]["hop"] == 480
    check_manifest(out, {"semantic": {"centroid_hash": tok["semantic"]["centroid_hash"]}})
    with pytest.raises(ManifestMismatch, match="acoustic.checkpoint_hash"):
        check_manifest(out, {"acoustic": {"checkpoint_hash": "0" * 64}})


def test_rerun_skips_finished_shards_and_changes_nothing(corpus):
    from cantus.tokenize import run as tokenize

    tmp, audio, models = corpus
    out = tmp / "again_acoustic"
    first = tokenize.run(_cfg(), FIELDS["acoustic"], audio, {"codec": models["codec"]}, out)
    ref = read_dir_bytes(out)
    os.remove(sorted(out.glob("*.tar"))[1])  # as if killed before this shard
    again = tokenize.run(_cfg(), FIELDS["acoustic"], audio, {"codec": models["codec"]}, out)
    assert again["shards_skipped"] == first["shards"] - 1
    assert read_dir_bytes(out) == ref


def test_a_chunk_the_tokenizer_cannot_handle_is_a_reject(corpus, monkeypatch):
    from cantus.tokenize import run as tokenize

    tmp, audio, models = corpus
    first_key = next(iter(__import__("cantus.shards", fromlist=["x"]).iter_samples(
        sorted(audio.glob("train-*.tar"))[0])))[0]
    real = tokenize.ShardTokenizer.encode

    def encode_with_bad_chunk(self, keys, wavs, path):
        if first_key in keys:
            wavs = list(wavs)
            wavs[keys.index(first_key)] = np.full(10, np.nan, np.float32)
        return real(self, keys, wavs, path)

    monkeypatch.setattr(tokenize.ShardTokenizer, "encode", encode_with_bad_chunk)
    # one reject in 15 chunks: within a 0.1 limit (the default 0.05 would fail the stage)
    s = tokenize.run(_cfg(max_reject_fraction=0.1), FIELDS["acoustic"], audio,
                     {"codec": models["codec"]}, tmp / "bad")
    import pyarrow.parquet as pq

    rejects = pq.read_table(tmp / "bad" / "rejects.parquet").to_pylist()
    assert [(r["key"], r["reason"]) for r in rejects] == [(first_key, "acoustic_error")]
    assert "NaN" in rejects[0]["detail"] and s["rejects"] == 1


def _whole_shard_tokens(audio, field, models):
    """Each audio shard decoded whole and given to the tokenizer in one call: what the
    stage wrote before it went a group at a time."""
    from cantus.tokenize.fields import load_field
    from cantus.tokenize.run import decode_shard

    tok, out = load_field(field, models), {}
    for path in sorted(audio.glob("*.tar")):
        d = decode_shard(str(path), tok.sample_rate)
        out.update(zip(d["keys"], tok.encode_batch(d["wavs"])))
    return out


def _written_tokens(folder, field):
    return {k: item[field] for p in sorted(folder.glob("*.tar"))
            for k, item in iter_token_samples(p)}


@pytest.mark.parametrize("field, group", [("acoustic", None), ("mulan", 2)])
def test_an_actor_holds_one_group_of_audio_and_writes_what_the_whole_shard_gives(
        corpus, monkeypatch, field, group):
    """A shard goes through the tokenizer GROUP chunks at a time (memory bounded at any
    shard size), and writes the tokens the whole shard in one call gives, bit for bit:
    the acoustic field at the stage's GROUP (its own batches are that size), and MuLan
    (one clip at a time) with groups of 2, so that every shard of more than 2 is split."""
    from cantus.tokenize import run as tokenize

    tmp, audio, models = corpus
    names = {n: models[n] for n in FIELD_ARGS[field]}
    seen, real = [], tokenize.ShardTokenizer.encode

    def encode(self, keys, wavs, path):
        seen.append(len(wavs))
        return real(self, keys, wavs, path)

    monkeypatch.setattr(tokenize.ShardTokenizer, "encode", encode)
    if group:
        monkeypatch.setattr(tokenize, "GROUP", group)
    out = tmp / f"grouped_{field}"
    s = tokenize.run(_cfg(), FIELDS[field], audio, names, out)
    limit = group or tokenize.GROUP
    assert seen and max(seen) <= limit and sum(seen) == s["chunks"]
    if group:
        assert len(seen) > s["shards"]  # some shard was split into groups
    ref, got = _whole_shard_tokens(audio, field, names), _written_tokens(out, field)
    assert got.keys() == ref.keys()
    assert all(np.array_equal(got[k], ref[k].astype(np.uint16)) for k in ref)


def test_stages_are_split_by_field_so_a_refit_retokenizes_one_field():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    deps = {f: {d for d in stages[f"tokenize_{f}"]["deps"] if d.startswith(("data/", "models/"))}
            - {"data/audio"} for f in ("acoustic", "semantic", "mulan")}
    assert deps["acoustic"] == {"models/codec"}
    assert "models/semantic_kmeans" in deps["semantic"]
    assert not any("semantic" in d or "mulan" in d for d in deps["acoustic"])
    # and each imports its own tokenizer's code only: an edit to another field's re-runs nothing
    code = {f: [d for d in stages[f"tokenize_{f}"]["deps"] if d.endswith(".py")]
            for f in ("acoustic", "semantic", "mulan")}
    for field, own in (("acoustic", "codec"), ("semantic", "semantic"), ("mulan", "mulan")):
        others = {"codec", "semantic", "mulan"} - {own}
        assert f"tokenize/{own}/tokenizer.py" in code[field]
        assert not [d for d in code[field] if d.split("/")[1] in others], (field, code[field])


# The child tokenizes as `python -m cantus.tokenize.codec.tokenizer` does, but pauses after each shard
# it writes, so the kill below always lands between shards, never after the last one.
_SLOW_CHILD = """
import sys, time
from cantus.tokenize import run
from cantus.tokenize.codec import tokenizer
real = run.ShardTokenizer.run
def slow(self, path, out_path):
    s = real(self, path, out_path)
    time.sleep(1.0)
    return s
run.ShardTokenizer.run = slow
sys.exit(tokenizer.main(sys.argv[1:]))
"""


def test_sigkill_then_rerun_skips_finished_shards_and_is_byte_identical(corpus):
    tmp, audio, models = corpus
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tokenize"]["executor"] = "local"
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    total = len(list(audio.glob("*.tar")))
    assert total >= 3

    def args(out):
        return ["--params", str(tmp / "params.yaml"), "--audio",
                str(audio), "--codec", models["codec"], "--out", str(out)]

    ref = subprocess.run([sys.executable, "-m", ACOUSTIC_CMD, *args(tmp / "k_ref")],
                         capture_output=True, text=True)
    assert ref.returncode == 0 and "(0 already done)" in ref.stdout, ref.stderr
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CHILD, *args(tmp / "k_out")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if len(list((tmp / "k_out").glob("*.tar"))) >= 1:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the child ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    finished = len(list((tmp / "k_out").glob("*.tar")))
    assert 1 <= finished < total and not (tmp / "k_out" / "index.parquet").exists()
    again = subprocess.run([sys.executable, "-m", ACOUSTIC_CMD, *args(tmp / "k_out")],
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"({finished} already done)" in again.stdout, again.stdout
    assert read_dir_bytes(tmp / "k_out") == read_dir_bytes(tmp / "k_ref")


def test_token_shards_of_changed_or_dropped_audio_are_not_kept(corpus, tmp_path):
    import shutil

    from cantus import shards
    from cantus.tokenize import pack
    from cantus.tokenize import run as tokenize

    tmp, src, models = corpus
    audio = tmp_path / "audio"
    shutil.copytree(src, audio)
    out = tmp_path / "acoustic"
    first = tokenize.run(_cfg(), FIELDS["acoustic"], audio, {"codec": models["codec"]}, out)
    assert first["shards_skipped"] == 0
    names = sorted(p.name for p in audio.glob("*.tar"))
    # another audio shard under the same name: its tokens must be made again
    victim, other = audio / names[0], audio / names[1]
    shutil.copy(other, victim)
    again = tokenize.run(_cfg(), FIELDS["acoustic"], audio, {"codec": models["codec"]}, out)
    assert again["shards_skipped"] == len(names) - 1
    assert json.loads((out / names[0]).with_suffix(".json").read_text())["input_sha256"] == \
        shards.sha256(victim)
    assert (out / names[0]).read_bytes() == (out / names[1]).read_bytes()
    # a plan with one shard fewer: its token shard and sidecar go
    victim.unlink()
    tokenize.run(_cfg(), FIELDS["acoustic"], audio, {"codec": models["codec"]}, out)
    assert not (out / names[0]).exists() and not (out / names[0]).with_suffix(".json").exists()
    # pack refuses tokens made from other audio, and removes packs the plan no longer has
    folders = {}
    for field, args in FIELD_ARGS.items():
        folders[field] = tmp_path / f"tok_{field}"
        tokenize.run(_cfg(), FIELDS[field], audio, {n: models[n] for n in args}, folders[field])
    (tmp_path / "packed").mkdir()
    stale = tmp_path / "packed" / "train-999999.tar"
    stale.write_bytes(b"old")
    pack.run(audio, folders, tmp_path / "packed")
    assert not stale.exists()
    shutil.copy(audio / names[2], audio / names[1])
    with pytest.raises(ValueError, match="tokens of other audio than the audio shard"):
        pack.run(audio, folders, tmp_path / "packed")


@pytest.mark.ray
def test_ray_actors_match_local_and_survive_a_killed_worker(corpus):
    import ray

    from cantus.parallel import init_ray
    from cantus.tokenize import run as tokenize

    tmp, audio, models = corpus
    local = tmp / "r_local"
    tokenize.run(_cfg(), FIELDS["acoustic"], audio, {"codec": models["codec"]}, local)
    init_ray(num_cpus=2)
    try:
        killer = _kill_one_actor_soon()
        s = tokenize.run(_cfg(executor="ray", actors=2, max_in_flight=2), FIELDS["acoustic"],
                         audio, {"codec": models["codec"]}, tmp / "r_ray")
        killer.join()
        assert killer.killed, "no tokenizer actor process was found to kill"
        ds = ray.data.read_webdataset(str(tmp / "r_ray"), file_extensions=["tar"])
        rows = ds.take_all()
    finally:
        ray.shutdown()
    assert read_dir_bytes(tmp / "r_ray") == read_dir_bytes(local)
    assert s["chunks"] == len(rows) > 0
    assert {"acoustic.npy"} <= set(rows[0])


def _kill_one_actor_soon():
    """Kill the first ShardTokenizer actor process that shows up (bounded wait)."""
    import threading

    import psutil

    def kill():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for p in psutil.process_iter(["cmdline"]):
                if "ShardTokenizer" in " ".join(p.info["cmdline"] or []):
                    p.kill()
                    t.killed = True
                    return
            time.sleep(0.05)

    t = threading.Thread(target=kill, daemon=True)
    t.killed = False
    t.start()
    return t


# Runs inside `unshare -n` (loopback is the only interface): an S3 server (SeaweedFS,
# tests/s3_server.py) and a two-node Ray cluster, each node with its own model cache. The
# audio shards and the codec folder are uploaded to S3; the stage reads them and writes its
# tokens there; the tokens are then downloaded to OUT for the comparison.
CLUSTER = """
import os, subprocess, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import s3_server

tmp, audio, codec, out = (Path(a) for a in sys.argv[2:6])
stage = sys.argv[6:]
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
server_proc, server = s3_server.start(tmp / "s3")
env = {**os.environ, **server.env(), "RAY_AUTH_MODE": "token"}
env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # set by a local init_ray; forbids joining
fs, bucket = server.fs(), server.bucket
try:
    for src, dest in ((audio, "audio"), (codec, "models/codec")):
        for p in sorted(src.rglob("*")):
            if p.is_file():
                fs.put_file(str(p), f"{bucket}/{dest}/{p.relative_to(src)}")
    ray = ["ray", "start", "--node-ip-address=127.0.0.1",
           "--num-cpus=1", "--disable-usage-stats"]
    subprocess.run(ray + ["--head", "--port=6390", '--resources={"node_a": 1}',
                          "--include-dashboard=false"], check=True,
                   env={**env, "CANTUS_CACHE": str(tmp / "cache_a")})
    subprocess.run(ray + ["--address=127.0.0.1:6390", '--resources={"node_b": 1}'], check=True,
                   env={**env, "CANTUS_CACHE": str(tmp / "cache_b")})
    proc = subprocess.run([*stage, "--audio", f"s3://{bucket}/audio",
                           "--codec", f"s3://{bucket}/models/codec",
                           "--out", f"s3://{bucket}/tokens"],
                          env={**env, "RAY_ADDRESS": "127.0.0.1:6390",
                               "CANTUS_CACHE": str(tmp / "cache_driver")})
    if proc.returncode == 0:
        for key in fs.find(f"{bucket}/tokens"):
            dest = out / key[len(f"{bucket}/tokens/"):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(fs.cat_file(key))
    sys.exit(proc.returncode)
finally:
    subprocess.run(["ray", "stop", "--force"], capture_output=True)
    s3_server.stop(server_proc)
"""


@pytest.mark.ray
@pytest.mark.slow
def test_a_two_node_cluster_tokenizes_s3_shards_on_both_nodes_like_a_local_run(corpus):
    """A real multi-node Ray cluster (a head and a second node joined with `ray start`)
    whose input and output are in S3, with no folder shared between the nodes.

    It runs in a private network namespace (``unshare -n``), where loopback is the
    only interface, so no Ray port (nor the S3 server there) is reachable from outside.
    Each node has one CPU and an actor needs 0.9, so the two actors must land on
    different nodes. Audio shards, the codec folder and the token shards are all
    ``s3://`` URLs; each node fetches the codec into its own cache (``CANTUS_CACHE``).
    """
    import shutil

    tmp, audio, models = corpus
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.fail("this test needs `unshare -n` (a private network namespace) to run Ray's "
                    "multi-node servers without exposing them")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tokenize"].update(executor="ray", actors=0, cpus_per_actor=0.9)
    (tmp / "cluster.yaml").write_text(yaml.safe_dump(params))
    (tmp / "cluster.py").write_text(CLUSTER)
    from cantus.tokenize import run as tokenize

    tokenize.run(_cfg(), FIELDS["acoustic"], audio, {"codec": models["codec"]}, tmp / "c_local")
    work = tmp / "cluster"
    work.mkdir()
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, str(tmp / "cluster.py"), str(ROOT / "tests"),
         str(work), str(audio), models["codec"], str(tmp / "c_ray"),
         sys.executable, "-m", ACOUSTIC_CMD, "--params", str(tmp / "cluster.yaml")],
        capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if "shards per node" in x)
    nodes = json.loads(line.split("shards per node: ", 1)[1])
    assert len(nodes) == 2 and all(n >= 1 for n in nodes.values()), line
    assert read_dir_bytes(tmp / "c_ray") == read_dir_bytes(tmp / "c_local")
    # each node fetched the codec from S3 into its own cache; the driver loaded no model
    for node in ("cache_a", "cache_b"):
        fetched = list((work / node / "models").iterdir())
        assert [p.name.split("-")[0] for p in fetched] == ["codec"], (node, fetched)
        assert read_dir_bytes(fetched[0]) == read_dir_bytes(Path(models["codec"]))
    assert not (work / "cache_driver").exists()
