"""GPU code paths whose logic runs on a CPU: devices of Ray actors, the actor count a
cluster's GPUs allow, CUDA errors, the reject limit, bf16 codes, DDP with more ranks
than shards, per-rank resume, and `.cpu()` before `.numpy()`.

No GPU is needed: Ray is told of a logical GPU (``init_ray(num_gpus=1)``), DDP runs
under gloo, and autocast runs on the CPU. ``bench/gpu.sh`` checks the rest on a GPU.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.multiprocessing as mp

from cantus import shards
from cantus.config import ConfigError
from conftest import ROOT, audio_shards

WORLD = 2


# ---- a tokenizer that needs no model: it records the device it was given -------------

class FakeTokens:
    """``field`` "fake": one uint16 per chunk (its length in samples, mod 2**16), or an
    error for chunks of fewer than ``fail_below`` samples; ``describe()`` names the
    device it got and the CUDA devices its process sees."""

    field, models, sample_rate, fail_below = "fake", (), 8000, 0

    def __init__(self, models: dict[str, str], device: str = "cpu"):
        self.device = str(device)

    def describe(self) -> dict:
        return {"kind": "fake", "device": self.device,
                "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def encode_batch(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        if any(len(w) < self.fail_below for w in wavs):
            raise ValueError(f"a chunk of {min(len(w) for w in wavs)} samples is too short")
        return [np.array([len(w) % 65536], np.uint16) for w in wavs]


class FailAll(FakeTokens):
    fail_below = 1 << 30


class FailShort(FakeTokens):
    fail_below = 12000  # 1.5 s: the last chunk of each file


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    """3 files of 5 s in 2 s chunks: 2 full chunks and a 1 s one each (9 in all)."""
    return audio_shards(tmp_path_factory.mktemp("gpu"), 3, 5.0, seed=900, chunk_seconds=2.0,
                        valid_fraction=0.3, min_chunk_seconds=0.9)


def _cfg(**kw):
    from cantus.tokenize.run import load_config

    return dataclasses.replace(load_config(ROOT / "params.yaml"), **{"executor": "local", **kw})


# ---- devices and actor counts --------------------------------------------------------

def test_an_actors_device_follows_its_gpus_not_the_machine():
    from cantus.tokenize.run import actor_device

    for device in ("auto", "cpu"):
        assert actor_device(device, 0, []) == "cpu"
        assert actor_device(device, 0, ["0"]) == "cpu"  # what Ray gives no actor anyway
    for device in ("auto", "cuda"):
        assert actor_device(device, 1.0, ["0"]) == "cuda"
        assert actor_device(device, 0.5, ["1"]) == "cuda"
    with pytest.raises(RuntimeError, match="assigned no GPU"):
        actor_device("auto", 1.0, [])
    # the contradictions stop the stage at start-up, naming the key
    with pytest.raises(ConfigError, match="'tokenize.device' is 'cuda' but gpus_per_actor"):
        _cfg(executor="ray", device="cuda", gpus_per_actor=0.0)
    with pytest.raises(ConfigError, match="'tokenize.gpus_per_actor' is 1.0 but device"):
        _cfg(executor="ray", device="cpu", gpus_per_actor=1.0)


def test_the_actor_count_is_capped_by_the_clusters_gpus():
    from cantus.tokenize.run import actor_count

    cfg = _cfg(executor="ray", actors=0, cpus_per_actor=0.9)
    assert actor_count(cfg, 16, 0) == 17  # CPU actors: 17 x 0.9 <= 16 CPUs
    gpu = dataclasses.replace(cfg, gpus_per_actor=1.0)
    assert actor_count(gpu, 16, 1) == 1       # not 16 actors waiting for one GPU
    assert actor_count(gpu, 16, 4) == 4
    assert actor_count(dataclasses.replace(gpu, gpus_per_actor=0.5), 16, 3) == 6
    assert actor_count(gpu, 2, 8) == 2        # and still by the CPUs
    with pytest.raises(ConfigError, match="has 0 GPUs, not enough for one actor"):
        actor_count(gpu, 16, 0)
    with pytest.raises(ConfigError, match="'tokenize.actors' 2 .* exceeds the 1 GPUs"):
        actor_count(dataclasses.replace(gpu, actors=2), 16, 1)


@pytest.mark.ray
def test_ray_gpu_actors_get_cuda_cpu_actors_get_cpu_and_no_hang(audio, tmp_path):
    """One logical GPU: `actors: 0, gpus_per_actor: 1` starts one actor (it used to start
    one per CPU and wait for ever); GPU actors see the GPU Ray gave them, CPU actors none."""
    import ray

    from cantus.parallel import init_ray
    from cantus.tokenize import run as tokenize

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # FakeTokens in workers
    init_ray(num_cpus=2, num_gpus=1)
    try:
        gpu = tokenize.run(_cfg(executor="ray", actors=0, gpus_per_actor=1.0), FakeTokens,
                           audio, {}, tmp_path / "gpu")
        cpu = tokenize.run(_cfg(executor="ray", actors=0, gpus_per_actor=0.0), FakeTokens,
                           audio, {}, tmp_path / "cpu")
    finally:
        ray.shutdown()
    made = {k: json.loads((tmp_path / k / "manifest.json").read_text())["tokenizer"]
            for k in ("gpu", "cpu")}
    assert made["gpu"] == {"kind": "fake", "device": "cuda", "visible": "0"}
    assert made["cpu"] == {"kind": "fake", "device": "cpu", "visible": ""}
    assert gpu["chunks"] == cpu["chunks"] > 0 and gpu["rejects"] == 0
    assert sum(gpu["nodes"].values()) == len(list(audio.glob("*.tar")))


def test_a_device_change_retokenizes_every_shard(audio, tmp_path):
    from cantus.tokenize import run as tokenize

    first = tokenize.run(_cfg(device="cpu"), FakeTokens, audio, {}, tmp_path / "t")
    again = tokenize.run(_cfg(device="cpu"), FakeTokens, audio, {}, tmp_path / "t")
    assert again["shards_skipped"] == first["shards"]
    other = tokenize.run(_cfg(device="cuda"), FakeTokens, audio, {}, tmp_path / "t")
    assert other["shards_skipped"] == 0  # tokens of another device are not kept
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["tokenizer"]["device"] \
        == "cuda"


def test_each_tokenizer_names_its_device_in_the_manifest(tmp_path):
    from cantus.tokenize.codec.model import CodecConfig, SoundStream
    from cantus.tokenize.fields import load_field

    SoundStream(CodecConfig.tiny()).save(tmp_path / "codec")
    tok = load_field("acoustic", {"codec": str(tmp_path / "codec")}, "cpu")
    assert tok.describe()["device"] == "cpu"


# ---- errors: CUDA errors stop the actor, rejects have a limit ------------------------

@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory"),
                                   RuntimeError("CUDA error: device-side assert triggered")])
def test_cuda_errors_stop_the_actor_instead_of_becoming_rejects(error, tmp_path):
    from cantus.tokenize.run import ShardTokenizer

    class Broken(FakeTokens):
        def encode_batch(self, wavs):
            raise error

    st = ShardTokenizer(Broken, {}, "cpu")
    keys, wavs = ["a", "b"], [np.zeros(8, np.float32)] * 2
    with pytest.raises(type(error)):
        st.encode(keys, wavs, "x.tar")
    # any other error is the chunk's: a reject for each, naming the shard
    st = ShardTokenizer(FailAll, {}, "cpu")
    pairs, rejects = st.encode(keys, wavs, "x.tar")
    assert pairs == [] and [r["reason"] for r in rejects] == ["fake_error"] * 2
    assert all(r["detail"].startswith("x.tar: ") for r in rejects)


def test_more_rejects_than_the_limit_fail_the_stage(audio, tmp_path, capsys):
    import yaml

    from cantus.tokenize import run as tokenize

    with pytest.raises(tokenize.TooManyRejects, match=r"9 of 9 chunks rejected.*first: "
                                                      r"\S+ fake_error: .*too short"):
        tokenize.run(_cfg(), FailAll, audio, {}, tmp_path / "all")
    # the same through the stage command: exit 1 and one line naming the count and error
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tokenize"]["executor"] = "local"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    rc = tokenize.field_main(FailAll, ["--params", str(tmp_path / "params.yaml"),
                                       "--audio", str(audio), "--out", str(tmp_path / "cmd")])
    err = capsys.readouterr().err
    assert rc == 1 and "chunks rejected" in err and "max_reject_fraction 0.05" in err
    # 3 short chunks in 9: within a limit of 0.5, not within the default 0.05
    ok = tokenize.run(_cfg(max_reject_fraction=0.5), FailShort, audio, {}, tmp_path / "some")
    assert ok["rejects"] == 3 and ok["chunks"] == 6
    with pytest.raises(tokenize.TooManyRejects, match="3 of 9 chunks rejected"):
        tokenize.run(_cfg(), FailShort, audio, {}, tmp_path / "none")
    with pytest.raises(ConfigError, match="'tokenize.max_reject_fraction' must be in"):
        _cfg(max_reject_fraction=1.0)  # a limit that lets every chunk be rejected


# ---- codes under bf16 ------------------------------------------------------------------

def test_bf16_autocast_encode_quantises_in_float32():
    """Under the caller's bf16 autocast the encoder runs in bf16, but the nearest-code
    search must not: the codes are fp32 quantisation of those same latents."""
    from cantus.tokenize.codec.model import CodecConfig, SoundStream

    torch.manual_seed(0)
    cfg = dataclasses.replace(CodecConfig.tiny(), n_q=2, codebook_size=1024)
    model = SoundStream(cfg).eval()
    x = torch.randn(2, 24000) * 0.1
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = model.encoder(model._prepare(x, None)).float()
        # a dense cluster of codes round the latents: bf16 distances cannot tell them apart
        g = torch.Generator().manual_seed(1)
        for level in model.quantizer.levels:
            level.codebook.copy_(z[0, :, 0] + 0.01 * torch.randn(1024, cfg.dim, generator=g))
        want = model.quantizer.encode(z)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model.encode(x)
            under = model.quantizer.encode(z)  # what encode used to do: bf16 distances
    assert not torch.equal(under, want), "the codebook no longer tells bf16 from fp32"
    assert torch.equal(got.to(torch.int64), want)


# ---- KV cache and the compiled-shape padding ---------------------------------------

def test_the_kv_cache_takes_autocasts_dtype():
    from cantus.train.model import GPTConfig, Transformer, tiny

    torch.manual_seed(0)
    model = Transformer(GPTConfig(vocab_size=40, **dataclasses.asdict(tiny()))).eval()
    ids = torch.randint(0, 40, (2, 6))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.new_cache(2, 8)
        step = torch.cat([model(ids[:, :5], cache=cache), model(ids[:, 5:], cache=cache)], 1)
        full = model(ids)
    assert cache.k.dtype == torch.bfloat16 and cache.length == 6
    torch.testing.assert_close(step.float(), full.float(), rtol=0.05, atol=0.05)
    with torch.no_grad():  # outside autocast: float32, equal to the uncached pass
        cache = model.new_cache(2, 8)
        step = torch.cat([model(ids[:, :5], cache=cache), model(ids[:, 5:], cache=cache)], 1)
        assert cache.k.dtype == torch.float32
        torch.testing.assert_close(step, model(ids), rtol=1e-5, atol=1e-5)


def test_padding_a_batch_to_the_compiled_length_leaves_the_loss(tmp_path):
    from cantus.audio_stream import shard_paths
    from cantus.train.data import collate, fixed_crops
    from cantus.train.run import pad_to, stage_loss
    from cantus.train.stage import build_model, load_lm, make_layout
    from cantus.train.synthetic import write_synthetic_tokens

    folder = write_synthetic_tokens(tmp_path / "tok", chunks=4, seconds=2.0, valid=1,
                                    shards_train=1)
    cfg = load_lm(ROOT / "params.yaml")
    sc = dataclasses.replace(cfg.semantic, crop_seconds=1.0)
    layout = make_layout(cfg.tokens, "semantic", sc)
    batch = collate(list(fixed_crops(shard_paths(folder, "train"), layout, 3)))
    torch.manual_seed(0)
    model = build_model(sc.model, layout).eval()
    padded = pad_to(batch, layout.max_len + 5)
    assert padded["ids"].shape[1] == layout.max_len + 5 > batch["ids"].shape[1]
    with torch.no_grad():
        a, n = stage_loss(model, model.embed.weight, batch, layout)
        b, m = stage_loss(model, model.embed.weight, padded, layout)
    assert int(n) == int(m) and float(a) == pytest.approx(float(b), rel=1e-5)


# ---- data for more ranks than shards ---------------------------------------------------

def _tone_shard(folder: Path, n: int, rate: int = 8000) -> Path:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        x = (0.3 * np.sin(2 * np.pi * rng.uniform(200, 800) * np.arange(rate) / rate)
             ).astype(np.float32)
        buf = io.BytesIO()
        sf.write(buf, x, rate, format="FLAC")
        meta = {"caption": ["a high tone", "a low tone"][i % 2], "key": f"k{i}",
                "tags": {"instruments": [["flute", "cello"][i % 2]]}}
        samples.append((f"k{i:02d}", {"flac": buf.getvalue(), "json": json.dumps(meta).encode()}))
    folder.mkdir(parents=True, exist_ok=True)
    shards.write_shard(folder / "train-000000.tar", samples)
    shards.write_shard(folder / "valid-000000.tar", samples[:2])
    return folder


def test_ranks_beyond_the_shard_count_split_the_samples(tmp_path):
    from cantus.audio_stream import AudioBatches

    paths = [str(_tone_shard(tmp_path, 8) / "train-000000.tar")]  # one shard, 2 ranks

    def epoch(rank: int, world: int, workers: int = 0) -> list[str]:
        b = AudioBatches(paths, crop_seconds=0.5, sample_rate=8000, batch_size=2, seed=3,
                         rank=rank, world=world, num_workers=workers, shuffle_buffer=4)
        it = iter(b)
        keys = []
        while b.epoch == 0:
            keys += next(it)["key"]
        return keys[:-2]  # the last batch is of epoch 1

    ranks = [epoch(r, WORLD) for r in range(WORLD)]
    assert all(len(k) == 4 for k in ranks)           # every rank gets its half
    assert not set(ranks[0]) & set(ranks[1])         # no sample twice in an epoch
    assert sorted(ranks[0] + ranks[1]) == sorted(epoch(0, 1))
    assert ranks == [epoch(r, WORLD) for r in range(WORLD)]  # deterministic per rank
    # two DataLoader workers on one shard: split by sample too, not the shard read twice
    two = epoch(0, 1, workers=2)
    assert sorted(two) == sorted(epoch(0, 1)) and len(set(two)) == len(two) == 8


# ---- DDP: the RVQ's collectives, MuLan's text tower, per-rank resume -----------------

def _init(rank: int, store: str) -> None:
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD)


def _rvq_rank(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from cantus.tokenize.codec.rvq import ResidualVQ

    _init(rank, store)
    try:
        torch.manual_seed(0)
        rvq = ResidualVQ(4, 4, 8, kmeans_iters=2, dead_threshold=0.5).train()
        draws = []
        for step in range(6):
            torch.manual_seed(100 * rank + step)  # the ranks draw their levels apart
            x = torch.randn(1, 4, 5)               # one example: one draw per rank and step
            state = torch.random.get_rng_state()
            draws.append(int(torch.randint(1, 5, (1,))[0]))
            torch.random.set_rng_state(state)      # the same draw happens inside forward
            rvq(x)
        torch.save({"books": torch.stack([lv.codebook for lv in rvq.levels]), "draws": draws},
                   f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_rvq_levels_learn_on_every_rank_whatever_its_dropout_drew(tmp_path):
    """A rank whose quantizer dropout leaves a level no example still meets that level's
    collectives (it used to skip them, and the other rank waited)."""
    mp.spawn(_rvq_rank, args=(str(tmp_path / "store"), str(tmp_path / "rvq")), nprocs=WORLD,
             join=True)
    got = [torch.load(tmp_path / f"rvq.{r}", weights_only=True) for r in range(WORLD)]
    assert got[0]["draws"] != got[1]["draws"]  # the ranks did use different levels
    assert torch.equal(got[0]["books"], got[1]["books"])  # and stayed in step


def test_every_trainable_text_parameter_reaches_the_loss():
    """MiniLM's pooler is not used by the mean-pooled tower: trainable, it would have no
    gradient, and DDP (find_unused_parameters=False) stops at its second step."""
    from cantus.tokenize.mulan.model import build_mulan
    from cantus.tokenize.mulan.params import MulanModelConfig
    from cantus.tokenize.mulan.train import info_nce

    model = build_mulan(MulanModelConfig.tiny(text_model="minilm", freeze_text=False)).train()
    assert model.text.encoder.pooler is not None
    a, t = model(torch.randn(2, model.cfg.window) * 0.1, ["a harp", "a fast drum"])
    info_nce(a, t, model.scale()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert any(p.requires_grad for p in model.text.parameters())  # the tower does train


def _mulan_cfg(steps: int):
    from cantus.tokenize.mulan.params import (MulanConfig, MulanEvalConfig, MulanModelConfig,
                                              MulanRVQConfig, MulanTrainConfig)

    t = dict(seed=0, steps=steps, batch_size=2, lr=3e-3, text_lr=1e-4, weight_decay=0.0,
             warmup_steps=1, grad_clip=1.0, num_workers=0, shuffle_buffer=4,
             checkpoint_every=2, keep_checkpoints=2, log_every=1, caption_prob=0.5, tag_keep=0.5)
    model = MulanModelConfig.tiny(text_model="minilm", freeze_text=False, dropout=0.1,
                                  proj_hidden=16)
    return MulanConfig(model=model, train=MulanTrainConfig(**t),
                       rvq=MulanRVQConfig(levels=2, codebook_size=4, kmeans_iters=2, seed=0,
                                          fit_stride_seconds=0.5, min_points_per_code=1),
                       eval=MulanEvalConfig({"instruments": "{}"}, (1,)))


def _mulan_rank(rank: int, store: str, audio: str, tmp: str) -> None:
    from cantus.tokenize.mulan import train as mulan_train

    _init(rank, store)
    try:
        cfg, out = _mulan_cfg(4), {}
        for name, stop in (("whole", None), ("cut", 2), ("cut", None)):
            inputs = mulan_train.Inputs(audio, f"{tmp}/ck_{name}")
            out[f"{name}{stop}"] = mulan_train.run(cfg, inputs, f"{tmp}/m_{name}", "cpu",
                                                   stop_after=stop)
        torch.save({k: v["final_loss"] for k, v in out.items()}, f"{tmp}/loss.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_mulan_ddp_trains_its_text_tower_on_one_shard_and_resumes_exactly(tmp_path):
    """2 gloo ranks, one train shard, the MiniLM tower unfrozen, dropout on: every rank
    gets data, steps past step 2, and a run cut at step 2 resumes to the same weights."""
    audio = _tone_shard(tmp_path / "audio", 8)
    mp.spawn(_mulan_rank, args=(str(tmp_path / "store"), str(audio), str(tmp_path)),
             nprocs=WORLD, join=True)
    whole = tmp_path / "m_whole" / "model.safetensors"
    assert whole.read_bytes() == (tmp_path / "m_cut" / "model.safetensors").read_bytes()
    losses = [torch.load(tmp_path / f"loss.{r}", weights_only=True) for r in range(WORLD)]
    assert losses[0]["wholeNone"] == losses[0]["cutNone"]
    ck = torch.load(tmp_path / "ck_cut" / "step-00000004.pt", weights_only=True)
    assert len(ck["ranks"]) == WORLD
    assert not torch.equal(ck["ranks"][0]["rng"]["torch"], ck["ranks"][1]["rng"]["torch"])


def _lm_rank(rank: int, store: str, tokens: str, tmp: str) -> None:
    from cantus.train.run import Inputs, run

    from test_lm_train import tiny_cfg

    _init(rank, store)
    try:
        cfg = tiny_cfg("coarse", steps=6)  # dropout 0.1: the ranks' RNG streams matter
        run(cfg, "coarse", Inputs(tokens, f"{tmp}/ck_a"), f"{tmp}/a")
        run(cfg, "coarse", Inputs(tokens, f"{tmp}/ck_b"), f"{tmp}/b", stop_after=5)
        run(cfg, "coarse", Inputs(tokens, f"{tmp}/ck_b"), f"{tmp}/b")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_lm_ddp_on_one_shard_resumes_each_ranks_rng_and_data(tmp_path):
    from cantus.train.synthetic import write_synthetic_tokens

    tokens = write_synthetic_tokens(tmp_path / "tokens", chunks=8, seconds=2.0, valid=2,
                                    shards_train=1)
    mp.spawn(_lm_rank, args=(str(tmp_path / "store"), str(tokens), str(tmp_path)),
             nprocs=WORLD, join=True)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == \
        (tmp_path / "b" / "model.safetensors").read_bytes()
    ck = torch.load(tmp_path / "ck_b" / "step-00000006.pt", weights_only=True)
    data = [r["data"] for r in ck["ranks"]]
    assert data[0] == data[1] and data[0]["epoch"] >= 1  # each rank its half, epoch by epoch
    assert not torch.equal(ck["ranks"][0]["rng"]["torch"], ck["ranks"][1]["rng"]["torch"])


def test_a_checkpoint_of_another_world_size_is_refused():
    from cantus.training import own_rank_state, rank_seed

    assert own_rank_state([{"a": 1}]) == {"a": 1}
    with pytest.raises(ValueError, match="written by 2 rank"):
        own_rank_state([{}, {}], "ck")
    assert rank_seed(7, 0) == 7 and len({rank_seed(7, r) for r in range(4)}) == 4


# ---- faiss on the GPU only when the config says so ---------------------------------------

def test_faiss_uses_the_gpu_only_when_the_config_asks(monkeypatch):
    import faiss

    from cantus.tokenize.semantic import kmeans as sk

    seen = []
    real = faiss.Kmeans

    def recording(*a, gpu=False, **kw):
        seen.append(gpu)
        return real(*a, **kw)

    monkeypatch.setattr(faiss, "Kmeans", recording)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    x = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    sk.fit_kmeans(x, 4, 2, 0)                  # device cpu: the CPU, GPU or not
    assert seen == [False]
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0, raising=False)
    sk.fit_kmeans(x, 4, 2, 0, gpu=True)        # asked, but this faiss has no GPU support
    assert seen == [False, False]


# ---- `.cpu()` before `.numpy()` ------------------------------------------------------------

# `.numpy()` calls on tensors that are on the CPU by construction (reviewed): file -> receivers
CPU_BY_CONSTRUCTION = {
    "cantus/nearest.py": {"ids"},                    # a search over from_numpy tensors
    "cantus/training.py": {'n["keys"]'},             # a tensor made by from_numpy
    "tokenize/codec/evaluate.py": {"codes[j, :, :-(-len(c) // hop)]",  # codes moved by .cpu()
                                   "m"},             # a mel of a from_numpy clip
    "tokenize/codec/train.py": {"clip", "recon"},    # CPU clips; recon moved by .cpu()
    "tokenize/semantic/pretrain.py": {"a[:n]"},      # a DataLoader batch (CPU)
    "evaluate/run.py": {"codec.decode(codes)[0, :x.shape[0]]"},  # a codec loaded on the CPU
}


def test_every_numpy_call_on_a_tensor_comes_after_cpu():
    """A tensor on a GPU has no `.numpy()`: every call in the stage code takes `.cpu()`
    first, unless reviewed above as CPU by construction."""
    bad = []
    for folder in ("cantus", "tokenize", "train", "generate", "evaluate"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel, src = str(path.relative_to(ROOT)), path.read_text()
            for node in ast.walk(ast.parse(src)):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "numpy" and not node.args):
                    continue
                recv = node.func.value
                if isinstance(recv, ast.Call) and isinstance(recv.func, ast.Attribute) \
                        and recv.func.attr == "cpu":
                    continue
                if ast.get_source_segment(src, recv) not in CPU_BY_CONSTRUCTION.get(rel, ()):
                    bad.append(f"{rel}:{node.lineno}: {ast.get_source_segment(src, node)}")
    assert not bad, "\n".join(bad)
