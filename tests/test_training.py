"""Shared trainer pieces: checkpoints round-trip, RNG state restores the same draws."""

import pickle
import random

import numpy as np
import pytest
import torch

from cantus.training import Checkpoints, load_weights, rng_state, save_weights, set_rng_state


def test_rng_state_restores_every_generator():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(2))
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


class _Payload:
    """Not a tensor, a container or a number: only full unpickling could rebuild it."""


def test_checkpoints_keep_last_k_and_load_without_unpickling(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    ck = Checkpoints(tmp_path / "ck", keep=2)
    for step in (10, 20, 30):
        ck.save(step, {"model": model.state_dict(), "opt": opt.state_dict(), "rng": rng_state(),
                       "data": {"epoch": 1, "consumed": [3, 4]}})
    assert ck.steps() == [20, 30]
    state = ck.latest()
    assert state["step"] == 30 and state["data"]["consumed"] == [3, 4]
    fresh = torch.nn.Linear(3, 2)
    fresh.load_state_dict(state["model"])
    assert torch.equal(fresh.weight, model.weight)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(state["opt"])
    set_rng_state(state["rng"])
    # a newer checkpoint holding an arbitrary object: refused, never unpickled
    torch.save({"step": 40, "payload": _Payload()}, ck.folder / "step-00000040.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ck.latest()


def test_weights_round_trip_through_safetensors(tmp_path):
    model = torch.nn.Conv1d(1, 4, 3)
    digest = save_weights(model, tmp_path / "m", {"channels": 4})
    other = torch.nn.Conv1d(1, 4, 3)
    load_weights(other, tmp_path / "m")
    assert torch.equal(other.weight, model.weight) and len(digest) == 64
    assert (tmp_path / "m" / "config.json").read_text().strip().startswith("{")


def test_run_id_changes_with_the_data_even_when_no_shard_changes_size(tmp_path):
    from cantus.training import run_id

    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(b"x" * 1024)
    (tmp_path / "manifest.parquet").write_bytes(b"captions v1")
    code = "cantus.tokenize.codec.train"
    a = run_id("params", code, [str(shard)])
    assert run_id("params", code, [str(shard)]) == a
    (tmp_path / "manifest.parquet").write_bytes(b"captions v2")   # same shard size
    assert run_id("params", code, [str(shard)]) != a
    assert run_id("other params", code, [str(shard)]) != run_id("params", code, [str(shard)])
    # another stage's code (the w2v-BERT trainer) on the same params and data
    assert run_id("params", "cantus.tokenize.semantic.pretrain", [str(shard)]) != \
        run_id("params", code, [str(shard)])
