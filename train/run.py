"""Train one LM stage (semantic, coarse or fine) from token shards.

Goes in: a token folder (``cantus.tokens``; its manifest must match
``lm.tokens.expect``) and section ``lm`` of params.yaml. Comes out: the
trained stage in ``--out`` (``model.safetensors`` + ``config.json``; load
with ``stage.load_stage``), numbered checkpoints in ``--checkpoints`` (a
killed run resumes exactly: model, optimiser, data position and RNG state;
only checkpoints of the same params, code and shards are resumed; under DDP
each rank's RNG and data position are saved and restored) and
dvclive curves in ``--live``: training loss, lr, tokens/s, and validation
loss / perplexity beside the perplexity of a unigram model of the same
tokens (the floor of a model that learned nothing).

One loop for all three stages, set by the stage's ``Layout``: AdamW,
warm-up + cosine (``lr_at``), gradient accumulation, clipping, bf16 autocast
and optional ``torch.compile`` on CUDA, DDP under torchrun (NCCL, or gloo on
CPU; each rank draws its own dropout masks). Under ``torch.compile`` every
batch is padded to the layout's full length, so one graph serves every step
(a batch's length varies with its crops). The loss is the cross-entropy of
each target token over the codes of its own codebook block.

    python -m cantus.train.run --stage semantic --params params.yaml \
        --tokens data/tokens --out models/lm_semantic \
        --checkpoints checkpoints/lm_semantic --live metrics/lm_semantic
    torchrun --nproc-per-node 2 -m cantus.train.run --stage coarse ...
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cantus.audio_stream import shard_paths
from cantus.config import config_hash
from cantus.dataset_version import of_folder as dataset_version
from cantus.shards import atomic_write_json
from cantus.tokens import check_manifest, read_manifest
from cantus.training import (Checkpoints, Metrics, distributed, gather_rank_states,
                             own_rank_state, progress, rank_seed, rng_state, set_rng_state,
                             stage_main, warmup_cosine)
from cantus.training import run_id as training_run_id

from .data import TokenBatches, batched, fixed_crops
from .layout import STAGES, Layout
from .stage import (LMConfig, StageConfig, TokensConfig, TrainConfig, build_model, load_lm,
                    make_layout, save_stage, token_sizes)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inputs:
    tokens: str                # token folder (train-*.tar, valid-*.tar, manifest.json)
    checkpoints: str           # checkpoint folder (resumed from when it matches)
    live: str | None = None    # dvclive folder (None: no curves)
    expect: dict | None = None  # more manifest entries to require (e.g. checkpoint hashes)


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up, cosine decay."""
    return t.lr * warmup_cosine(step, t.warmup_steps, t.steps, t.min_lr_ratio)


def _all_sum(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if distributed()[1] > 1:
        dist.all_reduce(x)
    return x


def stage_loss(model: torch.nn.Module, head: torch.Tensor, batch: dict[str, torch.Tensor],
               layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, number of target tokens) of one batch.

    Position i predicts id i + 1 where that id is a target; each prediction is
    scored over the K codes of its own block only (``head``: the tied output rows).
    """
    ids, blocks = batch["ids"], batch["block"]
    cond = batch["cond"][:, :-1] if "cond" in batch else None  # (B, T-1, C): aligned
    h = model(ids[:, :-1], head=False, cond=cond)              # (B, T-1, D)
    mask = batch["target"][:, 1:]
    h, tgt, blk = h[mask], ids[:, 1:][mask], blocks[:, 1:][mask]  # (N, D), (N,), (N,)
    total = h.new_zeros((), dtype=torch.float32)
    for b in layout.target_blocks.tolist():
        sel = blk == b
        lo, hi = layout.block_range(b)
        logits = h[sel] @ head[lo:hi].T                        # (Nb, K of the block)
        total = total + F.cross_entropy(logits.float(), tgt[sel] - lo, reduction="sum")
    return total, mask.sum()


def pad_to(batch: dict[str, Any], length: int) -> dict[str, Any]:
    """A collated batch padded on the right to ``length`` columns (ids 0, block -1, no
    target): the causal model and the target mask leave every real position as it was."""
    n = batch["ids"].shape[1]
    if n >= length:
        return batch
    fill = {"ids": 0, "block": -1, "target": False}
    out = {**batch, **{k: F.pad(batch[k], (0, length - n), value=v) for k, v in fill.items()}}
    if "cond" in batch:
        out["cond"] = F.pad(batch["cond"], (0, 0, 0, length - n), value=-1)
    return out


def _autocast(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model: torch.nn.Module, core, opt: torch.optim.Optimizer, micro: list[dict],
               layout: Layout, t: TrainConfig, step: int, device: torch.device) -> float:
    """One optimiser step over ``micro`` batches; returns the mean loss over all ranks.

    Every token weighs the same however tokens split over micro-batches and
    ranks: each rank divides its summed loss by the global target count / world
    (DDP averages gradients over ranks).
    """
    world = distributed()[1]
    count = _all_sum(sum(m["target"][:, 1:].sum() for m in micro).to(device).float())
    scale = world / count.clamp(min=1)
    summed = torch.zeros((), device=device)
    for i, m in enumerate(micro):
        # non_blocking copies only from pinned memory (TokenBatches pins on CUDA)
        m = {k: v.to(device, non_blocking=v.is_pinned()) for k, v in m.items()
             if torch.is_tensor(v)}
        sync = i == len(micro) - 1 or not hasattr(model, "no_sync")
        with (contextlib.nullcontext() if sync else model.no_sync()), _autocast(device, t.bf16):
            loss, _ = stage_loss(model, core.embed.weight, m, layout)
        (loss * scale).backward()
        summed += loss.detach()
    if t.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(core.parameters(), t.grad_clip)
    for g in opt.param_groups:
        g["lr"] = lr_at(step, t)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(_all_sum(summed) / count.clamp(min=1))


def optimiser(core: torch.nn.Module, t: TrainConfig, device: torch.device):
    decay = [p for n, p in core.named_parameters() if p.dim() >= 2 and "embed" not in n
             and "rel_bias" not in n]
    ids = {id(p) for p in decay}
    rest = [p for p in core.parameters() if id(p) not in ids]
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), **fused)


@torch.no_grad()
def evaluate(core, layout: Layout, batches: list[dict], device: torch.device, bf16: bool
             ) -> float:
    """Mean cross-entropy (nats per target token) of fixed batches."""
    was = core.training
    core.eval()
    total, count = 0.0, 0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items() if torch.is_tensor(v)}
        with _autocast(device, bf16):
            loss, n = stage_loss(core, core.embed.weight, b, layout)
        total, count = total + float(loss), count + int(n)
    core.train(was)
    return total / max(1, count)


def unigram_nll(layout: Layout, train: list[dict], valid: list[dict]) -> float:
    """Validation cross-entropy of a per-block unigram model counted on training crops
    (add-one smoothing): what a model that ignores all context would reach."""
    counts = torch.ones(layout.null_id, dtype=torch.float64)
    for b in train:
        m = b["target"]
        counts.index_add_(0, b["ids"][m], torch.ones(int(m.sum()), dtype=torch.float64))
    logp = torch.empty_like(counts)
    for b in range(len(layout.blocks)):
        lo, hi = layout.block_range(b)
        logp[lo:hi] = (counts[lo:hi] / counts[lo:hi].sum()).log()
    nll, n = 0.0, 0
    for b in valid:
        m = b["target"]
        nll, n = nll - float(logp[b["ids"][m]].sum()), n + int(m.sum())
    return nll / max(1, n)


def run_id(stage: str, cfg: StageConfig, tokens: TokensConfig, paths: list[str]) -> str:
    """What a checkpoint must match to be resumed: params, this code, the shards."""
    head = f"{stage}:{config_hash(cfg)}:{config_hash(tokens)}"
    return training_run_id(head, "cantus.train.run", paths)


def expected_tokenizers(tokens: TokensConfig, extra: dict | None = None) -> dict[str, dict]:
    """The manifest entries a run requires: the levels its layout assumes, ``lm.tokens.expect``
    and ``extra`` (e.g. the checkpoint hashes of the tokenizers a generator will use). The
    codebook sizes are the manifest's own (``token_sizes``)."""
    expect = {"acoustic": {"n_q": tokens.acoustic_levels},
              "mulan": {"levels": tokens.mulan_levels}}
    for more in (json.loads(json.dumps(dict(tokens.expect), default=dict)), extra or {}):
        for name, entries in more.items():
            expect.setdefault(name, {}).update(entries)
    return expect


def _check_tokens(folder: str, tokens: TokensConfig, extra: dict | None) -> dict[str, int]:
    """Refuse shards whose manifest differs from what the run expects; their codebook sizes."""
    return token_sizes(check_manifest(folder, expected_tokenizers(tokens, extra)))


def _setup(stage: str, cfg: LMConfig, inputs: Inputs, device: torch.device):
    """Layout, model (DDP-wrapped, compiled), optimiser, data, fixed evaluation batches."""
    scfg: StageConfig = getattr(cfg, stage)
    t, (rank, world) = scfg.train, distributed()
    sizes = _check_tokens(inputs.tokens, cfg.tokens, inputs.expect)
    layout = make_layout(cfg.tokens, stage, scfg, sizes)
    paths = shard_paths(inputs.tokens, "train")
    torch.manual_seed(t.seed)
    core = build_model(scfg.model, layout).to(device)
    model: torch.nn.Module = core
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(core, device_ids=ids)
    if rank:  # DDP: rank 0's weights are broadcast; each rank draws its own dropout
        torch.manual_seed(rank_seed(t.seed, rank))
    compiled = t.compile and device.type == "cuda"
    if compiled:  # one static shape: batches are padded to layout.max_len (pad_to)
        model = torch.compile(model, dynamic=False)
    data = TokenBatches(paths, layout, batch_size=t.batch_size, seed=t.seed,
                        cond_dropout=scfg.cond_dropout, num_workers=t.num_workers,
                        shuffle_buffer=t.shuffle_buffer, rank=rank, world=world,
                        pin_memory=device.type == "cuda")
    valid = list(batched(fixed_crops(shard_paths(inputs.tokens, "valid"), layout,
                                     t.valid_samples, t.seed), t.batch_size))
    train_fixed = list(batched(fixed_crops(paths, layout, t.unigram_samples, t.seed), 64))
    unigram = unigram_nll(layout, train_fixed, valid)
    return layout, core, model, optimiser(core, t, device), data, valid, unigram, \
        run_id(stage, scfg, cfg.tokens, paths), layout.max_len if compiled else 0


def run(cfg: LMConfig, stage: str, inputs: Inputs, out: str | Path | None,
        device: str | None = None, stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) stage ``stage``; writes the trained stage to ``out``; returns a summary.

    ``stop_after`` ends the run after that many steps without writing weights,
    as a crash would (for tests of resume). ``summary["losses"]`` are the
    training losses of the steps this call ran.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t, (rank, world) = getattr(cfg, stage).train, distributed()
    layout, core, model, opt, data, valid, unigram, want, length = _setup(stage, cfg, inputs,
                                                                          dev)
    ckpts, step = Checkpoints(inputs.checkpoints, t.keep_checkpoints), 0
    state = ckpts.resume(want)
    if state is not None:
        core.load_state_dict(state["model"])
        opt.load_state_dict(state["optimiser"])
        own = own_rank_state(state["ranks"], str(ckpts.folder))  # this rank's RNG and data
        data.load_state_dict(own["data"])
        set_rng_state(own["rng"])
        step = int(state["step"])
    metrics = Metrics(inputs.live, resume=step > 0) if inputs.live and rank == 0 else None
    bar = progress(t.steps, initial=step, desc=f"lm {stage}") if rank == 0 else None
    losses, val, tokens, started = [], float("nan"), 0, time.perf_counter()
    batches = iter(data)
    model.train()
    while step < t.steps and (stop_after is None or step < stop_after):
        micro = [pad_to(next(batches), length) for _ in range(t.grad_accum)]
        tokens += sum(int((m["block"] >= 0).sum()) for m in micro) * world
        losses.append(train_step(model, core, opt, micro, layout, t, step, dev))
        step += 1
        rate = tokens / max(1e-9, time.perf_counter() - started)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:.0f}")
        row = {}
        if step % t.log_every == 0 or step == t.steps:
            row = {"train_loss": losses[-1], "lr": lr_at(step - 1, t)}
        if step % t.valid_every == 0 or step == t.steps:
            val = evaluate(core, layout, valid, dev, t.bf16)
            row.update(val_loss=val, val_ppl=math.exp(val), unigram_ppl=math.exp(unigram))
            log.info("%s step %d: val ppl %.1f (unigram %.1f)", stage, step, math.exp(val),
                     math.exp(unigram))
        if metrics is not None and row:
            metrics.log(step, **row)
        if step % t.checkpoint_every == 0 or step == t.steps:
            ranks = gather_rank_states({"data": data.state_dict(), "rng": rng_state()})
            if rank == 0:
                ckpts.save(step, {"model": core.state_dict(), "optimiser": opt.state_dict(),
                                  "ranks": ranks, "run_id": want})
    if bar is not None:
        bar.close()
    if val != val and step >= t.steps:  # resumed a finished run: score the weights it holds
        val = evaluate(core, layout, valid, dev, t.bf16)
    seconds = time.perf_counter() - started
    summary = {"stage": stage, "steps": step, "losses": losses, "val_loss": val,
               "val_ppl": math.exp(val) if val == val else val,
               "unigram_ppl": math.exp(unigram), "seconds": seconds,
               "tokens_per_s": tokens / max(1e-9, seconds), "params": core.num_params()}
    if step >= t.steps and out is not None and rank == 0:
        # the tokenizers the stage was trained on, so a generator can refuse others
        tokenizers = read_manifest(inputs.tokens).get("tokenizers", {})
        # config.json is cached: no times or throughput in it (they go to metrics.json)
        kept = {k: v for k, v in summary.items() if k not in ("losses", "seconds", "tokens_per_s")}
        summary["sha256"] = save_stage(core, layout, cfg.tokens, out,
                                       extra={"summary": kept, "tokenizers": tokenizers,
                                              # printed by `cantus generate`
                                              "dataset_version": dataset_version(inputs.tokens)})
    if metrics is not None:
        metrics.close()
        # evaluate depends on metrics.json: times go beside it, in a file no stage reads
        atomic_write_json(Path(inputs.live) / "timing.json",
                          {"seconds": round(seconds, 2), "steps_run": len(losses),
                           "tokens_per_s": round(summary["tokens_per_s"], 1)})
    return summary


def _arguments(p) -> None:
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--tokens", required=True, help="token folder (data/tokens)")
    p.add_argument("--out", required=True, help="trained stage folder")
    p.add_argument("--checkpoints", required=True)
    p.add_argument("--live", default=None, help="dvclive folder")
    p.add_argument("--expect", default=None,
                   help="JSON file of more manifest 'tokenizers' entries to require")
    p.add_argument("--device", default=None)


def _main(a) -> None:
    cfg = load_lm(a.params)
    expect = json.loads(Path(a.expect).read_text()) if a.expect else None
    device = a.device
    if "WORLD_SIZE" in os.environ:
        import torch.distributed as dist

        cuda = torch.cuda.is_available() and a.device != "cpu"
        if cuda:  # the device first: NCCL binds each rank to its current device
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        dist.init_process_group("nccl" if cuda else "gloo")
    summary = run(cfg, a.stage, Inputs(a.tokens, a.checkpoints, a.live, expect), a.out, device)
    if distributed()[0] == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=2))
    if "WORLD_SIZE" in os.environ:
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    return stage_main("cantus train", __doc__.split("\n\n")[0], _arguments, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
