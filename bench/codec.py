"""Benchmark the SoundStream codec against EnCodec and its own modules' forward, one CPU thread.

Measured in one run, side by side (interleaved, best of ``--rounds``), for the
demo and the paper sizes on ``--seconds`` of audio. Weights do not change the
speed, so freshly initialised models are timed (k-means initialisation is run
once so the codebooks are real):

- ``encode`` / ``decode`` (the path ``tokenize/codec/cpu.py`` chooses for this
  machine: its time-major path or the modules' forward; the one-time choice is
  made, and timed, in the warm-up);
- the modules' channels-first forward (encoder + RVQ, RVQ + decoder);
- EnCodec 24 kHz at 6 kbps, random weights (``pip install --no-deps encodec
  einops``, bench-only), ``encode`` / ``decode``.

Targets (paper size): encode >= 1.1x EnCodec's speed, decode >= 1.0x, and
never slower than the plain forward. Prints the CPU's ISA, cores and whether
the ``cantus.kernels`` caps are set; to time what an AVX2 machine runs:

    python bench/codec.py [--seconds 10] [--rounds 7]
    env $(python -m cantus.kernels --env avx2) python bench/codec.py

With CUDA: encode and decode throughput in audio-hours per second at batch 64 (bf16).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections.abc import Callable

import torch

from cantus import kernels
from cantus.tokenize.codec import cpu as codec_cpu
from cantus.tokenize.codec.model import CodecConfig, SoundStream


def build(size: str) -> SoundStream:
    torch.manual_seed(0)
    model = SoundStream(getattr(CodecConfig, size)())
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 24000) * 0.1)  # k-means init of the codebooks
    return model.eval()


def encodec_model() -> torch.nn.Module | None:
    """EnCodec 24 kHz at 6 kbps with random weights, or None without the package."""
    try:
        import encodec
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its weight_norm deprecation
        model = encodec.EncodecModel.encodec_model_24khz(pretrained=False)
    model.set_target_bandwidth(6.0)
    return model.eval()


def best_times(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """name -> best seconds of ``rounds`` interleaved runs (after one warm-up each)."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def cpu_times(model: SoundStream, enc: torch.nn.Module | None, seconds: float,
              rounds: int) -> dict[str, float]:
    """Seconds per call of encode/decode (chosen path), the modules' forward and EnCodec's."""
    wav = torch.randn(1, int(seconds * model.cfg.sample_rate)) * 0.1
    start = time.perf_counter()
    codes = model.encode(wav)  # the first call chooses the path (measured once, cached)
    model.decode(codes)
    first = time.perf_counter() - start

    @torch.inference_mode()
    def modules_encode():
        return model.quantizer.encode(model.encoder(wav[:, None]).float())

    @torch.inference_mode()
    def modules_decode():
        return model.decoder(model.quantizer.decode(codes.long()))

    fns = {"encode": lambda: model.encode(wav), "decode": lambda: model.decode(codes),
           "encode_forward": modules_encode, "decode_forward": modules_decode}
    if enc is not None:
        x = wav[:, None]
        with torch.inference_mode():
            frames = enc.encode(x)
        fns["encode_encodec"] = torch.inference_mode()(lambda: enc.encode(x))
        fns["decode_encodec"] = torch.inference_mode()(lambda: enc.decode(frames))
    return best_times(fns, rounds) | {"first_calls": first}


def gpu_throughput(model: SoundStream, seconds: float, batch: int = 64) -> dict[str, float]:
    model = model.cuda()
    wav = torch.randn(batch, int(seconds * model.cfg.sample_rate), device="cuda") * 0.1
    with torch.autocast("cuda", dtype=torch.bfloat16):
        codes = model.encode(wav)

        def enc():
            model.encode(wav)
            torch.cuda.synchronize()

        def dec():
            model.decode(codes)
            torch.cuda.synchronize()

        hours = batch * seconds / 3600
        times = best_times({"encode": enc, "decode": dec}, 3)
        return {k: hours / t for k, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--sizes", nargs="+", default=["demo", "paper"])
    args = p.parse_args()
    threads = torch.get_num_threads()  # restored for the GPU part
    torch.set_num_threads(1)
    print(kernels.describe())
    print(f"one CPU thread, {args.seconds:g} s of 24 kHz audio, 6 kbps (12 x 1024), "
          f"best of {args.rounds}, interleaved; CANTUS_CODEC_PATH="
          f"{os.environ.get('CANTUS_CODEC_PATH', 'auto')}")
    enc = encodec_model()
    if enc is None:
        print("encodec not installed (pip install --no-deps encodec einops): not timed")
    models = {size: build(size) for size in args.sizes}
    s = args.seconds
    print(f"{'model':<9}{'params':>8}{'encode RTF':>12}{'decode RTF':>12}  path (enc/dec)")
    met = []
    for size, model in models.items():
        t = cpu_times(model, enc, s, args.rounds)
        n = sum(q.numel() for q in model.parameters()) / 1e6
        hop = model.cfg.hop
        frames = int(s * model.cfg.sample_rate) // hop  # the choice for inputs this size
        paths = [codec_cpu.choose(model, "encode", torch.zeros(1, 1, frames * hop)),
                 codec_cpu.choose(model, "decode", torch.zeros(1, model.cfg.dim, frames))]
        print(f"{size:<9}{n:>7.2f}M{s / t['encode']:>11.1f}x{s / t['decode']:>11.1f}x  "
              f"{paths[0].path}/{paths[1].path} (first encode+decode {t['first_calls']:.1f} s)")
        print(f"{'  forward':<17}{s / t['encode_forward']:>11.1f}x{s / t['decode_forward']:>11.1f}x"
              f"  chosen path {t['encode_forward'] / t['encode']:.2f}x / "
              f"{t['decode_forward'] / t['decode']:.2f}x its speed")
        if enc is not None:
            e, d = t["encode_encodec"] / t["encode"], t["decode_encodec"] / t["decode"]
            rtf = s / t["encode_encodec"], s / t["decode_encodec"]
            print(f"{'  EnCodec':<17}{rtf[0]:>11.1f}x{rtf[1]:>11.1f}x"
                  f"  {size} {e:.2f}x / {d:.2f}x its speed")
            if size == "paper":
                met.append(f"paper encode >= 1.1x EnCodec: {'met' if e >= 1.1 else 'NOT met'} "
                           f"({e:.2f}x); decode >= 1.0x: {'met' if d >= 1.0 else 'NOT met'} "
                           f"({d:.2f}x)")
        # a direction that chose the forward runs the forward's code: its ratio is noise
        slower = [k for k, c in zip(("encode", "decode"), paths)
                  if c.path == "cpu" and t[k] > t[f"{k}_forward"]]
        met.append(f"{size} never slower than the forward: "
                   f"{'met' if not slower else 'NOT met (' + ', '.join(slower) + ')'}")
    print("targets: " + "; ".join(met))
    if torch.cuda.is_available():
        torch.set_num_threads(threads)
        print(f"\nGPU ({torch.cuda.get_device_name()}), batch 64 x {args.seconds:g} s, bf16:")
        for size, model in models.items():
            g = gpu_throughput(model, args.seconds)
            print(f"{size:<16} encode {g['encode']:.2f} audio-h/s   "
                  f"decode {g['decode']:.2f} audio-h/s")
    else:
        print("\nno CUDA device: GPU throughput not measured")


if __name__ == "__main__":
    main()
