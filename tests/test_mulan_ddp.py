"""MuLan's contrastive loss under DDP: negatives gathered across ranks, gradients exact."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

WORLD, B, D = 2, 3, 8


def _data():
    g = torch.Generator().manual_seed(0)
    audio = F.normalize(torch.randn(WORLD * B, D, generator=g), dim=-1)
    text = F.normalize(torch.randn(WORLD * B, D, generator=g), dim=-1)
    return audio, text, torch.tensor(10.0)


def _rank(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from cantus.tokenize.mulan.train import info_nce

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        audio, text, scale = _data()
        a = audio[rank * B:(rank + 1) * B].clone().requires_grad_()
        t = text[rank * B:(rank + 1) * B].clone().requires_grad_()
        loss = info_nce(a, t, scale)
        loss.backward()
        torch.save({"loss": loss.detach(), "ga": a.grad, "gt": t.grad}, f"{out}.{rank}")
        # no rank tears gloo down while the other is still in a collective (a rank that
        # did so aborted now and then: "terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_gathered_loss_and_gradients_equal_the_single_process_full_batch(tmp_path):
    from cantus.tokenize.mulan.train import info_nce

    mp.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path / "rank")), nprocs=WORLD,
             join=True)
    got = [torch.load(tmp_path / f"rank.{r}", weights_only=True) for r in range(WORLD)]
    audio, text, scale = _data()
    a, t = audio.clone().requires_grad_(), text.clone().requires_grad_()
    full = info_nce(a, t, scale)           # one process: every pair in one batch
    full.backward()
    # every rank's rows see all WORLD * B candidates, so the mean of the rank losses is the
    # full-batch loss; each rank's gradient is that of the sum of the rank losses
    assert torch.stack([g["loss"] for g in got]).mean().item() == pytest.approx(full.item(),
                                                                               rel=1e-5)
    ga = torch.cat([g["ga"] for g in got])
    gt = torch.cat([g["gt"] for g in got])
    torch.testing.assert_close(ga, WORLD * a.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gt, WORLD * t.grad, rtol=1e-4, atol=1e-6)
    # without the gather each rank would see only its own B candidates: a different loss
    local = [info_nce(audio[r * B:(r + 1) * B], text[r * B:(r + 1) * B], scale)
             for r in range(WORLD)]
    assert abs(torch.stack(local).mean().item() - full.item()) > 1e-3
