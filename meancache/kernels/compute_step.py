"""Triton kernel for a computed MeanCache step: log the model's velocity and take the Euler step in one launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import BLOCK
from ._common import cast_out
from ._common import check_launch
from ._common import round_bf16_by_hand
from ._common import NUM_WARPS
from ._common import grid

__all__ = ["compute_step_triton"]


@triton.jit(do_not_specialize=["slot_write"])
def _compute_step_kernel(x_ptr, v_ptr, xs_ptr, vs_ptr, out_ptr, n, slot_write, dt, BLOCK: tl.constexpr, RNE_BF16: tl.constexpr):
    # xs[slot] = x;  vs[slot] = v;  x' = x + dt * v   (fp32 registers, one cast on store)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    write = slot_write.to(tl.int64) * n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
    tl.store(xs_ptr + write + offs, x, mask=mask)
    tl.store(vs_ptr + write + offs, v, mask=mask)
    tl.store(out_ptr + offs, cast_out(x + dt * v, out_ptr, RNE_BF16), mask=mask)


def compute_step_triton(x: torch.Tensor, v: torch.Tensor, xs: torch.Tensor, vs: torch.Tensor, slot_write: int,
                        dt: float) -> torch.Tensor:
    """Triton version of :func:`meancache.reference.compute_step_ref` (same arguments and result).

    Example (CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1``):
        >>> import torch
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> xs, vs = torch.zeros(1, 2, device=dev), torch.zeros(1, 2, device=dev)
        >>> compute_step_triton(torch.ones(2, device=dev), torch.ones(2, device=dev), xs, vs, 0, -0.5).tolist()
        [0.5, 0.5]
    """
    check_launch("compute_step_triton", x, xs, vs, v, slot_write=slot_write)
    x = x.contiguous()
    v = v.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        _compute_step_kernel[grid(n)](x, v, xs, vs, out, n, slot_write, dt, BLOCK=BLOCK, RNE_BF16=round_bf16_by_hand(out), num_warps=NUM_WARPS)
    return out
