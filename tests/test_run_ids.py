"""A trainer resumes only a run of the same params, code and data; a finished run resumed
writes the same outputs as the run itself (no NaN, no times)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cantus.tokenize.semantic import pretrain as sp
from cantus.tokenize.codec import train as train_codec
from conftest import audio_shards

_real_read_bytes = Path.read_bytes


def _edit(monkeypatch, name: str) -> None:
    """Make every read of the project file ``name`` see one more line, as an edit would."""
    monkeypatch.setattr(Path, "read_bytes", lambda self: _real_read_bytes(self) + (
        b"\n# edited\n" if self.name == name else b""))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("runids")
    a = audio_shards(root / "a", 3, 3.0, seed=700, chunk_seconds=1.5, rate=24000)
    b = audio_shards(root / "b", 3, 3.0, seed=900, chunk_seconds=1.5, rate=24000)
    return a, b


def test_codec_starts_afresh_after_new_data_or_a_loss_edit(shards, tmp_path, monkeypatch):
    from test_codec import _tiny_params

    a, b = shards
    cfg, work = _tiny_params(), tmp_path / "work"
    first = train_codec.run(cfg, a, tmp_path / "m1", work)
    assert first["finished"] and first["resumed_from"] == 0
    again = train_codec.run(cfg, a, tmp_path / "m2", work)  # same inputs: the finished run
    assert again["resumed_from"] == cfg.train.steps
    assert (tmp_path / "m1" / "train.json").read_bytes() == \
        (tmp_path / "m2" / "train.json").read_bytes()  # no time, no resume point in it
    assert (tmp_path / "m1" / "model.safetensors").read_bytes() == \
        (tmp_path / "m2" / "model.safetensors").read_bytes()
    assert train_codec.run(cfg, b, tmp_path / "m3", work)["resumed_from"] == 0  # new data
    assert train_codec.run(cfg, b, tmp_path / "m4", work)["resumed_from"] == cfg.train.steps
    _edit(monkeypatch, "losses.py")
    assert train_codec.run(cfg, b, tmp_path / "m5", work)["resumed_from"] == 0  # loss code


def test_w2v_bert_starts_afresh_after_new_data_or_a_loss_edit(shards, tmp_path, monkeypatch):
    from test_semantic import _model_cfg

    a, b = shards
    cfg, ck = _model_cfg(), tmp_path / "ck"
    first = sp.run(cfg, a, tmp_path / "m1", ck)
    again = sp.run(cfg, a, tmp_path / "m2", ck)  # resumes the finished run: same manifest
    assert again["final"] == first["final"] and again["final"] and again["hash"] == first["hash"]
    assert len(list(ck.iterdir())) == 1
    sp.run(cfg, b, tmp_path / "m3", ck)
    assert len(list(ck.iterdir())) == 2  # new data: a run of its own, from step 0
    _edit(monkeypatch, "pretrain.py")
    sp.run(cfg, b, tmp_path / "m4", ck)
    assert len(list(ck.iterdir())) == 3  # its own code edited: again from step 0


def test_a_resumed_finished_lm_run_writes_the_same_stage(tmp_path):
    from cantus.train.run import Inputs, run
    from cantus.train.synthetic import write_synthetic_tokens
    from test_lm_train import tiny_cfg

    tokens = write_synthetic_tokens(tmp_path / "tokens", chunks=10, seconds=2.0, valid=2,
                                    shards_train=2)
    cfg = tiny_cfg("fine")
    first = run(cfg, "fine", Inputs(str(tokens), str(tmp_path / "ck")), tmp_path / "a")
    again = run(cfg, "fine", Inputs(str(tokens), str(tmp_path / "ck")), tmp_path / "b")
    assert again["losses"] == [] and again["val_ppl"] == first["val_ppl"]  # no NaN
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert "NaN" not in (tmp_path / "b" / "config.json").read_text()
    assert json.loads((tmp_path / "b" / "config.json").read_text())["summary"].keys().isdisjoint(
        {"seconds", "tokens_per_s"})
