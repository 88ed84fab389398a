"""Evaluation metrics: MCC, FAD, KLD, adherence, on arrays with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from cantus.evaluate import metrics as M


def test_mcc_is_one_for_identical_embeddings_and_near_zero_for_random_ones():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 128))
    assert M.mcc(x, x) == pytest.approx(1.0)
    assert M.mcc(x, 3 * x) == pytest.approx(1.0)                  # scale-free
    assert abs(M.mcc(x, rng.normal(size=(64, 128)))) < 0.05
    assert M.mcc(x, -x) == pytest.approx(-1.0)


def test_mismatched_cosine_is_the_chance_level_of_mcc():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 32))
    prompts = [f"p{i}" for i in range(16)]
    # audio equal to its own text: matching pairs score 1, mismatched ones about 0
    assert abs(M.mismatched_cosine(x, x, prompts)) < 0.1
    with pytest.raises(ValueError, match="two different prompts"):
        M.mismatched_cosine(x[:2], x[:2], ["same", "same"])


def test_fad_of_a_set_with_itself_is_zero_and_grows_with_noise():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 16))
    assert M.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    fads = [M.frechet_distance(x, x + s * rng.normal(size=x.shape)) for s in (0.1, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(fads, fads[1:]))
    shifted = M.frechet_distance(x, x + 1.0)                        # mean shift: 16 * 1^2
    assert shifted == pytest.approx(16.0, rel=1e-6)


def test_fad_stays_finite_when_there_are_fewer_samples_than_dimensions():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 64)), rng.normal(size=(7, 64))
    d = M.frechet_distance(a, b)
    assert np.isfinite(d) and d > 0
    with pytest.raises(ValueError, match="at least 2"):
        M.frechet_distance(a[:1], b)


def test_kld_is_zero_for_equal_distributions_and_positive_otherwise():
    p = M.softmax(np.random.default_rng(4).normal(size=(10, 5)))
    assert M.kl_divergence(p, p) == pytest.approx(0.0, abs=1e-9)
    q = M.softmax(np.zeros((10, 5)))
    assert M.kl_divergence(p, q) > 0
    with pytest.raises(ValueError, match="paired rows"):
        M.kl_divergence(p, q[:3])


def test_adherence_counts_hits_beside_chance_and_prior():
    probs = np.eye(4)[[0, 1, 2, 2]]                  # predictions 0, 1, 2, 2
    a = M.adherence(probs, [0, 1, 2, 3])
    assert a["accuracy"] == 0.75 and a["chance"] == 0.25 and a["n"] == 4
    # prompt 2: one of the three other generations is classed 2; prompt 3: none
    assert a["prior"] == pytest.approx(np.mean([0, 0, 1 / 3, 0]))
