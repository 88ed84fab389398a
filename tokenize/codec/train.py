"""Train the SoundStream codec on audio shards.

Goes in: the ingest stage's audio shards (``--shards``: ``train-*.tar`` for
training, the first ``valid-*.tar`` chunks for reconstruction samples) and the
``codec`` section of params.yaml (``model``, ``disc``, ``loss``, ``train``). Comes out:

- ``--out``: ``model.safetensors`` + ``config.json`` (load with
  ``SoundStream.load(out)``) and ``train.json`` (steps, run id, final losses;
  the time goes to the uncached ``--live`` summary);
- ``--checkpoints``: ``step-NNNNNNNN.pt`` (models, optimisers, schedulers,
  step, RNG states, data position) and ``samples/`` (wav + spectrogram PNG of
  fixed validation chunks); a killed run started again resumes from the last
  checkpoint and ends with the same weights as an uninterrupted run (CPU);
- ``--live``: dvclive curves (``dvc plots show``).

    python -m cantus.tokenize.codec.train --params params.yaml --audio data/audio \\
        --out models/codec --checkpoints checkpoints/codec --live metrics/codec_train
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cantus.audio_stream import AudioBatches, load_all, shard_paths
from cantus.config import config_hash, load_section
from cantus.shards import atomic_write_json
from cantus.tokenize.codec import losses as L
from cantus.tokenize.codec.model import SoundStream
from cantus.tokenize.codec.params import CodecParams, CodecSection, TrainConfig
from cantus.training import (Checkpoints, Metrics, progress, resolve_device, rng_state, run_id,
                             set_rng_state, stage_main, warmup_cosine)

log = logging.getLogger(__name__)


class Trainer:
    """Models, optimisers and schedulers of one codec run, and its train step."""

    def __init__(self, cfg: CodecParams, device: torch.device):
        t = cfg.train
        self.cfg, self.device = cfg, device
        self.model = SoundStream(cfg.model).to(device)
        self.disc = L.Discriminators(cfg.disc).to(device)
        self.mel = L.MultiScaleMel(cfg.model.sample_rate).to(device)
        self.opt_g = torch.optim.AdamW(self.model.parameters(), t.lr, betas=tuple(t.betas),
                                       weight_decay=t.weight_decay)
        self.opt_d = torch.optim.AdamW(self.disc.parameters(), t.disc_lr, betas=tuple(t.betas),
                                       weight_decay=t.weight_decay)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, self._lr_factor)
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, self._lr_factor)

    def _lr_factor(self, step: int) -> float:
        return warmup_cosine(step, self.cfg.train.warmup_steps, self.cfg.train.steps)

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k).state_dict()
                for k in ("model", "disc", "opt_g", "opt_d", "sched_g", "sched_d")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            getattr(self, k).load_state_dict(v)

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def _clip_step(self, opt, sched, params) -> float:
        clip = self.cfg.train.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        opt.step()
        sched.step()
        return float(norm)

    def step(self, wav: torch.Tensor, step: int) -> dict[str, float]:
        """One generator (and, after the warm-up, discriminator) update on float[B, N]."""
        w, adv = self.cfg.loss, step >= self.cfg.train.adversarial_start
        wav = wav.to(self.device)
        with self._autocast():
            recon, _, commit = self.model(wav)
            recon = recon[:, :wav.shape[1]]
        rec, wave = self.mel(wav, recon.float()), L.waveform_l1(wav, recon.float())
        out = {"reconstruction": rec.item(), "waveform": wave.item(), "commitment": commit.item()}
        loss = w.reconstruction * rec + w.waveform * wave + w.commitment * commit
        if adv:
            with self._autocast():
                d_loss = L.disc_hinge(self.disc(wav), self.disc(recon.detach()))
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self._clip_step(self.opt_d, self.sched_d, self.disc.parameters())
            with self._autocast():
                with torch.no_grad():
                    real = self.disc(wav)
                fake = self.disc(recon)
                g_adv, feat = L.gen_hinge(fake), L.feature_matching(real, fake)
            loss = loss + w.adversarial * g_adv + w.feature * feat
            out.update(disc=d_loss.item(), adversarial=g_adv.item(), feature=feat.item())
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        out["grad_norm"] = self._clip_step(self.opt_g, self.sched_g, self.model.parameters())
        out["loss"] = loss.item()
        return out


def _resume(ckpts: Checkpoints, trainer: Trainer, batches: AudioBatches,
            digest: str) -> tuple[int, dict[str, float]]:
    """Restore the newest checkpoint of this config -> (its step, its last losses)."""
    state = ckpts.latest()
    if state is None:
        return 0, {}
    if state.get("run_id") != digest:
        log.warning("checkpoints in %s are from other params, code or data: starting afresh",
                    ckpts.folder)
        for s in ckpts.steps():
            (ckpts.folder / f"step-{s:08d}.pt").unlink()
        return 0, {}
    trainer.load_state_dict(state["trainer"])
    batches.load_state_dict(state["data"])
    set_rng_state(state["rng"])
    return int(state["step"]), dict(state.get("last", {}))


def write_samples(model: SoundStream, clips: list[torch.Tensor], folder: Path,
                  metrics: Metrics | None) -> None:
    """Reconstruct fixed clips at full bitrate: wav files and one spectrogram PNG."""
    import soundfile as sf

    from cantus.tokenize.codec.evaluate import spectrogram_png

    was_training = model.training
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i, clip in enumerate(clips):
        recon = model.decode(model.encode(clip[None]))[0, :clip.shape[0]].cpu()
        sf.write(str(folder / f"clip{i}-original.wav"), clip.numpy(), model.cfg.sample_rate)
        sf.write(str(folder / f"clip{i}-codec.wav"), recon.numpy(), model.cfg.sample_rate)
        pairs.append((clip.numpy(), recon.numpy()))
    png = spectrogram_png(pairs, model.cfg.sample_rate, folder / "spectrograms.png")
    if metrics is not None:
        metrics.image("reconstruction.png", png)
    model.train(was_training)


def _clips(shards: str | Path, t: TrainConfig, rate: int) -> list[torch.Tensor]:
    try:
        paths = shard_paths(shards, "valid")
    except FileNotFoundError:
        paths = shard_paths(shards, "train")
    n = int(t.sample_seconds * rate)
    return [torch.from_numpy(x[:n].copy()) for x, _ in load_all(paths, limit=t.sample_chunks)]


def run(cfg: CodecParams, shards: str | Path, out: str | Path, work: str | Path,
        live: str | Path | None = None, stop_at: int | None = None) -> dict[str, Any]:
    """Train (or resume) a codec; ``stop_at`` ends early as a kill would, for tests."""
    t, out, work = cfg.train, Path(out), Path(work)
    torch.manual_seed(t.seed)
    if t.threads:
        torch.set_num_threads(t.threads)
    device = torch.device(resolve_device(t.device))
    trainer = Trainer(cfg, device)
    batches = AudioBatches(shard_paths(shards, "train"), crop_seconds=t.crop_seconds,
                           sample_rate=cfg.model.sample_rate, batch_size=t.batch_size,
                           seed=t.seed, num_workers=t.num_workers,
                           shuffle_buffer=t.shuffle_buffer)
    # resumed only by a run of the same params, code (the trainer's imports) and shards
    digest = run_id(config_hash(cfg), "cantus.tokenize.codec.train", shard_paths(shards, "train"))
    ckpts = Checkpoints(work, t.keep_checkpoints)
    start, last = _resume(ckpts, trainer, batches, digest)
    metrics = Metrics(live or work / "live", resume=start > 0)
    clips = _clips(shards, t, cfg.model.sample_rate)
    end = t.steps if stop_at is None else min(stop_at, t.steps)
    began, bar = time.time(), progress(end, initial=start, desc="codec")
    data = iter(batches)
    for step in range(start, end):
        last = trainer.step(next(data)["audio"], step)
        done = step + 1
        bar.update(1)
        bar.set_postfix(rec=f"{last['reconstruction']:.3f}", **(
            {"adv": f"{last['adversarial']:.2f}"} if "adversarial" in last else {}))
        if done % t.log_every == 0 or done == t.steps:
            metrics.log(done, lr=trainer.sched_g.get_last_lr()[0], **last)
            log.info("step %d/%d %s", done, t.steps,
                     " ".join(f"{k}={v:.4g}" for k, v in last.items()))
        if t.sample_every and done % t.sample_every == 0:
            write_samples(trainer.model, clips, work / "samples" / f"step-{done:08d}", metrics)
        if done % t.checkpoint_every == 0 or done == end:
            ckpts.save(done, {"trainer": trainer.state_dict(), "data": batches.state_dict(),
                              "rng": rng_state(), "run_id": digest, "last": last})
    bar.close()
    seconds = round(time.time() - began, 1)
    # train.json is a cached output: only what the weights are (no times, no resume point,
    # no run id: an edit that leaves the weights alone must leave the folder alone too)
    summary = {"steps": end, "final": last, "finished": end == t.steps}
    if end == t.steps:
        write_samples(trainer.model, clips, work / "samples" / "final", metrics)
        summary["sha256"] = trainer.model.save(out)
        atomic_write_json(out / "train.json", summary)
    metrics.summary(seconds=seconds, resumed_from=start)  # uncached metrics.json
    metrics.close()
    return {**summary, "run_id": digest, "resumed_from": start, "seconds": seconds}


def _arguments(p) -> None:
    p.add_argument("--audio", required=True, help="folder of train-*/valid-* audio shards")
    p.add_argument("--out", required=True, help="folder for model.safetensors + config.json")
    p.add_argument("--checkpoints", required=True, help="folder for checkpoints and samples")
    p.add_argument("--live", help="dvclive folder (default CHECKPOINTS/live)")


def _main(args) -> None:
    s = run(load_section(args.params, "codec", CodecSection).training(), args.audio, args.out,
            args.checkpoints, args.live)
    print(f"codec_train: {s['steps']} steps (resumed from {s['resumed_from']}) in "
          f"{s['seconds']} s -> {args.out}; " + json.dumps(s["final"]))


def main(argv: list[str] | None = None) -> int:
    return stage_main("cantus codec train", __doc__, _arguments, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
