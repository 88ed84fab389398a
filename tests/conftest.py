"""Shared fixtures: audio made in code, a quick ingest config, a tiny run helper."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cantus.config import load_section
from cantus.ingest.params import IngestConfig

ROOT = Path(__file__).resolve().parents[1]


def melody(seed: int, seconds: float, rate: int = 44100, amp: float = 0.2) -> np.ndarray:
    """A seeded random melody of short two-note chords: float32[N]."""
    rng = np.random.default_rng(seed)
    note = int(0.25 * rate)
    out = []
    t = np.arange(note) / rate
    env = np.hanning(note)
    for _ in range(int(np.ceil(seconds / 0.25))):
        f = 220 * 2 ** (rng.integers(0, 12) / 12)
        out.append(amp * env * (np.sin(2 * np.pi * f * t) + 0.5 * np.sin(3 * np.pi * f * t)))
    return np.concatenate(out)[: int(seconds * rate)].astype(np.float32)


def write(path: Path, x: np.ndarray, rate: int = 44100, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), x, rate, **kw)
    return path


@pytest.fixture
def cfg() -> IngestConfig:
    """The project's ingest params, made quick for tests (in-process executor)."""
    base = load_section(ROOT / "params.yaml", "ingest", IngestConfig)
    return dataclasses.replace(base, executor="local", num_workers=1, chunk_seconds=10.0,
                               hop_seconds=10.0, min_chunk_seconds=2.0, shard_max_samples=3,
                               valid_fraction=0.3)


def read_dir_bytes(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (relative name -> bytes), for byte-identity checks."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def audio_shards(tmp: Path, files: int, seconds: float, seed: int, chunk_seconds: float,
                 valid_fraction: float = 0.0, min_chunk_seconds: float = 0.5,
                 rate: int = 44100, sidecars: list[dict] | None = None) -> Path:
    """Real ingest output for ``files`` seeded melodies: the audio shard folder ``tmp/out``."""
    from cantus.ingest import run as ingest

    for i in range(files):
        write(tmp / "src" / f"t{i}.flac", melody(seed + i, seconds, rate=rate), rate=rate)
        if sidecars:  # caption and tags of each file
            (tmp / "src" / f"t{i}.json").write_text(json.dumps(sidecars[i % len(sidecars)]))
    base = load_section(ROOT / "params.yaml", "ingest", IngestConfig)
    cfg = dataclasses.replace(base, executor="local", chunk_seconds=chunk_seconds,
                              hop_seconds=chunk_seconds, min_chunk_seconds=min_chunk_seconds,
                              shard_max_samples=4, valid_fraction=valid_fraction)
    ingest.run(cfg, ingest.Inputs(local=(str(tmp / "src"),)), tmp / "out", tmp / "cache")
    return tmp / "out"


@pytest.fixture
def one_thread():
    """One torch thread: on a loaded 2-core machine two OpenMP threads spin against each other."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_tokenizer_models(tmp: Path, audio_dir: Path, codec_cfg=None) -> dict[str, str]:
    """Tiny codec, w2v-BERT + k-means (K 8) and MuLan + RVQ (12 x 4) made in the test."""
    import hashlib

    import torch

    from cantus.tokenize.semantic import kmeans as sk
    from cantus.tokenize.semantic import model as sm
    from cantus.tokenize.semantic.params import KMeansConfig
    from cantus.tokenize.codec.model import CodecConfig, SoundStream
    from cantus.tokenize.mulan.model import build_mulan
    from cantus.tokenize.mulan.params import MulanModelConfig
    from cantus.tokenize.mulan.rvq import ResidualKMeans, fit_embeddings
    from cantus.audio_stream import load_all, shard_paths
    from cantus.training import save_weights

    torch.manual_seed(0)
    models = {"codec": tmp / "codec", "semantic": tmp / "semantic",
              "semantic_kmeans": tmp / "semantic_kmeans", "mulan": tmp / "mulan",
              "mulan_rvq": tmp / "mulan_rvq"}
    SoundStream(codec_cfg or CodecConfig.tiny()).save(models["codec"])
    ckpt = tmp / "w2v"
    sm.build("tiny").save_pretrained(str(ckpt))
    models["semantic"].mkdir()
    (models["semantic"] / "manifest.json").write_text(json.dumps(
        {"source": "checkpoint", "checkpoint": str(ckpt), "hash": sm.checkpoint_hash(ckpt)}))
    sk.run(KMeansConfig(layer=0, token_rate=25, clusters=8, max_frames=400, iterations=5,
                           restarts=1, seed=0, batch_size=2, device="cpu"),
           models["semantic"], audio_dir, models["semantic_kmeans"])
    mulan = build_mulan(MulanModelConfig.tiny(), seed=0).eval()
    save_weights(mulan, models["mulan"], mulan.cfg)
    audio = [x for x, _ in load_all(shard_paths(audio_dir, "train"))]
    emb = fit_embeddings(mulan, audio, 1.0)
    digest = hashlib.sha256((models["mulan"] / "model.safetensors").read_bytes()).hexdigest()
    ResidualKMeans.fit(emb, 12, 4, 5, 0).save(models["mulan_rvq"], {"mulan_sha256": digest})
    return {k: str(v) for k, v in models.items()}
