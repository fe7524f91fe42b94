"""Clipping, DP noise and the privacy estimate (README.md, "Federated learning: the data plane").

What the numbers mean. A participant clips its whole LoRA delta to L2 norm `clip_norm` and adds
Gaussian noise of standard deviation `dp_noise_scale` once, before submitting. For one round that
is the Gaussian mechanism with sensitivity `clip_norm` and noise multiplier
σ = dp_noise_scale / clip_norm, protecting the participant's entire contribution (add/remove of a
participant). `epsilon_estimate` computes (ε, δ) with Google's `dp_accounting` RDP accountant for
`n_steps` compositions of the Poisson-subsampled Gaussian mechanism with sampling rate
batch / dataset_size. With n_steps = 1 and batch = dataset_size (`round_epsilon`) it is exactly
the participant-level guarantee above. Called with a round's training steps and batch size it is
the DP-SGD example-level number, which holds only for training that clips and noises every
example's gradient at every step; hearthnet's trainer does not, so it reports `round_epsilon`.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping

import dp_accounting
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from dp_accounting import rdp

from hearthnet.constants import FEDLEARN_DP_DELTA_DEFAULT

StateDict = Mapping[str, torch.Tensor]


def global_norm(state_dict: StateDict) -> float:
    """The L2 norm of all tensors together, in float64 so a bf16 delta is measured exactly enough
    to clip."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in state_dict.values()))


def clip_gradient(state_dict: StateDict, max_norm: float) -> dict[str, torch.Tensor]:
    """Scale every tensor by one factor so the global L2 norm is at most `max_norm`."""
    if not max_norm > 0:
        raise ValueError("max_norm must be > 0")
    norm = global_norm(state_dict)
    if norm <= max_norm:
        return dict(state_dict)
    factor = max_norm / norm
    out = {k: (t.double() * factor).to(t.dtype) for k, t in state_dict.items()}
    # Rounding back to a narrow dtype can land a hair above the bound: shrink until it holds.
    while global_norm(out) > max_norm:
        factor *= 1 - 2**-10
        out = {k: (t.double() * factor).to(t.dtype) for k, t in state_dict.items()}
    return out


class NoiseSource:
    """Standard normal samples from a cryptographic stream: ChaCha20 keyed with 32 secret bytes
    (fresh from the OS unless a key is given, as tests do for reproducibility), turned into
    Gaussians by Box–Muller in float64. DP noise must not be predictable from anything an
    observer could learn, which a seeded Mersenne Twister (torch's CPU generator) does not
    promise: its state is recoverable from its output."""

    def __init__(self, key: bytes | None = None):
        key = secrets.token_bytes(32) if key is None else key
        if len(key) != 32:
            raise ValueError("a NoiseSource key is 32 bytes")
        cipher = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None)
        self._stream = cipher.encryptor()

    def _uniform(self, n: int) -> torch.Tensor:
        """n doubles uniform in (0, 1], 53 random bits each."""
        raw = self._stream.update(bytes(8 * n))
        bits = torch.frombuffer(bytearray(raw), dtype=torch.int64)
        return ((bits >> 11) & ((1 << 53) - 1)).double().add_(1.0).mul_(2.0**-53)

    def normal(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A float64 tensor of standard normal samples of `shape`."""
        count = math.prod(shape)
        half = (count + 1) // 2
        u1, u2 = self._uniform(half), self._uniform(half)
        radius = torch.sqrt(-2.0 * torch.log(u1))
        angle = 2.0 * math.pi * u2
        both = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])
        return both[:count].reshape(shape)


def add_dp_noise(state_dict: StateDict, scale: float, rng: NoiseSource) -> dict[str, torch.Tensor]:
    """Add N(0, scale²) to every entry; `scale == 0` returns the tensors untouched."""
    if scale < 0 or not math.isfinite(scale):
        raise ValueError("scale must be finite and >= 0")
    if scale == 0:
        return dict(state_dict)
    out = {}
    for key in sorted(state_dict):  # fixed order: the same key gives the same noise
        t = state_dict[key]
        noise = rng.normal(tuple(t.shape)) * scale
        out[key] = (t.double() + noise).to(t.dtype)
    return out


def epsilon_estimate(
    scale: float,
    clip: float,
    n_steps: int,
    batch: int,
    dataset_size: int,
    delta: float = FEDLEARN_DP_DELTA_DEFAULT,
) -> float:
    """ε for `n_steps` Poisson-subsampled Gaussian steps (see the module docstring); inf when
    there is no noise."""
    if clip <= 0 or n_steps < 1 or batch < 1 or dataset_size < 1 or not 0 < delta < 1:
        raise ValueError("clip, n_steps, batch and dataset_size must be positive; 0 < delta < 1")
    if scale <= 0:
        return math.inf
    sigma = scale / clip
    q = min(1.0, batch / dataset_size)
    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(sigma)
    if q < 1.0:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    accountant = rdp.RdpAccountant()
    accountant.compose(event, n_steps)
    return float(accountant.get_epsilon(delta))


def round_epsilon(scale: float, clip: float, delta: float = FEDLEARN_DP_DELTA_DEFAULT) -> float:
    """The participant-level (ε, δ) of one round of clip-then-noise on the whole delta."""
    return epsilon_estimate(scale, clip, 1, 1, 1, delta)
