"""The fused MeanCache steps as ``torch.library`` ops under the ``meancache::`` namespace.

Each op is one launch on the CUDA and Triton backends and reads/writes the history ring in place:

* ``meancache::skip_step``: estimate v_hat from the ring, log ``(x_i, v_hat)``, return ``x_{i+1}``;
* ``meancache::compute_step``: log the model's ``(x_i, v_i)``, return ``x_{i+1}``;
* ``meancache::estimate``: log ``(x_i, v_hat)`` and return ``v_hat`` for a caller that steps itself;
* ``meancache::weighted_step``: a skipped step (or estimate) with any estimator of :mod:`meancache.estimators`:
  ``v_hat = sum_j w_j * V[slot_j] + x_weight * (x_i - xs[x_slot])`` from host weights, logged, then the Euler
  step or the scaled estimate.

The ring ``xs``/``vs`` has shape ``(C, *x.shape)``, C <= 6, and holds step ``j`` in slot ``j % C``. Sigmas, the
step index and K are host scalars: validation reads only metadata, so no call synchronises the device, and a
sampling loop can be captured in a CUDA graph or traced by ``torch.compile(fullgraph=True)`` (each op has a fake
implementation). CPU tensors run the pure-torch reference; CUDA tensors run the backend chosen by
:func:`meancache.available_backends` / ``MEANCACHE_BACKEND``.

Every call is validated before any work, on every path (eager, fake tensors, the backend kernels): the ring's two
halves share one ``(C, *x.shape)`` shape, dtype and device with x; ``0 <= step`` and ``1 <= k <= min(step, C)``;
every ring row read holds a step already logged (steps ``max(0, step - C) .. step - 1``); sigmas, scales and weights
are finite host numbers; no input overlaps the ring slot the call writes. Bad input raises ValueError naming the
argument, its value and the rule. While autograd records (grad mode on, an input requiring grad) the ops run as the
reference's torch ops on any device, so they are differentiable in ``x``, ``v`` and the ring's logged entries;
otherwise they run the fused backend.
"""

from __future__ import annotations

import math
import operator

import torch

from . import _backend
from .estimators import MAX_TERMS
from .reference import compute_step_ref
from .reference import estimate_ref
from .reference import skip_step_ref
from .reference import step_scalars
from .reference import weighted_step_ref
from .validation import is_int
from .validation import is_real
from ._limits import MAX_ORDER

__all__ = ["skip_step", "compute_step", "estimate", "weighted_step"]

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
_LIB.define(
    "weighted_step(Tensor x, Tensor(a!) xs, Tensor(b!) vs, Tensor? vc, int step, int[] v_slots, float[] v_weights, "
    "int x_slot, float x_weight, float dt, float out_scale, ScalarType out_dtype, bool euler) -> Tensor"
)

_LATENT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT64 = (-(2**63), 2**63 - 1)


# -- validation ---------------------------------------------------------------------------------------------------
#
# Every check reads metadata only (shapes, strides, dtypes, devices, storage identity): nothing synchronises the
# device, so the same checks run eagerly, in the fake implementations under torch.compile, and inside a CUDA graph
# capture. They all run before the first write, so a rejected call leaves the ring as it was.


def _host_int(op: str, name: str, value):
    """``value`` as an int64 host integer, or ValueError.

    The dispatcher would take ``True`` as 1 and fail on ints beyond int64 with a message that names neither, so
    the public wrappers check first. A SymInt (an int that torch.compile made dynamic) passes as it is.
    """
    if isinstance(value, torch.SymInt):
        return value
    if type(value) is not int:  # a plain int (every engine call) skips the ABC lookup
        # the package's one rule for integers (numpy integers count, bool does not); a tensor would need a device
        # read (a sync) to become a slot, so it is refused like any other non-integer
        if not is_int(value):
            raise ValueError(f"{op}: {name}={value!r}: must be a Python int, not a {type(value).__name__}")
        value = operator.index(value)
    if not _INT64[0] <= value <= _INT64[1]:
        raise ValueError(f"{op}: {name}={value}: must fit in int64")
    return value


def _host_real(op: str, name: str, value):
    """``value`` as a host float, or ValueError naming it: the package's rule for real numbers (numpy scalars count,
    ``bool`` does not). A 0-d tensor is refused too: reading it would synchronise the device on every step."""
    if type(value) is float or isinstance(value, torch.SymFloat):  # every engine call: no ABC lookup
        return value
    if not is_real(value):
        raise ValueError(f"{op}: {name}={value!r}: must be a real number (int or float), not a {type(value).__name__}")
    return float(value)


def _host_list(op: str, name: str, values) -> list:
    """A host list of ``values``: a tensor would need a device read (a sync) per step, and a string is one value."""
    if not isinstance(values, (str, bytes, torch.Tensor)):
        try:
            return list(values)
        except TypeError:
            pass
    raise ValueError(f"{op}: {name}={values!r}: v_slots and v_weights must be lists of host ints and floats")


def _host_sigmas(op: str, sigma_start, sigma_now, sigma_next) -> tuple:
    return (_host_real(op, "sigma_start", sigma_start), _host_real(op, "sigma_now", sigma_now),
            _host_real(op, "sigma_next", sigma_next))


def _check_finite(op: str, *named) -> None:
    """Host scalars ``(name, value)`` that must be finite: a NaN or inf sigma, step or scale poisons every element
    the op writes into the ring, and every later step that reads it."""
    for name, value in named:
        # a SymFloat (torch.compile with dynamic floats) has no value to test at trace time
        if not isinstance(value, torch.SymFloat) and not math.isfinite(value):
            raise ValueError(f"{op}: {name}={value}: must be finite")


def _check_ring(op: str, x: torch.Tensor, xs: torch.Tensor, vs: torch.Tensor) -> None:
    """The latent against the ring: dtypes, ``(C, *x.shape)`` shapes with one capacity C, devices, layout."""
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
    # Slots come from one capacity; a vs shorter than xs would be indexed past its end (the kernels write there).
    if xs.shape[0] != vs.shape[0]:
        raise ValueError(
            f"{op}: xs has shape {tuple(xs.shape)} but vs has shape {tuple(vs.shape)}: xs and vs must have the same "
            f"capacity C (first dimension)"
        )
    if not 1 <= xs.shape[0] <= MAX_ORDER:
        raise ValueError(f"{op}: ring capacity xs.shape[0]={xs.shape[0]}: must be in 1..{MAX_ORDER}")


def _check_step(op: str, step: int) -> None:
    if step < 0:
        raise ValueError(f"{op}: step={step}: must be >= 0")


def _check_window(op: str, xs: torch.Tensor, step: int, k: int) -> tuple[int, int, int]:
    """Slots (window start, newest entry, this step) after checking that the ring holds the window."""
    _check_step(op, step)
    if not 1 <= k <= MAX_ORDER:
        raise ValueError(f"{op}: k={k}: the window K of a skipped step must be in 1..{MAX_ORDER}")
    capacity = xs.shape[0]
    if k > capacity:
        raise ValueError(f"{op}: k={k} but the ring holds only {capacity} entries (xs.shape[0])")
    if k > step:
        raise ValueError(f"{op}: k={k} at step={step}: the history holds only {step} entries; truncate k first")
    return (step - k) % capacity, (step - 1) % capacity, step % capacity


def _check_velocity(x: torch.Tensor, v: torch.Tensor) -> None:
    if tuple(v.shape) != tuple(x.shape):
        raise ValueError(f"compute_step: v has shape {tuple(v.shape)} but x has shape {tuple(x.shape)}")
    if v.device != x.device:
        raise ValueError(f"compute_step: v is on {v.device} but x is on {x.device}: they must match")
    if v.dtype not in _LATENT_DTYPES:
        raise ValueError(f"compute_step: v dtype={v.dtype}: must be a float dtype")


def _check_out_dtype(out_dtype: torch.dtype, op: str = "estimate") -> None:
    if out_dtype not in _LATENT_DTYPES:
        raise ValueError(f"{op}: out_dtype={out_dtype}: must be float16, bfloat16, float32 or float64")


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """Bytes ``[lo, hi)`` that ``t``'s elements can occupy, counted from the start of its storage."""
    lo = hi = t.storage_offset()
    for size, stride in zip(t.shape, t.stride()):
        reach = (size - 1) * stride
        if reach < 0:
            lo += reach
        else:
            hi += reach
    return lo * t.element_size(), (hi + 1) * t.element_size()


def _has_real_memory(t: torch.Tensor) -> bool:
    # fake and meta tensors have no memory (their storages report address 0), so only plain tensors are compared
    # by address; tensor subclasses fall back to storage identity
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type != "meta"


def _address_span(t: torch.Tensor) -> tuple[int, int]:
    """Absolute bytes ``[lo, hi)`` a plain tensor's elements can occupy."""
    if t.is_contiguous():
        lo = t.data_ptr()
        return lo, lo + t.numel() * t.element_size()
    base = t.untyped_storage().data_ptr()
    lo, hi = _byte_span(t)
    return base + lo, base + hi


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` may touch the same bytes (conservative: compares the spans, not every element)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if _has_real_memory(a) and _has_real_memory(b):
        # by address: also catches two storage objects that map the same memory (DLPack, from_blob); the common
        # case, contiguous tensors, costs two pointer reads each (this runs on every step)
        a_lo, a_hi = _address_span(a)
        b_lo, b_hi = _address_span(b)
        return a_lo < b_hi and b_lo < a_hi
    if torch._C._is_alias_of(a, b):  # one storage (also for fake tensors under torch.compile)
        (a_lo, a_hi), (b_lo, b_hi) = _byte_span(a), _byte_span(b)
        return a_lo < b_hi and b_lo < a_hi
    return False


def _check_no_alias(op: str, inputs, xs: torch.Tensor, vs: torch.Tensor, step: int, slot: int) -> None:
    """The step writes ring rows ``xs[slot]`` and ``vs[slot]`` while it still reads its inputs: an input sharing
    memory with a written row would be overwritten mid-step (element order decides what each kernel reads)."""
    def refuse(name, ring_name):
        raise ValueError(
            f"{op}: {name} shares memory with {ring_name}[{slot}], the ring slot this call writes "
            f"(step={step}, slot step % C={slot}): an input must not overlap the slot being written; pass "
            f"{name}.clone()"
        )

    if all(_has_real_memory(t) for t in (xs, vs, *(t for _, t in inputs))):
        # plain tensors (every eager call): compare addresses without building views; the rings are contiguous
        # (checked before), so row ``slot`` is one byte range
        xs_lo, xs_hi = _address_span(xs)
        vs_lo, vs_hi = _address_span(vs)
        if xs.numel() and vs.numel() and xs_lo < vs_hi and vs_lo < xs_hi:
            raise ValueError(f"{op}: xs and vs share memory: the two halves of the ring must not overlap")
        row = (xs.numel() // xs.shape[0]) * xs.element_size()
        rows = (("xs", xs_lo + slot * row), ("vs", vs_lo + slot * row))
        for name, t in inputs:
            if t.numel() == 0 or row == 0:
                continue
            lo, hi = _address_span(t)
            for ring_name, start in rows:
                if lo < start + row and start < hi:
                    refuse(name, ring_name)
        return
    if _overlap(xs, vs):
        raise ValueError(f"{op}: xs and vs share memory: the two halves of the ring must not overlap")
    for name, t in inputs:
        for ring_name, ring_row in (("xs", xs[slot]), ("vs", vs[slot])):
            if _overlap(t, ring_row):
                refuse(name, ring_name)


def _validate_skip(op, x, xs, vs, step, k, sigmas, out_scale=1.0) -> tuple[int, int, int]:
    """All checks of skip_step / estimate; returns their slots (start, last, write)."""
    _check_ring(op, x, xs, vs)
    slots = _check_window(op, xs, step, k)
    _check_finite(op, *zip(("sigma_start", "sigma_now", "sigma_next"), sigmas), ("out_scale", out_scale))
    _check_no_alias(op, (("x", x),), xs, vs, step, slots[2])
    return slots


def _validate_compute(x, v, xs, vs, step, sigma_now, sigma_next) -> int:
    """All checks of compute_step; returns the slot it writes."""
    _check_ring("compute_step", x, xs, vs)
    _check_velocity(x, v)
    _check_step("compute_step", step)
    _check_finite("compute_step", ("sigma_now", sigma_now), ("sigma_next", sigma_next))
    slot = step % xs.shape[0]
    _check_no_alias("compute_step", (("x", x), ("v", v)), xs, vs, step, slot)
    return slot


def _check_terms(op: str, vc, xs, step, v_slots, v_weights, x_slot, x_weight) -> None:
    """The weighted step's terms: 1..MAX_TERMS (slot, finite weight) pairs inside their source, the latent slot, and
    every row read holding a step already logged (as :func:`_check_window` holds skip_step's window)."""
    if not 1 <= len(v_slots) <= MAX_TERMS or len(v_weights) != len(v_slots):
        raise ValueError(
            f"{op}: v_slots={list(v_slots)} and v_weights={list(v_weights)}: need 1..{MAX_TERMS} slots and one "
            "weight per slot"
        )
    rows = xs.shape[0] if vc is None else vc.shape[0]
    source = "vs" if vc is None else "vc"
    for slot in v_slots:
        if not 0 <= slot < rows:
            raise ValueError(f"{op}: v_slots entry {slot}: must be in 0..{rows - 1} ({source} holds {rows} rows)")
    for name, w in [*(("v_weights", w) for w in v_weights), ("x_weight", x_weight)]:
        if not math.isfinite(w):
            raise ValueError(f"{op}: {name} holds {w}: every weight must be finite")
    if not 0 <= x_slot < xs.shape[0]:
        raise ValueError(f"{op}: x_slot={x_slot}: must be in 0..{xs.shape[0] - 1} (xs.shape[0]={xs.shape[0]})")
    # Which rows hold data follows from step alone (metadata, no device read). Before step i the ring holds steps
    # max(0, i - C) .. i - 1, in slots 0 .. min(i, C) - 1 (all of them once i >= C: the written slot then holds
    # step i - C, read before the write, as skip_step with k = C does). vc fills its rows in order, one per computed
    # step, and at most i steps were computed before step i, so only rows 0 .. min(i, D) - 1 can hold a velocity.
    capacity = xs.shape[0]
    logged = min(step, capacity)
    held = f"steps {max(0, step - capacity)}..{step - 1} in slots 0..{logged - 1}" if step > 0 else "no step yet"
    if vc is None:
        for slot in v_slots:
            if slot >= logged:
                raise ValueError(
                    f"{op}: v_slots entry {slot} at step={step}: vs row {slot} holds no logged step (before step "
                    f"{step} the ring of C={capacity} holds {held}); a skipped step reads only steps already logged"
                )
    else:
        kept = min(step, rows)
        for slot in v_slots:
            if slot >= kept:
                raise ValueError(
                    f"{op}: v_slots entry {slot} at step={step}: vc row {slot} holds no computed velocity (vc fills "
                    f"its {rows} rows in order, one per computed step, and at most {step} steps precede step "
                    f"{step}, so only rows below {kept} can); a skipped step reads only steps already logged"
                )
    if x_weight != 0.0 and x_slot >= logged:  # a left-out latent term (weight 0) reads nothing
        raise ValueError(
            f"{op}: x_slot={x_slot} at step={step}: xs row {x_slot} holds no logged step (before step {step} the "
            f"ring of C={capacity} holds {held}); a skipped step reads only steps already logged"
        )


def _check_computed_store(op: str, x: torch.Tensor, xs: torch.Tensor, vc) -> None:
    """``vc``, when given, is a ``(D, *x.shape)`` stack of velocities in the ring's dtype, on x's device."""
    if vc is None:
        return
    if vc.dim() != x.dim() + 1 or tuple(vc.shape[1:]) != tuple(x.shape) or not 1 <= vc.shape[0] <= MAX_ORDER:
        raise ValueError(
            f"{op}: vc has shape {tuple(vc.shape)} but x has shape {tuple(x.shape)}: must be (D, *x.shape) with "
            f"1 <= D <= {MAX_ORDER}"
        )
    if vc.device != x.device or vc.dtype != xs.dtype or not vc.is_contiguous():
        raise ValueError(
            f"{op}: vc is {vc.dtype} on {vc.device} (contiguous={vc.is_contiguous()}): must be contiguous "
            f"{xs.dtype} on {x.device}, like the ring"
        )


def _validate_weighted(x, xs, vs, vc, step, v_slots, v_weights, x_slot, x_weight, dt, out_scale, out_dtype) -> int:
    """All checks of weighted_step; returns the slot it writes."""
    op = "weighted_step"
    _check_ring(op, x, xs, vs)
    _check_computed_store(op, x, xs, vc)
    _check_step(op, step)
    _check_terms(op, vc, xs, step, v_slots, v_weights, x_slot, x_weight)
    _check_finite(op, ("dt", dt), ("out_scale", out_scale))
    _check_out_dtype(out_dtype, op)
    slot = step % xs.shape[0]
    inputs = (("x", x),) if vc is None else (("x", x), ("vc", vc))
    _check_no_alias(op, inputs, xs, vs, step, slot)
    return slot


# -- backend implementations (CPU and CUDA dispatch keys) ---------------------------------------------------------


def _skip_step_impl(x, xs, vs, step, k, sigma_start, sigma_now, sigma_next):
    slots = _validate_skip("skip_step", x, xs, vs, step, k, (sigma_start, sigma_now, sigma_next))
    scalars = step_scalars(sigma_start, sigma_now, sigma_next)
    backend = _backend.select_backend(x)
    if backend == "cuda":
        return _backend.cuda_ops()._skip_step_cuda(x.contiguous(), xs, vs, *slots, *scalars)
    if backend == "triton":
        return _backend.triton_kernels().skip_step_triton(x, xs, vs, *slots, *scalars)
    return skip_step_ref(x, xs, vs, *slots, *scalars)


def _compute_step_impl(x, v, xs, vs, step, sigma_now, sigma_next):
    slot = _validate_compute(x, v, xs, vs, step, sigma_now, sigma_next)
    dt = sigma_next - sigma_now
    backend = _backend.select_backend(x)
    if backend == "cuda" and v.dtype not in _backend.KERNEL_DTYPES:
        backend = "torch"  # the compiled kernel reads float16/bfloat16/float32 velocities only
    if backend == "cuda":
        return _backend.cuda_ops()._compute_step_cuda(x.contiguous(), v.contiguous(), xs, vs, slot, dt)
    if backend == "triton":
        return _backend.triton_kernels().compute_step_triton(x, v, xs, vs, slot, dt)
    return compute_step_ref(x, v, xs, vs, slot, dt)


def _estimate_impl(x, xs, vs, step, k, sigma_start, sigma_now, sigma_next, out_scale, out_dtype):
    slots = _validate_skip("estimate", x, xs, vs, step, k, (sigma_start, sigma_now, sigma_next), out_scale)
    _check_out_dtype(out_dtype)
    scalars = step_scalars(sigma_start, sigma_now, sigma_next)
    backend = _backend.select_backend(x)
    if backend != "torch" and out_dtype == torch.float64:
        backend = "torch"  # the kernels store float16/bfloat16/float32 only
    if backend == "cuda":
        return _backend.cuda_ops()._estimate_cuda(x.contiguous(), xs, vs, *slots, *scalars, out_scale, out_dtype)
    if backend == "triton":
        return _backend.triton_kernels().estimate_triton(x, xs, vs, *slots, *scalars, out_scale, out_dtype)
    return estimate_ref(x, xs, vs, *slots, *scalars, out_scale, out_dtype)


def _weighted_step_impl(x, xs, vs, vc, step, v_slots, v_weights, x_slot, x_weight, dt, out_scale, out_dtype,
                        euler):
    slot = _validate_weighted(x, xs, vs, vc, step, v_slots, v_weights, x_slot, x_weight, dt, out_scale, out_dtype)
    out_dtype = x.dtype if euler else out_dtype
    args = (list(v_slots), list(v_weights), x_slot, x_weight, slot, dt, out_scale, out_dtype, euler)
    backend = _backend.select_backend(x)
    if backend != "torch" and out_dtype == torch.float64:
        backend = "torch"  # the kernels store float16/bfloat16/float32 only
    if backend == "cuda":
        return _backend.cuda_ops()._weighted_step_cuda(x.contiguous(), xs, vs, vc, *args)
    if backend == "triton":
        return _backend.triton_kernels().weighted_step_triton(x, xs, vs, vc, *args)
    return weighted_step_ref(x, xs, vs, vc, *args)


for _name, _impl in (("skip_step", _skip_step_impl), ("compute_step", _compute_step_impl),
                     ("estimate", _estimate_impl), ("weighted_step", _weighted_step_impl)):
    _LIB.impl(_name, _impl, "CPU")
    _LIB.impl(_name, _impl, "CUDA")


# -- autograd -----------------------------------------------------------------------------------------------------
#
# When autograd records (grad mode on and some input requires grad) an op runs as the reference's torch ops, on any
# device: they are differentiable as they stand, in-place ring writes included, so gradients reach x, v and the
# earlier steps logged in the ring. Otherwise the Autograd kernel steps aside for the fused backends. Registering it
# at the Autograd key (rather than leaving the backend kernels to be traced by accident) is also what
# torch.library.opcheck's autograd-registration test asks of an op.


def _check_ring_writable(op: str, xs: torch.Tensor, vs: torch.Tensor) -> None:
    """Autograd refuses in-place writes into a leaf that requires grad (or a view of one); say so before any work."""
    for name, ring in (("xs", xs), ("vs", vs)):
        base = ring._base if ring._base is not None else ring
        if ring.requires_grad and base.is_leaf and base.requires_grad:
            raise ValueError(
                f"{op}: {name} is a leaf tensor that requires grad (or a view of one), and the op writes into it in "
                f"place, which autograd forbids: log into a ring that does not require grad"
            )


def _skip_step_autograd(x, xs, vs, step, k, sigma_start, sigma_now, sigma_next):
    slots = _validate_skip("skip_step", x, xs, vs, step, k, (sigma_start, sigma_now, sigma_next))
    _check_ring_writable("skip_step", xs, vs)
    return skip_step_ref(x, xs, vs, *slots, *step_scalars(sigma_start, sigma_now, sigma_next))


def _compute_step_autograd(x, v, xs, vs, step, sigma_now, sigma_next):
    slot = _validate_compute(x, v, xs, vs, step, sigma_now, sigma_next)
    _check_ring_writable("compute_step", xs, vs)
    return compute_step_ref(x, v, xs, vs, slot, sigma_next - sigma_now)


def _estimate_autograd(x, xs, vs, step, k, sigma_start, sigma_now, sigma_next, out_scale, out_dtype):
    slots = _validate_skip("estimate", x, xs, vs, step, k, (sigma_start, sigma_now, sigma_next), out_scale)
    _check_out_dtype(out_dtype)
    _check_ring_writable("estimate", xs, vs)
    scalars = step_scalars(sigma_start, sigma_now, sigma_next)
    return estimate_ref(x, xs, vs, *slots, *scalars, out_scale, out_dtype)


def _weighted_step_autograd(x, xs, vs, vc, step, v_slots, v_weights, x_slot, x_weight, dt, out_scale, out_dtype,
                            euler):
    slot = _validate_weighted(x, xs, vs, vc, step, v_slots, v_weights, x_slot, x_weight, dt, out_scale, out_dtype)
    _check_ring_writable("weighted_step", xs, vs)
    out_dtype = x.dtype if euler else out_dtype
    return weighted_step_ref(x, xs, vs, vc, list(v_slots), list(v_weights), x_slot, x_weight, slot, dt, out_scale,
                             out_dtype, euler)


def _autograd_kernel(name: str, differentiable):
    overload = getattr(torch.ops.meancache, name).default

    def kernel(keyset, *args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return differentiable(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return overload.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    return kernel


def _inplace_kernel(name: str, ring_args: tuple[int, int]):
    overload = getattr(torch.ops.meancache, name).default

    def kernel(keyset, *args):
        # The fused kernels write the ring behind autograd's back; bumping its version lets autograd refuse a
        # backward that would read a tensor this call overwrote (as every in-place torch op does).
        torch.autograd.graph.increment_version([args[i] for i in ring_args])
        with torch._C._AutoDispatchBelowADInplaceOrView():
            return overload.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args)

    return kernel


for _name, _differentiable, _rings in (("skip_step", _skip_step_autograd, (1, 2)),
                                       ("compute_step", _compute_step_autograd, (2, 3)),
                                       ("estimate", _estimate_autograd, (1, 2)),
                                       ("weighted_step", _weighted_step_autograd, (1, 2))):
    _LIB.impl(_name, _autograd_kernel(_name, _differentiable), "Autograd", with_keyset=True)
    _LIB.impl(_name, _inplace_kernel(_name, _rings), "ADInplaceOrView", with_keyset=True)


# -- fake implementations (torch.compile, FakeTensorMode): the same checks, on metadata --------------------------


@torch.library.register_fake("meancache::skip_step")
def _skip_step_fake(x, xs, vs, step, k, sigma_start, sigma_now, sigma_next):
    _validate_skip("skip_step", x, xs, vs, step, k, (sigma_start, sigma_now, sigma_next))
    return torch.empty_like(x)


@torch.library.register_fake("meancache::compute_step")
def _compute_step_fake(x, v, xs, vs, step, sigma_now, sigma_next):
    _validate_compute(x, v, xs, vs, step, sigma_now, sigma_next)
    return torch.empty_like(x)


@torch.library.register_fake("meancache::estimate")
def _estimate_fake(x, xs, vs, step, k, sigma_start, sigma_now, sigma_next, out_scale, out_dtype):
    _validate_skip("estimate", x, xs, vs, step, k, (sigma_start, sigma_now, sigma_next), out_scale)
    _check_out_dtype(out_dtype)
    return torch.empty(x.shape, dtype=out_dtype, device=x.device)


@torch.library.register_fake("meancache::weighted_step")
def _weighted_step_fake(x, xs, vs, vc, step, v_slots, v_weights, x_slot, x_weight, dt, out_scale, out_dtype, euler):
    _validate_weighted(x, xs, vs, vc, step, v_slots, v_weights, x_slot, x_weight, dt, out_scale, out_dtype)
    return torch.empty(x.shape, dtype=x.dtype if euler else out_dtype, device=x.device)


def _direct(x, xs, vs, v=None) -> bool:
    """Whether an eager call may go straight to the op's implementation: nothing is being traced and autograd
    records nothing. The dispatcher would only pass through its Autograd and ADInplaceOrView layers (two Python
    kernels, about 10 us a call on the CPU); their one effect, bumping the ring's version counter, is done here."""
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor:
        return False
    if torch.is_grad_enabled() and (
        x.requires_grad or xs.requires_grad or vs.requires_grad or (v is not None and v.requires_grad)
    ):
        return False
    if not xs.is_inference():
        torch.autograd.graph.increment_version([xs, vs])
    return True


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
        ValueError: mismatched shapes/devices/dtypes between ``x``, ``xs`` and ``vs``; ``step`` or ``k`` not an
            int64 integer (numpy integers count, bool does not); ``step < 0`` or ``k`` outside ``1..min(step, C)``;
            a sigma that is not a finite real number (a bool or a tensor is not); ``x`` overlapping the ring slot
            being written. Checked from metadata only, before any work.

    Example:
        >>> import torch, meancache.ops as ops
        >>> xs, vs = torch.zeros(2, 3), torch.ones(2, 3)
        >>> ops.skip_step(torch.zeros(3), xs, vs, 1, 1, 1.0, 0.5, 0.25)
        tensor([-0.1250, -0.1250, -0.1250])
    """
    step, k = _host_int("skip_step", "step", step), _host_int("skip_step", "k", k)
    sigma_start, sigma_now, sigma_next = _host_sigmas("skip_step", sigma_start, sigma_now, sigma_next)
    if _direct(x, xs, vs):
        return _skip_step_impl(x, xs, vs, step, k, sigma_start, sigma_now, sigma_next)
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

    Raises:
        ValueError: as :func:`skip_step`, with ``v`` held to ``x``'s shape and device and, like ``x``, kept clear
            of the ring slot being written.

    Example:
        >>> import torch, meancache.ops as ops
        >>> xs, vs = torch.zeros(1, 2), torch.zeros(1, 2)
        >>> ops.compute_step(torch.ones(2), torch.ones(2), xs, vs, 0, 1.0, 0.5)
        tensor([0.5000, 0.5000])
    """
    step = _host_int("compute_step", "step", step)
    sigma_now = _host_real("compute_step", "sigma_now", sigma_now)
    sigma_next = _host_real("compute_step", "sigma_next", sigma_next)
    if _direct(x, xs, vs, v):
        return _compute_step_impl(x, v, xs, vs, step, sigma_now, sigma_next)
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
    step, k = _host_int("estimate", "step", step), _host_int("estimate", "k", k)
    sigma_start, sigma_now, sigma_next = _host_sigmas("estimate", sigma_start, sigma_now, sigma_next)
    out_scale = _host_real("estimate", "out_scale", out_scale)
    if _direct(x, xs, vs):
        return _estimate_impl(x, xs, vs, step, k, sigma_start, sigma_now, sigma_next, out_scale, dtype)
    return torch.ops.meancache.estimate(x, xs, vs, step, k, sigma_start, sigma_now, sigma_next, out_scale, dtype)


def weighted_step(
    x: torch.Tensor,
    xs: torch.Tensor,
    vs: torch.Tensor,
    vc: torch.Tensor | None,
    step: int,
    v_slots,
    v_weights,
    x_slot: int = 0,
    x_weight: float = 0.0,
    dt: float = 0.0,
    out_scale: float = 1.0,
    out_dtype: torch.dtype | None = None,
    euler: bool = True,
) -> torch.Tensor:
    """A skipped step with any estimator, in one launch: ``v_hat = sum_j v_weights[j] * V[v_slots[j]] +
    x_weight * (x - xs[x_slot])``, logged as ``(x_i, v_hat)`` in slot ``step % C``, then ``x_i + dt * v_hat``
    (``euler``) or ``v_hat * out_scale`` in ``out_dtype`` (a caller that steps itself).

    The weights come from :mod:`meancache.estimators` (host floats), so nothing synchronises the device and the op
    traces under ``torch.compile(fullgraph=True)``. Terms are summed in the order given, in the ring's dtype.

    Args:
        x: latent x_i, shape S, float16/bfloat16/float32/float64.
        xs, vs: ring ``(C, *S)``, float32 (float64 for float64 x), contiguous; updated in place.
        vc: computed velocities ``(D, *S)`` (D <= 6) in the ring's dtype, read only, or None to read the velocity
            terms from ``vs``.
        step: index i of this step (it writes ring slot ``step % C``).
        v_slots, v_weights: 1..4 rows of V (ints) and their weights (finite floats). Each row must hold data
            already logged: with ``vc`` None a ring slot of steps ``max(0, step - C) .. step - 1``, i.e. a slot below
            ``min(step, C)``; with ``vc`` a row below ``min(step, D)`` (its rows fill in order, one per computed step,
            and at most ``step`` steps precede this one).
        x_slot, x_weight: the latent term's ring slot and weight (``x_weight = 0`` leaves the term out and its row
            unread; otherwise ``x_slot`` obeys the ring rule above).
        dt: ``sigma_next - sigma_now``, finite.
        out_scale, out_dtype: scale (finite) and dtype of the returned estimate when ``euler`` is False
            (``out_dtype`` defaults to ``x.dtype``).
        euler: return x_{i+1} (True) or the estimate (False).

    Returns:
        x_{i+1} (shape S, ``x.dtype``) or ``v_hat * out_scale`` (shape S, ``out_dtype``).

    Raises:
        ValueError: as :func:`skip_step`, plus: slot and weight lists of different length or outside 1..4 terms,
            a slot outside its source or holding no logged step yet, a non-finite weight, ``dt`` or ``out_scale``,
            ``vc`` not shaped ``(D, *S)`` like the ring, or ``vc`` overlapping the ring slot being written. Checked
            from metadata only, before any work.

    Example:
        >>> import torch, meancache.ops as ops
        >>> xs, vs = torch.zeros(2, 3), torch.zeros(2, 3)
        >>> vc = torch.tensor([[1.0] * 3, [2.0] * 3])  # the velocities of computed steps 0 and 1
        >>> ops.weighted_step(torch.zeros(3), xs, vs, vc, 2, [0, 1], [-1.0, 2.0], dt=-0.5)
        tensor([-1.5000, -1.5000, -1.5000])
    """
    op = "weighted_step"
    step, x_slot = _host_int(op, "step", step), _host_int(op, "x_slot", x_slot)
    v_slots = [_host_int(op, "v_slots entry", s) for s in _host_list(op, "v_slots", v_slots)]
    v_weights = [_host_real(op, "v_weights entry", w) for w in _host_list(op, "v_weights", v_weights)]
    x_weight, dt = _host_real(op, "x_weight", x_weight), _host_real(op, "dt", dt)
    out_scale = _host_real(op, "out_scale", out_scale)
    if not isinstance(euler, bool):
        raise ValueError(f"{op}: euler={euler!r}: must be True or False")
    dtype = x.dtype if out_dtype is None else out_dtype
    args = (x, xs, vs, vc, step, v_slots, v_weights, x_slot, x_weight, dt, out_scale, dtype, euler)
    if _direct(x, xs, vs, vc):
        return _weighted_step_impl(*args)
    return torch.ops.meancache.weighted_step(*args)
