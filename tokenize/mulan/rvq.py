"""The MuLan RVQ: 12 residual k-means codebooks that turn an embedding into tokens.

Goes in: a trained MuLan (``models/mulan``), the audio shards and section
``mulan.rvq``. Comes out: ``<out>/codebooks.safetensors`` (``codebooks``
``float32[L, K, D]`` and ``fitted`` ``int64[L]``, the codes each level uses)
and ``<out>/rvq.json`` (levels, size, fitted codes per level, the sha256 of
both tensors, the sha256 of the MuLan weights they were fitted for, the fit's
size). The codebooks
are fitted once, by k-means at each level on the residuals of the previous
levels, on audio embeddings of the train split (every window at
``fit_stride_seconds`` and every chunk's averaged embedding), then frozen.
The split is streamed one chunk at a time; the fit sees a seeded reservoir
sample of at most ``max_embeddings`` of those embeddings (all of them when
fewer, in order).

``MulanTokenizer`` joins the two: ``mulan_tokens(audio, tok)`` and
``mulan_tokens("a fast reel", tok)`` both give ``uint16[12]``; training
conditions on the audio's tokens, generation on the prompt's.

    python -m cantus.tokenize.mulan.rvq --params params.yaml --model models/mulan \
        --audio data/audio --out models/mulan_rvq
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cantus.config import load_section
from cantus.nearest import canonical_rows, distinct_rows, nearest_np
from cantus.reservoir import Reservoir
from cantus.shards import atomic_write_json
from cantus.tokenize.mulan.params import MulanConfig, MulanRVQConfig

log = logging.getLogger(__name__)


class ResidualKMeans:
    """Residual codebooks ``float32[L, K, D]`` of which level ``l`` uses its first
    ``fitted[l]`` entries; greedy nearest-centroid encoding.

    ``K`` is the token vocabulary (what the LM layout reserves for the field);
    ``fitted[l] <= K`` is what the fit found. Encoding searches only the fitted
    entries, which are distinct, so every code of level ``l`` is below
    ``fitted[l]`` by construction, whatever the CPU rounds. Entries past
    ``fitted[l]`` are zero and never produced.
    """

    def __init__(self, codebooks: np.ndarray, fitted: np.ndarray | None = None):
        self.codebooks = np.ascontiguousarray(codebooks, dtype=np.float32)  # (L, K, D)
        levels, size = self.codebooks.shape[:2]
        self.fitted = (np.full(levels, size, np.int64) if fitted is None
                       else np.asarray(fitted, np.int64).reshape(-1))
        if self.fitted.shape != (levels,) or (self.fitted < 1).any() or (self.fitted > size).any():
            raise ValueError(f"fitted codes per level must be {levels} counts in [1, {size}], "
                             f"got {self.fitted.tolist()}")
        self._canon = [canonical_rows(self.codebooks[lv, :k]) for lv, k in enumerate(self.fitted)]

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

        A level fits up to ``min(size, N // min_points_per_code)`` centroids and
        keeps the distinct ones (equal residuals give equal centroids); with
        fewer than ``size`` (a demo corpus) the rest of the level stays unused.
        ``min_points_per_code > 1`` keeps a small corpus from being memorised by
        the first level (which would leave the other levels only zeros).
        """
        import faiss

        x = np.ascontiguousarray(x, dtype=np.float32)
        n, d = x.shape
        k = max(1, min(size, n // min_points_per_code))
        if k < size:
            log.warning("RVQ fit on %d points: at most %d of %d codes per level fitted",
                        n, k, size)
        books, residual = np.zeros((levels, size, d), np.float32), x.copy()
        fitted = np.zeros(levels, np.int64)
        for level in range(levels):
            if k == n:
                centroids = residual.copy()
            else:
                km = faiss.Kmeans(d, k, niter=iters, seed=seed + level, verbose=False,
                                  min_points_per_centroid=1, max_points_per_centroid=1 << 16)
                km.train(residual)
                centroids = km.centroids
            centroids = distinct_rows(centroids)
            fitted[level] = len(centroids)
            books[level, :len(centroids)] = centroids
            residual = residual - centroids[nearest_np(residual, centroids)]
        return cls(books, fitted)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """float32[N, D] -> int64[N, L] codes, level ``l``'s below ``fitted[l]``."""
        residual = np.array(x, dtype=np.float32, ndmin=2)
        codes = np.zeros((residual.shape[0], self.levels), np.int64)
        for level, k in enumerate(self.fitted):
            book = self.codebooks[level, :k]
            codes[:, level] = nearest_np(residual, book, self._canon[level])
            residual = residual - book[codes[:, level]]
        return codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int[N, L] (or a prefix of the levels) -> float32[N, D], the sum of centroids."""
        codes = np.array(codes, dtype=np.int64, ndmin=2)
        if codes.shape[1] > self.levels:
            raise ValueError(f"{codes.shape[1]} levels of codes for an RVQ of {self.levels}")
        bad = (codes < 0) | (codes >= self.fitted[None, :codes.shape[1]])
        if bad.any():
            row, level = map(int, np.argwhere(bad)[0])
            raise ValueError(f"code {int(codes[row, level])} at level {level} is outside the "
                             f"{int(self.fitted[level])} fitted codes of that level")
        return sum(self.codebooks[level][codes[:, level]] for level in range(codes.shape[1]))

    def sha256(self) -> str:
        """Digest of the codebooks and the fitted counts (both decide every code)."""
        h = hashlib.sha256(self.codebooks.tobytes())
        h.update(self.fitted.astype("<i8").tobytes())
        return h.hexdigest()

    def save(self, folder: str | Path, extra: dict[str, Any] | None = None) -> str:
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / ".codebooks.safetensors.tmp"
        save_file({"codebooks": self.codebooks, "fitted": self.fitted}, str(tmp))
        tmp.replace(folder / "codebooks.safetensors")
        digest = self.sha256()
        atomic_write_json(folder / "rvq.json", {"levels": self.levels, "codebook_size": self.size,
                                                "dim": int(self.codebooks.shape[2]),
                                                "fitted_per_level": self.fitted.tolist(),
                                                "sha256": digest, **(extra or {})})
        return digest

    @classmethod
    def load(cls, folder: str | Path) -> ResidualKMeans:
        from safetensors.numpy import load_file

        folder = Path(folder)
        tensors = load_file(str(folder / "codebooks.safetensors"))
        if "fitted" not in tensors:
            raise ValueError(f"{folder}: codebooks without fitted counts per level (written by an "
                             "older version): refit the RVQ")
        rvq = cls(tensors["codebooks"], tensors["fitted"])
        want = json.loads((folder / "rvq.json").read_text())["sha256"]
        if rvq.sha256() != want:
            raise ValueError(f"{folder}: codebooks do not match the sha256 in rvq.json")
        return rvq


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
        from cantus.tokenize.mulan.model import load_mulan

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


def chunk_embeddings(model, x: np.ndarray, stride: int) -> np.ndarray:
    """float32[W + 1, D] for one chunk: its window embeddings ``stride`` samples apart,
    then their normalised mean."""
    w = model.embed_windows(torch.from_numpy(np.asarray(x, np.float32)), stride)
    return torch.cat([w, torch.nn.functional.normalize(w.mean(0, keepdim=True), dim=-1)]
                     ).cpu().numpy()


def fit_embeddings(model, audio: list[np.ndarray], stride_seconds: float) -> np.ndarray:
    """float32[M, D]: every window embedding at ``stride_seconds`` and every chunk mean."""
    from cantus.training import progress

    stride = int(round(stride_seconds * model.cfg.sample_rate))
    rows = []
    with progress(len(audio), desc="mulan embeddings") as bar:
        for x in audio:
            rows.append(chunk_embeddings(model, x, stride))
            bar.update(1)
    return np.concatenate(rows)


def stream_embeddings(model, audio_dir: str | Path, split: str, stride_seconds: float,
                      cap: int, seed: int) -> tuple[np.ndarray, int, int]:
    """(float32[<= cap, D] sample, embeddings seen, chunks) of one split's fit embeddings
    (``chunk_embeddings``), decoding one chunk at a time."""
    from cantus.audio_stream import iter_all, shard_paths
    from cantus.training import progress

    stride = int(round(stride_seconds * model.cfg.sample_rate))
    res, chunks = Reservoir(cap, seed, "embeddings"), 0
    with progress(None, desc="mulan embeddings") as bar:
        for x, _ in iter_all(shard_paths(audio_dir, split)):
            res.add(chunk_embeddings(model, x, stride))
            chunks += 1
            bar.update(1)
    if chunks == 0:
        raise ValueError(f"{audio_dir}: the {split} split has no chunks to fit the RVQ on")
    return res.sample(), res.seen, chunks


def run(cfg: MulanRVQConfig, model_dir: str | Path, audio_dir: str | Path,
        out: str | Path) -> dict[str, Any]:
    """Fit and save the RVQ on a seeded sample of at most ``cfg.max_embeddings`` train
    embeddings (all of them when fewer); returns its summary (also in ``rvq.json``)."""
    from cantus.tokenize.mulan.model import load_mulan

    model = load_mulan(model_dir)
    x, seen, chunks = stream_embeddings(model, audio_dir, "train", cfg.fit_stride_seconds,
                                        cfg.max_embeddings, cfg.seed)
    rvq = ResidualKMeans.fit(x, cfg.levels, cfg.codebook_size, cfg.kmeans_iters, cfg.seed,
                             cfg.min_points_per_code)
    quant = rvq.decode(rvq.encode(x))
    cos = float((quant * x).sum(1).mean() / np.linalg.norm(quant, axis=1).clip(1e-9).mean())
    weights = hashlib.sha256((Path(model_dir) / "model.safetensors").read_bytes()).hexdigest()
    extra = {"mulan_sha256": weights, "fit_points": int(x.shape[0]), "fit_chunks": chunks,
             "fit_stride_seconds": cfg.fit_stride_seconds, "kmeans_iters": cfg.kmeans_iters,
             "seed": cfg.seed, "train_cosine": round(cos, 6)}
    if seen > x.shape[0]:  # sampled: say from how many
        extra["fit_embeddings_seen"] = seen
    digest = rvq.save(out, extra)
    return {"sha256": digest, "fitted_per_level": rvq.fitted.tolist(), **extra}


def _arguments(p) -> None:
    p.add_argument("--model", required=True, help="trained MuLan folder")
    p.add_argument("--audio", required=True, help="audio shard folder (train split used)")
    p.add_argument("--out", required=True, help="folder for codebooks.safetensors + rvq.json")


def _main(args) -> None:
    cfg = load_section(args.params, "mulan", MulanConfig).rvq
    print(run(cfg, args.model, args.audio, args.out))


def main(argv: list[str] | None = None) -> int:
    from cantus.training import stage_main

    return stage_main("cantus mulan rvq", __doc__, _arguments, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
