"""The steps of bench/gpu.sh: one GPU check each, ``python bench/gpu/steps.py STEP``.

Goes in: a step name (``setup``, ``codec``, ``fields``, ``tokenize``, ``codec_train``,
``lm``, ``ddp``, ``generate``, ``trainers``) and ``CANTUS_GPU_WORK`` (a scratch folder
the steps share: ``setup`` writes tiny audio shards and tiny models there, made as the
tests make them). Comes out: one line per check, ``PASS: what: figure`` or
``FAIL: what: figure``; exit 1 if any failed. Without CUDA every step prints
``SKIP: no CUDA`` and exits 0. ``CANTUS_GPU_BENCH_DEVICE=cpu`` runs the steps on the
CPU instead (to check this script itself; the CUDA-only figures are then skipped).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' fixtures: audio_shards, tiny models

import numpy as np  # noqa: E402
import torch  # noqa: E402

DEV = os.environ.get("CANTUS_GPU_BENCH_DEVICE", "cuda")
CUDA = DEV.startswith("cuda")
WORK = Path(os.environ.get("CANTUS_GPU_WORK", "/tmp/cantus-gpu"))
FAILED: list[str] = []
K = 64  # the tiny models' codebook size (test_generate's)


def check(name: str, ok: bool, figure: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'}: {name}: {figure}", flush=True)
    if not ok:
        FAILED.append(name)
    return ok


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def fixtures() -> tuple[Path, dict[str, str]]:
    """(audio shard folder, tiny model folders incl. lm_*) under WORK; ``setup`` makes them."""
    made = WORK / "fixtures.json"
    if not made.is_file():
        raise FileNotFoundError(f"{made}: run the setup step first")
    f = json.loads(made.read_text())
    return Path(f["audio"]), f["models"]


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.asarray(a) == np.asarray(b)).mean()) if a.shape == b.shape else 0.0


# ---- the steps ---------------------------------------------------------------------------

def setup() -> None:
    """Tiny audio shards (24 kHz, captions) and every tiny model generation needs."""
    from conftest import audio_shards, tiny_tokenizer_models
    from test_generate import CAPTIONS, tiny_lm, tokens_cfg

    from cantus.tokenize.codec.model import CodecConfig
    from cantus.train.stage import save_stage

    t0 = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    audio = audio_shards(WORK, 6, 4.0, seed=900, chunk_seconds=2.0, valid_fraction=0.4,
                         min_chunk_seconds=1.0, rate=24000, sidecars=CAPTIONS)
    models = tiny_tokenizer_models(WORK / "models", audio, dataclasses.replace(
        CodecConfig.tiny(), n_q=12, codebook_size=K))
    for i, stage in enumerate(("semantic", "coarse", "fine")):
        model, lay = tiny_lm(stage, seed=i)
        save_stage(model, lay, tokens_cfg(), WORK / "models" / f"lm_{stage}")
        models[f"{stage}_lm"] = str(WORK / "models" / f"lm_{stage}")
    (WORK / "fixtures.json").write_text(json.dumps({"audio": str(audio), "models": models}))
    check("setup: tiny shards and models", True, f"{time.perf_counter() - t0:.1f} s")


def codec() -> None:
    """(1) demo-size codec: GPU vs CPU codes with TF32 off and on, reruns, bf16 vs fp32."""
    from conftest import melody

    from cantus.tokenize.codec.model import CodecConfig, SoundStream
    from cantus.tokenize.run import deterministic_cuda

    torch.manual_seed(0)
    model = SoundStream(CodecConfig.demo())
    wav = torch.from_numpy(np.stack([melody(s, 10.0, 24000) for s in range(8)]))
    with torch.no_grad():  # k-means-initialised codebooks from a first training batch
        model.train()(wav[:4, :48000])
    model.eval()
    cpu = model.encode(wav).numpy()
    model.to(DEV)
    if CUDA:
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
            got = model.encode(wav.to(DEV)).cpu().numpy()
            a0, a = agreement(got[:, 0], cpu[:, 0]), agreement(got, cpu)
            check(f"codec GPU vs CPU codes, TF32 {'on' if tf32 else 'off'}",
                  a0 >= (0.95 if tf32 else 0.99), f"level 0 {a0:.4f}, all 12 levels {a:.4f}")
    if CUDA:
        deterministic_cuda()
    one, two = (model.encode(wav.to(DEV)).cpu().numpy() for _ in range(2))
    check("codec: deterministic rerun on the device", np.array_equal(one, two),
          f"agreement {agreement(one, two):.4f}")
    with torch.inference_mode():
        with torch.autocast(torch.device(DEV).type, dtype=torch.bfloat16):
            z = model.encoder(model._prepare(wav.to(DEV), None)).float()
            got = model.encode(wav.to(DEV)).cpu().numpy().astype(np.int64)
        want = model.quantizer.encode(z).cpu().numpy()
    check("codec bf16: codes are fp32 quantisation of the bf16 latents",
          np.array_equal(got, want), f"bf16 vs fp32 encode agreement {agreement(got, one):.4f}")


def fields() -> None:
    """(2) the three fields through load_field(..., DEV), against their CPU tokens."""
    from cantus.tokenize.fields import FIELD_MODELS, load_field
    from cantus.tokenize.run import decode_shard, deterministic_cuda

    audio, models = fixtures()
    shard = str(sorted(audio.glob("train-*.tar"))[0])
    if CUDA:
        deterministic_cuda()
    for field, names in FIELD_MODELS.items():
        mine = {m: models[m] for m in names}
        cpu = load_field(field, mine, "cpu")
        dev = load_field(field, mine, DEV)
        wavs = decode_shard(shard, cpu.sample_rate)["wavs"]
        t0 = time.perf_counter()
        got = dev.encode_batch(wavs)
        sync()
        seconds = time.perf_counter() - t0
        want = cpu.encode_batch(wavs)
        same = all(g.shape == w.shape and g.dtype == w.dtype for g, w in zip(got, want))
        agree = float(np.mean([agreement(g, w) for g, w in zip(got, want)]))
        device = dev.describe()["device"]
        check(f"field {field} on {DEV}", same and device == torch.device(DEV).type
              and agree >= 0.9, f"{len(wavs)} chunks in {seconds:.2f} s, token agreement "
              f"with CPU {agree:.4f}, manifest device {device}")


def tokenize() -> None:
    """(3) the Ray stage: a GPU actor with 0 rejects and a byte-identical rerun; CPU
    actors for gpus_per_actor 0; `actors: 0` starts (not hangs) with the GPUs' count."""
    import ray
    from conftest import read_dir_bytes

    from cantus.parallel import init_ray
    from cantus.tokenize import run as tok
    from cantus.tokenize.codec.tokenizer import AcousticTokens

    audio, models = fixtures()
    codec = {"codec": models["codec"]}
    base = dataclasses.replace(tok.load_config(ROOT / "params.yaml"), executor="ray",
                               actors=1, gpus_per_actor=1.0 if CUDA else 0.0)
    init_ray()
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        t0 = time.perf_counter()
        a = tok.run(base, AcousticTokens, audio, codec, WORK / "tok_a")
        manifest = json.loads((WORK / "tok_a" / "manifest.json").read_text())["tokenizer"]
        check("tokenize: one GPU actor", a["rejects"] == 0 and a["chunks"] > 0
              and manifest["device"] == torch.device(DEV).type,
              f"{a['chunks']} chunks, {a['rejects']} rejects, device {manifest['device']}, "
              f"{time.perf_counter() - t0:.1f} s")
        tok.run(base, AcousticTokens, audio, codec, WORK / "tok_b")
        same = read_dir_bytes(WORK / "tok_a") == read_dir_bytes(WORK / "tok_b")
        check("tokenize: a rerun is byte-identical", same, f"{len(list(audio.glob('*.tar')))}"
              " shards")
        c = tok.run(dataclasses.replace(base, gpus_per_actor=0.0), AcousticTokens, audio, codec,
                    WORK / "tok_c")
        cpu = json.loads((WORK / "tok_c" / "manifest.json").read_text())["tokenizer"]
        check("tokenize: gpus_per_actor 0 gives CPU actors", cpu["device"] == "cpu",
              f"device {cpu['device']}, {c['chunks']} chunks")
        print(f"running actors 0 with {gpus:g} GPU(s) (a hang ends at the step's timeout)",
              flush=True)
        t0 = time.perf_counter()
        d = tok.run(dataclasses.replace(base, actors=0), AcousticTokens, audio, codec,
                    WORK / "tok_d")
        check("tokenize: actors 0 does not hang", d["chunks"] == a["chunks"],
              f"{time.perf_counter() - t0:.1f} s, actor(s) capped at "
              f"{tok.actor_count(dataclasses.replace(base, actors=0), ray.cluster_resources()['CPU'], gpus)}")
    finally:
        ray.shutdown()


def codec_train() -> None:
    """(4) codec trainer steps with the adversarial losses, killed and resumed."""
    from test_codec import _tiny_params

    from cantus.tokenize.codec import train as codec_train

    audio, _ = fixtures()
    cfg = _tiny_params()  # 6 steps, adversarial from step 3
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=DEV))
    t0 = time.perf_counter()
    whole = codec_train.run(cfg, audio, WORK / "codec_a", WORK / "codec_wa")
    codec_train.run(cfg, audio, WORK / "codec_b", WORK / "codec_wb", stop_at=3)
    rest = codec_train.run(cfg, audio, WORK / "codec_b", WORK / "codec_wb")
    losses = {k: (whole["final"][k], rest["final"][k]) for k in whole["final"]}
    close = all(math.isfinite(a) and abs(a - b) <= 0.05 * abs(a) + 1e-4
                for a, b in losses.values())
    check("codec trainer: adversarial steps and resume", "adversarial" in rest["final"]
          and rest["resumed_from"] == 3 and close,
          f"{time.perf_counter() - t0:.1f} s; uninterrupted vs resumed: " + ", ".join(
              f"{k} {a:.4g}/{b:.4g}" for k, (a, b) in losses.items()))


def lm() -> None:
    """(5) an LM stage with bf16, torch.compile and grad accumulation: tokens/s, MFU and
    the compiled graphs (batches are padded to one length: no recompiles)."""
    from cantus.train import run as lm_run
    from cantus.train.model import ModelSize
    from cantus.train.stage import load_lm
    from cantus.train.synthetic import write_synthetic_tokens

    tokens = write_synthetic_tokens(WORK / "lm_tokens", chunks=24, seconds=12.0, valid=4,
                                    shards_train=2)
    cfg = load_lm(ROOT / "params.yaml")
    size = ModelSize(layers=8, heads=8, dim=512, ffn=2048, dropout=0.1) if CUDA else \
        ModelSize(layers=1, heads=2, dim=32, ffn=64, dropout=0.1)
    t = dataclasses.replace(cfg.coarse.train, steps=40, batch_size=8 if CUDA else 2,
                            grad_accum=2, bf16=True, compile=True, warmup_steps=2,
                            valid_samples=4, unigram_samples=8, shuffle_buffer=8)
    sc = dataclasses.replace(cfg.coarse, crop_seconds=5.0 if CUDA else 1.0, model=size, train=t)
    dev = torch.device(DEV)
    layout, core, model, opt, data, valid, unigram, _, length = lm_run._setup(
        "coarse", dataclasses.replace(cfg, coarse=sc), lm_run.Inputs(str(tokens),
                                                                      str(WORK / "lm_ck")), dev)
    batches, losses = iter(data), []
    counters = __import__("torch._dynamo.utils", fromlist=["counters"]).counters

    def step(i: int) -> int:
        micro = [lm_run.pad_to(next(batches), length) for _ in range(t.grad_accum)]
        losses.append(lm_run.train_step(model, core, opt, micro, layout, t, i, dev))
        return sum(m["ids"].numel() for m in micro)

    t0 = time.perf_counter()
    for i in range(3):  # compiles here
        step(i)
    sync()
    warm, graphs = time.perf_counter() - t0, counters["stats"]["unique_graphs"]
    t0, n = time.perf_counter(), 0
    for i in range(3, 3 + (12 if CUDA else 2)):
        n += step(i)
    sync()
    rate = n / (time.perf_counter() - t0)
    peak = float(os.environ.get("CANTUS_PEAK_TFLOPS", "989")) * 1e12  # H100/H200 dense bf16
    mfu = 6 * core.num_params() * rate / peak
    new = counters["stats"]["unique_graphs"] - graphs
    check("LM bf16 + compile + grad accumulation", CUDA and new == 0 and all(
        map(math.isfinite, losses)) and losses[-1] < losses[0],
          f"{rate:,.0f} tokens/s (padded to {length}), MFU {mfu:.1%} at {peak / 1e12:g} "
          f"TFLOPS, compile + 3 steps {warm:.1f} s, graphs {graphs} then {new} recompiles, "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")


def _ddp_rank(rank: int, store: str, tokens: str, work: str) -> None:
    import torch.distributed as dist

    from test_lm_train import tiny_cfg

    from cantus.train.run import Inputs, run

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        device = "cuda:0" if CUDA else "cpu"  # both ranks on the one GPU
        cfg = tiny_cfg("coarse", steps=6)
        out = {"whole": run(cfg, "coarse", Inputs(tokens, f"{work}/ddp_ck_a"),
                            f"{work}/ddp_a", device)}
        run(cfg, "coarse", Inputs(tokens, f"{work}/ddp_ck_b"), f"{work}/ddp_b", device,
            stop_after=5)
        out["resumed"] = run(cfg, "coarse", Inputs(tokens, f"{work}/ddp_ck_b"),
                             f"{work}/ddp_b", device)
        torch.save({k: v["val_loss"] for k, v in out.items()}, f"{work}/ddp.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def ddp() -> None:
    """(6) 2 DDP ranks on one GPU (gloo), one train shard, killed and resumed."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from cantus.train.synthetic import write_synthetic_tokens

    tokens = write_synthetic_tokens(WORK / "ddp_tokens", chunks=8, seconds=2.0, valid=2,
                                    shards_train=1)
    (WORK / "ddp_store").unlink(missing_ok=True)
    t0 = time.perf_counter()
    mp.spawn(_ddp_rank, args=(str(WORK / "ddp_store"), str(tokens), str(WORK)), nprocs=2,
             join=True)
    a, b = (load_file(WORK / f"ddp_{x}" / "model.safetensors") for x in "ab")
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    vals = [torch.load(WORK / f"ddp.{r}", weights_only=True) for r in range(2)]
    check("DDP 2 ranks on one GPU: trains on one shard and resumes", diff < 1e-3,
          f"{time.perf_counter() - t0:.1f} s, max weight difference resumed vs whole "
          f"{diff:.2e}, val loss {vals[0]['whole']:.4f} / {vals[0]['resumed']:.4f}")


def generate() -> None:
    """(7) generation and --continue on the device."""
    from test_generate import gen_cfg

    from cantus.generate.run import Generator, model_paths

    _, models = fixtures()
    gen = Generator(model_paths(Path(models["codec"]).parent), DEV)
    cfg = dataclasses.replace(gen_cfg(), device=DEV)
    t0 = time.perf_counter()
    wavs = gen.generate(["a slow piece on harp", "a fast reel on banjo"], cfg, seconds=2.0)
    sync()
    seconds = time.perf_counter() - t0
    check("generate on the device", wavs.shape == (2, 2 * gen.sample_rate)
          and np.isfinite(wavs).all(), f"2 x 2 s in {seconds:.1f} s ({4 / seconds:.2f}x real "
                                       "time, tiny untrained models)")
    rate = gen.sample_rate
    prompt = (0.3 * np.sin(2 * np.pi * 330 * np.arange(int(0.4 * rate)) / rate)).astype(
        np.float32)
    out = gen.continue_audio(prompt, rate, cfg, seconds=0.6, prompt="harp", samples=2)
    check("generate --continue on the device", out.shape == (2, rate) and
          np.isfinite(out).all(), f"shape {out.shape}")


def trainers() -> None:
    """(8) w2v-BERT pretraining and MuLan (MiniLM tower unfrozen) for a few steps."""
    from test_semantic import _model_cfg

    from cantus.tokenize.mulan import train as mulan_train
    from cantus.tokenize.semantic import pretrain as sp
    from test_gpu_paths import _mulan_cfg

    audio, _ = fixtures()
    t0 = time.perf_counter()
    cfg = _model_cfg(device=DEV)
    s = sp.run(cfg, audio, WORK / "w2v", WORK / "w2v_ck")
    check("semantic pretraining", s.get("steps", 0) > 0,
          f"{s.get('steps')} steps in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    m = mulan_train.run(_mulan_cfg(4), mulan_train.Inputs(str(audio), str(WORK / "mulan_ck")),
                        WORK / "mulan", DEV)
    check("MuLan with the text tower trained", m["steps"] == 4
          and math.isfinite(m["final_loss"]), f"4 steps in {time.perf_counter() - t0:.1f} s, "
                                              f"loss {m['final_loss']:.4f}")


STEPS = {f.__name__: f for f in (setup, codec, fields, tokenize, codec_train, lm, ddp,
                                 generate, trainers)}


def main() -> int:
    if len(sys.argv) != 2 or sys.argv[1] not in STEPS:
        print(f"usage: steps.py {{{','.join(STEPS)}}}", file=sys.stderr)
        return 2
    if DEV.startswith("cuda") and not torch.cuda.is_available():
        print(f"SKIP: no CUDA ({sys.argv[1]})")
        return 0
    try:
        STEPS[sys.argv[1]]()
    except Exception as e:  # one line the log reader finds, then the traceback
        check(sys.argv[1], False, f"{type(e).__name__}: {e}")
        raise
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
