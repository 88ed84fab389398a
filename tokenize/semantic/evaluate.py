"""How much musical information the semantic tokens carry, against a log-mel baseline.

Goes in: the pretraining stage output, the fitted codebook, the audio shards
(train and valid) and the ``semantic.kmeans`` and ``semantic.eval`` params. Comes out: a metrics JSON
with, per split, the tokens' inertia (mean squared normalised distance to the
centroid), fraction of clusters used and code perplexity, and the
phone-purity-style measures against the shard JSON tags: cluster purity and
PNMI (mutual information of token and label over the label entropy) for the
instrument set and the genre. The same figures are given for the baseline:
k-means with the same K, seed and frame cap on per-dimension normalised
log-mel frames at the same rate, fitted on the same train split.

    python -m cantus.tokenize.semantic.evaluate --params params.yaml \
        --model models/semantic --codebook models/semantic_kmeans \
        --audio data/audio --out metrics/semantic.json
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cantus import shards
from cantus.audio_stream import shard_paths
from cantus.config import load_section
from cantus.tokenize.semantic import kmeans as sk
from cantus.tokenize.semantic import model as sm
from cantus.tokenize.semantic.params import SemanticConfig

log = logging.getLogger(__name__)
N_MELS = 80


def _labels(meta: dict[str, Any]) -> dict[str, str]:
    tags = meta.get("tags") or {}
    inst = tags.get("instruments") or []
    return {"instrument": "+".join(sorted(set(inst))) if inst else "unknown",
            "genre": str(tags.get("genre") or "unknown")}


def contingency(tokens: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Joint counts float[K_used, L] of token and label per frame."""
    _, t = np.unique(tokens, return_inverse=True)
    _, y = np.unique(labels, return_inverse=True)
    joint = np.zeros((t.max() + 1, y.max() + 1))
    np.add.at(joint, (t, y), 1)
    return joint


def purity(tokens: np.ndarray, labels: np.ndarray) -> float:
    """Share of frames whose label is their cluster's most common label."""
    joint = contingency(tokens, labels)
    return float(joint.max(1).sum() / joint.sum())


def pnmi(tokens: np.ndarray, labels: np.ndarray) -> float:
    """I(token; label) / H(label): 1 when tokens determine labels, 0 when independent."""
    p = contingency(tokens, labels) / len(tokens)
    pt, py = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / (pt @ py)[nz])).sum())
    h = float(-(py[py > 0] * np.log(py[py > 0])).sum())
    return mi / h if h > 0 else 0.0


def code_stats(tokens: np.ndarray, k: int) -> dict[str, float]:
    counts = np.bincount(tokens, minlength=k)
    p = counts[counts > 0] / counts.sum()
    return {"clusters_used": float((counts > 0).mean()),
            "perplexity": float(np.exp(-(p * np.log(p)).sum()))}


def logmel(x: np.ndarray, token_rate: int) -> np.ndarray:
    """Log-mel frames float32[T, 80] of 16 kHz audio at ``token_rate`` Hz."""
    import librosa

    hop = sm.SAMPLE_RATE // token_rate
    mel = librosa.feature.melspectrogram(y=x, sr=sm.SAMPLE_RATE, n_fft=2 * hop, hop_length=hop,
                                         n_mels=N_MELS, power=2.0)
    return np.log(mel + 1e-6).T[:sm.num_frames(len(x), token_rate)].astype(np.float32)


def _split_features(featurise: Callable, paths: list[str]) -> list[tuple[np.ndarray, dict]]:
    return [(np.asarray(f), m) for f, m in featurise(paths)]


def evaluate(codebook: sk.Codebook, clips: list[tuple[np.ndarray, dict]]) -> dict[str, float]:
    """Token statistics and tag measures of one split's features."""
    feats = np.concatenate([f for f, _ in clips])
    ids, dist = codebook.assign(torch.from_numpy(feats))
    tokens = ids.cpu().numpy()
    out = {"frames": int(len(tokens)), "inertia": float(dist.mean()),
           **code_stats(tokens, codebook.size)}
    for name in ("instrument", "genre"):
        labels = np.concatenate([np.full(len(f), _labels(m)[name]) for f, m in clips])
        out[f"purity_{name}"] = purity(tokens, labels)
        out[f"pnmi_{name}"] = pnmi(tokens, labels)
    return out


def run(cfg: SemanticConfig, model_out: str | Path, codebook_dir: str | Path,
        shards_dir: str | Path) -> dict[str, Any]:
    """Metrics of the semantic tokens and of the log-mel baseline on train and valid."""
    km = cfg.kmeans
    tok = sk.SemanticTokenizer(model_out, codebook_dir, cfg.eval.device)
    splits = {s: shard_paths(shards_dir, s) for s in ("train", "valid")}

    def semantic(paths):
        for f, m in sk.iter_features(tok.extractor, sk.iter_clips(paths), cfg.eval.batch_size):
            yield f.cpu().numpy(), m

    def mel(paths):
        for x, m in sk.iter_clips(paths):
            if sm.num_frames(len(x), km.token_rate) >= 1:
                yield logmel(x, km.token_rate), m

    result: dict[str, Any] = {"clusters": km.clusters, "layer": tok.extractor.layer,
                              "model_hash": tok.manifest["model_hash"]}
    for name, featurise, codebook in (("semantic", semantic, tok.codebook),
                                      ("logmel", mel, None)):
        data = {s: _split_features(featurise, p) for s, p in splits.items()}
        if codebook is None:
            codebook, _ = sk.fit((f for f, _ in data["train"]), km)
        result[name] = {s: evaluate(codebook, d) for s, d in data.items()}
    for s in splits:
        result[f"{s}_pnmi_instrument_gain"] = (result["semantic"][s]["pnmi_instrument"]
                                              - result["logmel"][s]["pnmi_instrument"])
    return result


def _arguments(ap) -> None:
    ap.add_argument("--model", required=True, help="pretraining stage output")
    ap.add_argument("--codebook", required=True, help="k-means stage output")
    ap.add_argument("--audio", required=True, help="audio shard folder")
    ap.add_argument("--out", required=True, help="metrics JSON")


def _main(args) -> None:
    cfg = load_section(args.params, "semantic", SemanticConfig)
    result = run(cfg, args.model, args.codebook, args.audio)
    shards.atomic_write_json(args.out, result)
    for s in ("train", "valid"):
        print(s, "PNMI instrument: semantic", round(result["semantic"][s]["pnmi_instrument"], 4),
              "log-mel", round(result["logmel"][s]["pnmi_instrument"], 4))


def main(argv: list[str] | None = None) -> int:
    from cantus.training import stage_main

    return stage_main("cantus semantic eval", __doc__, _arguments, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
