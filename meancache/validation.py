"""Checks of what callers hand MeanCache: latents and the model's velocities (metadata only, no device sync)."""

from __future__ import annotations

import numbers

import torch

__all__ = ["SUPPORTED_DTYPES", "check_latents", "check_velocity", "is_int", "is_real"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_latents(latents, name: str = "latents") -> None:
    """Raise ValueError unless ``latents`` is a tensor of a supported float dtype (fp16, bf16, fp32, fp64).

    Example:
        >>> import torch
        >>> check_latents(torch.zeros(2, 4, dtype=torch.bfloat16))
        >>> check_latents(torch.zeros(2, dtype=torch.int64))
        Traceback (most recent call last):
        ...
        ValueError: latents dtype=torch.int64: must be one of float16, bfloat16, float32, float64
    """
    if not isinstance(latents, torch.Tensor):
        raise ValueError(f"{name} is a {type(latents).__name__}: must be a torch.Tensor")
    if latents.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{name} dtype={latents.dtype}: must be one of float16, bfloat16, float32, float64"
        )


def check_velocity(v, x: torch.Tensor, where: str) -> None:
    """Raise ValueError unless the model's velocity ``v`` is a float tensor shaped and placed like ``x``.

    Example:
        >>> import torch
        >>> check_velocity(torch.zeros(2, 3), torch.ones(3), "the model")
        Traceback (most recent call last):
        ...
        ValueError: the model returned velocity of shape (2, 3) for latents of shape (3,): they must match
    """
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"{where} returned a {type(v).__name__}: the velocity must be a torch.Tensor")
    if v.shape != x.shape:
        raise ValueError(
            f"{where} returned velocity of shape {tuple(v.shape)} for latents of shape {tuple(x.shape)}: "
            "they must match"
        )
    if v.device != x.device:
        raise ValueError(f"{where} returned velocity on {v.device} for latents on {x.device}: they must match")
    if not v.dtype.is_floating_point:
        raise ValueError(f"{where} returned velocity of dtype {v.dtype}: must be floating point")


def is_int(value) -> bool:
    """An integer argument: numpy and torch integer scalars count, ``bool`` does not (a True step index or budget
    is a caller bug).

    Example:
        >>> is_int(3), is_int(True), is_int(2.0)
        (True, False, False)
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real-number argument (``bool`` excluded).

    Example:
        >>> is_real(0.5), is_real(True)
        (True, False)
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
