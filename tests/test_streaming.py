"""No stage holds a split of decoded audio: the Python-side peak memory (tracemalloc, which
sees numpy's buffers) of the RVQ fit, MuLan's evaluation, the evaluate stage's references
and the generation prompts stays flat when the split grows 4x."""

from __future__ import annotations

import dataclasses
import io
import json
import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from cantus import shards
from cantus.tokenize.mulan import evaluate as mulan_eval
from cantus.tokenize.mulan import rvq as mulan_rvq
from cantus.tokenize.mulan.model import build_mulan
from cantus.tokenize.mulan.params import MulanModelConfig, MulanRVQConfig
from cantus.training import save_weights

RATE, SECONDS = 8000, 4.0
CHUNK_BYTES = int(RATE * SECONDS) * 4  # one decoded float32 chunk


def _split_dir(tmp_path, name: str, chunks: int):
    """Train and valid shards of ``chunks`` noise chunks each, two instruments."""
    rng, folder = np.random.default_rng(0), tmp_path / name
    for split in ("train", "valid"):
        samples = []
        for i in range(chunks):
            buf = io.BytesIO()
            sf.write(buf, (0.3 * rng.standard_normal(int(RATE * SECONDS))).astype(np.float32),
                     RATE, format="FLAC")
            inst = ["piano", "violin"][i % 2]
            meta = {"key": f"{split}{i:03d}", "caption": f"a {inst} piece",
                    "tags": {"instruments": [inst]}, "sample_rate": RATE}
            samples.append((meta["key"], {"flac": buf.getvalue(),
                                          "json": json.dumps(meta).encode()}))
        shards.write_shard(folder / f"{split}-000000.tar", samples)
    return folder


def _peak(fn) -> int:
    fn()  # warm: imports, caches, lazily built tensors
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("streaming")
    return _split_dir(tmp, "small", 6), _split_dir(tmp, "large", 24)


@pytest.fixture(scope="module")
def model():
    return build_mulan(MulanModelConfig.tiny(), seed=0).eval()


def _flat(small: int, large: int) -> None:
    # holding the split would add 18 decoded chunks; streaming adds metadata and embeddings
    assert large - small < 2 * CHUNK_BYTES, (small, large)


def test_rvq_fit_streams_the_split_into_a_capped_sample(splits, model, tmp_path):
    save_weights(model, tmp_path / "mulan", model.cfg)
    cfg = MulanRVQConfig(levels=2, codebook_size=4, kmeans_iters=2, seed=0,
                         fit_stride_seconds=0.5, min_points_per_code=1, max_embeddings=16)
    peaks = [_peak(lambda: mulan_rvq.run(cfg, tmp_path / "mulan", d, tmp_path / "rvq"))
             for d in splits]
    _flat(*peaks)
    summary = mulan_rvq.run(cfg, tmp_path / "mulan", splits[1], tmp_path / "rvq")
    assert summary["fit_points"] == 16 and summary["fit_chunks"] == 24
    assert summary["fit_embeddings_seen"] > 16


def test_rvq_sample_is_everything_in_order_under_the_cap(splits, model):
    every = np.concatenate([mulan_rvq.chunk_embeddings(model, x, RATE // 2) for x, _ in
                            __import__("cantus.audio_stream", fromlist=["x"]).iter_all(
                                [str(splits[0] / "train-000000.tar")])])
    x, seen, chunks = mulan_rvq.stream_embeddings(model, splits[0], "train", 0.5, 10**6, 0)
    assert np.array_equal(x, every) and seen == len(every) and chunks == 6
    capped, seen, _ = mulan_rvq.stream_embeddings(model, splits[0], "train", 0.5, 5, 0)
    again, _, _ = mulan_rvq.stream_embeddings(model, splits[0], "train", 0.5, 5, 0)
    assert capped.shape == (5, every.shape[1]) and np.array_equal(capped, again)  # seeded
    assert all((every == r).all(axis=1).any() for r in capped)  # rows of the stream


def test_mulan_eval_embeds_a_split_one_chunk_at_a_time(splits, model):
    rvq = mulan_rvq.ResidualKMeans(np.zeros((1, 2, model.cfg.embed_dim), np.float32))
    tok = mulan_rvq.MulanTokenizer(model, rvq)
    _flat(*[_peak(lambda: mulan_eval.embed_split(tok, d, "train")) for d in splits])
    audio, text, metas = mulan_eval.embed_split(tok, splits[1], "train")
    assert audio.shape[0] == text.shape[0] == len(metas) == 24


def test_evaluate_references_and_prompts_stream(splits, model):
    from cantus.config import load_section
    from cantus.evaluate import generate_eval, run as evaluate
    from cantus.evaluate.params import EvaluateConfig

    cfg = dataclasses.replace(load_section("params.yaml", "evaluate", EvaluateConfig),
                              fad_embedding="mulan", max_captions=2, min_instrument_count=1)
    prompts = generate_eval.build_prompts(splits[0], cfg)
    assert [p["kind"] for p in prompts] == ["caption"] * 2 + ["instrument"] * 2
    _flat(*[_peak(lambda: generate_eval.build_prompts(d, cfg)) for d in splits])
    n = int(cfg.seconds * RATE)
    _flat(*[_peak(lambda: evaluate.references(d, prompts, model, cfg, RATE, n))
            for d in splits])
    refs = evaluate.references(splits[1], prompts, model, cfg, RATE, n)
    assert sorted(refs.real) == ["valid000", "valid001"] and len(refs.metas) == 48
    assert len(refs.instrument_chunks) == 48 and refs.train_fad.shape[0] == 24
