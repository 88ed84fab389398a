"""Generate the evaluation set: audio for valid-split captions and instrument prompts.

Goes in: the audio shards (their valid captions and the corpus's instrument
tags), the trained models, sections ``generate`` and ``evaluate``. Comes
out, in ``--out``: ``gen-NNN.wav`` (one per prompt, 24 kHz) and
``prompts.json`` (each prompt, its kind, its real reference chunk or the
instrument it names); the generation's speed goes to ``--timing`` (an uncached
metric, so the cached folder holds no wall-clock time).

    python -m cantus.evaluate.generate_eval --params params.yaml --models models \
        --audio data/audio --out data/generated --timing metrics/generate.json

Prompts of two kinds:
- ``caption``: the caption of each valid chunk (MCC, FAD, KLD against that chunk);
- ``instrument``: ``evaluate.instrument_prompt`` for every instrument tagged on
  at least ``min_instrument_count`` chunks (text adherence).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from cantus.audio_stream import iter_meta, shard_paths
from cantus.config import load_section
from cantus.shards import atomic_write_json
from cantus.generate.run import GenerateConfig, Generator, model_paths, write_wavs
from cantus.training import resolve_device

from .params import EvaluateConfig

log = logging.getLogger(__name__)


def instruments_of(meta: dict[str, Any]) -> list[str]:
    """The ``instruments`` tag of a chunk ([] when its tags are a plain list or absent)."""
    tags = meta.get("tags")
    v = (tags.get("instruments") if isinstance(tags, dict) else None) or []
    return [str(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


def build_prompts(audio_dir: str | Path, cfg: EvaluateConfig) -> list[dict[str, Any]]:
    """Caption prompts of the valid split, then one prompt per common instrument."""
    valid = list(iter_meta(shard_paths(audio_dir, "valid")))  # JSON members only: no audio
    train = list(iter_meta(shard_paths(audio_dir, "train")))
    prompts = [{"kind": "caption", "prompt": m["caption"], "key": m["key"],
                "instruments": instruments_of(m)}
               for m in valid[:cfg.max_captions] if str(m.get("caption", "")).strip()]
    counts = Counter(i for m in train + valid for i in instruments_of(m))
    for inst, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if n >= cfg.min_instrument_count:
            prompts.append({"kind": "instrument", "prompt": cfg.instrument_prompt.format(inst),
                            "key": None, "instruments": [inst]})
    if not prompts:
        raise ValueError(f"{audio_dir}: no valid captions and no instrument tags to prompt with")
    return prompts


def run(gen_cfg: GenerateConfig, cfg: EvaluateConfig, models: str | Path,
        audio_dir: str | Path, out: str | Path,
        timing: str | Path | None = None) -> dict[str, Any]:
    """Generate for every prompt into ``out``; the speed goes to ``timing`` (uncached JSON)."""
    prompts = build_prompts(audio_dir, cfg)
    gen = Generator(model_paths(models), resolve_device(gen_cfg.device))
    started = time.perf_counter()
    wavs = gen.generate([p["prompt"] for p in prompts], gen_cfg, seconds=cfg.seconds,
                        samples=1, seed=cfg.seed)
    seconds = time.perf_counter() - started
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    paths = [out / f"gen-{i:03d}.wav" for i in range(len(prompts))]
    for p, w in zip(paths, wavs):
        write_wavs(w[None], gen.sample_rate, p)
    for p, path in zip(prompts, paths):
        p["file"] = path.name
    summary = {"prompts": prompts, "sample_rate": gen.sample_rate, "seconds": cfg.seconds}
    atomic_write_json(out / "prompts.json", summary)  # cached: no wall-clock in it
    speed = {"clips": len(prompts), "seconds": cfg.seconds, "wall_seconds": round(seconds, 2),
             "realtime_factor": round(len(prompts) * cfg.seconds / max(seconds, 1e-9), 3)}
    if timing:
        atomic_write_json(timing, speed)
    log.info("generated %d clips of %.1f s in %.1f s", len(prompts), cfg.seconds, seconds)
    return {**summary, **speed}


def _arguments(p) -> None:
    p.add_argument("--models", default="models", help="folder of the trained models")
    p.add_argument("--audio", required=True, help="audio shard folder")
    p.add_argument("--out", required=True, help="folder for gen-NNN.wav + prompts.json")
    p.add_argument("--timing", default=None, help="JSON file for the generation speed")


def _main(args) -> None:
    summary = run(load_section(args.params, "generate", GenerateConfig),
                  load_section(args.params, "evaluate", EvaluateConfig),
                  args.models, args.audio, args.out, args.timing)
    print(json.dumps({k: v for k, v in summary.items() if k != "prompts"}))


def main(argv: list[str] | None = None) -> int:
    from cantus.training import stage_main

    return stage_main("cantus generate-eval", __doc__, _arguments, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
