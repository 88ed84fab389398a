"""The pieces every trainer shares: one schedule, one command line."""

from __future__ import annotations

import math

import pytest
import yaml

from cantus.training import warmup_cosine
from conftest import ROOT


def test_warmup_cosine_is_the_schedule_the_trainers_had_bit_for_bit():
    warmup, total = 7, 120
    for step in range(total + 5):
        old = ((step + 1) / warmup if step < warmup else
               0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup)))))
        assert warmup_cosine(step, warmup, total) == old, step  # codec's and MuLan's factor
    assert warmup_cosine(0, 4, 10) == 0.25 and warmup_cosine(3, 4, 10) == 1.0
    assert warmup_cosine(4, 4, 10) == 1.0 and warmup_cosine(10, 4, 10) == pytest.approx(0.1)
    assert warmup_cosine(99, 4, 10, floor=0.0) == pytest.approx(0.0)  # held at the floor


def _trainers():
    from cantus.tokenize.codec import train as codec
    from cantus.tokenize.mulan import train as mulan
    from cantus.tokenize.semantic import pretrain as semantic
    from cantus.train import run as lm

    return [
        (codec.main, ["--audio", "a", "--out", "o", "--checkpoints", "c"], ("codec", "train")),
        (semantic.main, ["--audio", "a", "--out", "o", "--checkpoints", "c"],
         ("semantic", "pretrain")),
        (mulan.main, ["--audio", "a", "--out", "o", "--checkpoints", "c"], ("mulan", "train")),
        (lm.main, ["--stage", "coarse", "--tokens", "t", "--out", "o", "--checkpoints", "c"],
         ("lm", "coarse", "train")),
    ]


@pytest.mark.parametrize("index", range(4), ids=["codec", "w2v-bert", "mulan", "lm"])
def test_a_bad_key_exits_2_naming_it_before_any_work(index, tmp_path, capsys):
    main, args, where = _trainers()[index]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    section = params
    for key in where:
        section = section[key]
    section["stpes"] = 3  # a typo of steps
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    code = main(["--params", str(tmp_path / "params.yaml"),
                 *[str(tmp_path / a) if not a.startswith("-") and a != "coarse" else a
                   for a in args]])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{'.'.join(where)}.stpes" in err and "configuration error" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()
