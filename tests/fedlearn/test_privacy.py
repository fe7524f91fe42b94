import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hearthnet.fedlearn.privacy import (
    NoiseSource,
    add_dp_noise,
    clip_gradient,
    epsilon_estimate,
    global_norm,
    round_epsilon,
)


def sd(seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        "a": (torch.randn(20, 8, generator=g) * scale).to(dtype),
        "b": (torch.randn(8, 4, generator=g) * scale).to(dtype),
    }


def test_dp_noise_zero_is_identity():
    d = sd()
    out = add_dp_noise(d, 0.0, NoiseSource(bytes(32)))
    assert all(out[k] is d[k] for k in d)


def test_dp_noise_is_keyed_gaussian_with_the_requested_std():
    d = {"x": torch.zeros(200_001)}  # odd: Box–Muller's pairs are cut to size
    a = add_dp_noise(d, 0.3, NoiseSource(bytes(32)))
    b = add_dp_noise(d, 0.3, NoiseSource(bytes(32)))
    assert torch.equal(a["x"], b["x"])  # the same key, the same noise
    assert abs(float(a["x"].std()) - 0.3) < 0.005
    assert abs(float(a["x"].mean())) < 0.005
    # Gaussian tails, not just the right variance: P(|z| > 3) ≈ 0.27%.
    assert 0.0020 < float((a["x"].abs() > 0.9).double().mean()) < 0.0034
    fresh = add_dp_noise(d, 0.3, NoiseSource())  # no key given: a secret one from the OS
    assert not torch.equal(fresh["x"], a["x"])
    with pytest.raises(ValueError):
        add_dp_noise(d, -1.0, NoiseSource())
    with pytest.raises(ValueError):
        NoiseSource(b"short")


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    scale=st.floats(1e-4, 1e3),
    max_norm=st.floats(1e-3, 10.0),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_clip_gradient_norm(seed, scale, max_norm, dtype):
    d = sd(seed, scale, dtype)
    out = clip_gradient(d, max_norm)
    assert global_norm(out) <= max_norm
    if global_norm(d) <= max_norm:
        assert all(torch.equal(out[k], d[k]) for k in d)
    else:
        assert global_norm(out) >= max_norm * 0.98  # scaled, not zeroed
        assert all(out[k].dtype == dtype for k in d)


def test_epsilon_estimate():
    assert epsilon_estimate(0.0, 1.0, 10, 4, 100) == math.inf
    e1 = round_epsilon(1.0, 1.0)
    e2 = round_epsilon(2.0, 1.0)
    assert 0 < e2 < e1 < math.inf
    assert round_epsilon(2.0, 2.0) == pytest.approx(e1)  # only the ratio matters
    # Subsampling amplifies privacy; more steps cost more.
    assert epsilon_estimate(1.0, 1.0, 10, 1, 100) < epsilon_estimate(1.0, 1.0, 10, 100, 100)
    assert epsilon_estimate(1.0, 1.0, 100, 1, 100) > epsilon_estimate(1.0, 1.0, 10, 1, 100)
    # DP-SGD's textbook case (σ=1.1, q=0.01, 1000 steps, δ=1e-5) is around ε≈1.7 with RDP.
    assert 1.0 < epsilon_estimate(1.1, 1.0, 1000, 1, 100) < 2.5
    with pytest.raises(ValueError):
        epsilon_estimate(1.0, 0.0, 1, 1, 1)
