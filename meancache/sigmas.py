"""Validation of sigma grids (the noise levels a flow-matching sampler steps through)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from .validation import is_real

__all__ = ["as_sigma_list"]


def as_sigma_list(sigmas: Sequence[float] | torch.Tensor, num_steps: int | None = None) -> list[float]:
    """Check a sigma grid and return it as Python floats.

    A grid holds ``num_steps + 1`` finite values ``sigma_0 > ... >= sigma_N`` (normally ending at 0, as diffusers'
    ``FlowMatchEulerDiscreteScheduler`` builds it). Equal neighbours are accepted: such a zero-length step occurs in
    Z-Image's original grid, and the estimator falls back to reuse there. A tensor grid is read to the host once.

    Args:
        sigmas: 1-D tensor or sequence of floats.
        num_steps: when given, the grid must hold exactly ``num_steps + 1`` values.

    Raises:
        ValueError: wrong length (stating both numbers), not 1-D, non-finite, or increasing anywhere.

    Example:
        >>> as_sigma_list([1.0, 0.5, 0.0], num_steps=2)
        [1.0, 0.5, 0.0]
    """
    if isinstance(sigmas, torch.Tensor):
        if sigmas.dim() != 1:
            raise ValueError(f"sigmas has shape {tuple(sigmas.shape)}: must be 1-D")
        if sigmas.device.type not in ("cpu", "cuda"):
            raise ValueError(
                f"sigmas is on the {sigmas.device} device: the grid is read to the host, so it must be a CPU or "
                "CUDA tensor (or a sequence of floats)"
            )
        if not (sigmas.dtype.is_floating_point or sigmas.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"sigmas dtype={sigmas.dtype}: must be a real floating-point (or integer) tensor")
        values = [float(s) for s in sigmas.detach().to("cpu", torch.float64).tolist()]
    else:
        if isinstance(sigmas, (str, bytes)):
            raise ValueError(f"sigmas={sigmas!r}: must be a 1-D tensor or a sequence of floats")
        try:
            items = list(sigmas)
        except TypeError:
            raise ValueError(f"sigmas={sigmas!r}: must be a 1-D tensor or a sequence of floats") from None
        # a bool or a numeric string is a caller's bug, not a noise level
        wrong = next(((i, s) for i, s in enumerate(items) if not is_real(s)), None)
        if wrong is not None:
            raise ValueError(f"sigmas[{wrong[0]}]={wrong[1]!r}: every sigma must be a real number (bool excluded)")
        values = [float(s) for s in items]
    if num_steps is not None and len(values) != num_steps + 1:
        raise ValueError(
            f"sigmas has {len(values)} values but the schedule has num_steps={num_steps}; "
            f"a grid needs num_steps + 1 = {num_steps + 1} values (the last one normally 0)"
        )
    if len(values) < 2:
        raise ValueError(f"sigmas has {len(values)} value(s): need at least 2")
    bad = [(i, s) for i, s in enumerate(values) if not math.isfinite(s)]
    if bad:
        raise ValueError(f"sigmas[{bad[0][0]}]={bad[0][1]}: every sigma must be finite")
    for i in range(len(values) - 1):
        if values[i + 1] > values[i]:
            raise ValueError(
                f"sigmas[{i + 1}]={values[i + 1]} > sigmas[{i}]={values[i]}: sigmas must decrease "
                "(from noise towards data)"
            )
    if values[0] == values[-1]:
        raise ValueError(f"sigmas are all {values[0]}: the grid must decrease from first to last")
    return values
