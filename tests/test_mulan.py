"""MuLan: embeddings, the contrastive loss, caption augmentation, the RVQ and tokens,
the trainer's exact resume, the metrics, and the offline pretrained text tower."""

from __future__ import annotations

import dataclasses
import io
import json
import random
import socket

import numpy as np
import pytest
import soundfile as sf
import torch

from cantus import shards
from cantus.audio_stream import AudioBatches, shard_paths
from cantus.tokenize.mulan import evaluate as mulan_eval
from cantus.tokenize.mulan import rvq as mulan_rvq
from cantus.tokenize.mulan import train as mulan_train
from cantus.tokenize.mulan.model import EmptyCaptionError, build_mulan
from cantus.tokenize.mulan.params import (MulanConfig, MulanEvalConfig, MulanModelConfig,
                                          MulanRVQConfig, MulanTrainConfig)
from cantus.tokenize.mulan.rvq import MulanTokenizer, ResidualKMeans, mulan_tokens
from cantus.training import Checkpoints, load_weights, save_weights

RATE = 8000


def _sine(rng: np.random.Generator, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * rng.uniform(200, 800) * t)).astype(np.float32)


def _noise(rng: np.random.Generator, seconds: float) -> np.ndarray:
    return (0.3 * rng.standard_normal(int(seconds * RATE))).astype(np.float32)


def _flac(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, RATE, format="FLAC")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """Sine and noise chunks with captions and tags, written with the real shard writer."""
    tmp, rng = tmp_path_factory.mktemp("mulan"), np.random.default_rng(0)
    for split, n in (("train", 8), ("valid", 4)):
        samples = []
        for i in range(n):
            kind = "sine" if i % 2 == 0 else "noise"
            x = (_sine if kind == "sine" else _noise)(rng, 1.5)
            meta = {"caption": f"a {kind} sound", "key": f"{split}{i}",
                    "tags": {"instruments": [kind], "tempo": ["slow", "fast"][i % 2],
                             "mode": "major", "tempo_bpm": 60 + i}}
            samples.append((f"{split}{i}", {"flac": _flac(x), "json": json.dumps(meta).encode()}))
        shards.write_shard(tmp / f"{split}-000000.tar", samples)
    return tmp


def _cfg(steps: int = 4, **train) -> MulanConfig:
    t = dict(seed=0, steps=steps, batch_size=2, lr=3e-3, text_lr=3e-3, weight_decay=0.0,
             warmup_steps=1, grad_clip=1.0, num_workers=0, shuffle_buffer=8,
             checkpoint_every=2, keep_checkpoints=2, log_every=1, caption_prob=0.5, tag_keep=0.5)
    return MulanConfig(model=MulanModelConfig.tiny(),
                       train=MulanTrainConfig(**{**t, **train}),
                       rvq=MulanRVQConfig(levels=3, codebook_size=4, kmeans_iters=5, seed=0,
                                          fit_stride_seconds=0.25, min_points_per_code=2),
                       eval=MulanEvalConfig({"instruments": "music played on {}",
                                             "tempo": "{} music"}, (1, 5, 10)))


def _other_weights(src, dst):
    """A copy of the model in ``src`` with one weight changed, saved to ``dst``."""
    model = build_mulan(MulanModelConfig.tiny())
    load_weights(model, src)
    with torch.no_grad():
        model.logit_scale += 1.0
    save_weights(model, dst, model.cfg)
    return dst


@pytest.fixture(scope="module")
def tiny():
    return build_mulan(MulanModelConfig.tiny(), seed=0).eval()


def test_embeddings_have_the_right_shapes_and_unit_norm(tiny):
    a = tiny.embed_audio(torch.randn(3, RATE))
    t = tiny.embed_text(["a sine sound", "noise, fast"])
    assert a.shape == (3, 16) and t.shape == (2, 16)
    assert torch.allclose(a.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    # 2.3 s at 1 s windows, 0.5 s stride: starts 0, 0.5, 1.0 and an end-aligned 1.3
    long = torch.randn(int(2.3 * RATE))
    assert tiny.windows(long).shape == (4, RATE)
    v = tiny.embed_long(long)
    assert v.shape == (16,) and abs(float(v.norm()) - 1) < 1e-5
    w = tiny.embed_windows(long)
    assert torch.allclose(v, torch.nn.functional.normalize(w.mean(0), dim=0), atol=1e-6)
    assert tiny.embed_long(torch.randn(RATE // 3)).shape == (16,)  # short audio is padded


def test_empty_or_blank_captions_raise_a_clear_error(tiny):
    for bad in ([""], ["ok", "   \n"]):
        with pytest.raises(EmptyCaptionError, match="empty or only whitespace"):
            tiny.embed_text(bad)
    # training texts fall back to the tags, then to "music": never empty
    rng = random.Random(0)
    assert mulan_train.augment_text({"caption": " ", "tags": {}}, rng, 0.5, 0.5) == "music"
    assert mulan_train.augment_text({"caption": "", "tags": {"genre": "reel"}}, rng, 1.0, 0.5) \
        == "reel"


def test_info_nce_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * a @ t.T
    want = 0.5 * (torch.nn.functional.cross_entropy(logits, torch.arange(5))
                  + torch.nn.functional.cross_entropy(logits.T, torch.arange(5)))
    assert torch.allclose(mulan_train.info_nce(a, t, scale), want)
    assert float(mulan_train.info_nce(a, a, torch.tensor(100.0))) < 1e-3  # aligned pairs


def test_caption_augmentation_mixes_sentences_and_tag_lists():
    meta = {"caption": "a fast reel on fiddle",
            "tags": {"instruments": ["fiddle", "flute"], "tempo": "fast", "tempo_bpm": 120,
                     "key": "D major", "mode": "major", "composer": None}}
    phrases = mulan_train.tag_phrases(meta["tags"])
    assert set(phrases) == {"fiddle", "flute", "fast", "120 bpm", "D major"}
    texts = mulan_train.batch_texts([meta] * 64, seed=1, step=3, rank=0, caption_prob=0.3,
                                    tag_keep=0.5)
    assert texts == mulan_train.batch_texts([meta] * 64, 1, 3, 0, 0.3, 0.5)  # pure function
    assert texts != mulan_train.batch_texts([meta] * 64, 1, 4, 0, 0.3, 0.5)
    lists = [x for x in texts if x != meta["caption"]]
    assert 0 < len(lists) < 64 and len(set(lists)) > 5
    for x in lists:
        parts = x.replace(" and ", ", ").split(", ")
        assert parts and set(parts) <= set(phrases)


def test_contrastive_training_separates_sine_from_noise():
    torch.manual_seed(0)
    model = build_mulan(MulanModelConfig.tiny(), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(1)

    def batch(n: int):
        kinds = ["sine", "noise"] * (n // 2)
        wav = torch.from_numpy(np.stack([(_sine if k == "sine" else _noise)(rng, 1.0)
                                         for k in kinds]))
        return wav, [f"a {k} sound" for k in kinds], kinds

    losses = []
    model.train()
    for _ in range(25):
        wav, texts, _ = batch(8)
        a, t = model(wav, texts)
        # both texts repeat, so use the two distinct captions as the classes
        loss = mulan_train.info_nce(a[:2], t[:2], model.scale()) + \
            torch.nn.functional.cross_entropy(model.scale() * a @ t[:2].T,
                                              torch.arange(8) % 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    wav, _, kinds = batch(16)
    with torch.no_grad():
        sim = model.embed_audio(wav) @ model.embed_text(["a sine sound", "a noise sound"]).T
    pred = ["sine" if s[0] > s[1] else "noise" for s in sim]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert np.mean([p == k for p, k in zip(pred, kinds)]) >= 0.9


def test_rvq_fit_encode_decode_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    rvq = ResidualKMeans.fit(x, levels=4, size=16, iters=10, seed=0)
    codes = rvq.encode(x)
    assert codes.shape == (300, 4) and codes.min() >= 0 and codes.max() < 16
    errors = [float(np.square(x - rvq.decode(codes[:, :k])).mean()) for k in range(1, 5)]
    assert all(b < a for a, b in zip(errors, errors[1:]))  # each level helps
    assert np.array_equal(rvq.encode(rvq.decode(codes)), codes) or errors[-1] < errors[0]
    few = rng.standard_normal((5, 8)).astype(np.float32)  # fewer points than codes
    small = ResidualKMeans.fit(few, levels=2, size=16)
    assert np.allclose(small.decode(small.encode(few)), few, atol=1e-5)
    assert small.fitted.tolist() == [5, 1]  # level 1 fits the all-zero residual: one code
    twice = ResidualKMeans.fit(np.concatenate([few, few]), levels=2, size=16)
    assert twice.fitted[0] == 5 and twice.encode(few)[:, 0].tolist() == [0, 1, 2, 3, 4]
    capped = ResidualKMeans.fit(x, levels=3, size=1024, iters=5, min_points_per_code=10)
    c = capped.encode(x)
    assert capped.size == 1024 and capped.fitted.tolist() == [30, 30, 30]
    assert (c < capped.fitted).all() and len(np.unique(c[:, 2])) > 1  # later levels carry info
    with pytest.raises(ValueError, match="outside the 30 fitted codes"):
        capped.decode(np.array([[0, 30, 0]]))
    digest = rvq.save(tmp_path / "rvq", {"note": "test"})
    back = ResidualKMeans.load(tmp_path / "rvq")
    assert back.sha256() == digest and np.array_equal(back.encode(x), codes)
    meta = json.loads((tmp_path / "rvq" / "rvq.json").read_text())
    meta["sha256"] = "0" * 64
    (tmp_path / "rvq" / "rvq.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="sha256"):
        ResidualKMeans.load(tmp_path / "rvq")
    from safetensors.numpy import save_file  # an RVQ saved before the fitted counts existed
    save_file({"codebooks": rvq.codebooks}, str(tmp_path / "rvq" / "codebooks.safetensors"))
    with pytest.raises(ValueError, match="refit"):
        ResidualKMeans.load(tmp_path / "rvq")


def test_text_and_audio_tokens_are_uint16_of_every_level(tiny):
    rng = np.random.default_rng(0)
    emb = torch.cat([tiny.embed_windows(torch.from_numpy(_noise(rng, 3.0))),
                     tiny.embed_windows(torch.from_numpy(_sine(rng, 3.0)))]).numpy()
    tok = MulanTokenizer(tiny, ResidualKMeans.fit(emb, levels=12, size=8, iters=5))
    audio = mulan_tokens(_sine(rng, 2.0), tok)
    text = mulan_tokens("a sine sound", tok)
    for codes in (audio, text):
        assert codes.dtype == np.uint16 and codes.shape == (12,) and codes.max() < 8
    assert np.array_equal(text, mulan_tokens("a sine sound", tok))


def test_audio_batches_can_carry_metadata(shard_dir):
    paths = shard_paths(shard_dir, "train")
    b = next(iter(AudioBatches(paths, crop_seconds=1.0, sample_rate=RATE, batch_size=3, seed=0,
                               with_meta=True)))
    assert [m["key"] for m in b["meta"]] == b["key"]
    assert all(m["caption"].startswith("a ") for m in b["meta"])
    plain = next(iter(AudioBatches(paths, crop_seconds=1.0, sample_rate=RATE, batch_size=3,
                                   seed=0)))
    assert "meta" not in plain and plain["key"] == b["key"]


def test_trainer_resumes_exactly_then_rvq_and_metrics(shard_dir, tmp_path):
    cfg = _cfg(steps=4)
    full = mulan_train.run(cfg, mulan_train.Inputs(str(shard_dir), str(tmp_path / "ck1")),
                           tmp_path / "m1")
    inputs = mulan_train.Inputs(str(shard_dir), str(tmp_path / "ck2"), str(tmp_path / "live"))
    part = mulan_train.run(cfg, inputs, tmp_path / "m2", stop_after=2)  # "killed" at step 2
    assert part["steps"] == 2 and not (tmp_path / "m2").exists()
    resumed = mulan_train.run(cfg, inputs, tmp_path / "m2")
    assert resumed["steps"] == 4 and resumed["sha256"] == full["sha256"]
    assert (tmp_path / "m1" / "model.safetensors").read_bytes() == \
        (tmp_path / "m2" / "model.safetensors").read_bytes()
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=1))
    again = mulan_train.run(other, inputs, tmp_path / "m3", stop_after=2)
    assert again["steps"] == 2 and Checkpoints(tmp_path / "ck2").steps() == [2]  # not resumed

    info = mulan_rvq.run(cfg.rvq, tmp_path / "m1", shard_dir, tmp_path / "rvq")
    assert info["fit_points"] == 8 * (3 + 1)  # 1.5 s at 1 s windows, 0.25 s stride, + means
    tok = MulanTokenizer.load(tmp_path / "m1", tmp_path / "rvq")
    assert tok("a sine sound").shape == (3,)
    # the tokenize stage's MuLan: audio side only, the same audio tokens
    from cantus.tokenize.fields import load_field

    field = load_field("mulan", {"mulan": str(tmp_path / "m1"), "mulan_rvq": str(tmp_path / "rvq")})
    assert field.tok.model.text is None and field.tok.model.text_proj is None
    clip = _sine(np.random.default_rng(5), 2.0)
    assert np.array_equal(field.encode_batch([clip])[0], tok(clip))
    with pytest.raises(RuntimeError, match="without its text tower"):
        field.tok("a sine sound")
    with pytest.raises(ValueError, match="refit"):  # an RVQ fitted for other weights
        MulanTokenizer.load(_other_weights(tmp_path / "m1", tmp_path / "m4"), tmp_path / "rvq")

    m = mulan_eval.run(cfg.eval, tok, shard_dir, tmp_path / "mulan.json")
    assert json.loads((tmp_path / "mulan.json").read_text()) == m
    valid = m["retrieval"]["valid"]
    assert valid["n"] == 4 and valid["chance"] == {"R@1": 0.25, "R@5": 1.0, "R@10": 1.0,
                                                   "median_rank": 2.5}
    assert valid["text_to_audio"]["R@10"] == 1.0 and 1 <= valid["audio_to_text"]["median_rank"] <= 4
    zs = m["zero_shot"]["all"]["instruments"]
    assert zs["classes"] == 2 and zs["majority_baseline"] == 0.5 and 0 <= zs["accuracy"] <= 1
    assert len(m["rvq"]["train"]["code_agreement"]) == 3
    assert -1 <= m["rvq"]["valid"]["audio_cosine"] <= 1


def test_ranks_and_zero_shot_golden(tiny):
    sim = np.array([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.2, 0.3, 0.1]])
    assert mulan_eval.ranks(sim).tolist() == [1, 2, 3]
    r = mulan_eval.retrieval(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32), (1, 2))
    assert r["text_to_audio"] == {"R@1": 1.0, "R@2": 1.0, "median_rank": 1.0}
    assert r["chance"] == {"R@1": 1 / 3, "R@2": 2 / 3, "median_rank": 2.0}


def test_pretrained_text_tower_loads_with_no_network(monkeypatch):
    def refuse(*a, **k):
        raise OSError("network access attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    model = build_mulan(MulanModelConfig.tiny(text_model="minilm"), seed=0).eval()
    with torch.no_grad():
        h = model.text(["solo piano", "piano solo", "a loud drum beat"])  # pooled MiniLM
    assert h.shape == (3, 384)
    h = torch.nn.functional.normalize(h, dim=-1)
    assert float(h[0] @ h[1]) > float(h[0] @ h[2])
