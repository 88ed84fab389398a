"""Train MuLan contrastively on (audio window, caption) pairs from the audio shards.

Goes in: the ingest stage's audio shards (``{split}-NNNNNN.tar``: FLAC +
JSON with ``caption`` and ``tags``) and section ``mulan`` of params.yaml.
Comes out: ``<out>/model.safetensors`` + ``config.json`` (load with
``mulan_model.load_mulan``), numbered checkpoints in ``--checkpoints`` (a
killed run resumes exactly: model, optimiser, schedule, data position and
RNG state, each rank's own under DDP; only checkpoints of the same params,
code and shards are resumed) and dvclive curves in ``--live``.

Each step takes ``batch_size`` random windows of ``window_seconds``, turns
each sample's metadata into a text (its caption, or a random subset of its
tags in random order; see ``augment_text``) and minimises the symmetric
InfoNCE loss over in-batch negatives, gathered across ranks under DDP
(``torchrun --nproc-per-node N -m cantus.tokenize.mulan.train ...``).

    python -m cantus.tokenize.mulan.train --params params.yaml --audio data/audio \
        --out models/mulan --checkpoints checkpoints/mulan --live metrics/mulan_train
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cantus.audio_stream import AudioBatches, shard_paths
from cantus.config import config_hash, load_section
from cantus.tokenize.mulan.model import Mulan, build_mulan
from cantus.tokenize.mulan.params import MulanConfig
from cantus.training import run_id as training_run_id
from cantus.training import (Checkpoints, Metrics, distributed, gather_rank_states,
                             own_rank_state, progress, rank_seed, rng_state, save_weights,
                             set_rng_state, stage_main, warmup_cosine)

log = logging.getLogger(__name__)


# ---- captions ---------------------------------------------------------------------------

def tag_phrases(tags: dict[str, Any]) -> list[str]:
    """The tags of a sample as short phrases ("harp", "fast", "99 bpm", "F# major")."""
    out: list[str] = []
    for name, value in sorted(tags.items()):
        if value is None or name in ("transpose", "meter", "mode"):
            continue  # the key ("F# major") already says the mode; numbers alone say little
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            phrase = f"{v} bpm" if name == "tempo_bpm" else str(v).strip()
            if phrase and phrase not in out:
                out.append(phrase)
    return out


def augment_text(meta: dict[str, Any], rng: random.Random, caption_prob: float,
                 tag_keep: float) -> str:
    """A training text for one sample: its caption, or a shuffled random subset of its tags.

    Tag lists come joined by commas or as "a, b and c" so that both sentences and
    lists work as prompts. A sample without tags always gets its caption.
    """
    caption = str(meta.get("caption") or "").strip()
    phrases = tag_phrases(meta.get("tags") or {})
    if not phrases or (caption and rng.random() < caption_prob):
        return caption or "music"
    kept = [p for p in phrases if rng.random() < tag_keep] or [rng.choice(phrases)]
    rng.shuffle(kept)
    if len(kept) > 1 and rng.random() < 0.5:
        return ", ".join(kept[:-1]) + " and " + kept[-1]
    return ", ".join(kept)


def _text_rng(seed: int, step: int, rank: int, i: int) -> random.Random:
    h = hashlib.sha256(f"{seed}:{step}:{rank}:{i}:text".encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


def batch_texts(metas: list[dict], seed: int, step: int, rank: int, caption_prob: float,
                tag_keep: float) -> list[str]:
    """Texts of one batch, a pure function of (seed, step, rank): resume needs no state."""
    return [augment_text(m, _text_rng(seed, step, rank, i), caption_prob, tag_keep)
            for i, m in enumerate(metas)]


# ---- loss -------------------------------------------------------------------------------

def _gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows (with gradients flowing back to this rank's), and this rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0), dist.get_rank()


def info_nce(audio: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over in-batch (and, under DDP, cross-rank) negatives.

    Args:
        audio, text: float32[B, D] L2-normalised embeddings of B matching pairs.
        scale: the inverse temperature (a scalar tensor).
    """
    all_audio, rank = _gather(audio)
    all_text, _ = _gather(text)
    b = audio.shape[0]
    labels = torch.arange(b, device=audio.device) + rank * b
    a2t = scale * audio @ all_text.T   # (B, B * world)
    t2a = scale * text @ all_audio.T   # (B, B * world)
    return 0.5 * (F.cross_entropy(a2t, labels) + F.cross_entropy(t2a, labels))


# ---- trainer ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Inputs:
    audio: str                 # folder of audio shards
    checkpoints: str           # checkpoint folder (resumed from when it matches the config)
    live: str | None = None    # dvclive folder (None: no curves)


def _optimiser(model: Mulan, cfg: MulanConfig) -> torch.optim.Optimizer:
    t = cfg.train
    text = [p for p in model.text.parameters() if p.requires_grad]
    text_ids = {id(p) for p in text}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in text_ids]
    groups = [{"params": rest, "lr": t.lr}]
    if text:
        groups.append({"params": text, "lr": t.text_lr})
    return torch.optim.AdamW(groups, weight_decay=t.weight_decay)


def _schedule(opt: torch.optim.Optimizer, cfg: MulanConfig) -> torch.optim.lr_scheduler.LambdaLR:
    t = cfg.train

    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: warmup_cosine(step, t.warmup_steps, t.steps))  # cosine to 10%


def run_id(cfg: MulanConfig, paths: list[str]) -> str:
    """What a checkpoint must match to be resumed: params, this code, the shards."""
    return training_run_id(config_hash(cfg), "cantus.tokenize.mulan.train", paths)


def train_step(model: torch.nn.Module, opt, sched, batch: dict, texts: list[str],
               grad_clip: float) -> tuple[float, float]:
    """One optimiser step; returns (loss, temperature)."""
    core = model.module if hasattr(model, "module") else model
    audio, text = model(batch["audio"], texts)
    loss = info_nce(audio, text, core.scale())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in core.parameters() if p.requires_grad],
                                       grad_clip)
    opt.step()
    sched.step()
    return float(loss.detach()), float(1.0 / core.scale().detach())


def run(cfg: MulanConfig, inputs: Inputs, out: str | Path, device: str = "cpu",
        stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) and write the final weights to ``out``; returns a summary.

    ``stop_after`` ends the run after that many steps without writing weights,
    as a crash would (for tests of resume).
    """
    t, rank, world = cfg.train, *distributed()
    paths = shard_paths(inputs.audio, "train")
    want = run_id(cfg, paths)
    torch.manual_seed(t.seed)
    core = build_mulan(cfg.model, seed=t.seed).to(device)
    model: torch.nn.Module = core
    if world > 1:  # every trainable parameter reaches the loss (the text pooler is frozen)
        ids = [torch.device(device).index or 0] if str(device).startswith("cuda") else None
        model = torch.nn.parallel.DistributedDataParallel(core, device_ids=ids,
                                                          find_unused_parameters=False)
    if rank:  # DDP: rank 0's weights are broadcast; each rank draws its own dropout
        torch.manual_seed(rank_seed(t.seed, rank))
    opt = _optimiser(core, cfg)
    sched = _schedule(opt, cfg)
    data = AudioBatches(paths, crop_seconds=cfg.model.window_seconds,
                        sample_rate=cfg.model.sample_rate, batch_size=t.batch_size, seed=t.seed,
                        num_workers=t.num_workers, shuffle_buffer=t.shuffle_buffer, rank=rank,
                        world=world, with_meta=True, pin_memory=str(device).startswith("cuda"))
    ckpts = Checkpoints(inputs.checkpoints, t.keep_checkpoints)
    parts = {"model": core, "optimiser": opt, "schedule": sched}
    state, step = ckpts.resume(want), 0  # rank 0 alone removes stale checkpoints
    if state is not None:
        for name, part in parts.items():
            part.load_state_dict(state[name])
        own = own_rank_state(state["ranks"], str(ckpts.folder))  # this rank's RNG and data
        data.load_state_dict(own["data"])
        set_rng_state(own["rng"])
        step = int(state["step"])
    metrics = Metrics(inputs.live, resume=step > 0) if inputs.live and rank == 0 else None
    model.train()
    loss = float(state.get("last_loss", float("nan"))) if state is not None else float("nan")
    bar = progress(t.steps, initial=step, desc="mulan") if rank == 0 else None
    batches = iter(data)
    while step < t.steps and (stop_after is None or step < stop_after):
        batch = next(batches)
        texts = batch_texts(batch["meta"], t.seed, step, rank, t.caption_prob, t.tag_keep)
        batch["audio"] = batch["audio"].to(device, non_blocking=batch["audio"].is_pinned())
        loss, temp = train_step(model, opt, sched, batch, texts, t.grad_clip)
        step += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
        if rank == 0 and (step % t.log_every == 0 or step == t.steps):
            log.info("step %d loss %.4f temperature %.4f", step, loss, temp)
            if metrics is not None:
                metrics.log(step, loss=loss, temperature=temp, lr=sched.get_last_lr()[0])
        if step % t.checkpoint_every == 0 or step == t.steps:
            ranks = gather_rank_states({"data": data.state_dict(), "rng": rng_state()})
            if rank == 0:
                ckpts.save(step, {**{k: v.state_dict() for k, v in parts.items()},
                                  "ranks": ranks, "run_id": want, "last_loss": loss})
    if bar is not None:
        bar.close()
    if metrics is not None:
        metrics.close()
    summary = {"steps": step, "final_loss": loss, "run_id": want}
    if step >= t.steps and rank == 0:
        core.eval()
        summary["sha256"] = save_weights(core, out, cfg.model,
                                         extra={"trained_steps": step})
    return summary


def _arguments(p) -> None:
    p.add_argument("--audio", required=True, help="audio shard folder (train split used)")
    p.add_argument("--out", required=True, help="folder for model.safetensors + config.json")
    p.add_argument("--checkpoints", required=True, help="checkpoint folder (resumed from)")
    p.add_argument("--live", default=None, help="dvclive folder for training curves")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _main(args) -> None:
    cfg = load_section(args.params, "mulan", MulanConfig)  # before any process group
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        cuda = args.device.startswith("cuda")  # "cuda" and "cuda:N" alike
        if cuda:  # the device first: NCCL binds each rank to its current device
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if cuda else "gloo")
    summary = run(cfg, Inputs(args.audio, args.checkpoints, args.live), args.out, args.device)
    print(summary)


def main(argv: list[str] | None = None) -> int:
    return stage_main("cantus mulan train", __doc__, _arguments, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
