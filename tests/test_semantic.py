"""Semantic tokens: w2v-BERT features, pretraining, faiss k-means, tag measures."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml

from cantus.config import ConfigError, from_dict, load_section, to_dict
from cantus.tokenize.semantic import kmeans as sk
from cantus.tokenize.semantic import evaluate as smet
from cantus.tokenize.semantic import model as sm
from cantus.tokenize.semantic import params as sparams
from cantus.tokenize.semantic import pretrain as sp
from conftest import ROOT, audio_shards, melody

PRETRAIN = dict(seed=0, steps=4, batch_size=2, crop_seconds=1.0, lr=3e-3, warmup_steps=1,
                weight_decay=0.0, grad_clip=1.0, mask_prob=0.2, mask_length=3, codebook_size=16,
                codevector_dim=8, num_negatives=5, temperature=0.1, gumbel_start=2.0,
                gumbel_end=0.5, diversity_weight=0.1, mlm_weight=1.0, dropout=0.1,
                checkpoint_every=2, keep_checkpoints=2, log_every=1, num_workers=0,
                device="cpu")


def _kmeans_cfg(**kw):
    base = dict(layer=0, token_rate=25, clusters=8, max_frames=400, iterations=10, restarts=1,
                seed=0, batch_size=2, device="cpu")
    return sparams.KMeansConfig(**{**base, **kw})


def _model_cfg(checkpoint: str = "", **kw) -> sparams.SemanticConfig:
    return sparams.SemanticConfig(
        model=sparams.WeightsConfig(checkpoint=checkpoint, size="tiny", utterance_norm=False),
        pretrain=sparams.PretrainConfig(**{**PRETRAIN, **kw}), kmeans=_kmeans_cfg(),
        eval=sparams.EvalConfig(batch_size=2, device="cpu"))


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return sm.build("tiny").eval()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    return audio_shards(tmp_path_factory.mktemp("semantic"), 3, 4.5, seed=40,
                        chunk_seconds=2.0, valid_fraction=0.34)


@pytest.fixture(scope="module")
def local_checkpoint(tmp_path_factory, tiny_model):
    path = tmp_path_factory.mktemp("ckpt") / "w2v-bert"
    tiny_model.save_pretrained(str(path))
    return path


def test_features_have_25hz_frames_and_the_layer_width(tiny_model):
    fe = sm.FeatureExtractor(tiny_model, layer=0, token_rate=25)
    assert fe.layer == sm.default_layer(tiny_model.config)
    ten = melody(1, 10.0, rate=16000)
    feats = fe([ten, ten[:16000 * 3 + 100]], 16000)
    assert feats[0].shape == (250, 32) and feats[1].shape == (75, 32)
    assert torch.isfinite(feats[0]).all()
    alone = fe([ten[:16000 * 3 + 100]], 16000)[0]   # padding in a batch does not leak
    assert torch.allclose(alone[:70], feats[1][:70], atol=1e-4)
    from transformers import Wav2Vec2BertConfig

    paper = Wav2Vec2BertConfig(num_hidden_layers=12 + 12)
    assert sm.default_layer(paper) == 19  # the MLM module's 7th layer


def test_compact_relative_bias_equals_transformers_own(tiny_model):
    from transformers.models.wav2vec2_bert import modeling_wav2vec2_bert as w2v

    sm.use_compact_relative_bias()
    own, compact = sm.transformers_relative_bias, w2v._apply_relative_key_position_encoding
    assert own is not None and compact is sm._relative_key_bias
    attn = tiny_model.encoder.layers[0].self_attn
    assert attn.position_embeddings_type == "relative_key"
    torch.manual_seed(1)
    with torch.no_grad():
        attn.distance_embedding.weight.normal_()
        for t in (1, 5, attn.left_max_position_embeddings + 30):  # shorter and longer than the window
            q, k = torch.randn(2, 3, t, attn.head_size), torch.randn(2, 3, t, attn.head_size)
            want, got = own(attn, q, k)[1], compact(attn, q, k)[1]
            assert got.shape == want.shape == (2, 3, t, t)
            assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    # the whole model: features with transformers' bias and with the compact one
    fe = sm.FeatureExtractor(tiny_model, layer=0, token_rate=25)
    clips = [melody(2, 3.0, rate=16000), melody(3, 2.2, rate=16000)]
    fast = fe(clips, 16000)
    try:
        w2v._apply_relative_key_position_encoding = own
        slow = fe(clips, 16000)
    finally:
        w2v._apply_relative_key_position_encoding = compact
    for a, b in zip(fast, slow):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bad_audio_and_settings_fail_clearly(tiny_model):
    fe = sm.FeatureExtractor(tiny_model)
    with pytest.raises(ValueError, match="shorter than one"):
        fe([np.zeros(600, np.float32)], 16000)
    with pytest.raises(ValueError, match="16000 Hz"):
        fe([np.zeros(24000, np.float32)], 24000)
    with pytest.raises(ValueError, match="out of range"):
        sm.FeatureExtractor(tiny_model, layer=9)
    with pytest.raises(ValueError, match="divide"):
        sm.FeatureExtractor(tiny_model, token_rate=30)
    with pytest.raises(ConfigError, match="semantic.kmeans.clusterz"):
        from_dict(sparams.KMeansConfig, {**dataclasses.asdict(_kmeans_cfg()), "clusterz": 3},
                  "semantic.kmeans")


def test_params_sections_load():
    cfg = load_section(ROOT / "params.yaml", "semantic", sparams.SemanticConfig)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    # every key as written (the validators themselves are tested with bad values above)
    assert to_dict(cfg) == raw["semantic"]


def test_kmeans_recovers_synthetic_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (6, 16))
    labels = rng.integers(0, 6, 3000)
    x = (centres[labels] + rng.normal(0, 0.5, (3000, 16))).astype(np.float32)
    # Twice as many clusters as blobs: random initialisation can otherwise merge two.
    cfg = _kmeans_cfg(clusters=12, max_frames=1000, iterations=25)
    codebook, stats = sk.fit(iter(np.array_split(x, 30)), cfg)   # streamed in 30 pieces
    assert stats["frames_seen"] == 3000 and stats["frames_sampled"] == 1000
    ids, _ = codebook.assign(x)
    assert smet.purity(ids.numpy(), labels) == 1.0
    assert smet.pnmi(ids.numpy(), labels) == pytest.approx(1.0)
    assert smet.pnmi(rng.integers(0, 6, 3000), labels) < 0.01


def test_codebook_and_normalisation_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(5, 3, (2000, 4)).astype(np.float32) * np.array([1, 10, 0.1, 2], np.float32)
    mean, std = sk.normalisation(x)
    z = (x - mean) / std
    assert np.allclose(z.mean(0), 0, atol=1e-4) and np.allclose(z.std(0), 1, atol=1e-3)
    centroids, _ = sk.fit_kmeans(z, 5, 10, 0, 1)
    book = sk.Codebook(centroids, mean, std)
    digest = book.save(tmp_path)
    again = sk.Codebook.load(tmp_path)
    assert torch.equal(again.mean, book.mean) and torch.equal(again.std, book.std)
    assert torch.equal(again.centroids, book.centroids)
    assert torch.equal(again.assign(x)[0], book.assign(x)[0])
    assert len(digest) == 64


def test_pretraining_losses_fall_on_a_few_clips():
    torch.manual_seed(0)
    cfg = _model_cfg(mask_prob=0.15, mask_length=4, num_negatives=10, codebook_size=32,
                     dropout=0.0, steps=25, lr=1e-2, warmup_steps=3)
    model = sp.W2VBert(sm.build("tiny", 0.0, False), 32, 8)
    front = sm.FeatureExtractor(model.backbone)
    clips = [melody(s, 1.5, rate=16000) for s in (7, 8)]
    feats, attn, _ = front.fbank(clips, 16000)
    attn = attn.bool()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain.lr)

    def losses():  # same mask, negatives and Gumbel noise before and after (no dropout)
        torch.manual_seed(123)
        with torch.no_grad():
            _, parts = sp.step_losses(model, feats, attn, cfg.pretrain, cfg.pretrain.steps)
        return parts

    before = losses()
    for step in range(cfg.pretrain.steps):
        total, _ = sp.step_losses(model, feats, attn, cfg.pretrain, step)
        opt.zero_grad()
        total.backward()
        opt.step()
    after = losses()
    print({k: (float(before[k]), float(after[k])) for k in before})
    assert after["contrastive"] < 0.8 * before["contrastive"]
    assert after["mlm"] < 0.8 * before["mlm"]


def test_span_mask_covers_spans_of_valid_frames():
    torch.manual_seed(0)
    valid = torch.ones(3, 200, dtype=torch.bool)
    valid[2, 50:] = False
    m = sp.span_mask(valid, 0.05, 10)
    assert not m[2, 50:].any() and m.any(1).all()
    assert 0.2 < m[:2].float().mean() < 0.6   # ~1 - (1 - p)^L of the frames


def test_pretraining_resumes_exactly(shard_dir, tmp_path):
    cfg = _model_cfg()
    full = sp.run(cfg, shard_dir, tmp_path / "full", tmp_path / "ck_full")
    paths = [str(p) for p in sorted(shard_dir.glob("train-*.tar"))]
    part = sp.pretrain(cfg, paths, tmp_path / "resumed", tmp_path / "ck" / sp.run_id(cfg, paths),
                       stop_after=2)
    assert part == {"step": 2, "finished": False}
    resumed = sp.run(cfg, shard_dir, tmp_path / "resumed", tmp_path / "ck",
                     metrics=tmp_path / "live")
    assert resumed["hash"] == full["hash"] and resumed["steps"] == 4
    a, b = sm.load(tmp_path / "full"), sm.load(tmp_path / "resumed")
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), ka
    assert (tmp_path / "full" / "config.json").is_file()


def test_local_checkpoint_loads_and_gives_the_same_features(tiny_model, local_checkpoint,
                                                             tmp_path):
    cfg = _model_cfg(checkpoint=str(local_checkpoint))
    summary = sp.run(cfg, "unused", tmp_path / "model", tmp_path / "ck")
    assert summary["source"] == "checkpoint" and summary["hash"] == sm.checkpoint_hash(
        local_checkpoint)
    assert not (tmp_path / "model" / "model.safetensors").exists()  # nothing trained
    assert sp.model_dir(tmp_path / "model") == local_checkpoint.resolve()
    loaded = sm.load(local_checkpoint)
    x = melody(5, 2.0, rate=16000)
    assert torch.allclose(sm.FeatureExtractor(loaded)([x], 16000)[0],
                          sm.FeatureExtractor(tiny_model)([x], 16000)[0], atol=1e-6)
    with pytest.raises(FileNotFoundError, match="no w2v-BERT checkpoint"):
        sm.load(tmp_path / "missing")


def test_kmeans_stage_tokens_survive_save_and_reload(shard_dir, local_checkpoint, tmp_path):
    mcfg = _model_cfg(checkpoint=str(local_checkpoint))
    sp.run(mcfg, shard_dir, tmp_path / "model", tmp_path / "ck")
    cfg = _kmeans_cfg()
    manifest = sk.run(cfg, tmp_path / "model", shard_dir, tmp_path / "km")
    on_disk = json.loads((tmp_path / "km" / "manifest.json").read_text())
    assert on_disk["centroid_hash"] == manifest["centroid_hash"]
    assert on_disk["model_hash"] == sm.checkpoint_hash(local_checkpoint)
    assert on_disk["clusters"] == 8 and on_disk["layer"] == 2
    tok = sk.SemanticTokenizer(tmp_path / "model", tmp_path / "km", "cpu")
    x = melody(11, 3.0, rate=24000)
    first = tok.encode(x, 24000)
    assert first.dtype == np.uint16 and first.shape == (75,) and first.max() < 8
    again = sk.SemanticTokenizer(tmp_path / "model", tmp_path / "km", "cpu").encode(x, 24000)
    assert np.array_equal(first, again)
    refit = sk.run(cfg, tmp_path / "model", shard_dir, tmp_path / "km2")  # seeded: same fit
    assert refit["centroid_hash"] == manifest["centroid_hash"]
    result = smet.run(mcfg, tmp_path / "model", tmp_path / "km", shard_dir)
    for name in ("semantic", "logmel"):
        for split in ("train", "valid"):
            r = result[name][split]
            assert 0 < r["clusters_used"] <= 1 and r["perplexity"] >= 1
            assert 0 <= r["pnmi_instrument"] <= 1 and 0 < r["purity_genre"] <= 1


def test_purity_and_pnmi_on_known_cases():
    labels = np.array(["a"] * 50 + ["b"] * 50)
    assert smet.purity(np.arange(100) % 2, labels) == 0.5
    assert smet.pnmi(np.arange(100) % 2, labels) == pytest.approx(0.0, abs=1e-12)
    assert smet.pnmi(np.repeat([3, 9], 50), labels) == pytest.approx(1.0)
    assert smet.code_stats(np.array([0, 0, 1, 1]), 4) == {"clusters_used": 0.5,
                                                          "perplexity": pytest.approx(2.0)}


def test_semantic_field_encodes_a_shard_in_bounded_groups():
    """A shard of any length goes through w2v-BERT ``batch_size`` clips at a time, in order."""
    from cantus.tokenize.semantic.tokenizer import SemanticTokens

    seen = []

    class Inner:
        def encode_batch(self, wavs, sample_rate):
            seen.append(len(wavs))
            return [np.full(3, int(w[0]), np.int64) for w in wavs]

    field = SemanticTokens.__new__(SemanticTokens)  # no model: the grouping alone
    field.tok, field.sample_rate, field.batch_size = Inner(), 16000, 2
    out = field.encode_batch([np.full(10, i, np.float32) for i in range(5)])
    assert seen == [2, 2, 1]
    assert [int(t[0]) for t in out] == [0, 1, 2, 3, 4] and out[0].dtype == np.uint16
