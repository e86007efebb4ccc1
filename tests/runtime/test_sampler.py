from __future__ import annotations

import numpy as np
import pytest

from trtc.errors import TrtcError
from trtc.runtime.sampler import Sampler, SamplingParams


def logits(seed=0, b=3, v=50):
    return np.random.default_rng(seed).standard_normal((b, v)).astype(np.float32) * 3


def test_greedy_is_argmax():
    x = logits()
    assert np.array_equal(Sampler(SamplingParams())(x), x.argmax(-1))


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


def test_top_k_excludes_the_tail():
    x = np.log(np.array([[0.4, 0.35, 0.25]], dtype=np.float32))
    s = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0))
    assert {int(s(x)[0]) for _ in range(500)} == {0, 1}


@pytest.mark.parametrize("kw", [{"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_params(kw):
    with pytest.raises(TrtcError):
        SamplingParams(**kw)
