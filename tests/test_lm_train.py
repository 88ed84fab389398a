"""The LM training loop: exact resume, the trained-stage folder, DDP and accumulation match."""

import dataclasses
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from cantus.audio_stream import shard_paths
from cantus.train.data import collate, fixed_crops
from cantus.train.model import tiny
from cantus.train.run import Inputs, optimiser, run, train_step
from cantus.train.stage import build_model, load_lm, load_stage, make_layout
from cantus.train.synthetic import write_synthetic_tokens

from conftest import ROOT


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(stage: str, dropout: float = 0.1, dedup: bool = True, **train):
    cfg = load_lm(ROOT / "params.yaml")
    sc = getattr(cfg, stage)
    t = dataclasses.replace(sc.train, **{
        "steps": 7, "warmup_steps": 1, "batch_size": 2, "checkpoint_every": 2,
        "valid_every": 3, "valid_samples": 2, "unigram_samples": 6, "log_every": 1,
        "shuffle_buffer": 3, "lr": 3e-3, **train})
    # de-duplication on by default (the demo turns it off for generation): its variable
    # lengths are the harder case for batching and exact resume
    sc = dataclasses.replace(sc, crop_seconds=0.5, dedup_semantic=dedup,
                             model=dataclasses.replace(tiny(), dropout=dropout), train=t)
    return dataclasses.replace(cfg, **{stage: sc})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_synthetic_tokens(tmp_path_factory.mktemp("tok") / "tokens", chunks=10,
                                  seconds=2.0, valid=2, shards_train=2)


def test_killed_and_resumed_run_matches_uninterrupted(folder, tmp_path):
    cfg = tiny_cfg("coarse")  # dropout, conditioning dropout, dedup and a shuffle buffer
    whole = run(cfg, "coarse", Inputs(str(folder), str(tmp_path / "ck_a"),
                                      str(tmp_path / "live")), tmp_path / "a")
    crashed = run(cfg, "coarse", Inputs(str(folder), str(tmp_path / "ck_b")), tmp_path / "b",
                  stop_after=5)  # its last checkpoint is step 4: step 5 is lost, as in a crash
    assert not (tmp_path / "b").exists()
    resumed = run(cfg, "coarse", Inputs(str(folder), str(tmp_path / "ck_b")), tmp_path / "b")
    assert whole["steps"] == resumed["steps"] == 7 and len(resumed["losses"]) == 3
    assert crashed["losses"] == pytest.approx(whole["losses"][:5], rel=1e-6)
    assert resumed["losses"] == pytest.approx(whole["losses"][4:], rel=1e-5)
    a, layout = load_stage(tmp_path / "a")
    b, _ = load_stage(tmp_path / "b")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
    assert layout.spec.name == "coarse" and layout.sizes["acoustic"] == 1024 and layout.dedup
    metrics = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert metrics["val_ppl"] == pytest.approx(whole["val_ppl"], rel=1e-4)
    # both below the uniform perplexity over the K codes of a target level: the unigram
    # baseline fitted on train, and the model after 7 steps
    k = layout.sizes["acoustic"]
    assert metrics["unigram_ppl"] < k and metrics["val_ppl"] < k
    assert metrics["step"] == 7


def _steps(folder: str, rank: int, world: int, accum: int = 1, steps: int = 3):
    """Three optimiser steps of 4 crops each, this rank taking its share of every batch."""
    cfg = tiny_cfg("semantic", dropout=0.0, batch_size=4)
    sc = dataclasses.replace(cfg.semantic, crop_seconds=2.0, cond_dropout=0.0)
    layout = make_layout(cfg.tokens, "semantic", sc)  # deduped targets: lengths differ
    items = list(fixed_crops(shard_paths(folder, "train"), layout, 8))
    torch.manual_seed(0)
    core = build_model(sc.model, layout)
    model = torch.nn.parallel.DistributedDataParallel(core) if world > 1 else core
    opt = optimiser(core, sc.train, torch.device("cpu"))
    losses, per = [], 4 // world
    for step in range(steps):
        batch = [items[(4 * step + i) % len(items)] for i in range(4)][rank * per:(rank + 1) * per]
        size = len(batch) // accum
        micro = [collate(batch[i * size:(i + 1) * size]) for i in range(accum)]
        losses.append(train_step(model, core, opt, micro, layout, sc.train, step,
                                 torch.device("cpu")))
    return losses, [p.detach().clone() for p in core.parameters()]


def _ddp_worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    losses, params = _steps(folder, rank, world)
    if rank == 0:
        torch.save({"losses": losses, "params": params}, out)
    dist.destroy_process_group()


def test_ddp_two_processes_equal_one_with_the_doubled_batch(folder, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, port, str(folder), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    losses, params = _steps(str(folder), 0, 1)
    # target counts differ per crop (dedup): equal only if every token weighs the same
    assert ddp["losses"] == pytest.approx(losses, rel=1e-5)
    assert losses[-1] < losses[0]
    for a, b in zip(ddp["params"], params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)  # Adam amplifies ~0 grads
    acc_losses, acc_params = _steps(str(folder), 0, 1, accum=2)
    assert acc_losses == pytest.approx(losses, rel=1e-5)
    for a, b in zip(acc_params, params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)  # Adam amplifies ~0 grads
