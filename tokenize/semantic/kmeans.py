"""Fit the semantic codebook: w2v-BERT features of the train shards clustered by faiss k-means.

Goes in: the pretraining stage's output (``models/semantic``: weights, or a
manifest naming a local checkpoint), the train split of the audio shards and
the ``semantic.kmeans`` params. Comes out, in ``--out``:
``codebook.safetensors`` (``centroids`` float32[K, D], per-dimension ``mean``
and ``std`` float32[D] of the fitting sample) and ``manifest.json`` (model
checkpoint hash, layer, token rate, K, seed, centroid hash, frames seen and
sampled, inertia).

Frames are reservoir-sampled while streaming over the shards, so memory is
bounded by ``max_frames`` however large the corpus. Assignment is a batched
distance matrix product on the model's device (``Codebook.assign``);
``SemanticTokenizer.encode(wav, rate) -> uint16[T]`` is the tokenizer other
stages use.

    python -m cantus.tokenize.semantic.kmeans --params params.yaml \
        --model models/semantic --audio data/audio --out models/semantic_kmeans
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cantus import audio, shards
from cantus.training import resolve_device
from cantus.audio_stream import decode_sample, shard_paths
from cantus.config import load_section, to_dict
from cantus.nearest import canonical_torch, nearest_torch
from cantus.reservoir import Reservoir
from cantus.tokenize.semantic import model as sm
from cantus.tokenize.semantic.params import KMeansConfig, SemanticConfig
from cantus.tokenize.semantic.pretrain import model_dir

log = logging.getLogger(__name__)


def normalisation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std (float32[D]) of a sample float[N, D]."""
    x64 = x.astype(np.float64)
    mean = x64.mean(0)
    std = np.sqrt(np.maximum(x64.var(0), 1e-10))
    return mean.astype(np.float32), std.astype(np.float32)


def fit_kmeans(x: np.ndarray, k: int, iterations: int, seed: int,
               restarts: int = 1, gpu: bool = False) -> tuple[np.ndarray, float]:
    """faiss k-means on float32[N, D]: centroids float32[K, D] and mean squared distance.

    ``gpu``: on faiss's GPUs when this faiss has any (the config asked for CUDA; a
    CPU-only faiss fits on the CPU); GPU centroids differ from the CPU's in the last bits.
    """
    import faiss

    if len(x) < k:
        raise ValueError(f"{len(x)} frames cannot make {k} clusters")
    x = np.ascontiguousarray(x, np.float32)
    if gpu and getattr(faiss, "get_num_gpus", lambda: 0)() == 0:
        log.info("faiss has no GPU support here: k-means runs on the CPU")
        gpu = False
    km = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=seed, gpu=gpu, verbose=False, nredo=restarts,
                      max_points_per_centroid=len(x) // k + 1)  # use the whole sample
    km.train(x)
    dist, _ = km.index.search(x, 1)
    return km.centroids.copy(), float(dist.mean())


class Codebook:
    """Centroids plus the normalisation they were fitted under."""

    def __init__(self, centroids: np.ndarray, mean: np.ndarray, std: np.ndarray,
                 device: str | torch.device = "cpu"):
        self.centroids = torch.as_tensor(centroids, dtype=torch.float32, device=device)
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device)
        self._canon = canonical_torch(self.centroids)

    @property
    def size(self) -> int:
        return self.centroids.shape[0]

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.centroids) - self.mean) / self.std

    @torch.no_grad()
    def assign(self, x: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest centroid of each raw feature row (N, D): ids int64[N], sq. distance[N].

        Exact re-ranking and the first of equal centroids (``cantus.nearest``), so
        the ids do not follow the CPU's rounding.
        """
        ids, dist = nearest_torch(self.normalise(torch.as_tensor(x)), self.centroids, self._canon)
        return ids, dist.clamp_min(0)

    def save(self, folder: str | Path) -> str:
        """Write ``codebook.safetensors``; returns the centroids' sha256."""
        import os

        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".codebook.tmp-{os.getpid()}"
        save_file({"centroids": self.centroids.cpu().contiguous(), "mean": self.mean.cpu(),
                   "std": self.std.cpu()}, str(tmp))
        os.replace(tmp, folder / "codebook.safetensors")
        return hashlib.sha256(self.centroids.cpu().numpy().tobytes()).hexdigest()

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> Codebook:
        from safetensors.torch import load_file

        path = Path(folder) / "codebook.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"no codebook at {path}")
        t = load_file(str(path))
        return cls(t["centroids"], t["mean"], t["std"], device)


def iter_clips(paths: list[str]) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """(16 kHz float32[N], metadata) of every shard sample, in shard order."""
    for path in paths:
        for _, fields in shards.iter_samples(path):
            x, meta = decode_sample(fields)
            yield audio.resample(x, int(meta["sample_rate"]), sm.SAMPLE_RATE), meta


def iter_features(extractor: sm.FeatureExtractor, clips, batch_size: int
                  ) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
    """Features float32[T, D] (on the model's device) of each (16 kHz clip, metadata)."""
    buf: list[tuple[np.ndarray, dict]] = []

    def flush():
        feats = extractor([x for x, _ in buf], sm.SAMPLE_RATE)
        yield from zip(feats, [m for _, m in buf])
        buf.clear()

    for x, meta in clips:
        if sm.num_frames(len(x), extractor.token_rate) < 1:
            log.warning("skipping %s: shorter than one frame", meta.get("key"))
            continue
        buf.append((x, meta))
        if len(buf) >= batch_size:
            yield from flush()
    if buf:
        yield from flush()


def extractor_for(model_out: str | Path, cfg: KMeansConfig) -> tuple[sm.FeatureExtractor,
                                                                       dict[str, Any]]:
    """The feature extractor of a pretraining stage output, and its manifest."""
    manifest = json.loads((Path(model_out) / "manifest.json").read_text())
    model = sm.load(model_dir(model_out), resolve_device(cfg.device))
    return sm.FeatureExtractor(model, cfg.layer, cfg.token_rate), manifest


def fit(features: Iterator[np.ndarray], cfg: KMeansConfig) -> tuple[Codebook, dict[str, Any]]:
    """Reservoir-sample frames, normalise, cluster: the codebook and fit statistics."""
    res = Reservoir(cfg.max_frames, cfg.seed, "frames")
    for i, f in enumerate(features, 1):
        res.add(f)
        if i % 500 == 0:
            log.info("%d clips, %d frames seen", i, res.seen)
    x = res.sample()
    mean, std = normalisation(x)
    # faiss on the GPU only when the config's device is CUDA, never because one is present
    gpu = resolve_device(cfg.device).startswith("cuda")
    centroids, inertia = fit_kmeans((x - mean) / std, cfg.clusters, cfg.iterations, cfg.seed,
                                   cfg.restarts, gpu=gpu)
    return Codebook(centroids, mean, std), {"frames_seen": res.seen, "frames_sampled": len(x),
                                            "inertia": inertia}


def run(cfg: KMeansConfig, model_out: str | Path, shards_dir: str | Path,
        out: str | Path) -> dict[str, Any]:
    """Fit on the train split and write ``codebook.safetensors`` and ``manifest.json``."""
    extractor, model_manifest = extractor_for(model_out, cfg)
    clips = iter_clips(shard_paths(shards_dir, "train"))
    feats = (f.cpu().numpy() for f, _ in iter_features(extractor, clips, cfg.batch_size))
    codebook, stats = fit(feats, cfg)
    digest = codebook.save(out)
    manifest = {"model_source": model_manifest["source"],
                "model_checkpoint": model_manifest["checkpoint"],
                "model_hash": model_manifest["hash"], "layer": extractor.layer,
                "token_rate": cfg.token_rate, "pooling": f"mean of {extractor.pool} frames",
                "clusters": cfg.clusters, "seed": cfg.seed, "dim": extractor.dim,
                "centroid_hash": digest, **stats, "params": to_dict(cfg)}
    shards.atomic_write_json(Path(out) / "manifest.json", manifest)
    return manifest


class SemanticTokenizer:
    """``encode(wav, rate) -> uint16[T]`` with a model and a fitted codebook."""

    def __init__(self, model_out: str | Path, codebook_dir: str | Path, device: str = "auto"):
        self.manifest = json.loads((Path(codebook_dir) / "manifest.json").read_text())
        model = sm.load(model_dir(model_out), resolve_device(device))
        if sm.checkpoint_hash(model_dir(model_out)) != self.manifest["model_hash"]:
            raise ValueError(f"codebook {codebook_dir} was fitted on another model")
        self.extractor = sm.FeatureExtractor(model, self.manifest["layer"],
                                             self.manifest["token_rate"])
        self.codebook = Codebook.load(codebook_dir, self.extractor.device)

    def encode_batch(self, wavs: list[np.ndarray], sample_rate: int) -> list[np.ndarray]:
        wavs = [audio.resample(w, sample_rate, sm.SAMPLE_RATE) for w in wavs]
        feats = self.extractor(wavs, sm.SAMPLE_RATE)
        ids, _ = self.codebook.assign(torch.cat(feats))
        return [t.cpu().numpy().astype(np.uint16)
                for t in ids.split([len(f) for f in feats])]

    def encode(self, wav: np.ndarray, sample_rate: int) -> np.ndarray:
        return self.encode_batch([wav], sample_rate)[0]


def _arguments(ap) -> None:
    ap.add_argument("--model", required=True, help="pretraining stage output")
    ap.add_argument("--audio", required=True, help="audio shard folder")
    ap.add_argument("--out", required=True, help="codebook folder")


def _main(args) -> None:
    cfg = load_section(args.params, "semantic", SemanticConfig).kmeans
    summary = run(cfg, args.model, args.audio, args.out)
    print({k: v for k, v in summary.items() if k != "params"})


def main(argv: list[str] | None = None) -> int:
    from cantus.training import stage_main

    return stage_main("cantus semantic kmeans", __doc__, _arguments, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
