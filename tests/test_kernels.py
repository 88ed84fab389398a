"""Tokens do not depend on the CPU's instruction set: the same model file gives the same bytes
under the native kernels and under the caps of ``cantus.kernels`` (what an AVX2-only or an
older CPU runs)."""

import json
import os
import subprocess
import sys

import numpy as np
import torch

from cantus import kernels
from cantus.tokenize.codec.model import CodecConfig, SoundStream
from conftest import melody

ENCODE = """
import json, sys
import numpy as np, torch
from cantus import kernels
from cantus.tokenize.codec.model import SoundStream
torch.set_num_threads(1)
model = SoundStream.load(sys.argv[1])
codes = model.encode(torch.from_numpy(np.load(sys.argv[2]))[None])
np.save(sys.argv[3], codes.numpy())
print(json.dumps(kernels.active()))
"""


def _encode(model_dir, wav_path, out, cap: str | None, path: str = "auto") -> tuple[bytes, dict]:
    env = {k: v for k, v in os.environ.items() if k not in kernels.CAPS["avx2"]}
    env.update(kernels.CAPS[cap] if cap else {})
    env["CANTUS_CODEC_PATH"] = path  # the codec's CPU inference path (auto: per machine)
    run = subprocess.run([sys.executable, "-c", ENCODE, str(model_dir), str(wav_path), str(out)],
                         env=env, capture_output=True, text=True, check=True)
    return out.read_bytes(), json.loads(run.stdout.strip().splitlines()[-1])


def test_codec_tokens_are_byte_identical_under_capped_kernels(tmp_path):
    torch.manual_seed(0)
    model = SoundStream(CodecConfig.tiny())
    model.train()
    # k-means init on 2,000 frames: every level of 64 codes gets distinct, separated codes
    model(torch.from_numpy(np.stack([melody(s, 5.0, 24000) for s in range(8)])))
    model.eval().save(tmp_path / "codec")
    wav = tmp_path / "wav.npy"
    np.save(wav, melody(11, 20.0, 24000))  # 20 s: 1,000 frames x 4 levels of codes
    native, seen = _encode(tmp_path / "codec", wav, tmp_path / "native.npy", None)
    codes = np.load(tmp_path / "native.npy")
    assert codes.shape == (1, 4, 1000) and len(np.unique(codes[0, 0])) > 4  # not a constant code
    for cap in kernels.CAPS:
        capped, under = _encode(tmp_path / "codec", wav, tmp_path / f"{cap}.npy", cap)
        assert kernels.check(cap, under) == [], under  # the cap took effect in the child
        assert capped == native, f"codec tokens differ under the {cap} cap ({under}, native {seen})"
    for path in ("cpu", "forward"):  # whichever path a machine's measurement picks
        forced, _ = _encode(tmp_path / "codec", wav, tmp_path / f"{path}.npy", "avx2", path)
        assert forced == native, f"codec tokens differ on the {path} path under the avx2 cap"
