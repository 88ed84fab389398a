"""Diagnostics of each hop of the chain, each figure beside its baseline and its n.

Goes in: valid token crops and the trained LM stages, MuLan (+ RVQ) embeddings and
codes of valid captions and audio, the earlier stages' metrics. Comes out: plain
dicts (for ``reports/metrics.json``) and table rows (for the report):

- ``sensitivity``: validation perplexity of an LM stage with each clip's own
  conditioning beside the same clips given another clip's (a seeded derangement),
  and with null conditioning where the stage was trained with dropout. A ratio
  swapped / own near 1 says the stage ignores its conditioning.
- ``codec_hearing``: MCC and zero-shot instrument accuracy of real valid chunks,
  as they are and through the codec, beside chance.
- ``code_agreement``: per MuLan RVQ level, how often a caption's text tokens equal
  its own audio's tokens, beside other clips' audio (chance).
- ``alarms``: MuLan InfoNCE near ln(batch) (nothing learnt), a codec level with
  codebook perplexity near 1 (collapsed). Each: value, threshold, raised.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cantus.audio_stream import _seed
from cantus.train.data import batched, crop
from cantus.train.layout import Layout

from . import metrics as M

log = logging.getLogger(__name__)

# the conditioning each stage's sensitivity swaps (MusicLM's hops)
SWAPPED = {"semantic": ("mulan",), "coarse": ("semantic",), "fine": ("acoustic",)}
INFONCE_FRACTION = 0.9      # InfoNCE above this fraction of ln(batch): MuLan learnt ~nothing
CODEC_MIN_PERPLEXITY = 2.0  # a codec level whose codebook perplexity is below this collapsed


def derangement(n: int, seed: int) -> np.ndarray:
    """int[n] permutation with no fixed point (n >= 2): clip i gets clip ``out[i]``'s
    conditioning."""
    if n < 2:
        raise ValueError("a derangement needs at least 2 clips")
    p = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, np.int64)
    out[p] = np.roll(p, -1)   # each clip takes the next one's in a random cycle
    return out


def _row(hop: str, series: str, role: str, value, n=None, note: str = "") -> dict[str, Any]:
    return {"hop": hop, "series": series, "role": role,
            "value": None if value is None else round(float(value), 5), "n": n, "note": note}


def _full(layout: Layout, tokens: dict[str, np.ndarray]) -> bool:
    """The crop holds every frame of the layout's time fields (so fields can be swapped)."""
    return all(tokens[f].shape[-1] == layout.frames(f) for f in ("semantic", "acoustic")
               if f in layout.spec.fields)


def swap_conditioning(layout: Layout, own: dict[str, np.ndarray], other: dict[str, np.ndarray],
                      fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    """``own`` with the conditioning parts of ``fields`` taken from ``other``; a field that is
    also a target (fine: acoustic) has only its conditioning levels replaced."""
    out = dict(own)
    targets = {p.field for p in layout.spec.target}
    for p in layout.spec.cond:
        if p.field not in fields:
            continue
        if p.field in targets:
            a = np.array(own[p.field], copy=True)
            a[p.levels[0]:p.levels[1]] = other[p.field][p.levels[0]:p.levels[1]]
            out[p.field] = a
        else:
            out[p.field] = other[p.field]
    return out


def _ppl(model, layout: Layout, crops: list[dict[str, np.ndarray]], batch_size: int,
         drop: bool = False) -> float:
    from cantus.train.data import encoded
    from cantus.train.run import evaluate

    items = [encoded(layout, t, drop) for t in crops]
    nll = evaluate(model, layout, list(batched(iter(items), batch_size)), torch.device("cpu"),
                   False)
    return math.exp(nll)


def sensitivity(model, layout: Layout, clips: list[tuple[str, dict[str, np.ndarray]]],
                seed: int, batch_size: int = 8) -> dict[str, Any]:
    """Perplexity of ``model`` on the clips' seeded crops (as ``train.data.fixed_crops``
    makes them) with own, swapped (derangement) and, if droppable, null conditioning.

    ``clips``: (key, uncropped tokens) of the valid split. Only crops of full length
    are scored (``n``). Returns {own_ppl, swapped_ppl, ratio (swapped / own), null_ppl,
    swapped_fields, n}; None values when fewer than 2 full crops.
    """
    crops = [crop(t, layout.crop_seconds, random.Random(_seed(seed, -1, k, "crop")))
             for k, t in clips]
    crops = [c for c in crops if _full(layout, c)]
    fields = SWAPPED[layout.spec.name]
    out: dict[str, Any] = {"swapped_fields": list(fields), "n": len(crops), "own_ppl": None,
                           "swapped_ppl": None, "ratio": None, "null_ppl": None}
    if len(crops) < 2:
        return out
    perm = derangement(len(crops), seed)
    swapped = [swap_conditioning(layout, c, crops[j], fields) for c, j in zip(crops, perm)]
    with torch.no_grad():
        own, other = _ppl(model, layout, crops, batch_size), _ppl(model, layout, swapped,
                                                                  batch_size)
        null = _ppl(model, layout, crops, batch_size, drop=True) if layout.spec.droppable \
            else None
    return {**out, "own_ppl": own, "swapped_ppl": other, "ratio": other / own, "null_ppl": null}


def sensitivity_rows(stage: str, s: dict[str, Any]) -> list[dict[str, Any]]:
    hop = f"{stage} LM <- {' + '.join(s['swapped_fields'])}"
    rows = [_row(hop, "valid perplexity, own conditioning", "cantus", s["own_ppl"], s["n"]),
            _row(hop, "another clip's conditioning (derangement)", "baseline",
                 s["swapped_ppl"], s["n"]),
            _row(hop, "ratio swapped / own", "cantus", s["ratio"], s["n"],
                 "1: the stage ignores its conditioning")]
    if s["null_ppl"] is not None:
        rows.append(_row(hop, "null conditioning (CFG)", "baseline", s["null_ppl"], s["n"]))
    return rows


def valid_tokens(tokens_dir: str | Path, fields: tuple[str, ...], limit: int
                 ) -> list[tuple[str, dict[str, np.ndarray]]]:
    """The first ``limit`` valid-split token samples: (key, {field: codes})."""
    from cantus import shards
    from cantus.audio_stream import shard_paths
    from cantus.train.data import decode_tokens

    out = []
    for path in shard_paths(tokens_dir, "valid"):
        for key, f in shards.iter_samples(path):
            if len(out) >= limit:
                return out
            out.append((key, decode_tokens(f, fields)))
    return out


def codec_hearing(text: np.ndarray, real: np.ndarray, codec: np.ndarray,
                  real_probs: np.ndarray | None, codec_probs: np.ndarray | None,
                  classes: list[str], labels: list[list[str]]) -> dict[str, Any]:
    """What MuLan hears of real valid chunks before and after the codec.

    ``text``, ``real``, ``codec``: float[N, D] embeddings of the captions, the chunks and
    the chunks through the codec; ``*_probs``: float[N, C] zero-shot instrument
    distributions (None: no instrument classes); ``labels``: each chunk's instruments.
    A chunk is named right when the top class is one of its instruments; chance is the
    mean share of its instruments among the classes.
    """
    n = len(text)
    out: dict[str, Any] = {"n": n, "mcc": {
        "real": M.mcc(text, real), "codec": M.mcc(text, codec),
        "chance_codec": M.mismatched_cosine(text, codec, [str(i) for i in range(n)])
        if n > 1 else None}}
    if real_probs is not None and classes:
        def acc(p: np.ndarray) -> float:
            return float(np.mean([classes[k] in lab for k, lab in zip(p.argmax(1), labels)]))

        out["instrument"] = {"real": acc(real_probs), "codec": acc(codec_probs),
                             "chance": float(np.mean([len(set(lab) & set(classes)) / len(classes)
                                                      for lab in labels])),
                             "classes": len(classes)}
    return out


def codec_hearing_rows(h: dict[str, Any]) -> list[dict[str, Any]]:
    hop, n = "codec -> MuLan", h["n"]
    rows = [_row(hop, "MCC real valid chunks, own caption", "reference", h["mcc"]["real"], n),
            _row(hop, "MCC same chunks through the codec", "cantus", h["mcc"]["codec"], n),
            _row(hop, "MCC through the codec, other captions (chance)", "baseline",
                 h["mcc"]["chance_codec"], n)]
    if "instrument" in h:
        i = h["instrument"]
        rows += [_row(hop, "instrument accuracy, real chunks", "reference", i["real"], n),
                 _row(hop, "instrument accuracy, through the codec", "cantus", i["codec"], n),
                 _row(hop, "instrument accuracy, chance", "baseline", i["chance"], n,
                      f"{i['classes']} classes")]
    return rows


def code_agreement(text_codes: np.ndarray, audio_codes: np.ndarray) -> dict[str, Any]:
    """Per RVQ level, how often row i of ``text_codes[N, L]`` equals row i of
    ``audio_codes[N, L]`` (own audio), beside every pair i != j (other clips' audio)."""
    t, a = np.asarray(text_codes), np.asarray(audio_codes)
    if t.shape != a.shape or t.ndim != 2 or len(t) < 2:
        raise ValueError(f"code agreement needs two [N >= 2, L] arrays, got {t.shape}, {a.shape}")
    same = t[:, None, :] == a[None, :, :]                    # (N, N, L)
    off = ~np.eye(len(t), dtype=bool)
    return {"n": int(len(t)), "own": same[np.arange(len(t)), np.arange(len(t))].mean(0).tolist(),
            "other_clips": same[off].mean(0).tolist()}


def agreement_rows(a: dict[str, Any], levels: int = 3) -> list[dict[str, Any]]:
    hop, rows = "caption text -> MuLan tokens", []
    for lvl in range(min(levels, len(a["own"]))):
        rows += [_row(hop, f"level {lvl}: text code = own audio's", "cantus", a["own"][lvl],
                      a["n"]),
                 _row(hop, f"level {lvl}: text code = other clips' (chance)", "baseline",
                      a["other_clips"][lvl], a["n"])]
    return rows


def mulan_final_loss(live_dir: str | Path, last: int = 10) -> float | None:
    """MuLan's training InfoNCE: the mean of the last ``last`` logged steps of
    ``plots/metrics/loss.tsv``, else ``metrics.json``'s ``loss``; None when neither exists."""
    d = Path(live_dir)
    tsv = d / "plots" / "metrics" / "loss.tsv"
    if tsv.is_file():
        head, *rows = tsv.read_text().splitlines()
        col = head.split("\t").index("loss")
        vals = [float(r.split("\t")[col]) for r in rows if r.strip()]
        if vals:
            return float(np.mean(vals[-last:]))
    if (d / "metrics.json").is_file():
        v = json.loads((d / "metrics.json").read_text()).get("loss")
        return None if v is None else float(v)
    return None


def alarms(mulan_loss: float | None, batch_size: int, codec_perplexity: list[float] | None
           ) -> dict[str, dict[str, Any]]:
    """Collapse alarms, each {value, threshold, raised} (a warning is logged when raised).

    ``mulan_infonce``: the training InfoNCE against ``INFONCE_FRACTION`` ln(batch) (the
    loss of embeddings that tell no pair apart is ln(batch)); ``codec_level_<i>``:
    a codec level's codebook perplexity against ``CODEC_MIN_PERPLEXITY``.
    """
    out: dict[str, dict[str, Any]] = {}
    if mulan_loss is not None:
        t = INFONCE_FRACTION * math.log(batch_size)
        out["mulan_infonce"] = {"value": mulan_loss, "threshold": t, "raised": mulan_loss >= t,
                                "note": f"ln(batch {batch_size}) = {math.log(batch_size):.4g}"}
    for i, p in enumerate(codec_perplexity or []):
        out[f"codec_level_{i}"] = {"value": float(p), "threshold": CODEC_MIN_PERPLEXITY,
                                   "raised": float(p) < CODEC_MIN_PERPLEXITY,
                                   "note": "codebook perplexity"}
    for name, a in out.items():
        if a["raised"]:
            log.warning("collapse alarm %s: %.4g (threshold %.4g, %s)", name, a["value"],
                        a["threshold"], a["note"])
    return out


def alarm_rows(a: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"alarm": k, "value": round(v["value"], 5), "threshold": round(v["threshold"], 5),
             "raised": v["raised"], "note": v["note"]} for k, v in a.items()]
