"""Benchmark the SoundStream codec: real-time factors on one CPU thread, GPU throughput.

Measured in one run, side by side, for the demo and the paper sizes (weights
do not change the speed, so freshly initialised models are timed; k-means
initialisation is run once so the codebooks are real):

- encode and decode real-time factor (audio seconds per wall second) on one
  CPU thread (``torch.set_num_threads(1)``, inference mode) of ``encode`` and
  ``decode`` (the time-major CPU path) and of the modules' own forward, best of
  ``--rounds`` on ``--seconds`` of audio, beside EnCodec's published 9.8x
  encode / 10.4x decode (24 kHz, 6 kbps, one thread; EnCodec paper, Table 5).
  Target: paper-size encode >= 10x real time.
- when CUDA is present: encode and decode throughput in audio-hours per second
  at batch 64 (bf16 autocast).

    python bench/codec.py [--seconds 10] [--rounds 7]
"""

from __future__ import annotations

import argparse
import time

import torch

from cantus.tokenize.codec.model import CodecConfig, SoundStream

ENCODEC = {"encode": 9.8, "decode": 10.4}


def build(size: str) -> SoundStream:
    torch.manual_seed(0)
    model = SoundStream(getattr(CodecConfig, size)())
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 24000) * 0.1)  # k-means init of the codebooks
    return model.eval()


def best_time(fn, rounds: int) -> float:
    fn()  # warm-up (allocations, oneDNN kernels)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def cpu_rtf(model: SoundStream, seconds: float, rounds: int) -> dict[str, float]:
    """encode/decode (the time-major CPU path, tokenize/codec/cpu.py) and, for
    comparison, the same through the modules' channels-first forward."""
    wav = torch.randn(1, int(seconds * model.cfg.sample_rate)) * 0.1
    codes = model.encode(wav)

    @torch.inference_mode()
    def modules_encode():
        return model.quantizer.encode(model.encoder(wav[:, None]).float())

    @torch.inference_mode()
    def modules_decode():
        return model.decoder(model.quantizer.decode(codes.long()))

    enc = best_time(lambda: model.encode(wav), rounds)
    dec = best_time(lambda: model.decode(codes), rounds)
    enc_m, dec_m = best_time(modules_encode, rounds), best_time(modules_decode, rounds)
    return {"encode": seconds / enc, "decode": seconds / dec,
            "encode_modules": seconds / enc_m, "decode_modules": seconds / dec_m}


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
        return {"encode": hours / best_time(enc, 3), "decode": hours / best_time(dec, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--sizes", nargs="+", default=["demo", "paper"])
    args = p.parse_args()
    threads = torch.get_num_threads()  # restored for the GPU part
    torch.set_num_threads(1)
    print(f"one CPU thread, {args.seconds:g} s of 24 kHz audio, 6 kbps (12 x 1024), "
          f"best of {args.rounds}")
    print(f"{'model':<16}{'params':>10}{'encode RTF':>13}{'decode RTF':>13}")
    print(f"{'EnCodec (paper)':<16}{'':>10}{ENCODEC['encode']:>12.1f}x{ENCODEC['decode']:>12.1f}x")
    models = {size: build(size) for size in args.sizes}
    measured = {}
    for size, model in models.items():
        r = measured[size] = cpu_rtf(model, args.seconds, args.rounds)
        n = sum(q.numel() for q in model.parameters()) / 1e6
        print(f"{size:<16}{n:>9.2f}M{r['encode']:>12.1f}x{r['decode']:>12.1f}x"
              f"   (encode {r['encode'] / ENCODEC['encode']:.2f}x EnCodec's, "
              f"decode {r['decode'] / ENCODEC['decode']:.2f}x)")
        print(f"{'  modules fwd':<16}{'':>10}{r['encode_modules']:>12.1f}x{r['decode_modules']:>12.1f}x"
              f"   (CPU path {r['encode'] / r['encode_modules']:.2f}x / "
              f"{r['decode'] / r['decode_modules']:.2f}x faster)")
    if "paper" in measured:
        e = measured["paper"]["encode"]
        print(f"target: paper-size encode >= 10x real time: {'met' if e >= 10 else 'NOT met'} "
              f"({e:.1f}x)")
    if torch.cuda.is_available():
        torch.set_num_threads(threads)
        print(f"\nGPU ({torch.cuda.get_device_name()}), batch 64 x {args.seconds:g} s, bf16:")
        for size, model in models.items():
            g = gpu_throughput(model, args.seconds)
            print(f"{size:<16} encode {g['encode']:.2f} audio-h/s   decode {g['decode']:.2f} audio-h/s")
    else:
        print("\nno CUDA device: GPU throughput not measured")


if __name__ == "__main__":
    main()
