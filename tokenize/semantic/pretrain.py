"""Self-supervised w2v-BERT pretraining on the audio shards (or record a given checkpoint).

Goes in: the train split of the ingest audio shards and the ``semantic.model``
params. Comes out, in ``--out``: the model in transformers' format
(``config.json`` + ``model.safetensors``, loadable like any local checkpoint)
and ``manifest.json`` (source, checkpoint hash, steps, final losses). With
``semantic.model.checkpoint`` set, nothing is trained: the manifest records that
folder and its hash, and the k-means stage loads the model from there.

w2v-BERT's objectives: span masking of the projected input features; the
contrastive module (lower layers) is trained with a contrastive loss between
its outputs at masked frames and targets from a learned Gumbel-softmax
codebook quantiser, plus a codebook-diversity loss; the MLM module (upper
layers) predicts the quantised target ids of masked frames with cross-entropy.
Checkpoints (model, quantiser and heads, optimiser, schedule, data position,
RNG) go to ``--checkpoints``; a rerun resumes exactly.

    python -m cantus.tokenize.semantic.pretrain --params params.yaml \
        --audio data/audio --out models/semantic \
        --checkpoints checkpoints/semantic --live metrics/semantic_pretrain
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cantus import audio, shards, training
from cantus.audio_stream import AudioBatches, load_all, shard_paths
from cantus.config import config_hash, load_section, to_dict
from cantus.tokenize.semantic import model as sm
from cantus.tokenize.semantic.params import PretrainConfig, SemanticConfig

log = logging.getLogger(__name__)


def span_mask(valid: torch.Tensor, prob: float, length: int) -> torch.Tensor:
    """Spans of ``length`` frames starting with probability ``prob``: bool[B, T].

    ``valid`` (bool[B, T]) marks real frames; every clip gets at least one span.
    """
    B, T = valid.shape
    starts = (torch.rand(B, T) < prob).to(valid.device) & valid
    first = torch.zeros_like(starts)
    first[:, 0] = True
    starts |= first & ~starts.any(1, keepdim=True)
    m = F.pad(starts.float(), (length - 1, 0)).unfold(1, length, 1).amax(-1) > 0  # (B, T)
    return m & valid


class Quantiser(nn.Module):
    """Gumbel-softmax codebook: features (B, T, F) -> targets (B, T, Dq) and ids (B, T)."""

    def __init__(self, in_dim: int, size: int, dim: int):
        super().__init__()
        self.logits = nn.Linear(in_dim, size)
        self.codevectors = nn.Parameter(torch.randn(size, dim))

    def forward(self, x: torch.Tensor, tau: float, where: torch.Tensor):
        logits = self.logits(x)                                   # (B, T, V)
        if self.training:
            onehot = F.gumbel_softmax(logits, tau=tau, hard=True)
        else:
            onehot = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
        q = onehot @ self.codevectors                             # (B, T, Dq)
        # Diversity: push the batch-mean code distribution towards uniform.
        p = logits[where].softmax(-1).mean(0)                     # (V,)
        perplexity = torch.exp(-(p * torch.log(p + 1e-7)).sum())
        diversity = (logits.shape[-1] - perplexity) / logits.shape[-1]
        return q, logits.argmax(-1), diversity, perplexity


class W2VBert(nn.Module):
    """The backbone plus the pretraining parts: quantiser, context projection, MLM head."""

    def __init__(self, backbone, codebook_size: int, codevector_dim: int):
        super().__init__()
        cfg = backbone.config
        self.backbone, self.split = backbone, sm.contrastive_layers(cfg)
        self.quantiser = Quantiser(cfg.feature_projection_input_dim, codebook_size,
                                   codevector_dim)
        self.project = nn.Linear(cfg.hidden_size, codevector_dim)
        self.mlm_head = nn.Linear(cfg.hidden_size, codebook_size)

    def forward(self, feats, attn, masked, *, tau: float, negatives: int,
                temperature: float) -> dict[str, torch.Tensor]:
        """Losses on one batch of fbank features (B, T, 160) with span mask ``masked``."""
        out = self.backbone(feats, attention_mask=attn, mask_time_indices=masked,
                            output_hidden_states=True)
        q, ids, diversity, ppl = self.quantiser(out.extract_features, tau, masked)
        ctx = self.project(out.hidden_states[self.split])          # (B, T, Dq)
        contrastive = _contrastive(ctx, q, masked, negatives, temperature)
        logits = self.mlm_head(out.last_hidden_state[masked])      # (N, V)
        mlm = F.cross_entropy(logits, ids[masked].detach())
        accuracy = (logits.argmax(-1) == ids[masked]).float().mean()
        return {"contrastive": contrastive, "diversity": diversity, "mlm": mlm,
                "perplexity": ppl.detach(), "mlm_accuracy": accuracy}


def _contrastive(ctx, q, masked, k: int, temperature: float) -> torch.Tensor:
    """InfoNCE of each masked frame's context against its target and ``k`` distractors
    drawn from the other masked frames of the same clip."""
    losses = []
    for b in range(ctx.shape[0]):
        idx = masked[b].nonzero().squeeze(1)                       # (M,)
        m = idx.shape[0]
        c, pos = ctx[b, idx], q[b, idx]                            # (M, Dq)
        if m < 2:
            continue
        r = torch.randint(0, m - 1, (m, k)).to(idx.device)
        r = r + (r >= torch.arange(m, device=idx.device)[:, None])  # never the frame itself
        cand = torch.cat([pos[:, None], pos[r]], 1)                # (M, 1+k, Dq)
        logits = F.cosine_similarity(c[:, None], cand, dim=-1) / temperature
        same = (cand[:, 1:] == pos[:, None]).all(-1)               # distractor == target
        logits[:, 1:] = logits[:, 1:].masked_fill(same, float("-inf"))
        losses.append(F.cross_entropy(logits, torch.zeros(m, dtype=torch.long,
                                                          device=idx.device)))
    if not losses:
        return ctx.sum() * 0.0
    return torch.stack(losses).mean()


def _schedule(cfg: PretrainConfig):
    return lambda step: training.warmup_cosine(step, cfg.warmup_steps, cfg.steps)


def _tau(cfg: PretrainConfig, step: int) -> float:
    t = step / max(1, cfg.steps - 1)
    return cfg.gumbel_start + (cfg.gumbel_end - cfg.gumbel_start) * min(1.0, t)


def _batch_features(front: sm.FeatureExtractor, batch: dict, rate: int, device):
    wavs = [audio.resample(a[:n].numpy(), rate, sm.SAMPLE_RATE)
            for a, n in zip(batch["audio"], batch["length"].tolist())]
    feats, attn, _ = front.fbank(wavs, sm.SAMPLE_RATE)
    return feats.to(device), attn.to(device).bool()


def step_losses(model: W2VBert, feats, attn, cfg: PretrainConfig, step: int):
    """Total loss and its parts for one batch (the span mask is drawn here)."""
    masked = span_mask(attn, cfg.mask_prob, cfg.mask_length)
    parts = model(feats, attn, masked, tau=_tau(cfg, step), negatives=cfg.num_negatives,
                  temperature=cfg.temperature)
    total = (parts["contrastive"] + cfg.diversity_weight * parts["diversity"]
             + cfg.mlm_weight * parts["mlm"])
    return total, parts


def pretrain(cfg: SemanticConfig, train_shards: list[str], out: Path,
             checkpoints: Path, metrics: Path | None = None,
             stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) and write the model to ``out``; ``stop_after`` simulates a crash.

    Runs with torch's deterministic algorithms: with more than one thread the
    default kernels of some op in this graph give other low bits from run to
    run (a demo-size step's gradients differed between two processes on 2
    threads, and not on 1), so the same inputs gave other weights. The
    deterministic ones gave equal gradients at about the same speed
    (``python bench/w2v_determinism.py``).
    """
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _pretrain(cfg, train_shards, out, checkpoints, metrics, stop_after)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _pretrain(cfg: SemanticConfig, train_shards: list[str], out: Path, checkpoints: Path,
              metrics: Path | None, stop_after: int | None) -> dict[str, Any]:
    p = cfg.pretrain
    device = training.resolve_device(p.device)
    torch.manual_seed(p.seed)
    model = W2VBert(sm.build(cfg.model.size, p.dropout, cfg.model.utterance_norm), p.codebook_size,
                    p.codevector_dim).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(p))
    rate = load_all(train_shards[:1], limit=1)[0][1]["sample_rate"]
    data = AudioBatches(train_shards, crop_seconds=p.crop_seconds, sample_rate=rate,
                        batch_size=p.batch_size, seed=p.seed, num_workers=p.num_workers)
    ckpts, step, last = training.Checkpoints(checkpoints, p.keep_checkpoints), 0, {}
    if (state := ckpts.latest()) is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        data.load_state_dict(state["data"])
        training.set_rng_state(state["rng"])
        step = int(state["step"])
        last = dict(state.get("last", {}))  # a resumed finished run reports the same losses
    front = sm.FeatureExtractor(model.backbone)
    live = training.Metrics(metrics, resume=step > 0) if metrics else None
    bar = training.progress(p.steps, step, "w2v-BERT")
    model.train()
    batches = iter(data)
    while step < p.steps and (stop_after is None or step < stop_after):
        feats, attn = _batch_features(front, next(batches), rate, device)
        total, parts = step_losses(model, feats, attn, p, step)
        opt.zero_grad(set_to_none=True)
        total.backward()
        if p.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        last = {"loss": total.item(), **{k: v.item() for k, v in parts.items()}}
        if live and (step % p.log_every == 0 or step == p.steps):
            live.log(step, **last, lr=sched.get_last_lr()[0])
        if step % p.log_every == 0:
            log.info("step %d %s", step, " ".join(f"{k}={v:.4f}" for k, v in last.items()))
        if step % p.checkpoint_every == 0 or step == p.steps:
            ckpts.save(step, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                              "scheduler": sched.state_dict(), "data": data.state_dict(),
                              "rng": training.rng_state(), "last": last})
    bar.close()
    if live:
        live.close()
    if step < p.steps:
        return {"step": step, "finished": False}
    return _export(model, cfg, out, step, last)


def _export(model: W2VBert, cfg: SemanticConfig, out: Path, step: int,
            last: dict[str, float]) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out.mkdir(parents=True, exist_ok=True)
    model.backbone.to("cpu").save_pretrained(str(out))
    summary = {"source": "pretrained", "checkpoint": str(out), "size": cfg.model.size,
               "hash": sm.checkpoint_hash(out), "steps": step, "final": last,
               "params": _params(cfg)}
    shards.atomic_write_json(out / "manifest.json", summary)
    return summary


def run(cfg: SemanticConfig, shards_dir: str | Path, out: str | Path,
        checkpoints: str | Path, metrics: str | Path | None = None) -> dict[str, Any]:
    """Pretrain when no checkpoint is given; otherwise record the checkpoint's hash."""
    out = Path(out)
    if cfg.model.checkpoint:
        ck = Path(cfg.model.checkpoint).resolve()
        sm.load(ck)  # fail now, not in the k-means stage, if it cannot be loaded
        out.mkdir(parents=True, exist_ok=True)
        summary = {"source": "checkpoint", "checkpoint": str(ck),
                   "hash": sm.checkpoint_hash(ck), "params": _params(cfg)}
        shards.atomic_write_json(out / "manifest.json", summary)
        return summary
    # Checkpoints are resumed only by a run of the same params, code and shards: each run
    # id (cantus.training.run_id) has its own folder.
    paths = shard_paths(shards_dir, "train")
    return pretrain(cfg, paths, out, Path(checkpoints) / run_id(cfg, paths),
                    Path(metrics) if metrics else None)


def run_id(cfg: SemanticConfig, paths: list[str]) -> str:
    """The checkpoint folder's name: params, this trainer's code (its imports) and the shards."""
    return training.run_id(config_hash(_params(cfg)), "cantus.tokenize.semantic.pretrain", paths)


def _params(cfg: SemanticConfig) -> dict[str, Any]:
    """The params this stage reads: ``semantic.model`` and ``semantic.pretrain``."""
    return {"model": to_dict(cfg.model), "pretrain": to_dict(cfg.pretrain)}


def model_dir(out: str | Path) -> Path:
    """The folder holding the weights a pretraining stage output refers to."""
    import json

    manifest = json.loads((Path(out) / "manifest.json").read_text())
    return Path(manifest["checkpoint"]) if manifest["source"] == "checkpoint" else Path(out)


def _arguments(ap) -> None:
    ap.add_argument("--audio", required=True, help="audio shard folder (ingest output)")
    ap.add_argument("--out", required=True, help="model folder")
    ap.add_argument("--checkpoints", required=True, help="resumable checkpoints folder")
    ap.add_argument("--live", default=None, help="dvclive folder for the curves")


def _main(args) -> None:
    cfg = load_section(args.params, "semantic", SemanticConfig)
    summary = run(cfg, args.audio, args.out, args.checkpoints, args.live)
    print({k: v for k, v in summary.items() if k != "params"})


def main(argv: list[str] | None = None) -> int:
    return training.stage_main("cantus semantic pretrain", __doc__, _arguments, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
