"""The MuLan RVQ: 12 residual k-means codebooks that turn an embedding into tokens.

Goes in: a trained MuLan (``models/mulan``), the audio shards and section
``mulan.rvq``. Comes out: ``<out>/codebooks.safetensors`` (``float32[L, K,
D]``) and ``<out>/rvq.json`` (levels, size, the codebooks' sha256, the sha256
of the MuLan weights they were fitted for, the fit's size). The codebooks
are fitted once, by k-means at each level on the residuals of the previous
levels, on audio embeddings of the train split (every window at
``fit_stride_seconds`` and every chunk's averaged embedding), then frozen.

``MulanTokenizer`` joins the two: ``mulan_tokens(audio, tok)`` and
``mulan_tokens("a fast reel", tok)`` both give ``uint16[12]``; training
conditions on the audio's tokens, generation on the prompt's.

    python -m cantus.tokenize.mulan_rvq --params params.yaml --model models/mulan \
        --audio data/audio --out models/mulan_rvq
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cantus.config import load_section
from cantus.shards import atomic_write_json
from cantus.tokenize.mulan_params import MulanConfig, MulanRVQConfig

log = logging.getLogger(__name__)


class ResidualKMeans:
    """Frozen residual codebooks ``float32[L, K, D]``; greedy nearest-centroid encoding."""

    def __init__(self, codebooks: np.ndarray):
        self.codebooks = np.ascontiguousarray(codebooks, dtype=np.float32)  # (L, K, D)

    @property
    def levels(self) -> int:
        return self.codebooks.shape[0]

    @property
    def size(self) -> int:
        return self.codebooks.shape[1]

    @classmethod
    def fit(cls, x: np.ndarray, levels: int, size: int, iters: int = 20, seed: int = 0,
            min_points_per_code: int = 1) -> ResidualKMeans:
        """k-means on ``float32[N, D]``, then on each level's residual.

        A level fits ``k = min(size, N // min_points_per_code)`` centroids. With
        fewer (a demo corpus), the unused entries repeat the fitted ones;
        encoding picks the first of equal centroids, so codes stay below k.
        ``min_points_per_code > 1`` keeps a small corpus from being memorised
        by the first level (which would leave the other levels only zeros).
        """
        import faiss

        x = np.ascontiguousarray(x, dtype=np.float32)
        n, d = x.shape
        k = max(1, min(size, n // min_points_per_code))
        if k < size:
            log.warning("RVQ fit on %d points: %d of %d codes per level used, the rest padded",
                        n, k, size)
        books, residual = np.zeros((levels, size, d), np.float32), x.copy()
        for level in range(levels):
            if k == n:
                centroids = residual.copy()
            else:
                km = faiss.Kmeans(d, k, niter=iters, seed=seed + level, verbose=False,
                                  min_points_per_centroid=1, max_points_per_centroid=1 << 16)
                km.train(residual)
                centroids = km.centroids
            books[level, :k] = centroids
            books[level, k:] = centroids[np.arange(size - k) % k]
            residual = residual - books[level][_nearest(residual, books[level])]
        return cls(books)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """float32[N, D] -> int64[N, L] codes."""
        residual = np.array(x, dtype=np.float32, ndmin=2)
        codes = np.zeros((residual.shape[0], self.levels), np.int64)
        for level in range(self.levels):
            codes[:, level] = _nearest(residual, self.codebooks[level])
            residual = residual - self.codebooks[level][codes[:, level]]
        return codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int[N, L] (or a prefix of the levels) -> float32[N, D], the sum of centroids."""
        codes = np.array(codes, dtype=np.int64, ndmin=2)
        return sum(self.codebooks[level][codes[:, level]] for level in range(codes.shape[1]))

    def sha256(self) -> str:
        return hashlib.sha256(self.codebooks.tobytes()).hexdigest()

    def save(self, folder: str | Path, extra: dict[str, Any] | None = None) -> str:
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / ".codebooks.safetensors.tmp"
        save_file({"codebooks": self.codebooks}, str(tmp))
        tmp.replace(folder / "codebooks.safetensors")
        digest = self.sha256()
        atomic_write_json(folder / "rvq.json", {"levels": self.levels, "codebook_size": self.size,
                                                "dim": int(self.codebooks.shape[2]),
                                                "sha256": digest, **(extra or {})})
        return digest

    @classmethod
    def load(cls, folder: str | Path) -> ResidualKMeans:
        from safetensors.numpy import load_file

        folder = Path(folder)
        rvq = cls(load_file(str(folder / "codebooks.safetensors"))["codebooks"])
        want = json.loads((folder / "rvq.json").read_text())["sha256"]
        if rvq.sha256() != want:
            raise ValueError(f"{folder}: codebooks do not match the sha256 in rvq.json")
        return rvq


def _nearest(x: np.ndarray, book: np.ndarray) -> np.ndarray:
    """Index of the nearest row of ``book`` for each row of ``x`` (first on ties)."""
    d = (x * x).sum(1, keepdims=True) - 2 * x @ book.T + (book * book).sum(1)[None]
    return d.argmin(axis=1)


class MulanTokenizer:
    """A MuLan model and its RVQ: audio or text -> ``uint16[L]`` conditioning tokens."""

    def __init__(self, model, rvq: ResidualKMeans):
        if rvq.size > 65536:
            raise ValueError("uint16 tokens need codebooks of at most 65536 entries")
        self.model, self.rvq = model.eval(), rvq

    @classmethod
    def load(cls, model_dir: str | Path, rvq_dir: str | Path, device: str = "cpu",
             text: bool = True) -> MulanTokenizer:
        """Load both, refusing an RVQ fitted for other MuLan weights (``text=False``:
        audio only, see ``load_mulan``)."""
        from cantus.tokenize.mulan_model import load_mulan

        meta = json.loads((Path(rvq_dir) / "rvq.json").read_text())
        weights = hashlib.sha256((Path(model_dir) / "model.safetensors").read_bytes()).hexdigest()
        if meta.get("mulan_sha256") not in (None, weights):
            raise ValueError(f"{rvq_dir} was fitted for MuLan weights {meta['mulan_sha256'][:12]}, "
                             f"but {model_dir} holds {weights[:12]}: refit the RVQ")
        return cls(load_mulan(model_dir, device, text=text), ResidualKMeans.load(rvq_dir))

    def quantise(self, emb: torch.Tensor | np.ndarray) -> np.ndarray:
        """float32[D] or [N, D] embeddings -> uint16[L] or [N, L]."""
        e = emb.detach().cpu().numpy() if isinstance(emb, torch.Tensor) else np.asarray(emb)
        codes = self.rvq.encode(e.reshape(-1, e.shape[-1])).astype(np.uint16)
        return codes[0] if e.ndim == 1 else codes

    def audio_embedding(self, audio: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.model.embed_long(torch.as_tensor(np.asarray(audio, np.float32)))

    def text_embedding(self, text: str) -> torch.Tensor:
        with torch.no_grad():
            return self.model.embed_text([text])[0]

    def __call__(self, x: str | np.ndarray | torch.Tensor) -> np.ndarray:
        emb = self.text_embedding(x) if isinstance(x, str) else self.audio_embedding(x)
        return self.quantise(emb)


def mulan_tokens(x: str | np.ndarray | torch.Tensor, tokenizer: MulanTokenizer) -> np.ndarray:
    """``uint16[L]`` tokens of a text prompt or of mono audio at the model's rate."""
    return tokenizer(x)


def fit_embeddings(model, audio: list[np.ndarray], stride_seconds: float) -> np.ndarray:
    """float32[M, D]: every window embedding at ``stride_seconds`` and every chunk mean."""
    from cantus.training import progress

    stride = int(round(stride_seconds * model.cfg.sample_rate))
    rows = []
    with progress(len(audio), desc="mulan embeddings") as bar:
        for x in audio:
            w = model.embed_windows(torch.from_numpy(np.asarray(x, np.float32)), stride)
            rows += [w, torch.nn.functional.normalize(w.mean(0, keepdim=True), dim=-1)]
            bar.update(1)
    return torch.cat(rows).cpu().numpy()


def run(cfg: MulanRVQConfig, model_dir: str | Path, audio_dir: str | Path,
        out: str | Path) -> dict[str, Any]:
    """Fit and save the RVQ; returns its summary (also written to ``rvq.json``)."""
    from cantus.audio_stream import load_all, shard_paths
    from cantus.tokenize.mulan_model import load_mulan

    model = load_mulan(model_dir)
    audio = [x for x, _ in load_all(shard_paths(audio_dir, "train"))]
    x = fit_embeddings(model, audio, cfg.fit_stride_seconds)
    rvq = ResidualKMeans.fit(x, cfg.levels, cfg.codebook_size, cfg.kmeans_iters, cfg.seed,
                             cfg.min_points_per_code)
    quant = rvq.decode(rvq.encode(x))
    cos = float((quant * x).sum(1).mean() / np.linalg.norm(quant, axis=1).clip(1e-9).mean())
    weights = hashlib.sha256((Path(model_dir) / "model.safetensors").read_bytes()).hexdigest()
    extra = {"mulan_sha256": weights, "fit_points": int(x.shape[0]), "fit_chunks": len(audio),
             "fit_stride_seconds": cfg.fit_stride_seconds, "kmeans_iters": cfg.kmeans_iters,
             "codes_used_per_level": int(min(cfg.codebook_size,
                                             x.shape[0] // cfg.min_points_per_code)),
             "seed": cfg.seed, "train_cosine": round(cos, 6)}
    digest = rvq.save(out, extra)
    return {"sha256": digest, **extra}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--model", required=True, help="trained MuLan folder")
    p.add_argument("--audio", required=True, help="audio shard folder (train split used)")
    p.add_argument("--out", required=True, help="folder for codebooks.safetensors + rvq.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_section(args.params, "mulan", MulanConfig).rvq
    print(run(cfg, args.model, args.audio, args.out))


if __name__ == "__main__":
    main()
