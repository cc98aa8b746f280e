"""Triton kernel for a skipped step with any estimator of :mod:`meancache.estimators`, written as host weights.

``v_hat = sum_j w_j * V[slot_j] + x_weight * (x_i - xs[x_slot])``, logged as ``(x_i, v_hat)``, then the Euler step
or the scaled estimate: one launch for the published MeanCache estimator restated as weights and for the
``extrapolate`` polynomials alike. The number of terms and whether the latent term is present are compile-time
constants, so each of the few combinations is its own specialised kernel and no unused row is ever loaded.
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

__all__ = ["weighted_step_triton"]

#: Most velocity terms one launch combines (meancache.estimators.MAX_TERMS: the 4 nodes of a cubic).
MAX_TERMS = 4


@triton.jit(do_not_specialize=["s0", "s1", "s2", "s3", "x_slot", "slot_write"])
def _weighted_step_kernel(x_ptr, xs_ptr, vs_ptr, v_ptr, out_ptr, n, s0, s1, s2, s3, w0, w1, w2, w3, x_slot, x_weight,
                          slot_write, dt, out_scale, N_TERMS: tl.constexpr, HAS_X: tl.constexpr, EULER: tl.constexpr,
                          BLOCK: tl.constexpr, RNE_BF16: tl.constexpr):
    # v_hat = w0 * V[s0] (+ w1 * V[s1] + w2 * V[s2] + w3 * V[s3]), in this order (the reference's), N_TERMS terms
    # HAS_X: v_hat += (x - xs[x_slot]) * x_weight   (without it xs[x_slot] is never loaded: it may hold NaN)
    # xs[slot_write] = x;  vs[slot_write] = v_hat;  out = x + dt * v_hat (EULER) or v_hat * out_scale
    # v_ptr is vc, or vs itself when the caller passed no computed velocities.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # row offsets in int64: rows * n can exceed 2**31 for video latents
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    v_hat = tl.load(v_ptr + s0.to(tl.int64) * n + offs, mask=mask) * w0
    if N_TERMS > 1:
        v_hat = v_hat + tl.load(v_ptr + s1.to(tl.int64) * n + offs, mask=mask) * w1
    if N_TERMS > 2:
        v_hat = v_hat + tl.load(v_ptr + s2.to(tl.int64) * n + offs, mask=mask) * w2
    if N_TERMS > 3:
        v_hat = v_hat + tl.load(v_ptr + s3.to(tl.int64) * n + offs, mask=mask) * w3
    if HAS_X:
        x_old = tl.load(xs_ptr + x_slot.to(tl.int64) * n + offs, mask=mask)
        v_hat = v_hat + (x - x_old) * x_weight
    # every input of this element is in registers before the writes, so slot_write may be a row read above
    log_and_output(xs_ptr, vs_ptr, out_ptr, slot_write.to(tl.int64) * n, offs, mask, x, v_hat, dt, out_scale, EULER,
                   RNE_BF16)


def _check_terms(x: torch.Tensor, vs: torch.Tensor, vc: torch.Tensor | None, v_slots: list[int],
                 v_weights: list[float]) -> None:
    """Refuse terms the kernel would read outside their source: it addresses row ``slot`` of V as
    ``slot * x.numel()`` from V's base, so V must hold that many contiguous float32 rows."""
    fn = "weighted_step_triton"
    if not 1 <= len(v_slots) <= MAX_TERMS or len(v_weights) != len(v_slots):
        raise ValueError(f"{fn}: v_slots={list(v_slots)} and v_weights={list(v_weights)}: need 1..{MAX_TERMS} slots "
                         "and one weight per slot")
    if vc is not None:
        if vc.dtype != torch.float32 or not vc.is_contiguous() or vc.device != x.device:
            raise ValueError(f"{fn}: vc is {vc.dtype} on {vc.device}, contiguous={vc.is_contiguous()}: must be "
                             f"contiguous float32 on {x.device}")
        if vc.dim() < 1 or vc.shape[0] < 1 or vc[0].numel() != x.numel():
            raise ValueError(f"{fn}: vc has shape {tuple(vc.shape)}: must be (D, *x.shape) with "
                             f"x.shape={tuple(x.shape)}")
    source, name = (vs, "vs") if vc is None else (vc, "vc")
    for slot in v_slots:
        if not 0 <= slot < source.shape[0]:
            raise ValueError(f"{fn}: v_slots entry {slot}: must be in 0..{source.shape[0] - 1} ({name} holds "
                             f"{source.shape[0]} rows)")


def weighted_step_triton(x: torch.Tensor, xs: torch.Tensor, vs: torch.Tensor, vc: torch.Tensor | None,
                         v_slots: list[int], v_weights: list[float], x_slot: int, x_weight: float, slot_write: int,
                         dt: float, out_scale: float, out_dtype: torch.dtype, euler: bool) -> torch.Tensor:
    """Triton version of :func:`meancache.reference.weighted_step_ref` (same arguments and result).

    Args:
        x: latent x_i, shape S, float16/bfloat16/float32 (made contiguous if it is not).
        xs, vs: ring ``(C, *S)``, contiguous float32; row ``slot_write`` of each is written.
        vc: computed velocities ``(D, *S)``, contiguous float32, read only; or None to read the terms from ``vs``.
        v_slots, v_weights: 1..4 rows of V (``vc`` or ``vs``) and their weights, summed in this order.
        x_slot, x_weight: the latent term ``x_weight * (x - xs[x_slot])``; with ``x_weight == 0`` it is left out
            and ``xs[x_slot]`` is not read.
        slot_write: ring row of this step.
        dt: ``sigma_next - sigma_now`` (the Euler step).
        out_scale, out_dtype: scale and dtype (float16/bfloat16/float32) of the returned estimate; ignored with
            ``euler``, whose result has ``x.dtype``.
        euler: return ``x + dt * v_hat`` instead of ``v_hat * out_scale``.

    Returns:
        x_{i+1} (shape S, ``x.dtype``) or ``v_hat * out_scale`` (shape S, ``out_dtype``).

    Example (CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1``):
        >>> import torch
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> xs, vs = torch.zeros(2, 3, device=dev), torch.zeros(2, 3, device=dev)
        >>> vc = torch.tensor([[1.0] * 3, [2.0] * 3], device=dev)  # the last two computed velocities
        >>> weighted_step_triton(torch.zeros(3, device=dev), xs, vs, vc, [0, 1], [-1.0, 2.0], 0, 0.0, 1, -0.5, 1.0,
        ...                      torch.float32, True).tolist()
        [-1.5, -1.5, -1.5]
    """
    check_launch("weighted_step_triton", x, xs, vs, x_slot=x_slot, slot_write=slot_write)
    _check_terms(x, vs, vc, v_slots, v_weights)
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype if euler else out_dtype, device=x.device)
    n = x.numel()
    if n:
        # unused terms: slot 0 and weight 0, never loaded (N_TERMS is a constexpr)
        slots = list(v_slots) + [0] * (MAX_TERMS - len(v_slots))
        weights = [float(w) for w in v_weights] + [0.0] * (MAX_TERMS - len(v_weights))
        _weighted_step_kernel[grid(n)](
            x, xs, vs, vs if vc is None else vc, out, n, *slots, *weights, x_slot, float(x_weight), slot_write,
            float(dt), float(out_scale), N_TERMS=len(v_slots), HAS_X=float(x_weight) != 0.0, EULER=bool(euler),
            BLOCK=BLOCK, RNE_BF16=round_bf16_by_hand(out), num_warps=NUM_WARPS)
    return out
