"""Score the generations the way MusicLM does, gather every stage's figures, write a report.

Goes in: ``generate_eval``'s folder (``gen-NNN.wav`` + ``prompts.json``), the
audio shards (real references), the trained MuLan + RVQ and codec, the
earlier stages' metrics folder, sections ``evaluate`` and ``mulan.eval``.
Comes out, in ``--out``: ``metrics.json`` (for ``dvc metrics show``),
``plots/scores.json`` (bars for ``dvc plots show``) and ``report.html``.

    python -m cantus.evaluate.run --params params.yaml --generated data/generated \
        --audio data/audio --models models --metrics metrics --out reports

Every figure stands beside a baseline:
- MCC of generations and their prompts; real valid audio with its own caption
  (upper reference); generations with the other prompts (chance);
- FAD of generations against real valid audio (MuLan or a local embedding);
  real train audio against the same (what real music of this corpus scores);
- KLD of MuLan zero-shot tag distributions, generation against its real chunk;
  the same with the pairs shuffled (chance);
- instrument adherence against chance (1 / classes) and the prior (how often the
  classifier names that instrument in other prompts' generations), beside the
  classifier's accuracy on real chunks of those instruments.

Diagnostics of each hop (``diagnostics``; ``--tokens`` adds the first two): each LM
stage's valid perplexity with own beside another clip's conditioning; caption text
tokens against their own audio's MuLan tokens (chance: other clips'); MCC and
instrument accuracy of real valid chunks before and after the codec; collapse alarms
(MuLan InfoNCE near ln(batch), a codec level of codebook perplexity near 1).

    python -m cantus.evaluate.run ... --tokens data/tokens
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from cantus.audio import resample
from cantus.audio_stream import iter_all, shard_paths
from cantus.config import load_section
from cantus.shards import atomic_write_json

from . import diagnostics as D
from . import metrics as M
from .embedding import embed_all, load_embedder
from .generate_eval import instruments_of
from .params import EvaluateConfig
from .report import render

log = logging.getLogger(__name__)


def _crop(x: np.ndarray, n: int) -> np.ndarray:
    return np.asarray(x[:n], np.float32)


def tag_probs(model, audio: np.ndarray, classes: list[str], template: str) -> np.ndarray:
    """MuLan zero-shot distribution over ``classes``: float[N, C] (softmax of scaled cosines)."""
    with torch.no_grad():
        text = model.embed_text([template.format(c) for c in classes]).cpu().numpy()
        scale = float(model.scale())
    return M.softmax(scale * (audio @ text.T))


def _classes(metas: list[dict], tag: str) -> list[str]:
    out = set()
    for m in metas:
        tags = m.get("tags")
        v = tags.get(tag) if isinstance(tags, dict) else None
        out.update(str(x) for x in (v if isinstance(v, (list, tuple)) else [v]) if x is not None)
    return sorted(out)


def _row(metric, series, role, value, n=None, note="") -> dict[str, Any]:
    return {"metric": metric, "series": series, "role": role,
            "value": None if value is None else round(float(value), 5), "n": n, "note": note}


@dataclass
class References:
    """What the scores need of the real audio, gathered in one pass over each split.

    ``real``: key -> (clip, metadata) of the valid chunks the caption prompts name (at
    most ``max_captions`` clips); ``metas``: every chunk's metadata, valid then train;
    ``instrument_chunks``: (MuLan embedding, metadata) of the chunks (valid then train)
    that have an instrument some prompt asks for; ``train_fad``: float32[N, D] FAD
    embeddings of every train chunk (None when FAD is not scored) and ``fad_embedder``,
    the embedder that made them.
    """

    real: dict[str, tuple[np.ndarray, dict]]
    metas: list[dict]
    instrument_chunks: list[tuple[np.ndarray, dict]]
    train_fad: np.ndarray | None
    fad_embedder: Any


def references(audio_dir: str | Path, prompts: list[dict], mulan, cfg: EvaluateConfig,
               rate: int, n: int) -> References:
    """``References`` from the audio shards, decoding one chunk at a time: no split's audio
    is held, only the caption chunks' clips and embeddings."""
    captions = {p["key"] for p in prompts if p["kind"] == "caption"}
    wanted = {p["instruments"][0] for p in prompts if p["kind"] == "instrument"}
    mulan_emb = load_embedder("mulan", mulan)
    fad_emb = load_embedder(cfg.fad_embedding, mulan) if len(captions) >= 2 else None

    def clip(x: np.ndarray, m: dict) -> np.ndarray:  # real audio at the generations' rate
        return _crop(resample(x, int(m.get("sample_rate") or rate), rate), n)

    real, metas, chunks, train_fad = {}, [], [], []
    for split in ("valid", "train"):
        for x, m in iter_all(shard_paths(audio_dir, split)):
            metas.append(m)
            fad = split == "train" and fad_emb is not None
            if not (fad or m["key"] in captions or set(instruments_of(m)) & wanted):
                continue
            c = clip(x, m)
            if split == "valid" and m["key"] in captions:
                real[m["key"]] = (c, m)
            if set(instruments_of(m)) & wanted:
                chunks.append((embed_all(mulan_emb, [c], rate)[0], m))
            if fad:
                train_fad.append(embed_all(fad_emb, [c], rate)[0])
    return References(real, metas, chunks, np.stack(train_fad) if train_fad else None,
                      fad_emb)


def score(gen: list[np.ndarray], prompts: list[dict], refs: References, mulan,
          cfg: EvaluateConfig, tag_prompts: dict[str, str], rate: int,
          resynth: dict[str, np.ndarray] | None = None
          ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """All generation metrics: (metrics dict, table rows). ``resynth``: real valid chunks
    through the codec (key -> audio), the best a generation can sound through it."""
    real = refs.real
    mulan_emb = load_embedder("mulan", mulan)
    emb = embed_all(mulan_emb, gen, rate)  # (N, D)
    with torch.no_grad():
        text = mulan.embed_text([p["prompt"] for p in prompts]).cpu().numpy()
    caps = [i for i, p in enumerate(prompts) if p["kind"] == "caption"]
    real_clips = [real[prompts[i]["key"]][0] for i in caps]
    real_emb = embed_all(mulan_emb, real_clips, rate) if caps else None
    texts = [p["prompt"] for p in prompts]
    out: dict[str, Any] = {"n_prompts": len(prompts), "n_caption_prompts": len(caps)}
    rows = []
    out["mcc"] = {"generated": M.mcc(text, emb),
                  "shuffled_prompts": M.mismatched_cosine(text, emb, texts) if len(set(texts)) > 1
                  else None,
                  "real_own_caption": M.mcc(text[caps], real_emb) if caps else None}
    rows += [_row("MCC", "generated", "cantus", out["mcc"]["generated"], len(prompts)),
             _row("MCC", "shuffled prompts (chance)", "baseline",
                  out["mcc"]["shuffled_prompts"], len(prompts)),
             _row("MCC", "real valid audio, own caption", "reference",
                  out["mcc"]["real_own_caption"], len(caps))]
    if caps and resynth:
        codec_emb = embed_all(mulan_emb, [resynth[prompts[i]["key"]] for i in caps], rate)
        out["mcc"]["codec_resynthesis_own_caption"] = M.mcc(text[caps], codec_emb)
        rows.append(_row("MCC", "real valid audio through the codec, own caption", "reference",
                         out["mcc"]["codec_resynthesis_own_caption"], len(caps)))
    # FAD: generated (every prompt) against the real valid chunks
    if len(real_clips) >= 2:
        fad_emb = refs.fad_embedder
        real_f = embed_all(fad_emb, real_clips, rate)
        out["fad"] = {"embedding": fad_emb.name,
                      "generated": M.frechet_distance(embed_all(fad_emb, gen, rate), real_f),
                      "real_train": M.frechet_distance(refs.train_fad, real_f)}
        rows += [_row("FAD", f"generated vs real valid ({fad_emb.name})", "cantus",
                      out["fad"]["generated"], len(gen)),
                 _row("FAD", "real train vs real valid", "reference",
                      out["fad"]["real_train"], len(refs.train_fad))]
    if len(caps) >= 2:
        out["kld"], more = _kld(mulan, real_emb, emb[caps], refs.metas, tag_prompts)
        rows += more
    inst = [i for i, p in enumerate(prompts) if p["kind"] == "instrument"]
    if inst:
        out["adherence"], more = _adherence(mulan, emb[inst], [prompts[i] for i in inst], refs,
                                            tag_prompts["instruments"])
        rows += more
    return out, rows


def _kld(mulan, real_emb: np.ndarray, gen_emb: np.ndarray, metas: list[dict],
         tag_prompts: dict[str, str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """KLD of zero-shot tag distributions, each generation against its real chunk, beside
    the same with the pairs shuffled."""
    out, rows, n = {}, [], len(real_emb)
    for tag, template in tag_prompts.items():
        classes = _classes(metas, tag)
        if len(classes) < 2:
            continue
        p_real = tag_probs(mulan, real_emb, classes, template)
        p_gen = tag_probs(mulan, gen_emb, classes, template)
        shuffled = float(np.mean([M.kl_divergence(p_real[[i]], p_gen[[j]])
                                  for i in range(n) for j in range(n) if i != j]))
        out[tag] = {"generated": M.kl_divergence(p_real, p_gen), "shuffled_pairs": shuffled,
                    "classes": len(classes)}
        rows += [_row(f"KLD {tag}", "generated vs its real chunk", "cantus",
                      out[tag]["generated"], n, "lower is better"),
                 _row(f"KLD {tag}", "shuffled pairs (chance)", "baseline", shuffled, n)]
    return out, rows


def _adherence(mulan, gen_emb: np.ndarray, prompts: list[dict], refs: References,
               template: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Instrument prompts: how often the zero-shot classifier names the asked instrument."""
    classes = _classes(refs.metas, "instruments")
    named = [classes.index(p["instruments"][0]) for p in prompts]
    a = M.adherence(tag_probs(mulan, gen_emb, classes, template), named)
    real_hits = _real_instrument_accuracy(mulan, refs.instrument_chunks, classes, template,
                                          {p["instruments"][0] for p in prompts})
    rows = [_row("instrument adherence", "generated", "cantus", a["accuracy"], a["n"]),
            _row("instrument adherence", "chance (1 / classes)", "baseline", a["chance"],
                 a["n"], f"{len(classes)} classes"),
            _row("instrument adherence", "prior (other prompts)", "baseline", a["prior"], a["n"]),
            _row("instrument adherence", "real chunks of those instruments", "reference",
                 real_hits, None)]
    return {**a, "real_audio_accuracy": real_hits}, rows


def _real_instrument_accuracy(mulan, chunks: list[tuple[np.ndarray, dict]], classes, template,
                              wanted) -> float | None:
    """Zero-shot accuracy on the valid chunks (MuLan embedding, metadata) that have one of
    the ``wanted`` instruments; None when none has."""
    chosen = [(e, m) for e, m in chunks if set(instruments_of(m)) & wanted]
    if not chosen:
        return None
    emb = np.stack([e for e, _ in chosen])
    pred = tag_probs(mulan, emb, classes, template).argmax(1)
    return float(np.mean([classes[p] in instruments_of(m)
                          for p, (_, m) in zip(pred, chosen)]))


def codec_resynthesis(codec_dir: Path, clips: dict[str, np.ndarray], rate: int
                      ) -> dict[str, np.ndarray]:
    """Each clip encoded and decoded by the trained codec (all levels); {} without a codec."""
    if not (codec_dir / "model.safetensors").is_file():
        return {}
    from cantus.tokenize.codec.model import SoundStream

    codec = SoundStream.load(codec_dir)
    if codec.cfg.sample_rate != rate:
        return {}
    out = {}
    for key, x in clips.items():
        codes = codec.encode(torch.from_numpy(x)[None], sample_rate=rate)
        out[key] = codec.decode(codes)[0, :x.shape[0]].numpy()
    return out


def diagnose(prompts: list[dict], refs: References, resynth: dict[str, np.ndarray], mulan,
             models: Path, tokens: str | Path | None, metrics_dir: Path, template: str,
             rate: int, seed: int, clips: int, mulan_batch: int | None
             ) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Issue 17's per-hop diagnostics (``diagnostics``): (metrics, table rows, alarm rows).

    LM sensitivity and text/audio code agreement need ``tokens`` (the packed token
    folder) and are left out without it; the codec hop needs caption chunks and a codec.
    """
    out: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    if tokens is not None:
        from cantus.train.stage import load_stage

        valid = D.valid_tokens(tokens, ("acoustic", "semantic", "mulan"), clips)
        out["sensitivity"] = {}
        for stage in ("semantic", "coarse", "fine"):
            folder = models / f"lm_{stage}"
            if (folder / "model.safetensors").is_file():
                model, layout = load_stage(folder)
                s = D.sensitivity(model, layout, valid, seed)
                out["sensitivity"][stage] = s
                rows += D.sensitivity_rows(stage, s)
        captions = {m["key"]: m["caption"] for m in refs.metas
                    if str(m.get("caption", "")).strip()}
        pairs = [(captions[k], t["mulan"]) for k, t in valid if k in captions]
        rvq_dir = models / "mulan_rvq"
        if len(pairs) >= 2 and (rvq_dir / "codebooks.safetensors").is_file():
            from cantus.tokenize.mulan.rvq import ResidualKMeans

            rvq = ResidualKMeans.load(rvq_dir)
            with torch.no_grad():
                text = mulan.embed_text([c for c, _ in pairs]).cpu().numpy()
            out["code_agreement"] = D.code_agreement(rvq.encode(text),
                                                     np.stack([a for _, a in pairs]))
            rows += D.agreement_rows(out["code_agreement"])
    caps = [p for p in prompts if p["kind"] == "caption" and p["key"] in resynth]
    if len(caps) >= 2:
        emb = load_embedder("mulan", mulan)
        real = embed_all(emb, [refs.real[p["key"]][0] for p in caps], rate)
        codec = embed_all(emb, [resynth[p["key"]] for p in caps], rate)
        with torch.no_grad():
            text = mulan.embed_text([p["prompt"] for p in caps]).cpu().numpy()
        classes = _classes(refs.metas, "instruments")
        labels = [instruments_of(refs.real[p["key"]][1]) for p in caps]
        probs = (tag_probs(mulan, real, classes, template),
                 tag_probs(mulan, codec, classes, template)) if len(classes) >= 2 else (None, None)
        out["codec_hearing"] = D.codec_hearing(text, real, codec, *probs, classes, labels)
        rows += D.codec_hearing_rows(out["codec_hearing"])
    codec_json = metrics_dir / "codec.json"
    usage = json.loads(codec_json.read_text()).get("usage", {}) if codec_json.is_file() else {}
    out["alarms"] = D.alarms(D.mulan_final_loss(metrics_dir / "mulan_train")
                             if mulan_batch else None, mulan_batch or 2,
                             usage.get("perplexity"))
    return out, rows, D.alarm_rows(out["alarms"])


def gather(metrics_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The earlier stages' metrics files, and one headline row (with baseline) per stage."""
    d = Path(metrics_dir)
    found: dict[str, Any] = {}
    for name, rel in (("ingest", "ingest.json"), ("codec", "codec.json"),
                      ("semantic", "semantic.json"), ("mulan", "mulan.json"),
                      ("lm_semantic", "lm_semantic/metrics.json"),
                      ("lm_coarse", "lm_coarse/metrics.json"),
                      ("lm_fine", "lm_fine/metrics.json")):
        if (d / rel).is_file():
            found[name] = json.loads((d / rel).read_text())
    rows = []

    def add(stage, metric, value, baseline, baseline_name):
        rows.append({"stage": stage, "metric": metric, "value": value, "baseline": baseline,
                     "baseline is": baseline_name})

    try:
        c = found["codec"]
        add("codec", "mel distance 6 kbps (valid)", c["codec_6kbps"]["mel_distance"],
            c["opus_6kbps"]["mel_distance"], "Opus 6 kbps")
        add("codec", "SI-SDR 6 kbps, dB", c["codec_6kbps"]["si_sdr"], c["opus_6kbps"]["si_sdr"],
            "Opus 6 kbps")
    except KeyError:
        pass
    try:
        s = found["semantic"]
        add("semantic", "PNMI instrument (valid)", s["semantic"]["valid"]["pnmi_instrument"],
            s["logmel"]["valid"]["pnmi_instrument"], "log-mel k-means")
    except KeyError:
        pass
    try:
        m = found["mulan"]
        r = m["retrieval"]["valid"]
        add("mulan", "text->audio R@1 (valid)", r["text_to_audio"]["R@1"], r["chance"]["R@1"],
            "chance")
        z = m["zero_shot"]["all"]["instruments"]
        add("mulan", "zero-shot instrument accuracy (all)", z["accuracy"],
            z["majority_baseline"], "majority class")
    except KeyError:
        pass
    for stage in ("lm_semantic", "lm_coarse", "lm_fine"):
        if stage in found and "val_ppl" in found[stage]:
            add(stage, "valid perplexity", found[stage]["val_ppl"],
                found[stage].get("unigram_ppl"), "unigram")
    return found, rows


def load_generated(folder: str | Path) -> tuple[dict[str, Any], list[np.ndarray]]:
    info = json.loads((Path(folder) / "prompts.json").read_text())
    clips = []
    for p in info["prompts"]:
        x, rate = sf.read(str(Path(folder) / p["file"]), dtype="float32")
        if rate != info["sample_rate"]:
            raise ValueError(f"{p['file']}: {rate} Hz, expected {info['sample_rate']}")
        clips.append(x)
    return info, clips


def run(cfg: EvaluateConfig, tag_prompts: dict[str, str], generated: str | Path,
        audio_dir: str | Path, models: str | Path, metrics_dir: str | Path,
        out: str | Path, tokens: str | Path | None = None, mulan_batch: int | None = None
        ) -> dict[str, Any]:
    """Score, diagnose and report (see the module docstring). ``tokens``: the packed
    token folder (LM sensitivity, code agreement); ``mulan_batch``: MuLan's training
    batch size (its InfoNCE alarm)."""
    from cantus.tokenize.mulan.model import load_mulan

    info, gen = load_generated(generated)
    rate = info["sample_rate"]
    n = int(round(cfg.seconds * rate))

    mulan = load_mulan(Path(models) / "mulan")
    prompts = info["prompts"]
    refs = references(audio_dir, prompts, mulan, cfg, rate, n)
    real = refs.real
    for p in prompts:
        if p["kind"] == "caption" and p["key"] not in real:
            raise ValueError(f"{generated}/prompts.json names chunk {p['key']}, which is not in "
                             f"the valid split of {audio_dir}")
    resynth = codec_resynthesis(Path(models) / "codec", {k: v[0] for k, v in real.items()}, rate)
    scores, rows = score(gen, prompts, refs, mulan, cfg, tag_prompts, rate, resynth)
    stages, stage_rows = gather(metrics_dir)
    diag, diag_rows, alarm_rows = diagnose(prompts, refs, resynth, mulan, Path(models), tokens,
                                           Path(metrics_dir), tag_prompts["instruments"], rate,
                                           cfg.seed, cfg.diagnostic_clips, mulan_batch)
    # The generation speed stays in metrics/generate.json: a dep holding a time would
    # re-run this stage after every regeneration, even one that made the same audio.
    scores["generation"] = {"seconds": info["seconds"]}
    result = {"generation": scores, "diagnostics": diag, "stages": stages}
    out = Path(out)
    atomic_write_json(out / "metrics.json", result)
    atomic_write_json(out / "plots" / "scores.json",
                      [{"name": f"{r['metric']}: {r['series']}", **r} for r in rows
                       if r["value"] is not None]
                     + [{"name": f"{r['hop']}: {r['series']}", "metric": r["hop"], **r}
                        for r in diag_rows if r["value"] is not None])
    examples = []
    for i, p in enumerate(prompts[:cfg.examples] if cfg.examples else []):
        ref = real.get(p["key"]) if p["key"] else None
        examples.append({"prompt": p["prompt"], "gen": gen[i], "rate": rate,
                         "real": None if ref is None else ref[0],
                         "codec": resynth.get(p["key"]) if p["key"] else None,
                         "note": (f"{p['kind']} prompt; beside it the real valid chunk it "
                                  f"describes ({p['key']}), as it is and through the codec")
                         if ref is not None else
                         f"{p['kind']} prompt (no real reference)"})
    render(out / "report.html", {
        "intro": f"{len(prompts)} generations of {info['seconds']} s "
                 f"({scores['n_caption_prompts']} valid captions, the rest instrument prompts). "
                 "Each figure stands beside a chance level or a real-audio reference.",
        "footer": "Written by cantus.evaluate.run; the figures are in metrics.json "
                  "(dvc metrics show)."}, rows, stage_rows, examples,
           diag_rows, alarm_rows)
    return result


def _arguments(p) -> None:
    p.add_argument("--generated", required=True, help="generate-eval output folder")
    p.add_argument("--audio", required=True, help="audio shard folder")
    p.add_argument("--models", default="models", help="folder of the trained models")
    p.add_argument("--metrics", default="metrics", help="folder of the earlier stages' metrics")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--tokens", default=None,
                   help="packed token folder (LM conditioning sensitivity, code agreement)")


def _main(args) -> None:
    from cantus.tokenize.mulan.params import MulanConfig

    cfg = load_section(args.params, "evaluate", EvaluateConfig)
    mulan = load_section(args.params, "mulan", MulanConfig)
    result = run(cfg, dict(mulan.eval.prompts), args.generated, args.audio, args.models,
                 args.metrics, args.out, args.tokens, mulan.train.batch_size)
    print(json.dumps(result["generation"], indent=1, default=str))
    print(f"report: {Path(args.out) / 'report.html'}")


def main(argv: list[str] | None = None) -> int:
    from cantus.training import stage_main

    return stage_main("cantus evaluate", __doc__, _arguments, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
