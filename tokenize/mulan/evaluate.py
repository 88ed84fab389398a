"""Evaluate MuLan and its RVQ: retrieval, zero-shot tags, token quality.

Goes in: a trained MuLan (``models/mulan``), its RVQ (``models/mulan_rvq``),
the audio shards and section ``mulan.eval``. Comes out: a metrics JSON with

- ``retrieval.{valid,train,all}``: text-to-audio and audio-to-text Recall@k
  and median rank over the split's (caption, chunk) pairs, beside chance
  (Recall@k = k/N, median rank = (N+1)/2). Each chunk is embedded whole:
  windows at ``stride_seconds``, averaged. The demo's valid split is tiny
  (3 pairs: Recall@5 and @10 are 1 by construction), so train is reported
  too; train pairs were seen in training, so those figures measure fit.
- ``zero_shot.<tag>``: accuracy of choosing the tag value whose prompt
  (``"music played on {}"``) is nearest to the audio, against every value
  of that tag in the corpus, beside the majority-class baseline. Multi-valued
  tags (instruments) count a prediction as right if the chunk has it.
- ``rvq.<split>``: cosine between each embedding and its quantised version
  (audio and text; also for the first 1 and 4 levels), and per level how often
  a caption and its audio get the same code, beside how often they would by
  chance (from each side's code frequencies).

    python -m cantus.tokenize.mulan.evaluate --params params.yaml --model models/mulan \
        --rvq models/mulan_rvq --audio data/audio --out metrics/mulan.json
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cantus.config import load_section
from cantus.shards import atomic_write_json
from cantus.tokenize.mulan.params import MulanConfig, MulanEvalConfig
from cantus.tokenize.mulan.rvq import MulanTokenizer

log = logging.getLogger(__name__)


def ranks(sim: np.ndarray) -> np.ndarray:
    """1-based rank of the matching column (the diagonal) in each row of ``sim[N, N]``."""
    diag = np.diag(sim)[:, None]
    return 1 + (sim > diag).sum(axis=1)


def retrieval(text: np.ndarray, audio: np.ndarray, ks: tuple[int, ...]) -> dict[str, Any]:
    """Recall@k and median rank both ways for matching rows of ``float32[N, D]``."""
    sim, n = text @ audio.T, len(text)

    def summary(r: np.ndarray) -> dict[str, float]:
        out = {f"R@{k}": float((r <= k).mean()) for k in ks}
        out["median_rank"] = float(np.median(r))
        return out

    chance = {f"R@{k}": min(k, n) / n for k in ks}
    chance["median_rank"] = (n + 1) / 2
    return {"n": n, "text_to_audio": summary(ranks(sim)),
            "audio_to_text": summary(ranks(sim.T)), "chance": chance}


def zero_shot(model, audio: np.ndarray, labels: list[list[str]], template: str
              ) -> dict[str, Any]:
    """Accuracy of the nearest prompt among all values, beside the majority class."""
    classes = sorted({v for vs in labels for v in vs})
    with torch.no_grad():
        prompts = model.embed_text([template.format(c) for c in classes]).cpu().numpy()
    pred = (audio @ prompts.T).argmax(axis=1)
    hits = [classes[p] in vs for p, vs in zip(pred, labels)]
    counts = Counter(v for vs in labels for v in set(vs))
    top, top_n = counts.most_common(1)[0]
    return {"accuracy": float(np.mean(hits)), "majority_baseline": top_n / len(labels),
            "majority_class": top, "classes": len(classes), "n": len(labels),
            "prompt": template}


def _labels(metas: list[dict], tag: str) -> list[list[str]]:
    out = []
    for m in metas:
        v = (m.get("tags") or {}).get(tag)
        out.append([str(x) for x in (v if isinstance(v, (list, tuple)) else [v])
                    if x is not None])
    return out


def rvq_quality(tok: MulanTokenizer, audio: np.ndarray, text: np.ndarray) -> dict[str, Any]:
    """Cosine of embeddings with their quantised versions; text/audio code agreement."""
    def cosine(x: np.ndarray, codes: np.ndarray) -> float:
        q = tok.rvq.decode(codes)
        q = q / np.linalg.norm(q, axis=1, keepdims=True).clip(1e-9)
        return float((q * x).sum(1).mean())

    ca, ct = tok.rvq.encode(audio), tok.rvq.encode(text)
    # what unrelated audio and text would share by chance, given each side's code counts
    chance = [sum(np.mean(ca[:, lv] == c) * np.mean(ct[:, lv] == c) for c in np.unique(ca[:, lv]))
              for lv in range(tok.rvq.levels)]
    first = {f"first_{k}": cosine(audio, ca[:, :k]) for k in (1, 4) if k < tok.rvq.levels}
    return {"audio_cosine": cosine(audio, ca), "text_cosine": cosine(text, ct),
            "audio_cosine_levels": first,
            "code_agreement": [round(float(x), 4) for x in (ca == ct).mean(axis=0)],
            "code_agreement_chance": [round(float(x), 4) for x in chance],
            "distinct_first_codes": int(len(np.unique(ca[:, 0])))}


def embed_split(tok: MulanTokenizer, audio_dir: str | Path, split: str
                ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(audio float32[N, D], caption float32[N, D], metadata) of one split, decoding one
    chunk at a time (only embeddings and metadata are kept)."""
    from cantus.audio_stream import iter_all, shard_paths
    from cantus.training import progress

    audio, metas = [], []
    with progress(None, desc=f"mulan eval {split}") as bar:
        for x, meta in iter_all(shard_paths(audio_dir, split)):
            audio.append(tok.audio_embedding(x).cpu().numpy())
            metas.append(meta)
            bar.update(1)
    with torch.no_grad():
        text = tok.model.embed_text([m["caption"] for m in metas]).cpu().numpy()
    return np.stack(audio), text, metas


def run(cfg: MulanEvalConfig, tok: MulanTokenizer, audio_dir: str | Path,
        out: str | Path | None = None) -> dict[str, Any]:
    """All metrics (and, with ``out``, the JSON file)."""
    parts = {s: embed_split(tok, audio_dir, s) for s in ("valid", "train")}
    parts["all"] = tuple(np.concatenate([parts[s][i] for s in ("valid", "train")])
                         if i < 2 else parts["valid"][2] + parts["train"][2] for i in range(3))
    metrics: dict[str, Any] = {"retrieval": {}, "zero_shot": {}, "rvq": {}}
    for split, (audio, text, metas) in parts.items():
        metrics["retrieval"][split] = retrieval(text, audio, cfg.recall_at)
        metrics["rvq"][split] = rvq_quality(tok, audio, text)
    for split in ("all", "valid"):
        audio, _, metas = parts[split]
        metrics["zero_shot"][split] = {tag: zero_shot(tok.model, audio, _labels(metas, tag), tpl)
                                       for tag, tpl in cfg.prompts.items()}
    if out is not None:
        atomic_write_json(out, metrics)
    return metrics


def _arguments(p) -> None:
    p.add_argument("--model", required=True, help="trained MuLan folder")
    p.add_argument("--rvq", required=True, help="fitted RVQ folder")
    p.add_argument("--audio", required=True, help="audio shard folder")
    p.add_argument("--out", required=True, help="metrics JSON")


def _main(args) -> None:
    cfg = load_section(args.params, "mulan", MulanConfig).eval
    m = run(cfg, MulanTokenizer.load(args.model, args.rvq), args.audio, args.out)
    r, z = m["retrieval"], m["zero_shot"]["all"]
    for split in ("valid", "train"):
        t2a, chance = r[split]["text_to_audio"], r[split]["chance"]
        print(f"{split}: text->audio R@10 {t2a['R@10']:.3f} (chance {chance['R@10']:.3f}), "
              f"median rank {t2a['median_rank']} (chance {chance['median_rank']})")
    for tag, v in z.items():
        print(f"zero-shot {tag}: {v['accuracy']:.3f} (majority {v['majority_baseline']:.3f})")


def main(argv: list[str] | None = None) -> int:
    from cantus.training import stage_main

    return stage_main("cantus mulan eval", __doc__, _arguments, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
