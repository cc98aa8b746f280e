"""Triton launcher for the model-level MeanCache estimate: v_hat from the ring, logged, returned; no Euler step."""

from __future__ import annotations

import torch

from .skip_step import launch_estimator

__all__ = ["estimate_triton"]


def estimate_triton(x: torch.Tensor, xs: torch.Tensor, vs: torch.Tensor, slot_start: int, slot_last: int,
                    slot_write: int, inv_d: float, dt: float, out_scale: float,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """Triton version of :func:`meancache.reference.estimate_ref` (same arguments and result).

    Example (CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1``):
        >>> import torch
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> xs, vs = torch.zeros(2, 3, device=dev), torch.ones(2, 3, device=dev)
        >>> estimate_triton(torch.zeros(3, device=dev), xs, vs, 0, 0, 1, 0.0, -0.5, -1.0, torch.float16).tolist()
        [-1.0, -1.0, -1.0]
    """
    return launch_estimator(x, xs, vs, slot_start, slot_last, slot_write, inv_d, dt, out_scale, out_dtype,
                            euler=False)
