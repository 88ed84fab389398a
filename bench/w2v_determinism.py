"""Are w2v-BERT pretraining gradients the same from process to process?

Runs three demo-size pretraining steps (``semantic.pretrain`` of params.yaml,
random input, fixed seeds) in fresh child processes and prints a hash of
every gradient, for torch's default kernels and for its deterministic ones
(what ``tokenize/semantic/pretrain.py`` trains with), at 1 and 2 threads, and
the seconds each child took. Equal hashes in a row: reproducible there.

    python bench/w2v_determinism.py [--runs 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import hashlib, sys
import numpy as np, torch
torch.set_num_threads(int(sys.argv[1]))
torch.use_deterministic_algorithms(sys.argv[2] == "1", warn_only=True)
from cantus.config import load_section
from cantus.tokenize.semantic import model as sm, pretrain as sp
from cantus.tokenize.semantic.params import SemanticConfig
cfg = load_section(sys.argv[3], "semantic", SemanticConfig)
torch.manual_seed(0)
model = sp.W2VBert(sm.build(cfg.model.size, 0.0, cfg.model.utterance_norm),
                   cfg.pretrain.codebook_size, cfg.pretrain.codevector_dim)
rng = np.random.default_rng(0)
wavs = [rng.standard_normal(16000 * 4).astype(np.float32) * 0.1 for _ in range(4)]
feats, attn, _ = sm.FeatureExtractor(model.backbone).fbank(wavs, 16000)
h = hashlib.sha256()
for step in range(3):
    torch.manual_seed(step)
    total, _ = sp.step_losses(model, feats, attn.bool(), cfg.pretrain, step)
    model.zero_grad()
    total.backward()
    for p in model.parameters():
        if p.grad is not None:
            h.update(p.grad.numpy().tobytes())
print(h.hexdigest()[:16])
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    args = ap.parse_args()
    print(f"CPU: {os.cpu_count()} cores; torch threads as given")
    for threads in (1, 2):
        for det in ("0", "1"):
            hashes, secs = [], []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                out = subprocess.run([sys.executable, "-c", CHILD, str(threads), det, args.params],
                                     capture_output=True, text=True, check=True)
                secs.append(time.perf_counter() - t0)
                hashes.append(out.stdout.strip())
            kind = "deterministic" if det == "1" else "default"
            print(f"{threads} thread(s), {kind:13s}: {' '.join(hashes)}  "
                  f"{'same' if len(set(hashes)) == 1 else 'DIFFERENT'}  "
                  f"({' '.join(f'{s:.1f}' for s in secs)} s)")


if __name__ == "__main__":
    main()
