"""Pure-torch MeanCache step math: the reference every faster backend is held to, and the CPU path.

All math runs in the history dtype (float32, or float64 for float64 latents); results are cast to the latent dtype
once, at the end. Inference only: nothing here is differentiable on purpose.
"""

from __future__ import annotations

import torch

from .history import History

__all__ = ["average_velocity", "euler_step", "estimate_from_history"]


def average_velocity(
    x: torch.Tensor,
    x_start: torch.Tensor,
    v_start: torch.Tensor,
    v_last: torch.Tensor,
    sigma_start: float,
    sigma_now: float,
    sigma_next: float,
) -> torch.Tensor:
    """MeanCache's estimate of the average velocity over ``[sigma_now, sigma_next]`` (algorithm.md §2.2).

    With ``D = sigma_now - sigma_start`` (< 0):
    ``avg = (x - x_start) / D``, ``jvp = (v_start - avg) / D``, ``v_hat = v_last - jvp * (sigma_next - sigma_now)``.
    When ``D == 0`` (repeated sigmas) the JVP term is dropped and ``v_last`` is reused, instead of producing NaN.

    Args:
        x: current latent x_i, any float dtype, shape S.
        x_start, v_start: latent and velocity logged at the window start j0, shape S, compute dtype.
        v_last: newest logged velocity v_{i-1}, shape S, compute dtype.
        sigma_start, sigma_now, sigma_next: sigma at j0, i and i + 1 (Python floats).

    Returns:
        v_hat of shape S in the dtype of ``x_start``.

    Example:
        >>> import torch
        >>> z = torch.zeros(2)
        >>> average_velocity(z, z, z, torch.ones(2), 1.0, 0.5, 0.25)
        tensor([1., 1.])
    """
    d = sigma_now - sigma_start
    if d == 0.0:
        return v_last.clone()
    avg = (x.to(x_start.dtype) - x_start) / d
    jvp = (v_start - avg) / d
    return v_last - jvp * (sigma_next - sigma_now)


def estimate_from_history(
    x: torch.Tensor, history: History, order: int, step: int, sigmas: list[float]
) -> torch.Tensor:
    """v_hat at skipped ``step`` from a window of ``order`` logged steps, truncated to what the history holds.

    The window start is ``j0 = step - min(order, history entries)``: the official rule, whose history holds every
    step, truncates at the start of the trajectory the same way.

    Args:
        x: latent at the start of ``step``, shape S.
        history: the trajectory's ring; ``history.count`` must equal ``step``.
        order: window K >= 1.
        step: index i of the skipped step.
        sigmas: the full sigma grid (``num_steps + 1`` floats).

    Returns:
        v_hat, shape S, history dtype.

    Example:
        >>> import torch
        >>> h = History(2); h.push(torch.zeros(3), torch.ones(3))
        >>> estimate_from_history(torch.full((3,), -0.5), h, 2, 1, [1.0, 0.5, 0.0])
        tensor([1., 1., 1.])
    """
    if order < 1:
        raise ValueError(f"order={order}: a skipped step needs a window K >= 1")
    if history.count != step:
        raise ValueError(f"history holds {history.count} steps but step={step}; the trajectory is out of sync")
    if history.count == 0:
        raise ValueError("step 0 cannot be skipped: the history is empty")
    k = min(order, len(history))
    j0 = step - k
    return average_velocity(
        x, history.x(j0), history.v(j0), history.v(step - 1), sigmas[j0], sigmas[step], sigmas[step + 1]
    )


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma_now: float, sigma_next: float) -> torch.Tensor:
    """``x + (sigma_next - sigma_now) * v`` in the dtype of ``v`` (fp32 for low-precision latents), cast to x's dtype.

    Example:
        >>> import torch
        >>> euler_step(torch.ones(2, dtype=torch.bfloat16), torch.ones(2), 1.0, 0.75)
        tensor([0.7500, 0.7500], dtype=torch.bfloat16)
    """
    return (x.to(v.dtype) + (sigma_next - sigma_now) * v).to(x.dtype)
