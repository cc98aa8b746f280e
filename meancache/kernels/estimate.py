"""Triton kernel for the model-level MeanCache estimate: v_hat from the ring, logged, returned; no Euler step."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import BLOCK
from ._common import cast_out
from ._common import round_bf16_by_hand
from ._common import NUM_WARPS
from ._common import grid

__all__ = ["estimate_triton"]


@triton.jit(do_not_specialize=["slot_start", "slot_last", "slot_write"])
def _estimate_kernel(x_ptr, xs_ptr, vs_ptr, out_ptr, n, slot_start, slot_last, slot_write, inv_d, dt, out_scale,
                     BLOCK: tl.constexpr, RNE_BF16: tl.constexpr):
    # v_hat as in the skipped step (algorithm.md §2.2); returns v_hat * out_scale for the caller's own Euler step
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    start = slot_start.to(tl.int64) * n
    last = slot_last.to(tl.int64) * n
    write = slot_write.to(tl.int64) * n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    x0 = tl.load(xs_ptr + start + offs, mask=mask)
    v0 = tl.load(vs_ptr + start + offs, mask=mask)
    v_last = tl.load(vs_ptr + last + offs, mask=mask)
    avg = (x - x0) * inv_d
    jvp = (v0 - avg) * inv_d
    v_hat = v_last - jvp * dt
    tl.store(xs_ptr + write + offs, x, mask=mask)
    tl.store(vs_ptr + write + offs, v_hat, mask=mask)
    tl.store(out_ptr + offs, cast_out(v_hat * out_scale, out_ptr, RNE_BF16), mask=mask)


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
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    n = x.numel()
    if n:
        _estimate_kernel[grid(n)](x, xs, vs, out, n, slot_start, slot_last, slot_write, inv_d, dt, out_scale,
                                  BLOCK=BLOCK, RNE_BF16=round_bf16_by_hand(out), num_warps=NUM_WARPS)
    return out
