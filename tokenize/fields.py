"""One tokenizer per token field, behind one small interface.

Goes in: the folder(s) of a trained model (codec; w2v-BERT + k-means; MuLan +
RVQ). Comes out: a ``FieldTokenizer`` with

- ``field``: "acoustic", "semantic" or "mulan";
- ``sample_rate``: the rate its input audio must have (decode resamples to it);
- ``describe()``: the manifest entry naming the exact tokenizer (hashes,
  layer, rates, hops, codebook sizes), which a trainer checks;
- ``encode_batch(wavs) -> list of uint16 arrays``: ``[12, T]`` at 50 Hz,
  ``[T]`` at 25 Hz, or ``[12]`` per chunk.

``load_field(field, models)`` builds one from ``{"codec": dir, ...}``; the
stage passes model paths, so a pretrained checkpoint a user has and a model
we trained are interchangeable.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

FIELD_MODELS = {"acoustic": ("codec",), "semantic": ("semantic", "semantic_kmeans"),
                "mulan": ("mulan", "mulan_rvq")}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class AcousticTokens:
    field = "acoustic"

    def __init__(self, codec_dir: str | Path, device: str = "cpu", batch_size: int = 8):
        from cantus.tokenize.codec.model import SoundStream

        self.model = SoundStream.load(codec_dir, device=device)
        self.sample_rate = self.model.cfg.sample_rate
        self.batch_size = batch_size
        self._desc = {"kind": "soundstream", "checkpoint_hash": sha256_file(
            Path(codec_dir) / "model.safetensors"), "sample_rate": self.sample_rate,
            "hop": self.model.cfg.hop, "frame_rate": self.sample_rate / self.model.cfg.hop,
            "n_q": self.model.cfg.n_q, "codebook_size": self.model.cfg.codebook_size}

    def describe(self) -> dict[str, Any]:
        return dict(self._desc)

    def encode_batch(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        hop, out = self.model.cfg.hop, []
        for i in range(0, len(wavs), self.batch_size):
            group = wavs[i:i + self.batch_size]
            n = max(w.shape[0] for w in group)
            x = torch.zeros(len(group), n)
            for j, w in enumerate(group):
                x[j, : w.shape[0]] = torch.from_numpy(w)
            # The encoder is causal, so padding at the end leaves earlier frames as they are.
            codes = self.model.encode(x, sample_rate=self.sample_rate).numpy()
            out += [codes[j, :, : -(-w.shape[0] // hop)].astype(np.uint16)
                    for j, w in enumerate(group)]
        return out


class SemanticTokens:
    field = "semantic"

    def __init__(self, model_dir: str | Path, kmeans_dir: str | Path, device: str = "cpu"):
        from cantus.tokenize.semantic.kmeans import SemanticTokenizer

        self.tok = SemanticTokenizer(model_dir, kmeans_dir, device=device)
        self.sample_rate = 16000
        m = self.tok.manifest
        self._desc = {"kind": "w2v-bert-kmeans", "checkpoint_hash": m["model_hash"],
                      "layer": m["layer"], "frame_rate": m["token_rate"],
                      "k": m["clusters"], "centroid_hash": m["centroid_hash"],
                      "sample_rate": self.sample_rate}

    def describe(self) -> dict[str, Any]:
        return dict(self._desc)

    def encode_batch(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        return [t.astype(np.uint16) for t in self.tok.encode_batch(wavs, self.sample_rate)]


class MulanTokens:
    field = "mulan"

    def __init__(self, model_dir: str | Path, rvq_dir: str | Path, device: str = "cpu"):
        from cantus.tokenize.mulan.rvq import MulanTokenizer

        self.tok = MulanTokenizer.load(model_dir, rvq_dir, device=device, text=False)
        self.sample_rate = self.tok.model.cfg.sample_rate
        rvq = json.loads((Path(rvq_dir) / "rvq.json").read_text())
        self._desc = {"kind": "mulan-rvq", "checkpoint_hash": sha256_file(
            Path(model_dir) / "model.safetensors"), "rvq_hash": sha256_file(
            Path(rvq_dir) / "codebooks.safetensors"), "levels": rvq.get("levels"),
            "codebook_size": rvq.get("codebook_size", rvq.get("size")),
            "fitted_per_level": self.tok.rvq.fitted.tolist(), "sample_rate": self.sample_rate}

    def describe(self) -> dict[str, Any]:
        return dict(self._desc)

    def encode_batch(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        return [self.tok(w).astype(np.uint16) for w in wavs]


def load_field(field: str, models: dict[str, str], device: str = "cpu"):
    """The tokenizer of ``field`` from model folders named as in FIELD_MODELS."""
    if field not in FIELD_MODELS:
        raise ValueError(f"unknown token field {field!r} (known: {', '.join(FIELD_MODELS)})")
    missing = [m for m in FIELD_MODELS[field] if not models.get(m)]
    if missing:
        raise ValueError(f"field {field!r} needs model folder(s): {', '.join(missing)}")
    for name in FIELD_MODELS[field]:
        if not Path(models[name]).is_dir():
            raise FileNotFoundError(f"{name} model folder not found: {models[name]}")
    if str(device).startswith("cpu"):
        from cantus.tokenize.codec import native as cpu_native

        cpu_native.keep_freed_memory(every_size=True)  # same-sized shards: reuse every block
    if field == "acoustic":
        return AcousticTokens(models["codec"], device)
    if field == "semantic":
        return SemanticTokens(models["semantic"], models["semantic_kmeans"], device)
    return MulanTokens(models["mulan"], models["mulan_rvq"], device)
