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
