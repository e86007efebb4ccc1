from __future__ import annotations

import numpy as np
import pytest

from trtc.errors import TrtcError
from trtc.runtime.sampler import Sampler, SamplingParams


def logits(seed=0, b=3, v=50):
    return np.random.default_rng(seed).standard_normal((b, v)).astype(np.float32) * 3


@pytest.mark.parametrize("kw", [{}, {"seed": 5}, {"top_k": 3, "top_p": 0.5, "seed": 5}])
def test_temperature_0_is_argmax(kw):
    """Greedy whatever the other options: every row of 200 random [8, 50] logits (no rng draw)."""
    s = Sampler(SamplingParams(temperature=0.0, **kw))
    for seed in range(200):
        x = logits(seed, b=8)
        assert np.array_equal(s(x), x.argmax(-1))


def test_top_k_1_is_greedy_at_any_temperature():
    x = logits(1)
    assert np.array_equal(Sampler(SamplingParams(temperature=5.0, top_k=1, seed=3))(x), x.argmax(-1))


def test_tiny_top_p_keeps_only_the_top_token():
    x = logits(2)
    assert np.array_equal(Sampler(SamplingParams(temperature=1.0, top_p=1e-6, seed=3))(x), x.argmax(-1))


def test_seeded_sampling_repeats_and_covers_the_distribution():
    x = np.log(np.array([[0.5, 0.3, 0.2]], dtype=np.float32))
    s = Sampler(SamplingParams(temperature=1.0, seed=11))
    draws = np.array([s(x)[0] for _ in range(4000)])
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.03)
    s2 = Sampler(SamplingParams(temperature=1.0, seed=11))
    assert np.array_equal(draws[:50], [s2(x)[0] for _ in range(50)])


def test_different_seeds_draw_differently():
    """Sampling is random, not silently greedy: over 100 steps of the same [3, 50] logits, two
    seeds give different draws, and both leave the argmax often (it holds 8-28% of the mass)."""
    x = logits(3) / 3                                    # N(0, 1) logits: no token dominates
    draws = {}
    for seed in (1, 2):
        s = Sampler(SamplingParams(temperature=1.0, seed=seed))
        draws[seed] = np.stack([s(x) for _ in range(100)])         # [100, 3]
    assert not np.array_equal(draws[1], draws[2])
    for d in draws.values():
        assert (d != x.argmax(-1)).mean() > 0.5
        assert len(np.unique(d)) > 20


def test_top_k_excludes_the_tail():
    x = np.log(np.array([[0.4, 0.35, 0.25]], dtype=np.float32))
    s = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0))
    assert {int(s(x)[0]) for _ in range(500)} == {0, 1}


@pytest.mark.parametrize("kw", [{"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_params(kw):
    with pytest.raises(TrtcError):
        SamplingParams(**kw)
