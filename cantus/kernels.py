"""Which CPU kernels this process runs, and the settings that cap them below the CPU's best.

Trained stages reproduce bit for bit only on the same kind of CPU: torch's
ATen kernels, oneDNN's convolutions and faiss's distance loops each pick an
instruction set at start-up (AVX-512 where the CPU has it, else AVX2, ...),
and the float rounding follows. ``CAPS`` holds the environment settings that
make a machine run what a lesser CPU would:

- ``ATEN_CPU_CAPABILITY`` (``avx512``, ``avx2``, ``default``),
- ``ONEDNN_MAX_CPU_ISA`` (``AVX2``, ``SSE41``),
- ``FAISS_SIMD_LEVEL`` (``AVX2``, ``NONE``: the dynamic-dispatch faiss wheels
  read this one) and ``FAISS_OPT_LEVEL`` (picks the library in the wheels
  that ship one per instruction set).

OpenBLAS is left as the machine sets it (``OPENBLAS_CORETYPE``): older
builds give wrong results on some CPUs without it.

    python -m cantus.kernels                 # what runs here, as JSON
    env $(python -m cantus.kernels --env avx2) python -m cantus.kernels --check avx2
                                             # fail unless the avx2 cap took effect

CI runs the quick tests once more under each cap, after ``--check`` proves
the cap is in force, so a developer on an AVX-512 machine sees what fails on
an AVX2 one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

CAPS: dict[str, dict[str, str]] = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "FAISS_SIMD_LEVEL": "AVX2", "FAISS_OPT_LEVEL": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                "FAISS_SIMD_LEVEL": "NONE", "FAISS_OPT_LEVEL": "generic"},
}
# What each library reports under a cap: ATen's capability name, words of
# oneDNN's ISA line, faiss's SIMD level name.
EXPECT = {"avx2": {"aten": "AVX2", "onednn": "AVX2", "faiss": "AVX2"},
          "default": {"aten": "DEFAULT", "onednn": "SSE4.1", "faiss": "NONE"}}


def _onednn_isa() -> str:
    """oneDNN's ISA line, read from its verbose output around one convolution."""
    import torch

    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 1)  # oneDNN prints from C to file descriptor 1
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                torch.nn.functional.conv2d(torch.randn(1, 64, 1, 2000), torch.randn(64, 64, 1, 7))
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        lines = f.read().decode(errors="replace").splitlines()
    isa = [ln.split("isa:", 1)[1] for ln in lines if "isa:" in ln]
    return isa[0].strip() if isa else "unknown (no oneDNN convolution ran)"


def active() -> dict[str, str]:
    """The instruction set each kernel library runs in this process."""
    import faiss
    import torch
    from threadpoolctl import threadpool_info

    blas = [f"{i['internal_api']} {i.get('architecture', '?')}" for i in threadpool_info()
            if i.get("user_api") == "blas"]
    blas.sort()
    return {"aten": torch.backends.cpu.get_cpu_capability(), "onednn": _onednn_isa(),
            "faiss": faiss.SIMDConfig.get_level_name() if hasattr(faiss, "SIMDConfig")
            else faiss.get_compile_options(),
            "blas": ", ".join(blas) or "none found",
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)")}


def cpu_model() -> str:
    """The CPU's model name and widest vector extension, from /proc/cpuinfo where there is one."""
    import platform

    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    isa = ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags
           else "no AVX2" if flags else "ISA unknown")
    return f"{name} ({isa})"


def describe() -> str:
    """One line for a bench's output: the CPU, the cores, the kernels in force and any caps."""
    k = active()
    capped = sorted(v for v in CAPS["avx2"] if v in os.environ)
    caps = f"caps set: {' '.join(f'{v}={os.environ[v]}' for v in capped)}" if capped else "no caps"
    return (f"CPU {cpu_model()}, {os.cpu_count()} cores; runs ATen {k['aten']}, "
            f"oneDNN {k['onednn']}, faiss {k['faiss']}; {caps}")


def check(cap: str, seen: dict[str, str]) -> list[str]:
    """What in ``seen`` (from ``active``) does not show the cap ``cap``; empty when it took."""
    want = EXPECT[cap]
    return [f"{lib}: wanted {want[lib]} under the {cap} cap, runs {seen[lib]}"
            for lib in want if want[lib].upper() not in seen[lib].upper()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", choices=sorted(CAPS),
                   help="exit 1 unless this cap's settings are in force in this environment")
    p.add_argument("--env", choices=sorted(CAPS),
                   help="print this cap's settings as NAME=VALUE words (for `env`) and exit")
    args = p.parse_args(argv)
    if args.env:
        print(" ".join(f"{k}={v}" for k, v in CAPS[args.env].items()))
        return 0
    seen = active()
    print(json.dumps(seen))
    if args.check:
        missing = [f"{k}={v}" for k, v in CAPS[args.check].items() if os.environ.get(k) != v]
        problems = ([f"environment lacks {', '.join(missing)}"] if missing else []) + \
            check(args.check, seen)
        for line in problems:
            print(f"kernel cap {args.check}: {line}", file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
