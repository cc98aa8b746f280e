"""Velocity fields shared by the tests: a random smooth field and the analytic Gaussian-mixture flow."""

from __future__ import annotations

import torch

from meancache.flows import GaussianMixtureFlow


class SmoothField:
    """A random smooth, time-dependent velocity field ``v(x, s) = tanh(x W + s b) * (1 + s) - c s^2``.

    Acts on the last dimension (size ``dim``); evaluated in float64 and returned in the input dtype, so the same
    field can drive float64 and lower-precision runs. Counts its calls.
    """

    def __init__(self, dim: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5
        self.b = torch.randn(dim, generator=g, dtype=torch.float64)
        self.c = torch.randn(dim, generator=g, dtype=torch.float64)
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        self.calls += 1
        xd = x.to(torch.float64)
        w, b, c = (t.to(x.device) for t in (self.w, self.b, self.c))
        v = torch.tanh(xd @ w + sigma * b) * (1.0 + sigma) - c * sigma**2
        return v.to(x.dtype)


def make_field(kind: str, dim: int, seed: int = 0):
    """``"smooth"`` or ``"mixture"`` velocity field over a last dimension of size ``dim``."""
    if kind == "smooth":
        return SmoothField(dim, seed)
    if kind == "mixture":
        return GaussianMixtureFlow(dim=dim, components=6, seed=seed)
    raise ValueError(kind)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` computed in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()
