"""SoundStream codec: shapes, the residual VQ, overfitting, save/load, exact resume, errors."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from cantus.config import ConfigError, from_dict, load_section
from cantus.tokenize.codec import evaluate as eval_codec
from cantus.tokenize.codec import train as train_codec
from cantus.tokenize.codec.params import CodecParams, CodecSection, DiscConfig
from cantus.tokenize.codec.model import CodecConfig, SoundStream
from cantus.tokenize.codec.rvq import ResidualVQ
from conftest import ROOT, audio_shards, melody

torch.set_num_threads(1)


def _tiny_params(**train) -> CodecParams:
    base = load_section(ROOT / "params.yaml", "codec", CodecSection).training()
    t = dataclasses.replace(base.train, steps=6, batch_size=2, crop_seconds=0.2, warmup_steps=2,
                            adversarial_start=3, checkpoint_every=2, log_every=1,
                            sample_every=0, sample_chunks=1, sample_seconds=0.5, num_workers=0,
                            threads=1, device="cpu", **train)
    return dataclasses.replace(base, model=CodecConfig.tiny(), train=t,
                               disc=DiscConfig(scales=2, wave_channels=1, stft_channels=2,
                                               stft_window=128))


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    return audio_shards(tmp_path_factory.mktemp("codec"), 3, 3.0, seed=700, chunk_seconds=1.5,
                        rate=24000)


def test_shapes_strides_and_causality():
    cfg = CodecConfig.tiny()
    assert cfg.hop == 480 and cfg.frame_rate == 50.0
    assert CodecConfig.paper().kbps() == 6.0 and CodecConfig.demo().kbps(3) == 1.5
    model = SoundStream(cfg).eval()
    wav = torch.from_numpy(np.stack([melody(1, 0.3, 24000), melody(2, 0.3, 24000)]))
    codes = model.encode(wav)
    assert codes.dtype == torch.uint16 and codes.shape == (2, cfg.n_q, 15)  # ceil(7200 / 480)
    assert model.decode(codes).shape == (2, 15 * 480)
    assert model.decode(codes, n_q=1).shape == (2, 15 * 480)
    late = wav.clone()
    late[:, 4800:] = 0.0  # changing samples after frame 10 leaves frames 0..9 alone
    assert torch.equal(model.encode(late)[:, :, :10], codes[:, :, :10])


@pytest.mark.parametrize("size", ["tiny", "demo"])
def test_cpu_inference_path_equals_the_modules(size):
    """codec_cpu's time-major encoder/decoder give the modules' forward to float rounding."""
    from cantus.tokenize.codec import cpu as codec_cpu

    torch.manual_seed(3)
    cfg = getattr(CodecConfig, size)()
    model = SoundStream(cfg).eval()
    with torch.no_grad():  # non-zero biases and gains, as after training
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    class Prefer(codec_cpu.Plan):  # every layer in one layout where it has it
        def __init__(self, layout: str):
            super().__init__()
            self.layout = layout

        def run(self, key, layouts):
            return layouts.get(self.layout, next(iter(layouts.values())))()

    for batch, frames in ((1, 1), (2, 23), (3, 61)):
        wav = 0.1 * torch.randn(batch, 1, frames * cfg.hop)
        for plan in (None, Prefer("line"), Prefer("frames"), Prefer("winograd")):
            with torch.inference_mode():
                ref = model.encoder(wav)
                z = codec_cpu.encode_latents(model.encoder, wav, cfg.hop, cfg.strides, plan)
                assert z.shape == ref.shape == (batch, cfg.dim, frames)
                assert torch.allclose(z, ref, atol=1e-5, rtol=1e-4), (z - ref).abs().max()
                ref_wav = model.decoder(ref)
                out = codec_cpu.decode_waveform(model.decoder, ref, cfg.hop, plan)
                assert out.shape == ref_wav.shape == (batch, 1, frames * cfg.hop)
                err = (out - ref_wav).abs().max()
                assert torch.allclose(out, ref_wav, atol=1e-5, rtol=1e-4), err
    # encode/decode take the CPU path; their codes match the modules' codes
    wav = 0.1 * torch.randn(2, 40 * cfg.hop)
    codes = model.encode(wav)
    with torch.inference_mode():
        ref_codes = model.quantizer.encode(model.encoder(wav[:, None]).float())
    assert (codes.long() == ref_codes).float().mean() > 0.99


def test_winograd_matrices_compute_the_correlation_of_a_tile():
    """AT @ ((G @ g) * (BT @ x)) is the 7-tap correlation of a 10-sample tile (float64)."""
    from cantus.tokenize.codec import cpu as codec_cpu

    at, g_mat, bt = codec_cpu.winograd_matrices(7)
    assert at.shape == (4, 10) and g_mat.shape == (10, 7) and bt.shape == (10, 10)
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(7, dtype=torch.float64, generator=gen)
    x = torch.randn(10, dtype=torch.float64, generator=gen)
    want = torch.stack([(g * x[i:i + 7]).sum() for i in range(4)])
    assert torch.allclose(at @ ((g_mat @ g) * (bt @ x)), want, atol=1e-12)


def test_codec_path_is_chosen_per_machine_cached_and_forced(monkeypatch, tmp_path):
    """auto measures once (cached on disk, keyed by machine, kernels, config and input size);
    CANTUS_CODEC_PATH forces a path; every path gives the same codes."""
    from cantus.tokenize.codec import cpu as codec_cpu

    torch.manual_seed(0)
    model = SoundStream(CodecConfig.tiny())
    model.train()
    model(torch.from_numpy(np.stack([melody(s, 2.0, 24000) for s in range(4)])))  # k-means init
    model.eval()
    wav = torch.from_numpy(melody(5, 2.0, 24000))[None]
    monkeypatch.setenv("CANTUS_CACHE", str(tmp_path))
    monkeypatch.setattr(codec_cpu, "_chosen", {})
    monkeypatch.delenv("CANTUS_CODEC_PATH", raising=False)
    codes = model.encode(wav)
    model.decode(codes)
    saved = sorted(tmp_path.glob("codec_path-*.json"))
    assert len(saved) == 2  # encode and decode
    for f in saved:
        choice = json.loads(f.read_text())
        assert choice["path"] in codec_cpu.PATHS and set(choice["seconds"]) == set(codec_cpu.PATHS)
    monkeypatch.setattr(codec_cpu, "_chosen", {})  # a new process reads the cache: no timing
    monkeypatch.setattr(codec_cpu, "measure", lambda *a, **k: pytest.fail("measured again"))
    assert torch.equal(model.encode(wav), codes)
    for path in codec_cpu.PATHS:
        monkeypatch.setenv("CANTUS_CODEC_PATH", path)
        assert codec_cpu.choose(model, "encode", wav[:, None]).path == path
        assert torch.equal(model.encode(wav), codes), path
    monkeypatch.setenv("CANTUS_CODEC_PATH", "fast")
    with pytest.raises(ValueError, match="CANTUS_CODEC_PATH"):
        model.encode(wav)


_REUSE_PROBE = """
import resource, sys
from cantus.memory import keep_freed_memory
if sys.argv[1] != "default":
    keep_freed_memory(every_size=sys.argv[1] == "every")
faults = []
for _ in range(4):  # a 64 MB block, written, freed, allocated again
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = bytearray(64 << 20)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[1:]))
"""


def test_keep_freed_memory_reuses_blocks_above_the_mmap_limit():
    import subprocess
    import sys

    def later_faults(mode):
        out = subprocess.run([sys.executable, "-c", _REUSE_PROBE, mode], check=True,
                             capture_output=True, text=True, cwd=ROOT).stdout
        return int(out.split()[-1])

    pages = (64 << 20) // 4096
    # 64 MB is above glibc's largest mmap threshold: only every_size keeps it mapped
    assert later_faults("default") > 2 * pages
    assert later_faults("32mib") > 2 * pages
    assert later_faults("every") < pages // 10


def test_native_elu_matches_torch(monkeypatch):
    import shutil

    from cantus.tokenize.codec import native as cpu_native

    x = torch.cat([torch.linspace(-100, 20, 200_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30]),
                   3 * torch.randn(10_000)])
    ref = torch.nn.functional.elu(x.double())
    if shutil.which("cc") or shutil.which("gcc"):
        assert cpu_native.available()
    y = cpu_native.elu(x)
    assert y.data_ptr() != x.data_ptr() and (y.double() - ref).abs().max() < 1e-6
    z = x.clone()
    assert cpu_native.elu(z, inplace=True).data_ptr() == z.data_ptr()
    assert torch.equal(z, y)
    assert torch.equal(cpu_native.elu(x[::2]), torch.nn.functional.elu(x[::2]))  # strided: torch
    monkeypatch.setattr(cpu_native, "_lib", False)  # no compiler: plain F.elu
    assert torch.equal(cpu_native.elu(x), torch.nn.functional.elu(x))


def _clusters(n=512, k=8, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g) * 5
    x = centres[torch.randint(k, (n,), generator=g)] + 0.01 * torch.randn(n, dim, generator=g)
    return centres, x


def test_rvq_kmeans_init_finds_the_clusters():
    torch.manual_seed(0)
    centres, x = _clusters()
    rvq = ResidualVQ(4, n_q=2, codebook_size=8, kmeans_iters=20, quantizer_dropout=False)
    rvq.train()
    q, codes, commit = rvq(x)  # [B, D] input: one vector per example
    assert codes.shape == (512, 2) and bool(rvq.levels[0].initialised)
    err = torch.cdist(centres, rvq.levels[0].codebook).min(dim=1).values
    assert err.max() < 0.5, err
    rvq.eval()
    assert (rvq.decode(rvq.encode(x)) - x).pow(2).mean() < 1e-3 and commit < 1.0


def test_rvq_ema_update_and_dead_code_replacement():
    torch.manual_seed(0)
    _, x = _clusters(k=4)
    rvq = ResidualVQ(4, n_q=1, codebook_size=8, decay=0.9, dead_threshold=0.5,
                     quantizer_dropout=False)
    lvl = rvq.levels[0]
    lvl.init_from(x)
    before_sum, before_count = lvl.embed_sum.clone(), lvl.cluster_size.clone()
    lvl.dead_threshold = 0.0  # check the EMA arithmetic on its own first
    codes = lvl.nearest(x)
    lvl.update(x, codes)
    counts = torch.bincount(codes, minlength=8).float()
    sums = torch.zeros(8, 4).index_add_(0, codes, x)
    assert torch.allclose(lvl.cluster_size, 0.9 * before_count + 0.1 * counts)
    assert torch.allclose(lvl.embed_sum, 0.9 * before_sum + 0.1 * sums, atol=1e-5)
    lvl.dead_threshold = 0.5
    lvl.cluster_size[3] = 0.01  # code 3 is now dead
    lvl.replace_dead(x)
    assert (x == lvl.codebook[3]).all(dim=1).any()  # it became a batch vector
    assert lvl.cluster_size[3] == 0.5


def test_quantizer_dropout_draws_levels_per_example():
    torch.manual_seed(0)
    rvq = ResidualVQ(8, n_q=6, codebook_size=16)
    rvq.train()
    x = torch.randn(64, 8, 3)
    rvq(x)  # k-means init
    coded_with = copy.deepcopy(rvq).eval()  # the codebooks the next batch is coded with
    q, codes, _ = rvq(x)
    rvq.eval()
    used = []
    for b in range(64):  # each example's output is the sum of its first k levels
        k = [k for k in range(1, 7) if torch.allclose(coded_with.decode(codes[b:b + 1, :k]),
                                                       q[b:b + 1], atol=1e-5)]
        assert k, b
        used.append(k[0])
    assert len(set(used)) >= 4 and min(used) >= 1 and max(used) <= 6
    errors = [(rvq.decode(rvq.encode(x, n_q=k)) - x).pow(2).mean() for k in range(1, 7)]
    assert all(a >= b for a, b in zip(errors, errors[1:]))


def test_tiny_codec_overfits_one_clip():
    torch.manual_seed(0)
    cfg = _tiny_params()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=1e-2, steps=30,
                                                             adversarial_start=10**9))
    trainer = train_codec.Trainer(cfg, torch.device("cpu"))
    clip = torch.from_numpy(melody(3, 0.4, 24000))[None]
    losses = [trainer.step(clip, s)["reconstruction"] for s in range(30)]
    assert min(losses[-5:]) < 0.5 * losses[0], losses


def test_fresh_encoder_latents_follow_the_audio():
    # The collapse of the first demo codec: default init made the latents a
    # bias-driven constant, so k-means saw one vector and the decoder ignored it.
    torch.manual_seed(0)
    model = SoundStream(CodecConfig.demo())
    x = model._prepare(torch.from_numpy(melody(6, 1.0, 24000))[None], None)
    with torch.no_grad():
        z = model.encoder(x)[0]  # (D, T)
    assert z.std(dim=1).mean() > z.mean(dim=1).abs().mean(), "latents are ~constant in time"
    assert all(float(c.bias.detach().abs().max()) == 0.0 for c in model.modules()
               if isinstance(c, torch.nn.Conv1d | torch.nn.ConvTranspose1d))


def test_tiny_codec_uses_many_codes_and_they_matter():
    torch.manual_seed(0)
    cfg = _tiny_params()
    # lr 1e-3: at 1e-2 these 40 steps are chaotic, and the code usage they end at
    # (perplexity 1.7 to 2.7 on level 0) followed the CPU's kernels.
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=1e-3, steps=40,
                                                             adversarial_start=10**9))
    trainer = train_codec.Trainer(cfg, torch.device("cpu"))
    clip = torch.from_numpy(melody(3, 0.4, 24000))[None]
    for s in range(40):
        trainer.step(clip, s)
    model = trainer.model.eval()
    wav = torch.from_numpy(melody(3, 1.0, 24000))[None]
    codes = model.encode(wav)
    usage = eval_codec.codebook_usage([codes[0].numpy()], model.cfg.codebook_size)
    assert min(usage["perplexity"][:2]) > 2.0, usage
    other = codes.clone()
    other[:, 0] = torch.roll(other[:, 0].to(torch.int32), 7, dims=-1).to(torch.uint16)
    assert not torch.allclose(model.decode(codes), model.decode(other), atol=1e-4)


def test_save_load_round_trip_gives_identical_codes(tmp_path):
    torch.manual_seed(0)
    model = SoundStream(CodecConfig.tiny())
    model.train()
    model(torch.randn(2, 4800) * 0.1)  # k-means init sets the codebooks
    model.eval()
    digest = model.save(tmp_path / "codec")
    loaded = SoundStream.load(tmp_path / "codec")
    wav = torch.from_numpy(melody(4, 0.5, 24000))[None]
    assert torch.equal(model.encode(wav), loaded.encode(wav)) and len(digest) == 64
    assert torch.equal(model.decode(model.encode(wav)), loaded.decode(loaded.encode(wav)))


def test_resume_equals_uninterrupted(shard_dir, tmp_path):
    from safetensors.torch import load_file

    cfg = _tiny_params()
    full = train_codec.run(cfg, shard_dir, tmp_path / "a", tmp_path / "wa")
    part = train_codec.run(cfg, shard_dir, tmp_path / "b", tmp_path / "wb", stop_at=3)
    assert not part["finished"] and not (tmp_path / "b" / "model.safetensors").exists()
    rest = train_codec.run(cfg, shard_dir, tmp_path / "b", tmp_path / "wb")
    assert rest["resumed_from"] == 3 and "adversarial" in rest["final"]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" /
                                                                     "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full["final"] == rest["final"]
    assert (tmp_path / "wa" / "samples" / "final" / "spectrograms.png").is_file()
    ecfg = dataclasses.replace(load_section(ROOT / "params.yaml", "codec",
                                            CodecSection).eval, split="train", max_chunks=2,
                               max_seconds=1.0, device="cpu")
    m = eval_codec.run(ecfg, shard_dir, tmp_path / "a", tmp_path / "m.json")
    assert m["codec_6kbps"]["n_q"] == 4 and len(m["usage"]["perplexity"]) == 4
    assert (tmp_path / "m.json").is_file() and m["opus_6kbps"]["si_sdr"] > 0


def test_bad_input_gives_clear_errors():
    model = SoundStream(CodecConfig.tiny()).eval()
    with pytest.raises(ValueError, match="empty audio"):
        model.encode(torch.zeros(1, 0))
    with pytest.raises(ValueError, match="expects 24000 Hz"):
        model.encode(torch.zeros(1, 960), sample_rate=16000)
    with pytest.raises(ValueError, match="NaN"):
        model.encode(torch.tensor([[0.0, float("nan")] * 480]))
    with pytest.raises(ValueError, match="mono"):
        model.encode(torch.zeros(1, 2, 960))
    with pytest.raises(ValueError, match="codes must be in"):
        model.decode(torch.full((1, 4, 2), 64, dtype=torch.int32))
    with pytest.raises(ConfigError, match="codec.model.chanels"):
        from_dict(CodecConfig, {**dataclasses.asdict(CodecConfig.tiny()), "chanels": 3},
                  prefix="codec.model")


def test_metrics_and_opus_baseline():
    x = melody(5, 1.0, 24000)
    assert eval_codec.mel_distance(x, x, 24000) == 0.0 and eval_codec.si_sdr(x, 0.5 * x) > 60
    y = eval_codec.opus_roundtrip(x, 24000, 6.0)
    assert y.shape == x.shape
    noisy = x + 0.05 * np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    assert eval_codec.si_sdr(x, y) > 3.0  # aligned: Opus keeps a clean melody recognisable
    assert eval_codec.mel_distance(x, noisy, 24000) > eval_codec.mel_distance(x, x * 0.99, 24000)
