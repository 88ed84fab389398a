"""Evaluate a trained codec against Opus on the valid split.

Goes in: a codec folder (``--model``: ``model.safetensors`` + ``config.json``),
audio shards (``--shards``: ``valid-*.tar``) and the ``codec.eval`` section of
params.yaml. Comes out: a metrics JSON (``--out``) with, for the codec at each
bitrate in ``bitrates_kbps`` and for Opus at ``opus_kbps`` (libopus through
PyAV, on the same audio):

- ``mel_distance``: mean |log10 mel - log10 mel'| (80 mels, windows 512,
  1024 and 2048, hop 1/4 window, magnitudes floored at 1e-5), lower is better;
- ``stft_distance``: multi-resolution STFT distance (spectral convergence +
  log-magnitude L1, the same three windows), lower is better;
- ``si_sdr``: scale-invariant SDR in dB, higher is better;

and the codebook usage of the full-rate codes: fraction of codes used and
perplexity per level.

    python -m cantus.tokenize.codec.evaluate --params params.yaml --audio data/audio \\
        --model models/codec --out metrics/codec.json
"""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cantus.audio import resample
from cantus.audio_stream import load_all, shard_paths
from cantus.config import load_section
from cantus.shards import atomic_write_json
from cantus.tokenize.codec.params import CodecSection, EvalConfig

log = logging.getLogger(__name__)
WINDOWS = (512, 1024, 2048)


def _mels(rate: int) -> list:
    import torchaudio

    return [torchaudio.transforms.MelSpectrogram(rate, n_fft=w, hop_length=w // 4, n_mels=80,
                                                 power=1.0, norm="slaney", mel_scale="slaney")
            for w in WINDOWS]


def mel_distance(ref: np.ndarray, est: np.ndarray, rate: int) -> float:
    """Mean L1 distance of log10 mel magnitudes over three windows (float[N] each)."""
    r, e = torch.from_numpy(ref)[None].float(), torch.from_numpy(est)[None].float()
    d = [(m(r).clamp_min(1e-5).log10() - m(e).clamp_min(1e-5).log10()).abs().mean()
         for m in _mels(rate)]
    return float(sum(d) / len(d))


def stft_distance(ref: np.ndarray, est: np.ndarray) -> float:
    """Multi-resolution STFT distance: spectral convergence + log-magnitude L1."""
    r, e = torch.from_numpy(ref).float(), torch.from_numpy(est).float()
    total = 0.0
    for w in WINDOWS:
        win = torch.hann_window(w)
        sr = torch.stft(r, w, w // 4, window=win, return_complex=True).abs()
        se = torch.stft(e, w, w // 4, window=win, return_complex=True).abs()
        sc = torch.linalg.norm(sr - se) / torch.linalg.norm(sr).clamp_min(1e-8)
        mag = (sr.clamp_min(1e-7).log() - se.clamp_min(1e-7).log()).abs().mean()
        total += float(sc + mag)
    return total / len(WINDOWS)


def si_sdr(ref: np.ndarray, est: np.ndarray) -> float:
    """Scale-invariant signal-to-distortion ratio in dB."""
    r, e = ref.astype(np.float64) - ref.mean(), est.astype(np.float64) - est.mean()
    target = (e @ r) / max(r @ r, 1e-12) * r
    noise = e - target
    return float(10 * np.log10(max(target @ target, 1e-12) / max(noise @ noise, 1e-12)))


def opus_roundtrip(x: np.ndarray, rate: int, kbps: float) -> np.ndarray:
    """Encode float32[N] with libopus at ``kbps`` (Ogg, through PyAV) and decode it back."""
    import av

    opus_rate = rate if rate in (8000, 12000, 16000, 24000, 48000) else 48000
    src = resample(x, rate, opus_rate)
    buf = io.BytesIO()
    with av.open(buf, "w", format="ogg") as out:
        stream = out.add_stream("libopus", rate=opus_rate, layout="mono")
        stream.bit_rate = int(kbps * 1000)
        pcm = np.clip(np.round(src * 32767), -32768, 32767).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.rate = opus_rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    buf.seek(0)
    with av.open(buf) as inp:
        s = inp.streams.audio[0]
        dec_rate = s.rate
        y = np.concatenate([f.to_ndarray().reshape(-1) for f in inp.decode(s)])
    y = resample(y.astype(np.float32), dec_rate, rate)
    return _align(x, y)


def _align(ref: np.ndarray, est: np.ndarray, max_lag: int = 1200) -> np.ndarray:
    """Shift ``est`` by the lag (|lag| <= max_lag) that best matches ``ref``; same length."""
    from scipy.signal import correlate

    n = min(len(ref), len(est), 5 * 24000)
    c = correlate(est[:n + max_lag], ref[:n], mode="full", method="fft")
    zero = n - 1
    lags = np.arange(-max_lag, max_lag + 1)
    lag = int(lags[np.argmax(c[zero - max_lag: zero + max_lag + 1])])
    est = est[lag:] if lag >= 0 else np.concatenate([np.zeros(-lag, est.dtype), est])
    out = np.zeros_like(ref)
    out[:min(len(ref), len(est))] = est[:len(ref)]
    return out


def quality(ref: np.ndarray, est: np.ndarray, rate: int) -> dict[str, float]:
    return {"mel_distance": mel_distance(ref, est, rate), "stft_distance": stft_distance(ref, est),
            "si_sdr": si_sdr(ref, est)}


def codebook_usage(codes: list[np.ndarray], codebook_size: int) -> dict[str, list[float]]:
    """Per level: fraction of codes used, and perplexity, over uint16[n_q, T] arrays."""
    allc = np.concatenate(codes, axis=1)  # (n_q, sum T)
    used, ppl = [], []
    for level in allc:
        p = np.bincount(level.astype(np.int64), minlength=codebook_size) / level.size
        used.append(round(float((p > 0).mean()), 4))
        nz = p[p > 0]
        ppl.append(round(float(np.exp(-(nz * np.log(nz)).sum())), 2))
    return {"used_fraction": used, "perplexity": ppl}


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0]}


def _encode_all(model, clips: list[np.ndarray], batch: int, device) -> list[np.ndarray]:
    """Codes uint16[n_q, T] of each clip (batched, zero-padded to the longest)."""
    out = []
    for i in range(0, len(clips), batch):
        part = clips[i:i + batch]
        n = max(len(c) for c in part)
        x = torch.zeros(len(part), n)
        for j, c in enumerate(part):
            x[j, :len(c)] = torch.from_numpy(c)
        codes = model.encode(x.to(device)).cpu()
        hop = model.cfg.hop
        out += [codes[j, :, :-(-len(c) // hop)].numpy() for j, c in enumerate(part)]
    return out


def run(cfg: EvalConfig, shards: str | Path, model_dir: str | Path,
        out: str | Path | None = None) -> dict[str, Any]:
    """Codec at each bitrate and Opus on the same clips -> metrics dict (and JSON)."""
    from cantus.tokenize.codec.model import SoundStream

    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else (
        "cpu" if cfg.device == "auto" else cfg.device)
    model = SoundStream.load(model_dir, device=device)
    rate, per_level = model.cfg.sample_rate, model.cfg.kbps(1)
    items = load_all(shard_paths(shards, cfg.split), limit=cfg.max_chunks or None)
    n = int(cfg.max_seconds * rate) if cfg.max_seconds else None
    clips = [x[:n].astype(np.float32) for x, _ in items]
    codes = _encode_all(model, clips, cfg.batch_size, device)
    result: dict[str, Any] = {"chunks": len(clips), "seconds": round(sum(map(len, clips)) / rate, 2)}
    for kbps in cfg.bitrates_kbps:
        n_q = max(1, min(model.cfg.n_q, round(kbps / per_level)))
        rows = []
        for clip, c in zip(clips, codes):
            wav = model.decode(torch.from_numpy(c.astype(np.int32))[None], n_q=n_q)
            rows.append(quality(clip, wav[0, :len(clip)].cpu().numpy(), rate))
        result[f"codec_{kbps:g}kbps"] = {"n_q": n_q, **_mean(rows)}
    rows = [quality(c, opus_roundtrip(c, rate, cfg.opus_kbps), rate) for c in clips]
    result[f"opus_{cfg.opus_kbps:g}kbps"] = _mean(rows)
    result["usage"] = codebook_usage(codes, model.cfg.codebook_size)
    full = result[f"codec_{max(cfg.bitrates_kbps):g}kbps"]["mel_distance"]
    result["beats_opus_mel"] = bool(full < result[f"opus_{cfg.opus_kbps:g}kbps"]["mel_distance"])
    if out is not None:
        atomic_write_json(out, result)
    return result


def spectrogram_png(pairs: list[tuple[np.ndarray, np.ndarray]], rate: int,
                    path: str | Path) -> Path:
    """Log-mel spectrograms of (original, reconstruction) pairs, one row per pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mel = _mels(rate)[1]
    fig, axes = plt.subplots(len(pairs), 2, figsize=(10, 2.2 * len(pairs)), squeeze=False)
    for row, (a, b) in zip(axes, pairs):
        for ax, x, title in zip(row, (a, b), ("original", "codec")):
            m = mel(torch.from_numpy(np.ascontiguousarray(x)).float()).clamp_min(1e-5).log10()
            ax.imshow(m.numpy(), origin="lower", aspect="auto", vmin=-5, vmax=float(m.max()))
            ax.set_title(title, fontsize=9)
            ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _arguments(p) -> None:
    p.add_argument("--audio", required=True, help="audio shard folder (ingest output)")
    p.add_argument("--model", required=True, help="codec folder (model.safetensors + config.json)")
    p.add_argument("--out", required=True, help="metrics JSON to write")


def _main(args) -> None:
    cfg = load_section(args.params, "codec", CodecSection).eval
    result = run(cfg, args.audio, args.model, args.out)
    for k, v in result.items():
        if isinstance(v, dict) and "mel_distance" in v:
            print(f"{k:>14}: mel {v['mel_distance']:.3f}  stft {v['stft_distance']:.3f}  "
                  f"si-sdr {v['si_sdr']:.2f} dB")
    print(f"beats Opus on mel distance: {result['beats_opus_mel']}")


def main(argv: list[str] | None = None) -> int:
    from cantus.training import stage_main

    return stage_main("cantus codec eval", __doc__, _arguments, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
