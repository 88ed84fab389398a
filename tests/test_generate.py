"""Generation: sliding-window sampling of each stage, the whole chain, continuation, errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from cantus.config import load_section
from cantus.generate.run import GenerateConfig, Generator, check_request, main, model_paths
from cantus.train.layout import FIELDS, Layout, stage_spec
from cantus.train.model import tiny
from cantus.generate.sample import SampleOptions, sample_frames, sample_ids, window_starts
from cantus.train.stage import TokensConfig, build_model, load_stage, save_stage
from conftest import ROOT, audio_shards, tiny_tokenizer_models

K = 64
CROPS = {"semantic": 0.8, "coarse": 0.4, "fine": 0.2}  # 20 semantic, 20 and 10 acoustic frames
CAPTIONS = [{"caption": "a slow piece on harp", "tags": {"instruments": ["harp"]}},
            {"caption": "a fast reel on banjo", "tags": {"instruments": ["banjo"]}},
            {"caption": "banjo and harp duet", "tags": {"instruments": ["banjo", "harp"]}}]


def layout(stage: str) -> Layout:
    return Layout(stage_spec(stage), K, CROPS[stage], False)


def tiny_lm(stage: str, seed: int = 0):
    torch.manual_seed(seed)
    lay = layout(stage)
    return build_model(tiny(), lay).eval(), lay


def tokens_cfg() -> TokensConfig:
    return TokensConfig(acoustic_levels=12, coarse_levels=4, mulan_levels=12,
                        expect={})


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A models/ folder as `dvc repro` leaves it, every model tiny and untrained."""
    from cantus.tokenize.codec.model import CodecConfig

    tmp = tmp_path_factory.mktemp("gen")
    audio = audio_shards(tmp, 6, 4.0, seed=900, chunk_seconds=2.0, valid_fraction=0.4,
                         min_chunk_seconds=1.0, rate=24000, sidecars=CAPTIONS)
    root = tmp / "models"
    tok = tiny_tokenizer_models(root, audio, dataclasses.replace(
        CodecConfig.tiny(), n_q=12, codebook_size=K))
    assert set(tok) <= set(model_paths(root))
    for i, stage in enumerate(("semantic", "coarse", "fine")):
        model, lay = tiny_lm(stage, seed=i)
        save_stage(model, lay, tokens_cfg(), root / f"lm_{stage}")
    (tmp / "audio_dir").write_text(str(audio))
    return root


def gen_cfg(**kw) -> GenerateConfig:
    return dataclasses.replace(load_section(ROOT / "params.yaml", "generate", GenerateConfig),
                               device="cpu", **kw)


@pytest.mark.parametrize("total,window,known", [(50, 20, 0), (20, 20, 0), (7, 20, 0),
                                                (61, 20, 13), (100, 10, 99)])
def test_windows_cover_every_new_frame_once_with_full_windows(total, window, known):
    starts = window_starts(total, window, known)
    made = known
    for start, first in starts:
        assert first == made and start <= first
        end = min(total, start + window)
        assert end - start == min(window, total)        # full windows, also the last
        if made > 0:
            assert first - start >= min(window // 2, made) or start == 0
        made = end
    assert made == total


def test_cached_sampling_equals_greedy_decoding_by_full_forward():
    model, lay = tiny_lm("coarse")
    rng = np.random.default_rng(0)
    tokens = {"mulan": rng.integers(0, K, 12), "semantic": rng.integers(0, K, 10)}
    prefix = torch.from_numpy(lay.prefix(tokens))[None]
    got = sample_ids(model, lay, prefix, 12, SampleOptions(temperature=0.0),
                     torch.Generator().manual_seed(0))[0]
    seq = prefix[0].tolist()
    with torch.no_grad():
        for i in range(12):
            logits = model(torch.tensor([seq]))[0, -1]
            b = lay.next_block(i)
            seq.append(int(logits[b * K:(b + 1) * K].argmax()) + b * K)
    assert got.tolist() == seq[prefix.shape[1]:]


def test_each_stage_samples_codes_of_its_shape_beyond_its_crop():
    rng = np.random.default_rng(1)
    b, frames = 2, 50                                    # semantic crop is 20 frames
    mulan = rng.integers(0, K, (b, 12)).astype(np.uint16)
    model, lay = tiny_lm("semantic")
    sem = sample_frames(model, lay, lambda s, e: {"mulan": mulan}, frames, SampleOptions(), b)
    assert sem.shape == (b, frames) and sem.dtype == np.uint16 and sem.max() < K
    model, lay = tiny_lm("coarse")
    seen = []

    def cond(s, e):
        seen.append((s, e))
        return {"mulan": mulan, "semantic": sem[:, s // 2: -(-e // 2)]}

    coarse = sample_frames(model, lay, cond, 2 * frames, SampleOptions(0.95), b)
    assert coarse.shape == (b, 4, 2 * frames) and coarse.max() < K
    assert len(seen) > 1 and all(e - s == 20 for s, e in seen)   # slid, full windows
    model, lay = tiny_lm("fine")
    fine = sample_frames(model, lay, lambda s, e: {"acoustic": coarse[:, :, s:e]}, 2 * frames,
                         SampleOptions(0.4), b)
    assert fine.shape == (b, 8, 2 * frames) and fine.max() < K


def test_known_frames_are_kept_and_continued():
    model, lay = tiny_lm("fine")
    rng = np.random.default_rng(2)
    coarse = rng.integers(0, K, (1, 4, 30)).astype(np.uint16)
    known = rng.integers(0, K, (1, 8, 7)).astype(np.uint16)
    out = sample_frames(model, lay, lambda s, e: {"acoustic": coarse[:, :, s:e]}, 30,
                        SampleOptions(0.4), 1, known=known)
    assert np.array_equal(out[:, :, :7], known) and out.shape == (1, 8, 30)


def test_guidance_one_is_plain_sampling_and_other_scales_sample_valid_codes():
    model, lay = tiny_lm("semantic")
    mulan = np.arange(24, dtype=np.uint16).reshape(2, 12) % K
    plain = sample_frames(model, lay, lambda s, e: {"mulan": mulan}, 30, SampleOptions(), 2, 5)
    one = sample_frames(model, lay, lambda s, e: {"mulan": mulan}, 30,
                        SampleOptions(guidance=1.0), 2, 5)
    three = sample_frames(model, lay, lambda s, e: {"mulan": mulan}, 30,
                          SampleOptions(guidance=3.0), 2, 5)
    assert np.array_equal(plain, one)
    assert three.shape == plain.shape and three.max() < K


def test_generator_makes_the_asked_length_for_every_prompt_and_sample(models):
    gen = Generator(model_paths(models))
    wavs = gen.generate(["a harp piece", "banjo, fast"], gen_cfg(), seconds=1.2, samples=2)
    assert wavs.shape == (4, int(1.2 * 24000)) and wavs.dtype == np.float32
    assert np.isfinite(wavs).all()
    again = gen.generate(["a harp piece", "banjo, fast"], gen_cfg(), seconds=1.2, samples=2)
    assert np.array_equal(wavs, again)                          # seeded


def test_continuation_keeps_the_prompt_and_adds_the_asked_seconds(models):
    gen = Generator(model_paths(models))
    rate = 24000
    t = np.arange(int(0.4 * rate)) / rate
    prompt = (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    out = gen.continue_audio(prompt, rate, gen_cfg(), seconds=0.6, prompt="harp", samples=2)
    assert out.shape == (2, rate)                                  # 0.4 s prompt + 0.6 s
    codes = gen.prompt_tokens(prompt, rate)["acoustic"]
    alone = gen.codec.decode(torch.from_numpy(codes.astype(np.int32))[None]).numpy()[0]
    # the decoder is causal: the prompt's frames re-synthesise exactly as on their own
    n = alone.shape[0]
    np.testing.assert_allclose(out[0, :n], alone, atol=1e-5)
    np.testing.assert_allclose(out[1, :n], alone, atol=1e-5)
    by_audio = gen.continue_audio(prompt, 48000, gen_cfg(), seconds=0.4)   # MuLan from audio
    assert by_audio.shape == (1, int(0.2 * rate) + int(0.4 * rate))


@pytest.mark.parametrize("prompts,seconds,match", [
    ([], 5.0, "no prompt"), (["  "], 5.0, "prompt 0 is empty"),
    (["harp"], 0.0, "positive duration"), (["harp"], float("nan"), "positive duration"),
    (["harp"], 1e6, "exceeds generate.max_seconds")])
def test_bad_requests_are_refused_with_a_clear_error(prompts, seconds, match):
    with pytest.raises(ValueError, match=match):
        check_request(prompts, seconds, 300.0)


def test_missing_or_mismatched_models_are_refused(models, tmp_path):
    paths = model_paths(models)
    with pytest.raises(FileNotFoundError, match="coarse LM model folder not found"):
        Generator({**paths, "coarse_lm": str(tmp_path / "nowhere")})
    bad = tmp_path / "lm_fine"
    model, lay = tiny_lm("fine")
    save_stage(model, lay, tokens_cfg(), bad, extra={"tokenizers": {
        "acoustic": {"checkpoint_hash": "0" * 64}}})
    with pytest.raises(ValueError, match="trained on acoustic tokens of checkpoint_hash 000000"):
        Generator({**paths, "fine_lm": str(bad)})


def test_command_writes_one_wav_per_generation(models, tmp_path, capsys):
    rc = main(["a harp piece", "--out", str(tmp_path / "x.wav"), "--seconds", "0.8",
               "--samples", "2", "--models", str(models), "--params", str(ROOT / "params.yaml"),
               "--device", "cpu", "--guidance", "2.0"])
    assert rc == 0
    for i in range(2):
        x, rate = sf.read(str(tmp_path / f"x-{i}.wav"))
        assert rate == 24000 and x.shape == (int(0.8 * rate),)
    with pytest.raises(SystemExit) as e:
        main(["", "--out", str(tmp_path / "y.wav"), "--models", str(models),
              "--params", str(ROOT / "params.yaml")])
    assert e.value.code == 2 and "prompt 0 is empty" in capsys.readouterr().err


def test_saved_stage_records_its_layout(models):
    model, lay = load_stage(models / "lm_coarse")
    assert lay.crop_seconds == CROPS["coarse"] and lay.sizes == dict.fromkeys(FIELDS, K)
    assert json.loads((models / "lm_coarse" / "config.json").read_text())["layout"]["stage"] \
        == "coarse"


def test_evaluation_stage_scores_generations_and_renders_every_section(models, tmp_path):
    import torch.jit

    from cantus.evaluate import generate_eval, run as evaluate
    from cantus.evaluate.params import EvaluateConfig

    audio = Path((models.parent / "audio_dir").read_text())
    cfg = load_section(ROOT / "params.yaml", "evaluate", EvaluateConfig)
    cfg = dataclasses.replace(cfg, seconds=1.0, min_instrument_count=1, examples=2)
    summary = generate_eval.run(gen_cfg(), cfg, models, audio, tmp_path / "gen")
    kinds = [p["kind"] for p in summary["prompts"]]
    assert kinds.count("instrument") == 2 and kinds.count("caption") >= 2
    for p in summary["prompts"]:
        x, rate = sf.read(str(tmp_path / "gen" / p["file"]))
        assert rate == 24000 and x.shape == (24000,)
    # a local embedding by path: a scripted module (here: log-power of 16 frames)
    class Frames(torch.nn.Module):
        def forward(self, x):
            return torch.log1p(x.reshape(x.shape[0], 16, -1).pow(2).mean(-1))

    emb = tmp_path / "emb"
    emb.mkdir()
    torch.jit.script(Frames()).save(str(emb / "model.pt"))
    (emb / "config.json").write_text(json.dumps({"sample_rate": 16000, "name": "frames"}))
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "codec.json").write_text(json.dumps({
        "codec_6kbps": {"mel_distance": 0.5, "si_sdr": 2.0},
        "opus_6kbps": {"mel_distance": 0.6, "si_sdr": 1.0},
        "usage": {"perplexity": [30.0, 1.0]}}))               # level 1 collapsed
    (metrics_dir / "mulan_train").mkdir()
    (metrics_dir / "mulan_train" / "metrics.json").write_text(json.dumps({"loss": 0.3}))
    # a token folder for the valid chunks (random codes, MuLan codes in its 4 entries)
    from cantus.audio_stream import iter_all, shard_paths
    from cantus.shards import write_shard
    from cantus.tokens import sample_fields

    rng = np.random.default_rng(3)
    keys = [m["key"] for _, m in iter_all(shard_paths(audio, "valid"))]
    write_shard(tmp_path / "tokens" / "valid-000000.tar", [
        (k, sample_fields({"acoustic": rng.integers(0, K, (12, 100)).astype(np.uint16),
                           "semantic": rng.integers(0, K, 50).astype(np.uint16),
                           "mulan": rng.integers(0, 4, 12).astype(np.uint16)}, {}))
        for k in keys])
    tags = {"instruments": "music played on {}"}
    out = evaluate.run(dataclasses.replace(cfg, fad_embedding=str(emb)), tags, tmp_path / "gen",
                       audio, models, metrics_dir, tmp_path / "reports",
                       tokens=tmp_path / "tokens", mulan_batch=16)
    d = out["diagnostics"]
    for stage in ("semantic", "coarse", "fine"):
        s = d["sensitivity"][stage]
        assert s["n"] == len(keys) and s["ratio"] == pytest.approx(s["swapped_ppl"] / s["own_ppl"])
    assert d["sensitivity"]["fine"]["null_ppl"] is None   # fine is trained without dropout
    assert len(d["code_agreement"]["own"]) == 12 and d["code_agreement"]["n"] >= 2
    assert -1 <= d["codec_hearing"]["mcc"]["codec"] <= 1
    assert d["codec_hearing"]["mcc"]["codec"] == pytest.approx(
        out["generation"]["mcc"]["codec_resynthesis_own_caption"], abs=1e-6)
    assert not d["alarms"]["mulan_infonce"]["raised"] and d["alarms"]["codec_level_1"]["raised"]
    g = out["generation"]
    assert -1 <= g["mcc"]["generated"] <= 1 and -1 <= g["mcc"]["shuffled_prompts"] <= 1
    assert g["mcc"]["real_own_caption"] is not None
    assert -1 <= g["mcc"]["codec_resynthesis_own_caption"] <= 1
    assert g["fad"]["embedding"] == "frames" and g["fad"]["generated"] >= 0
    assert g["kld"]["instruments"]["generated"] >= 0
    assert 0 <= g["adherence"]["accuracy"] <= 1 and g["adherence"]["chance"] == 0.5
    assert out["stages"]["codec"]["opus_6kbps"]["mel_distance"] == 0.6
    saved = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert saved["generation"]["n_prompts"] == len(kinds)
    bars = json.loads((tmp_path / "reports" / "plots" / "scores.json").read_text())
    assert {b["role"] for b in bars} == {"cantus", "baseline", "reference"}
    page = (tmp_path / "reports" / "report.html").read_text()
    assert saved["diagnostics"]["alarms"]["codec_level_1"]["raised"] is True
    for section in ("id='metrics'", "id='stages'", "id='examples'", "mel distance 6 kbps",
                    "id='diagnostics'", "coarse LM &lt;- semantic", "codec_level_1",
                    "1 of 3 raised"):
        assert section in page
    assert page.count("<audio") >= 5 and page.count("data:image/png;base64") >= 7
    assert "real through the codec" in page


def aligned_lm(stage: str, seed: int = 0):
    torch.manual_seed(seed)
    lay = Layout(stage_spec(stage), K, CROPS[stage], False, aligned=True)
    return build_model(tiny(), lay).eval(), lay


@pytest.mark.parametrize("stage,guidance", [("semantic", 1.0), ("coarse", 1.0),
                                            ("coarse", 3.0), ("fine", 1.0)])
def test_aligned_sampling_sees_what_training_sees(stage, guidance):
    """Greedy sampling of a stage with aligned conditioning, one window, equals the argmax
    of the training forward (``encoded``: ids + aligned_cond) on the sequence it made."""
    from cantus.train.data import encoded

    model, lay = aligned_lm(stage)
    torch.nn.init.normal_(model.cond_embed.weight, std=1.0)  # conditioning that matters
    rng = np.random.default_rng(3)
    (tp,) = lay.spec.target
    frames = lay.frames(tp.field)
    cond = {"mulan": rng.integers(0, K, (1, 12)).astype(np.uint16),
            "semantic": rng.integers(0, K, (1, lay.frames("semantic"))).astype(np.uint16),
            "acoustic": rng.integers(0, K, (1, 4, frames)).astype(np.uint16)}
    cond = {f: v for f, v in cond.items() if f in {p.field for p in lay.spec.cond}}
    opts = SampleOptions(temperature=0.0, guidance=guidance)
    out = sample_frames(model, lay, lambda s, e: cond, frames, opts, 1)
    tokens = {f: v[0] for f, v in cond.items()}
    if stage == "fine":
        tokens["acoustic"] = np.concatenate([tokens["acoustic"], out[0]])
    elif stage == "coarse":
        tokens["acoustic"] = np.concatenate([out[0], np.zeros((8, frames), np.uint16)])
    else:
        tokens["semantic"] = out[0]

    def logits(drop: bool) -> torch.Tensor:
        item = encoded(lay, tokens, drop)
        with torch.no_grad():
            return model(item["ids"][None, :-1], cond=item["cond"][None, :-1])[0], item

    full, item = logits(False)
    if guidance != 1.0:
        full = logits(True)[0] + guidance * (full - logits(True)[0])
    at = np.flatnonzero(item["target"].numpy()) - 1          # positions that predict targets
    want = []
    for j, pos in enumerate(at):
        lo, hi = lay.block_range(lay.next_block(j))
        want.append(int(full[pos, lo:hi].argmax()) + lo)
    assert item["ids"][at + 1].tolist() == want
    ids = torch.from_numpy(lay.prefix(tokens))[None]
    with pytest.raises(ValueError, match="aligned conditioning"):
        sample_ids(model, lay, ids, 4, SampleOptions(), torch.Generator())
