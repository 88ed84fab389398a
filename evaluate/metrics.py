"""The numbers MusicLM reports, as plain functions of embeddings and probabilities.

Goes in: float arrays (MuLan embeddings ``[N, D]``, tag probabilities
``[N, C]``). Comes out: floats. No model is loaded here; ``evaluate.run``
computes the embeddings and calls these.

- ``mcc``: MuLan cycle consistency, the mean cosine of matching text/audio rows;
  ``mismatched_cosine`` is its chance level (every pair of different prompts).
- ``frechet_distance``: FAD, the Fréchet distance between Gaussians fitted to
  two embedding sets.
- ``kl_divergence``: mean KL(p || q) of paired tag distributions (rows).
- ``adherence``: how often the classifier picks the class a prompt names.
"""

from __future__ import annotations

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def mcc(text: np.ndarray, audio: np.ndarray) -> float:
    """Mean cosine of row i of ``text[N, D]`` with row i of ``audio[N, D]``."""
    if text.shape != audio.shape or text.ndim != 2 or len(text) == 0:
        raise ValueError(f"mcc needs two [N, D] arrays of one shape, got {text.shape} "
                         f"and {audio.shape}")
    return float((_unit(text) * _unit(audio)).sum(1).mean())


def mismatched_cosine(text: np.ndarray, audio: np.ndarray, prompts: list[str]) -> float:
    """Mean cosine of text i with audio j over every pair whose prompts differ:
    what MCC would be if generations ignored their prompt."""
    sim = _unit(text) @ _unit(audio).T
    differ = np.array([[a != b for b in prompts] for a in prompts])
    if not differ.any():
        raise ValueError("mismatched_cosine needs at least two different prompts")
    return float(sim[differ].mean())


def gaussian(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] of ``x[N, D]`` (N >= 2)."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 embeddings, got {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(w.clip(0))) @ v.T


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """||mu_x - mu_y||^2 + Tr(S_x + S_y - 2 (S_x S_y)^(1/2)) for ``x[N, D]``, ``y[M, D]``.

    Tr((S_x S_y)^(1/2)) is taken as Tr((A S_y A)^(1/2)) with A = S_x^(1/2): the
    same eigenvalues, but a symmetric matrix, so it stays real and stable when
    N < D makes the covariances singular.
    """
    mx, sx = gaussian(x)
    my, sy = gaussian(y)
    a = _psd_sqrt(sx)
    cross = np.sqrt(np.linalg.eigvalsh(a @ sy @ a).clip(0)).sum()
    return float(max(0.0, ((mx - my) ** 2).sum() + np.trace(sx) + np.trace(sy) - 2 * cross))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = 1e-8) -> float:
    """Mean over rows of KL(p_i || q_i) in nats; ``p``, ``q``: [N, C] distributions."""
    p = np.asarray(p, np.float64).clip(eps)
    q = np.asarray(q, np.float64).clip(eps)
    if p.shape != q.shape:
        raise ValueError(f"KL needs paired rows, got {p.shape} and {q.shape}")
    p, q = p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)
    return float((p * np.log(p / q)).sum(1).mean())


def adherence(probs: np.ndarray, named: list[int]) -> dict[str, float]:
    """How often ``argmax probs[i]`` is the class ``named[i]`` the prompt asked for.

    Beside it: ``chance`` (1 / classes) and ``prior``, how often the classifier
    picks a prompt's class in the generations of the *other* prompts (what
    adherence would be if generations ignored their prompt).
    """
    pred = np.asarray(probs).argmax(1)
    named_ = np.asarray(named)
    hits = pred == named_
    others = [np.mean(np.delete(pred, i) == c) for i, c in enumerate(named_)] if len(pred) > 1 \
        else [float("nan")]
    return {"accuracy": float(hits.mean()), "chance": 1.0 / probs.shape[1],
            "prior": float(np.mean(others)), "n": int(len(pred))}


__all__ = ["adherence", "frechet_distance", "gaussian", "kl_divergence", "mcc",
           "mismatched_cosine", "softmax"]
