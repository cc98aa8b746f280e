"""Triton kernel for a skipped MeanCache step (algorithm.md §2.2): estimate, log, Euler step in one launch.

The same kernel serves the model-level estimate (:mod:`meancache.kernels.estimate`), which differs only in what it
stores as the output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import BLOCK
from ._common import NUM_WARPS
from ._common import log_and_output
from ._common import check_launch
from ._common import grid
from ._common import round_bf16_by_hand

__all__ = ["skip_step_triton", "launch_estimator"]


@triton.jit(do_not_specialize=["slot_start", "slot_last", "slot_write"])
def _estimator_kernel(x_ptr, xs_ptr, vs_ptr, out_ptr, n, slot_start, slot_last, slot_write, inv_d, dt, out_scale,
                      EULER: tl.constexpr, BLOCK: tl.constexpr, RNE_BF16: tl.constexpr):
    # avg = (x - x0) * inv_d;  jvp = (v0 - avg) * inv_d;  v_hat = v_last - jvp * dt
    # EULER: out = x + dt * v_hat (skipped step); else out = v_hat * out_scale (model-level estimate)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # ring offsets in int64: C * n can exceed 2**31 for video latents
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
    # every input of this element is in registers before the write, so slot_write may alias slot_start/slot_last
    log_and_output(xs_ptr, vs_ptr, out_ptr, write, offs, mask, x, v_hat, dt, out_scale, EULER, RNE_BF16)


def launch_estimator(x, xs, vs, slot_start, slot_last, slot_write, inv_d, dt, out_scale, out_dtype, euler):
    """Run the estimator kernel; ``euler`` selects the skipped-step output (x_{i+1}) or the estimate (v_hat)."""
    check_launch("skip_step_triton" if euler else "estimate_triton", x, xs, vs, slot_start=slot_start,
                 slot_last=slot_last, slot_write=slot_write)
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    n = x.numel()
    if n:
        _estimator_kernel[grid(n)](x, xs, vs, out, n, slot_start, slot_last, slot_write, inv_d, dt, out_scale,
                                   EULER=euler, BLOCK=BLOCK, RNE_BF16=round_bf16_by_hand(out), num_warps=NUM_WARPS)
    return out


def skip_step_triton(x: torch.Tensor, xs: torch.Tensor, vs: torch.Tensor, slot_start: int, slot_last: int,
                     slot_write: int, inv_d: float, dt: float) -> torch.Tensor:
    """Triton version of :func:`meancache.reference.skip_step_ref` (same arguments and result).

    ``x`` (float16/bfloat16/float32) is made contiguous if it is not; ``xs``/``vs`` must be contiguous float32.

    Example (CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1``):
        >>> import torch
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> xs, vs = torch.zeros(2, 3, device=dev), torch.ones(2, 3, device=dev)
        >>> skip_step_triton(torch.zeros(3, device=dev), xs, vs, 0, 0, 1, -2.0, -0.25).tolist()
        [-0.125, -0.125, -0.125]
    """
    return launch_estimator(x, xs, vs, slot_start, slot_last, slot_write, inv_d, dt, 1.0, x.dtype, euler=True)
