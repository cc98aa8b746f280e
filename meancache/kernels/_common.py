"""Launch geometry and the output cast shared by the Triton kernels."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The interpreter runs programs one after another in numpy, so fewer, larger blocks are much faster there.
BLOCK = 8192 if INTERPRET else 1024
NUM_WARPS = 4


def grid(n: int) -> tuple[int]:
    """One program per BLOCK elements."""
    return (triton.cdiv(n, BLOCK),)


def round_bf16_by_hand(out: torch.Tensor) -> bool:
    """True when the kernel must round to bfloat16 itself: Triton's interpreter truncates fp32 -> bf16 casts,
    while compiled kernels (and torch) round to nearest even."""
    return INTERPRET and out.dtype == torch.bfloat16


@triton.jit
def cast_out(value, out_ptr, RNE_BF16: tl.constexpr):
    """``value`` (fp32) in the output's dtype, rounded to nearest even."""
    if RNE_BF16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return value.to(out_ptr.dtype.element_ty)


def check_launch(fn: str, x: torch.Tensor, xs: torch.Tensor, vs: torch.Tensor, v: torch.Tensor | None = None,
                 **slots: int) -> None:
    """Refuse a launch that would address memory outside the ring: the kernels index rows as ``slot * x.numel()``
    from the bases of ``xs`` and ``vs`` and trust both to hold C such rows of float32.

    :mod:`meancache.ops` validates more (and first); this guards direct callers of the launchers.
    """
    if xs.shape != vs.shape:
        raise ValueError(f"{fn}: xs has shape {tuple(xs.shape)} but vs has shape {tuple(vs.shape)}: they must match")
    if xs.dim() < 1 or xs.shape[0] < 1 or xs[0].numel() != x.numel():
        raise ValueError(f"{fn}: xs has shape {tuple(xs.shape)}: must be (C, *x.shape) with x.shape={tuple(x.shape)}")
    for name, ring in (("xs", xs), ("vs", vs)):
        if ring.dtype != torch.float32 or not ring.is_contiguous() or ring.device != x.device:
            raise ValueError(
                f"{fn}: {name} is {ring.dtype} on {ring.device}, contiguous={ring.is_contiguous()}: must be contiguous "
                f"float32 on {x.device}"
            )
    if v is not None and (v.numel() != x.numel() or v.device != x.device):
        raise ValueError(
            f"{fn}: v has shape {tuple(v.shape)} on {v.device}: must be x.shape={tuple(x.shape)} on {x.device}"
        )
    for name, slot in slots.items():
        if not 0 <= slot < xs.shape[0]:
            raise ValueError(f"{fn}: {name}={slot}: must be in 0..{xs.shape[0] - 1} (xs.shape[0]={xs.shape[0]})")


@triton.jit
def log_and_output(xs_ptr, vs_ptr, out_ptr, write, offs, mask, x, v_hat, dt, out_scale, EULER: tl.constexpr,
                   RNE_BF16: tl.constexpr):
    """The common end of the skipped-step kernels: log ``(x, v_hat)`` in ring row ``write`` (an int64 element
    offset), then store the Euler step ``x + dt * v_hat`` (EULER) or the estimate ``v_hat * out_scale``."""
    tl.store(xs_ptr + write + offs, x, mask=mask)
    tl.store(vs_ptr + write + offs, v_hat, mask=mask)
    if EULER:
        tl.store(out_ptr + offs, cast_out(x + dt * v_hat, out_ptr, RNE_BF16), mask=mask)
    else:
        tl.store(out_ptr + offs, cast_out(v_hat * out_scale, out_ptr, RNE_BF16), mask=mask)
