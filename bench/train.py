"""Training throughput of the LM stage transformer against a plain PyTorch reference.

Goes in: the demo config of one stage (params.yaml ``lm.<stage>``), random
tokens laid out as that stage's sequences. Comes out: printed tokens/s of a
full training step (forward, backward, AdamW step) for

- ours: ``cantus.train`` (RoPE, fused causal SDPA, loss over each target
  token's own codebook block, as the trainer runs it);
- ours_full_head: ours with logits over the whole vocabulary at every position
  (what the reference does: separates the trunk from the loss head);
- reference: ``torch.nn.TransformerEncoderLayer`` (norm_first, GELU, a causal
  mask) of the same width, depth, heads, FFN and dropout, with the same tied
  embedding, a full-vocabulary head and cross-entropy on the target positions;

interleaved in rounds in the same process (the order turns each round, so
the machine's drift hits all three alike), each figure the best of its
rounds, and the ratio ours / reference against the target (>= 1.3x) with
PASS or FAIL; the ratio of each round's pair is printed beside it. The first
line names the CPU, its widest ISA, the cores, the kernels in force and any
``cantus.kernels`` caps; to time what an AVX2 machine runs:

    python bench/train.py [--stage semantic] [--threads N] [--rounds 5] [--steps 2]
    env $(python -m cantus.kernels --env avx2) python bench/train.py

With CUDA, also the model FLOPs utilisation of the paper-size semantic stage
in bf16 (target >= 40%).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cantus import kernels
from cantus.train.layout import Layout
from cantus.train.model import paper
from cantus.train.run import optimiser, stage_loss
from cantus.train.stage import build_model, load_lm, make_layout

ROOT = Path(__file__).resolve().parents[1]


class Reference(nn.Module):
    """The straightforward build: nn.TransformerEncoder with a causal mask."""

    def __init__(self, vocab: int, size):
        super().__init__()
        self.embed = nn.Embedding(vocab, size.dim)
        layer = nn.TransformerEncoderLayer(size.dim, size.heads, size.ffn, size.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, size.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(size.dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device)
        x = self.embed(ids)  # no position table: the causal mask orders tokens; sizes match ours
        x = self.encoder(x, mask=mask, is_causal=True)
        return self.norm(x) @ self.embed.weight.T  # (B, T, V)


def batch_of(layout: Layout, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    k, n_sem, n_ac = layout.sizes, layout.frames("semantic"), layout.frames("acoustic")
    rows = [layout.encode({"mulan": rng.integers(0, k["mulan"], 12),
                           "semantic": rng.integers(0, k["semantic"], n_sem),
                           "acoustic": rng.integers(0, k["acoustic"], (12, n_ac))})
            for _ in range(batch)]
    return {name: torch.from_numpy(np.stack([r[i] for r in rows]))
            for i, name in enumerate(("ids", "block", "target"))}


def full_head_loss(logits: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
    tgt = b["ids"][:, 1:].masked_fill(~b["target"][:, 1:], -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tgt.flatten())


def steps_per_s(step, n: int) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(n):
        step()
    return n / (time.perf_counter() - start)


def cpu_bench(stage: str, rounds: int, steps: int, batch: int | None) -> None:
    cfg = load_lm(ROOT / "params.yaml")
    sc = getattr(cfg, stage)
    # the trunk against the reference: aligned conditioning (one embedding sum) left out
    layout = make_layout(cfg.tokens, stage, dataclasses.replace(sc, dedup_semantic=False,
                                                                aligned_cond=False))
    b = batch_of(layout, batch or sc.train.batch_size)
    dev = torch.device("cpu")
    torch.manual_seed(0)
    ours = build_model(sc.model, layout)
    ref = Reference(layout.vocab_size, sc.model)
    opt_o, opt_r = optimiser(ours, sc.train, dev), torch.optim.AdamW(ref.parameters(), lr=1e-3)

    def step_ours():
        total, n = stage_loss(ours, ours.embed.weight, b, layout)
        (total / n).backward()
        opt_o.step(), opt_o.zero_grad(set_to_none=True)

    def step_ours_full():
        full_head_loss(ours(b["ids"]), b).backward()
        opt_o.step(), opt_o.zero_grad(set_to_none=True)

    def step_ref():
        full_head_loss(ref(b["ids"]), b).backward()
        opt_r.step(), opt_r.zero_grad(set_to_none=True)

    tokens = b["ids"].numel()
    n_o = sum(p.numel() for p in ours.parameters())
    n_r = sum(p.numel() for p in ref.parameters())
    print(f"stage {stage}: batch {tuple(b['ids'].shape)}, vocab {layout.vocab_size}, "
          f"params ours {n_o / 1e6:.2f}M, reference {n_r / 1e6:.2f}M, "
          f"threads {torch.get_num_threads()}; best of {rounds} rounds of {steps} steps, "
          "interleaved")
    fns = {"ours": step_ours, "ours_full_head": step_ours_full, "reference": step_ref}
    best = dict.fromkeys(fns, 0.0)
    pairs = []  # (ours / reference, trunk / reference) of each round
    for r in range(rounds):
        names = list(fns)[r % 3:] + list(fns)[:r % 3]  # a different one goes first each round
        rate = {name: steps_per_s(fns[name], steps) * tokens for name in names}
        best = {k: max(best[k], rate[k]) for k in best}
        pairs.append((rate["ours"] / rate["reference"],
                      rate["ours_full_head"] / rate["reference"]))
        print(f"  round {r + 1}: " + ", ".join(f"{k} {rate[k]:.0f} tok/s" for k in fns)
              + f"; ours / reference {pairs[-1][0]:.2f}x")
    ratio, trunk = best["ours"] / best["reference"], best["ours_full_head"] / best["reference"]
    print("best: " + ", ".join(f"{k} {v:.0f} tok/s" for k, v in best.items()))
    print(f"ours / reference: {ratio:.2f}x (median of the rounds' pairs "
          f"{statistics.median(p[0] for p in pairs):.2f}x; trunk only, same full head: "
          f"{trunk:.2f}x, median {statistics.median(p[1] for p in pairs):.2f}x); "
          f"target >= 1.3x: {'PASS' if ratio >= 1.3 else 'FAIL'}")


def gpu_mfu(batch: int, seconds: float, peak_tflops: float, steps: int) -> None:
    """MFU of the paper-size semantic stage in bf16 (6 N flops per token + attention)."""
    cfg = load_lm(ROOT / "params.yaml")
    sc = dataclasses.replace(cfg.semantic, model=paper(), crop_seconds=seconds,
                             dedup_semantic=False, aligned_cond=False)
    layout = make_layout(cfg.tokens, "semantic", sc)
    dev = torch.device("cuda")
    model = build_model(sc.model, layout).to(dev)
    opt = optimiser(model, sc.train, dev)
    b = {k: v.to(dev) for k, v in batch_of(layout, batch).items()}
    compiled = torch.compile(model)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            total, n = stage_loss(compiled, model.embed.weight, b, layout)
        (total / n).backward()
        opt.step(), opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    for _ in range(3):
        step()
    rate = steps_per_s(step, steps)
    c, t = model.cfg, b["ids"].shape[1]
    n_params = model.num_params() - model.embed.weight.numel()
    targets = int(b["target"][:, 1:].sum()) / batch
    per_seq = (6 * n_params * t + 6 * c.layers * c.dim * t * t
               + 6 * targets * layout.sizes["semantic"] * c.dim)
    tflops = per_seq * batch * rate / 1e12
    print(f"GPU paper-size semantic stage, bf16, batch {batch} x {t}: "
          f"{rate * batch * t:.0f} tok/s, {tflops:.0f} TFLOP/s, MFU {tflops / peak_tflops:.1%} "
          f"of {peak_tflops:.0f} (target >= 40%)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", default="semantic", choices=("semantic", "coarse", "fine"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--gpu-batch", type=int, default=16)
    p.add_argument("--gpu-seconds", type=float, default=30.0)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(kernels.describe())
    print("load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    cpu_bench(a.stage, a.rounds, a.steps, a.batch)
    if torch.cuda.is_available():
        gpu_mfu(a.gpu_batch, a.gpu_seconds, a.peak_tflops, a.steps)
    else:
        print("no CUDA device: MFU of the paper-size stage not measured")


if __name__ == "__main__":
    main()
