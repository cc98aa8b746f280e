"""The fused MeanCache steps as ``torch.library`` ops under the ``meancache::`` namespace.

Each op is one launch on the CUDA and Triton backends and reads/writes the history ring in place:

* ``meancache::skip_step``: estimate v_hat from the ring, log ``(x_i, v_hat)``, return ``x_{i+1}``;
* ``meancache::compute_step``: log the model's ``(x_i, v_i)``, return ``x_{i+1}``;
* ``meancache::estimate``: log ``(x_i, v_hat)`` and return ``v_hat`` for a caller that steps itself.

The ring ``xs``/``vs`` has shape ``(C, *x.shape)``, C <= 6, and holds step ``j`` in slot ``j % C``. Sigmas, the
step index and K are host scalars: validation reads only metadata, so no call synchronises the device, and a
sampling loop can be captured in a CUDA graph or traced by ``torch.compile(fullgraph=True)`` (each op has a fake
implementation). CPU tensors run the pure-torch reference; CUDA tensors run the backend chosen by
:func:`meancache.available_backends` / ``MEANCACHE_BACKEND``. Inference only: no autograd formula is registered.
"""

from __future__ import annotations

import torch

from . import _backend
from .reference import compute_step_ref
from .reference import estimate_ref
from .reference import skip_step_ref
from .reference import step_scalars
from .schedule import MAX_ORDER

__all__ = ["skip_step", "compute_step", "estimate"]

_LIB = torch.library.Library("meancache", "FRAGMENT")
_LIB.define(
    "skip_step(Tensor x, Tensor(a!) xs, Tensor(b!) vs, int step, int k, float sigma_start, float sigma_now, "
    "float sigma_next) -> Tensor"
)
_LIB.define(
    "compute_step(Tensor x, Tensor v, Tensor(a!) xs, Tensor(b!) vs, int step, float sigma_now, "
    "float sigma_next) -> Tensor"
)
_LIB.define(
    "estimate(Tensor x, Tensor(a!) xs, Tensor(b!) vs, int step, int k, float sigma_start, float sigma_now, "
    "float sigma_next, float out_scale, ScalarType out_dtype) -> Tensor"
)

_LATENT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_ring(op: str, x: torch.Tensor, xs: torch.Tensor, vs: torch.Tensor) -> None:
    """Metadata-only checks (no device sync) of the latent against the ring."""
    if x.dtype not in _LATENT_DTYPES:
        raise ValueError(f"{op}: x dtype={x.dtype}: must be float16, bfloat16, float32 or float64")
    want = torch.float64 if x.dtype == torch.float64 else torch.float32
    for name, ring in (("xs", xs), ("vs", vs)):
        if ring.dim() != x.dim() + 1 or tuple(ring.shape[1:]) != tuple(x.shape):
            raise ValueError(
                f"{op}: {name} has shape {tuple(ring.shape)} but x has shape {tuple(x.shape)}: the ring must be "
                f"(C, *x.shape)"
            )
        if ring.device != x.device:
            raise ValueError(f"{op}: {name} is on {ring.device} but x is on {x.device}: they must match")
        if ring.dtype != want:
            raise ValueError(f"{op}: {name} dtype={ring.dtype} but x dtype={x.dtype} needs a {want} ring")
        if not ring.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous")
    if not 1 <= xs.shape[0] <= MAX_ORDER:
        raise ValueError(f"{op}: ring capacity xs.shape[0]={xs.shape[0]}: must be in 1..{MAX_ORDER}")


def _check_window(op: str, xs: torch.Tensor, step: int, k: int) -> tuple[int, int, int]:
    """Slots (window start, newest entry, this step) after checking that the ring holds the window."""
    if not 1 <= k <= MAX_ORDER:
        raise ValueError(f"{op}: k={k}: the window K of a skipped step must be in 1..{MAX_ORDER}")
    capacity = xs.shape[0]
    if k > capacity:
        raise ValueError(f"{op}: k={k} but the ring holds only {capacity} entries (xs.shape[0])")
    if k > step:
        raise ValueError(f"{op}: k={k} at step={step}: the history holds only {step} entries; truncate k first")
    return (step - k) % capacity, (step - 1) % capacity, step % capacity


def _skip_step_impl(x, xs, vs, step, k, sigma_start, sigma_now, sigma_next):
    _check_ring("skip_step", x, xs, vs)
    slots = _check_window("skip_step", xs, step, k)
    scalars = step_scalars(sigma_start, sigma_now, sigma_next)
    backend = _backend.select_backend(x)
    if backend == "cuda":
        return _backend.cuda_ops()._skip_step_cuda(x.contiguous(), xs, vs, *slots, *scalars)
    if backend == "triton":
        return _backend.triton_kernels().skip_step_triton(x, xs, vs, *slots, *scalars)
    return skip_step_ref(x, xs, vs, *slots, *scalars)


def _compute_step_impl(x, v, xs, vs, step, sigma_now, sigma_next):
    _check_ring("compute_step", x, xs, vs)
    _check_velocity(x, v)
    if step < 0:
        raise ValueError(f"compute_step: step={step}: must be >= 0")
    slot = step % xs.shape[0]
    dt = sigma_next - sigma_now
    backend = _backend.select_backend(x)
    if backend == "cuda":
        return _backend.cuda_ops()._compute_step_cuda(x.contiguous(), v.contiguous(), xs, vs, slot, dt)
    if backend == "triton":
        return _backend.triton_kernels().compute_step_triton(x, v, xs, vs, slot, dt)
    return compute_step_ref(x, v, xs, vs, slot, dt)


def _estimate_impl(x, xs, vs, step, k, sigma_start, sigma_now, sigma_next, out_scale, out_dtype):
    _check_ring("estimate", x, xs, vs)
    slots = _check_window("estimate", xs, step, k)
    if out_dtype not in _LATENT_DTYPES:
        raise ValueError(f"estimate: out_dtype={out_dtype}: must be float16, bfloat16, float32 or float64")
    scalars = step_scalars(sigma_start, sigma_now, sigma_next)
    backend = _backend.select_backend(x)
    if backend != "torch" and out_dtype == torch.float64:
        backend = "torch"  # the kernels store float16/bfloat16/float32 only
    if backend == "cuda":
        return _backend.cuda_ops()._estimate_cuda(x.contiguous(), xs, vs, *slots, *scalars, out_scale, out_dtype)
    if backend == "triton":
        return _backend.triton_kernels().estimate_triton(x, xs, vs, *slots, *scalars, out_scale, out_dtype)
    return estimate_ref(x, xs, vs, *slots, *scalars, out_scale, out_dtype)


def _check_velocity(x: torch.Tensor, v: torch.Tensor) -> None:
    if tuple(v.shape) != tuple(x.shape):
        raise ValueError(f"compute_step: v has shape {tuple(v.shape)} but x has shape {tuple(x.shape)}")
    if v.device != x.device:
        raise ValueError(f"compute_step: v is on {v.device} but x is on {x.device}: they must match")
    if v.dtype not in _LATENT_DTYPES:
        raise ValueError(f"compute_step: v dtype={v.dtype}: must be a float dtype")


for _name, _impl in (("skip_step", _skip_step_impl), ("compute_step", _compute_step_impl),
                     ("estimate", _estimate_impl)):
    _LIB.impl(_name, _impl, "CPU")
    _LIB.impl(_name, _impl, "CUDA")


@torch.library.register_fake("meancache::skip_step")
def _skip_step_fake(x, xs, vs, step, k, sigma_start, sigma_now, sigma_next):
    _check_ring("skip_step", x, xs, vs)
    _check_window("skip_step", xs, step, k)
    return torch.empty_like(x)


@torch.library.register_fake("meancache::compute_step")
def _compute_step_fake(x, v, xs, vs, step, sigma_now, sigma_next):
    _check_ring("compute_step", x, xs, vs)
    _check_velocity(x, v)
    return torch.empty_like(x)


@torch.library.register_fake("meancache::estimate")
def _estimate_fake(x, xs, vs, step, k, sigma_start, sigma_now, sigma_next, out_scale, out_dtype):
    _check_ring("estimate", x, xs, vs)
    _check_window("estimate", xs, step, k)
    return torch.empty(x.shape, dtype=out_dtype, device=x.device)


def skip_step(
    x: torch.Tensor,
    xs: torch.Tensor,
    vs: torch.Tensor,
    step: int,
    k: int,
    sigma_start: float,
    sigma_now: float,
    sigma_next: float,
) -> torch.Tensor:
    """A skipped MeanCache step in one launch: ``x_{i+1} = x_i + (sigma_next - sigma_now) * v_hat``.

    ``v_hat = v_{i-1} - jvp * (sigma_next - sigma_now)``, ``jvp = (v_{i-k} - (x_i - x_{i-k}) / D) / D``,
    ``D = sigma_now - sigma_start`` (algorithm.md §2.2; ``D = 0`` gives plain reuse). Logs ``(x_i, v_hat)`` into
    slot ``step % C`` of the ring.

    Args:
        x: latent x_i, any shape S, float16/bfloat16/float32/float64.
        xs, vs: ring ``(C, *S)``, float32 (float64 for float64 x), contiguous; ``xs[j % C]``/``vs[j % C]`` hold
            step j's latent and velocity for the last C steps. Updated in place.
        step: index i of this step (the ring holds steps ``i - C .. i - 1``).
        k: window K after truncation, ``1 <= k <= min(step, C)``.
        sigma_start, sigma_now, sigma_next: sigma at steps ``i - k``, ``i`` and ``i + 1``.

    Returns:
        x_{i+1}: shape S, dtype of ``x``.

    Raises:
        ValueError: mismatched shapes/devices/dtypes between ``x`` and the ring, or ``k`` outside
            ``1..min(step, C)``. Checked from metadata only, before any work.

    Example:
        >>> import torch, meancache.ops as ops
        >>> xs, vs = torch.zeros(2, 3), torch.ones(2, 3)
        >>> ops.skip_step(torch.zeros(3), xs, vs, 1, 1, 1.0, 0.5, 0.25)
        tensor([-0.1250, -0.1250, -0.1250])
    """
    return torch.ops.meancache.skip_step(x, xs, vs, step, k, sigma_start, sigma_now, sigma_next)


def compute_step(
    x: torch.Tensor, v: torch.Tensor, xs: torch.Tensor, vs: torch.Tensor, step: int, sigma_now: float,
    sigma_next: float,
) -> torch.Tensor:
    """A computed step in one launch: log ``(x_i, v_i)`` in slot ``step % C`` and return ``x_i + dt * v_i``.

    Args:
        x: latent x_i, shape S, float16/bfloat16/float32/float64.
        v: the model's velocity at x_i, shape S, any float dtype (math in float32).
        xs, vs: ring ``(C, *S)``, updated in place.
        step: index i of this step.
        sigma_now, sigma_next: sigma at steps i and i + 1.

    Returns:
        x_{i+1}: shape S, dtype of ``x``.

    Example:
        >>> import torch, meancache.ops as ops
        >>> xs, vs = torch.zeros(1, 2), torch.zeros(1, 2)
        >>> ops.compute_step(torch.ones(2), torch.ones(2), xs, vs, 0, 1.0, 0.5)
        tensor([0.5000, 0.5000])
    """
    return torch.ops.meancache.compute_step(x, v, xs, vs, step, sigma_now, sigma_next)


def estimate(
    x: torch.Tensor,
    xs: torch.Tensor,
    vs: torch.Tensor,
    step: int,
    k: int,
    sigma_start: float,
    sigma_now: float,
    sigma_next: float,
    out_scale: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Model-level estimate in one launch: log ``(x_i, v_hat)`` and return ``v_hat * out_scale``.

    For :func:`meancache.accelerate`, where the caller takes the Euler step itself. Arguments as in
    :func:`skip_step`; ``out_dtype`` defaults to ``x.dtype``.

    Returns:
        ``v_hat * out_scale``: shape S, ``out_dtype``.

    Example:
        >>> import torch, meancache.ops as ops
        >>> xs, vs = torch.zeros(2, 3), torch.ones(2, 3)
        >>> ops.estimate(torch.zeros(3), xs, vs, 1, 1, 1.0, 0.5, 0.25, out_scale=-1.0)
        tensor([-0.5000, -0.5000, -0.5000])
    """
    dtype = x.dtype if out_dtype is None else out_dtype
    return torch.ops.meancache.estimate(x, xs, vs, step, k, sigma_start, sigma_now, sigma_next, out_scale, dtype)
