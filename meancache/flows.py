"""Flows with closed-form velocities, for tests, benchmarks and the demo.

``GaussianMixtureFlow`` is the exact rectified flow from standard normal noise to an isotropic Gaussian mixture:
with ``x_sigma = (1 - sigma) * x_data + sigma * noise``, its velocity ``v = E[noise - x_data | x_sigma]`` has a
closed form, and its trajectories curve (they bend towards one mixture component as sigma falls), which is what
makes a cache's error visible.
"""

from __future__ import annotations

import math

import torch
from .validation import is_int
from .validation import is_real

__all__ = ["GaussianMixtureFlow", "shifted_sigmas"]


class GaussianMixtureFlow:
    """Exact velocity of the rectified flow to ``sum_k w_k N(mu_k, s_k^2 I)`` in ``dim`` dimensions.

    For component k, with ``a = 1 - sigma`` and ``c_k = a^2 s_k^2 + sigma^2``, the posterior mean of
    ``noise - data`` given ``x`` is ``(sigma - a s_k^2) / c_k * (x - a mu_k) - mu_k``; the velocity is their
    average under the component posterior ``p(k | x) ∝ w_k N(x; a mu_k, c_k I)``. Computed in float64 internally
    (when the input is float64) or float32, and returned in the input dtype.

    Args:
        dim: size of the last latent dimension; leading dimensions are batch.
        components: number of mixture components.
        seed: seed of the component means, scales and weights.
        spread: scale of the means (larger means more curved trajectories).
        scale: standard deviation of every component; None (default): drawn per component in 0.15..0.5. Narrow
            components with distant means make sharp flows, whose trajectories turn late and fast.

    Example:
        >>> import torch
        >>> flow = GaussianMixtureFlow(dim=4, components=3)
        >>> flow(torch.zeros(2, 4), 0.5).shape
        torch.Size([2, 4])
    """

    def __init__(self, dim: int = 16, components: int = 8, seed: int = 0, spread: float = 2.0,
                 scale: float | None = None):
        if dim < 1 or components < 1:
            raise ValueError(f"dim={dim}, components={components}: both must be >= 1")
        if scale is not None and not (is_real(scale) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale={scale!r}: must be None or a number > 0")
        g = torch.Generator().manual_seed(seed)
        self.dim = dim
        self.means = spread * torch.randn(components, dim, generator=g, dtype=torch.float64)
        self.scales = 0.15 + 0.35 * torch.rand(components, generator=g, dtype=torch.float64)
        if scale is not None:  # drawn anyway, so the weights are the same draws as with scale=None
            self.scales = torch.full_like(self.scales, float(scale))
        self.log_weights = torch.log_softmax(torch.randn(components, generator=g, dtype=torch.float64), 0)
        self.calls = 0

    def velocity(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """Velocity ``dx/dsigma`` at ``x`` (shape ``(..., dim)``) and noise level ``sigma`` in [0, 1]."""
        self.calls += 1
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.to(work).reshape(-1, self.dim)
        mu = self.means.to(device=x.device, dtype=work)
        s2 = (self.scales**2).to(device=x.device, dtype=work)
        a = 1.0 - sigma
        c = a * a * s2 + sigma * sigma  # (K,)
        centre = a * mu  # (K, D)
        # squared distances via the expansion |x|^2 - 2 x.m + |m|^2, one matmul for all components
        d2 = (xf * xf).sum(-1, keepdim=True) - 2.0 * xf @ centre.T + (centre * centre).sum(-1)
        logp = self.log_weights.to(device=x.device, dtype=work) - 0.5 * d2 / c - 0.5 * self.dim * torch.log(c)
        w = torch.softmax(logp, dim=-1)  # (M, K)
        gain = (sigma - a * s2) / c  # (K,)
        # sum_k w_k [gain_k (x - a mu_k) - mu_k] = (w @ gain) x - w @ ((a gain_k + 1) mu_k)
        v = (w @ gain).unsqueeze(-1) * xf - w @ ((a * gain + 1.0).unsqueeze(-1) * mu)
        return v.reshape(x.shape).to(x.dtype)

    __call__ = velocity


def shifted_sigmas(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    """The FLUX/SD3-style grid: ``linspace(1, 1/N, N)`` under the time shift ``s*t / (1 + (s-1)*t)``, then 0.

    Returns a float64 tensor of ``num_steps + 1`` values, as diffusers' ``FlowMatchEulerDiscreteScheduler`` builds
    with ``shift`` (``use_dynamic_shifting=False``).

    Example:
        >>> shifted_sigmas(4, shift=1.0).tolist()
        [1.0, 0.75, 0.5, 0.25, 0.0]
    """
    if not is_int(num_steps) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r}: must be an int >= 1")
    if not is_real(shift) or not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift={shift!r}: must be a finite number > 0")
    num_steps = int(num_steps)
    t = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    s = shift * t / (1.0 + (shift - 1.0) * t)
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])
