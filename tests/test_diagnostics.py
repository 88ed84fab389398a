"""Per-hop diagnostics: each tells a working hop from a broken one on inputs built in code."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

from cantus.evaluate import diagnostics as D
from cantus.train.layout import Layout, stage_spec

K = 16
LOGIT = 10.0


class FirstTokenModel(torch.nn.Module):
    """A stand-in LM (``model(ids, head=False)`` and tied ``embed``): one-hot embeddings,
    and every position predicts, in every block, the code of the sequence's first id
    (``copy``) or nothing (uniform, ``copy=False``)."""

    def __init__(self, vocab: int, copy: bool):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, vocab)
        self.embed.weight.data = torch.eye(vocab)
        self.copy, self.k = copy, K

    def forward(self, ids: torch.Tensor, head: bool = True, cond=None) -> torch.Tensor:
        b, t = ids.shape
        h = torch.zeros(b, t, self.embed.weight.shape[0])
        if self.copy:
            code = ids[:, 0] % self.k
            for blk in range(h.shape[-1] // self.k):
                h[torch.arange(b), :, blk * self.k + code] = LOGIT
        return h


def semantic_clips(n: int, frames: int) -> list[tuple[str, dict[str, np.ndarray]]]:
    """Clip i: MuLan codes all i, every semantic token i (so MuLan level 0 tells it)."""
    return [(f"k{i}", {"mulan": np.full(12, i, np.uint16),
                       "semantic": np.full(frames, i, np.uint16),
                       "acoustic": np.zeros((12, 2 * frames), np.uint16)}) for i in range(n)]


def test_derangement_moves_every_clip_and_is_seeded():
    for n in (2, 3, 10):
        p = D.derangement(n, seed=n)
        assert sorted(p.tolist()) == list(range(n)) and (p != np.arange(n)).all()
        assert np.array_equal(p, D.derangement(n, seed=n))
    with pytest.raises(ValueError):
        D.derangement(1, 0)


def test_sensitivity_tells_a_model_that_uses_conditioning_from_one_that_ignores_it():
    lay = Layout(stage_spec("semantic"), K, 0.4, False)      # 10 semantic frames
    clips = semantic_clips(6, 10)
    used = D.sensitivity(FirstTokenModel(lay.vocab_size, True), lay, clips, seed=0)
    # own: the right code at logit 10 among K; swapped: always a wrong code
    z = math.exp(LOGIT) + K - 1
    assert used["n"] == 6 and used["swapped_fields"] == ["mulan"]
    assert used["own_ppl"] == pytest.approx(z / math.exp(LOGIT), rel=1e-4)
    assert used["swapped_ppl"] == pytest.approx(z, rel=1e-4)
    assert used["ratio"] == pytest.approx(used["swapped_ppl"] / used["own_ppl"])
    assert used["null_ppl"] > 1000           # null conditioning: no code is told
    ignored = D.sensitivity(FirstTokenModel(lay.vocab_size, False), lay, clips, seed=0)
    assert ignored["own_ppl"] == pytest.approx(K) and ignored["ratio"] == pytest.approx(1.0)
    rows = D.sensitivity_rows("semantic", used)
    assert {r["role"] for r in rows} == {"cantus", "baseline"} and all(r["n"] == 6 for r in rows)


def test_fine_swap_replaces_only_the_coarse_levels_and_short_crops_are_left_out():
    lay = Layout(stage_spec("fine"), K, 0.2, False)          # 10 acoustic frames
    own = {"acoustic": np.zeros((12, 10), np.uint16)}
    other = {"acoustic": np.ones((12, 10), np.uint16)}
    got = D.swap_conditioning(lay, own, other, ("acoustic",))["acoustic"]
    assert (got[:4] == 1).all() and (got[4:] == 0).all() and (own["acoustic"] == 0).all()
    short = [("a", {"acoustic": np.zeros((12, 4), np.uint16)}),
             ("b", {"acoustic": np.zeros((12, 4), np.uint16)})]
    s = D.sensitivity(FirstTokenModel(lay.vocab_size, True), lay, short, seed=0)
    assert s["n"] == 0 and s["ratio"] is None


def test_code_agreement_is_one_for_equal_codes_and_chance_for_other_clips():
    rng = np.random.default_rng(0)
    audio = rng.integers(0, 4, (20, 12))
    a = D.code_agreement(audio.copy(), audio)
    assert a["own"] == [1.0] * 12 and a["n"] == 20
    assert all(x < 0.6 for x in a["other_clips"])             # ~1/4 for 4 codes
    same_code = np.zeros((5, 3), int)                          # every clip one code: no info
    b = D.code_agreement(same_code, same_code)
    assert b["own"] == b["other_clips"] == [1.0] * 3
    shifted = D.code_agreement(np.roll(audio, 1, axis=0), audio)   # each text on the next clip
    assert shifted["own"][0] < 0.6
    with pytest.raises(ValueError):
        D.code_agreement(audio[:1], audio[:1])


def test_codec_hearing_compares_real_and_codec_against_chance():
    rng = np.random.default_rng(1)
    text = rng.normal(size=(4, 8))
    real, noise = text.copy(), rng.normal(size=(4, 8))
    classes = ["banjo", "harp"]
    labels = [["harp"], ["banjo"], ["harp"], ["banjo", "harp"]]
    right = np.array([[0, 1], [1, 0], [0, 1], [1, 0]], float)
    h = D.codec_hearing(text, real, noise, right, right[:, ::-1], classes, labels)
    assert h["mcc"]["real"] == pytest.approx(1.0) and h["mcc"]["codec"] < 0.9
    assert h["instrument"]["real"] == 1.0 and h["instrument"]["codec"] == 0.25
    assert h["instrument"]["chance"] == pytest.approx((0.5 + 0.5 + 0.5 + 1.0) / 4)
    assert len(D.codec_hearing_rows(h)) == 6


def test_alarms_raise_on_collapse_and_not_on_a_healthy_run(tmp_path, caplog):
    healthy = D.alarms(0.3, 16, [238.2, 15.2])
    assert not any(a["raised"] for a in healthy.values()) and len(healthy) == 3
    with caplog.at_level(logging.WARNING, logger="cantus.evaluate.diagnostics"):
        bad = D.alarms(math.log(16) - 0.01, 16, [238.2, 1.0])
    assert bad["mulan_infonce"]["raised"] and bad["codec_level_1"]["raised"]
    assert not bad["codec_level_0"]["raised"]
    assert bad["mulan_infonce"]["threshold"] == pytest.approx(0.9 * math.log(16))
    assert "mulan_infonce" in caplog.text and "codec_level_1" in caplog.text
    rows = D.alarm_rows(bad)
    assert [r["raised"] for r in rows] == [True, False, True]
    # the training loss: the last logged steps of the dvclive curve, else metrics.json
    live = tmp_path / "mulan_train"
    (live / "plots" / "metrics").mkdir(parents=True)
    (live / "metrics.json").write_text(json.dumps({"loss": 0.5}))
    assert D.mulan_final_loss(live) == 0.5
    (live / "plots" / "metrics" / "loss.tsv").write_text("step\tloss\n10\t3.0\n20\t1.0\n30\t2.0\n")
    assert D.mulan_final_loss(live, last=2) == pytest.approx(1.5)
    assert D.mulan_final_loss(tmp_path / "nowhere") is None
