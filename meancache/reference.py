"""Pure-torch MeanCache step math: the reference every faster backend is held to, and the CPU path.

The three fused steps (skipped step, computed step, model-level estimate) work on a history ring ``xs``/``vs`` of
shape ``(C, *latent_shape)`` in float32 (float64 for float64 latents), addressed by slot. Math runs in the ring's
dtype; results are cast to the output dtype once, at the end. Plain torch ops throughout, so with autograd
recording the functions are differentiable as written (the ops in :mod:`meancache.ops` rely on that).

Scalars come precomputed from the host (:func:`step_scalars`): ``inv_d = 1 / (sigma_now - sigma_start)`` (0 when
that difference is 0, which turns the estimate into plain reuse instead of NaN) and ``dt = sigma_next - sigma_now``.
With them the estimator of algorithm.md §2.2 reads ``avg = (x - x0) * inv_d``, ``jvp = (v0 - avg) * inv_d``,
``v_hat = v_last - jvp * dt``.
"""

from __future__ import annotations

import torch

__all__ = [
    "step_scalars",
    "average_velocity",
    "skip_step_ref",
    "compute_step_ref",
    "estimate_ref",
    "weighted_step_ref",
]


def step_scalars(sigma_start: float, sigma_now: float, sigma_next: float) -> tuple[float, float]:
    """``(inv_d, dt)`` in double precision for a step from ``sigma_now`` to ``sigma_next`` with window start
    ``sigma_start``. ``inv_d`` is 0 for a zero-length window (repeated sigmas).

    Example:
        >>> step_scalars(1.0, 0.5, 0.25)
        (-2.0, -0.25)
    """
    d = sigma_now - sigma_start
    return (0.0 if d == 0.0 else 1.0 / d), sigma_next - sigma_now


def average_velocity(
    x: torch.Tensor, x_start: torch.Tensor, v_start: torch.Tensor, v_last: torch.Tensor, inv_d: float, dt: float
) -> torch.Tensor:
    """MeanCache's average-velocity estimate ``v_last - (v_start - (x - x_start) * inv_d) * inv_d * dt``.

    Args:
        x: current latent x_i, any float dtype, shape S.
        x_start, v_start: latent and velocity logged at the window start, shape S.
        v_last: newest logged velocity, shape S.
        inv_d, dt: from :func:`step_scalars`.

    Returns:
        v_hat, shape S, in the dtype of ``x_start``.

    Example:
        >>> import torch
        >>> z = torch.zeros(2)
        >>> average_velocity(z, z, z, torch.ones(2), *step_scalars(1.0, 0.5, 0.25))
        tensor([1., 1.])
    """
    avg = (x.to(x_start.dtype) - x_start) * inv_d
    jvp = (v_start - avg) * inv_d
    return v_last - jvp * dt


def skip_step_ref(
    x: torch.Tensor,
    xs: torch.Tensor,
    vs: torch.Tensor,
    slot_start: int,
    slot_last: int,
    slot_write: int,
    inv_d: float,
    dt: float,
) -> torch.Tensor:
    """A skipped step: estimate v_hat, log ``(x, v_hat)`` in ``slot_write``, return ``x + dt * v_hat``.

    Args:
        x: latent x_i, shape S, float16/bfloat16/float32/float64.
        xs, vs: history ring, shape ``(C, *S)``, float32 (float64 for float64 latents); updated in place.
        slot_start, slot_last, slot_write: ring slots of the window start, the newest entry and this step.
        inv_d, dt: from :func:`step_scalars`.

    Returns:
        x_{i+1}, shape S, dtype of ``x``.

    Example:
        >>> import torch
        >>> xs, vs = torch.zeros(2, 3), torch.ones(2, 3)
        >>> skip_step_ref(torch.zeros(3), xs, vs, 0, 0, 1, *step_scalars(1.0, 0.5, 0.25))
        tensor([-0.1250, -0.1250, -0.1250])
    """
    _check_slots("skip_step_ref", xs, vs, slot_start=slot_start, slot_last=slot_last, slot_write=slot_write)
    x32, v_hat = _estimate_and_log(x, xs, vs, slot_start, slot_last, slot_write, inv_d, dt)
    return (x32 + dt * v_hat).to(x.dtype)


def compute_step_ref(
    x: torch.Tensor, v: torch.Tensor, xs: torch.Tensor, vs: torch.Tensor, slot_write: int, dt: float
) -> torch.Tensor:
    """A computed step: log ``(x, v)`` in ``slot_write`` and return the Euler step ``x + dt * v``.

    Args:
        x: latent x_i, shape S, any supported float dtype.
        v: the model's velocity at x_i, shape S, any float dtype.
        xs, vs: history ring ``(C, *S)``; updated in place.
        slot_write: ring slot of this step.
        dt: ``sigma_next - sigma_now``.

    Returns:
        x_{i+1}, shape S, dtype of ``x``.

    Example:
        >>> import torch
        >>> xs, vs = torch.zeros(1, 2), torch.zeros(1, 2)
        >>> compute_step_ref(torch.ones(2), torch.ones(2), xs, vs, 0, -0.5), vs
        (tensor([0.5000, 0.5000]), tensor([[1., 1.]]))
    """
    _check_slots("compute_step_ref", xs, vs, slot_write=slot_write)
    x32 = x.to(xs.dtype)
    v32 = v.to(vs.dtype)
    xs[slot_write].copy_(x32)
    vs[slot_write].copy_(v32)
    return (x32 + dt * v32).to(x.dtype)


def estimate_ref(
    x: torch.Tensor,
    xs: torch.Tensor,
    vs: torch.Tensor,
    slot_start: int,
    slot_last: int,
    slot_write: int,
    inv_d: float,
    dt: float,
    out_scale: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Model-level estimate (the caller takes its own Euler step): log ``(x, v_hat)``, return
    ``v_hat * out_scale`` in ``out_dtype``.

    Example:
        >>> import torch
        >>> xs, vs = torch.zeros(2, 3), torch.ones(2, 3)
        >>> estimate_ref(torch.zeros(3), xs, vs, 0, 0, 1, 0.0, -0.5, -1.0, torch.float16)
        tensor([-1., -1., -1.], dtype=torch.float16)
    """
    _check_slots("estimate_ref", xs, vs, slot_start=slot_start, slot_last=slot_last, slot_write=slot_write)
    _, v_hat = _estimate_and_log(x, xs, vs, slot_start, slot_last, slot_write, inv_d, dt)
    return (v_hat * out_scale).to(out_dtype)


def weighted_step_ref(
    x: torch.Tensor,
    xs: torch.Tensor,
    vs: torch.Tensor,
    vc: torch.Tensor | None,
    v_slots: list[int],
    v_weights: list[float],
    x_slot: int,
    x_weight: float,
    slot_write: int,
    dt: float,
    out_scale: float,
    out_dtype: torch.dtype,
    euler: bool,
) -> torch.Tensor:
    """A skipped step with any estimator of :mod:`meancache.estimators`, written as weights.

    ``v_hat = sum_j v_weights[j] * V[v_slots[j]] + x_weight * (x - xs[x_slot])``, summed in the order given, with
    ``V = vc`` (the computed velocities) or ``V = vs`` (the ring) when ``vc`` is None; the latent term is left out
    when ``x_weight == 0`` (so an unwritten ``xs[x_slot]`` is never read). Logs ``(x, v_hat)`` in ``slot_write``
    and returns ``x + dt * v_hat`` in ``x.dtype`` (``euler``) or ``v_hat * out_scale`` in ``out_dtype``.

    Args:
        x: latent x_i, shape S, float16/bfloat16/float32/float64.
        xs, vs: history ring ``(C, *S)`` in the ring dtype; updated in place.
        vc: computed velocities ``(D, *S)`` in the ring dtype, or None to read velocities from ``vs``.
        v_slots, v_weights: 1..4 rows of V and their weights (host ints and floats).
        x_slot, x_weight: the latent term's ring slot and weight.
        slot_write: ring slot of this step.
        dt: ``sigma_next - sigma_now``.
        out_scale, out_dtype: the returned estimate's scale and dtype (ignored with ``euler``).
        euler: return the Euler step instead of the estimate.

    Returns:
        x_{i+1} (shape S, ``x.dtype``) or ``v_hat * out_scale`` (shape S, ``out_dtype``).

    Example:
        >>> import torch
        >>> xs, vs, vc = torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([[1.0] * 3, [2.0] * 3])
        >>> weighted_step_ref(torch.zeros(3), xs, vs, vc, [0, 1], [-1.0, 2.0], 0, 0.0, 1, -0.5, 1.0,
        ...                   torch.float32, True)
        tensor([-1.5000, -1.5000, -1.5000])
    """
    source = vs if vc is None else vc
    _check_slots("weighted_step_ref", xs, vs, x_slot=x_slot, slot_write=slot_write)
    if len(v_slots) != len(v_weights) or not v_slots:
        raise ValueError(
            f"weighted_step_ref: {len(v_slots)} v_slots and {len(v_weights)} v_weights: need one weight per slot, "
            "at least one"
        )
    for slot in v_slots:
        if not 0 <= slot < source.shape[0]:
            raise ValueError(f"weighted_step_ref: v_slots entry {slot}: must be in 0..{source.shape[0] - 1}")
    x_r = x.to(xs.dtype)
    v_hat = source[v_slots[0]] * v_weights[0]
    for slot, w in zip(v_slots[1:], v_weights[1:]):
        v_hat = v_hat + source[slot] * w
    if x_weight != 0.0:
        v_hat = v_hat + (x_r - xs[x_slot]) * x_weight
    # v_hat is a fresh tensor, so the writes cannot disturb what it was computed from
    xs[slot_write].copy_(x_r)
    vs[slot_write].copy_(v_hat)
    if euler:
        return (x_r + dt * v_hat).to(x.dtype)
    return (v_hat * out_scale).to(out_dtype)


def _check_slots(fn: str, xs: torch.Tensor, vs: torch.Tensor, **slots: int) -> None:
    """The two halves of the ring agree and every slot is a real one. Python indexing would otherwise take a
    negative slot from the end, and a vs shorter than xs would raise IndexError partway, possibly after xs was
    written."""
    if xs.shape != vs.shape:
        raise ValueError(
            f"{fn}: xs has shape {tuple(xs.shape)} but vs has shape {tuple(vs.shape)}: they must be one (C, *S) ring"
        )
    capacity = xs.shape[0] if xs.dim() else 0
    for name, slot in slots.items():
        if not 0 <= slot < capacity:
            raise ValueError(f"{fn}: {name}={slot}: must be in 0..{capacity - 1} for a ring of C={capacity} slots")


def _estimate_and_log(x, xs, vs, slot_start, slot_last, slot_write, inv_d, dt):
    """``(x in the ring dtype, v_hat)`` after logging both into ``slot_write``."""
    v_hat = average_velocity(x, xs[slot_start], vs[slot_start], vs[slot_last], inv_d, dt)
    x32 = x.to(xs.dtype)
    # v_hat is a fresh tensor, so writing over the window's slots (a full ring) cannot corrupt the inputs
    xs[slot_write].copy_(x32)
    vs[slot_write].copy_(v_hat)
    return x32, v_hat
