"""Which implementation runs the fused steps: the compiled CUDA extension, Triton, or the pure-torch reference.

Environment:
    MEANCACHE_BACKEND  ``auto`` (default), ``cuda``, ``triton`` or ``torch``. ``auto`` picks, for CUDA tensors, the
                       CUDA extension, else Triton, else the reference, and for CPU tensors the reference. A forced
                       backend that cannot run the call raises RuntimeError naming what is available.
    TRITON_INTERPRET   ``1`` runs Triton kernels on CPU tensors through Triton's interpreter (tests only: it is
                       slow). It must be set before meancache's kernels are first imported.

Nothing here fails at import: a missing extension or Triton is recorded with its reason for
:func:`available_backends`.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

__all__ = ["BACKENDS", "available_backends", "requested_backend", "select_backend", "cuda_ops", "triton_kernels"]

logger = logging.getLogger("meancache")

BACKENDS = ("cuda", "triton", "torch")
#: Latent dtypes the compiled and Triton kernels handle (their ring is float32); float64 runs on the reference.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


#: The private ops the compiled extension registers (csrc/torch_bindings.cpp).
_CUDA_OPS = ("_skip_step_cuda", "_compute_step_cuda", "_estimate_cuda", "_weighted_step_cuda")


@functools.lru_cache(maxsize=None)
def _load_extension() -> tuple[bool, str]:
    try:
        importlib.import_module("meancache._C")
    except (ImportError, OSError) as exc:
        return False, f"meancache._C did not load ({type(exc).__name__}: {exc})"
    missing = [n for n in _CUDA_OPS if not hasattr(torch.ops.meancache, n)]
    if missing:
        # an extension built from older sources: rebuild it (pip install -e . or make setup)
        return False, f"meancache._C loaded but lacks {missing}; rebuild it from this source tree"
    return True, "compiled extension meancache._C"


@functools.lru_cache(maxsize=None)
def _load_triton() -> tuple[object | None, str]:
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return None, f"triton is not installed ({exc})"
    try:
        kernels = importlib.import_module("meancache.kernels")
    except Exception as exc:  # a broken triton install must not break the package
        return None, f"meancache.kernels failed to import ({type(exc).__name__}: {exc})"
    return kernels, "triton kernels"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cuda_ops():
    """``torch.ops.meancache`` after loading the extension, or None when it is unavailable."""
    return torch.ops.meancache if _load_extension()[0] else None


def triton_kernels():
    """The :mod:`meancache.kernels` module, or None when Triton is unavailable."""
    return _load_triton()[0]


def available_backends() -> dict[str, str]:
    """Each backend's state: ``"available: ..."`` or ``"unavailable: <reason>"``.

    Example:
        >>> available_backends()["torch"]
        'available: pure-torch reference (CPU and CUDA)'
    """
    ok, why = _load_extension()
    has_gpu = torch.cuda.is_available()
    if ok and not has_gpu:
        cuda = "unavailable: meancache._C is loaded but no CUDA device is visible"
    else:
        cuda = f"available: {why}" if ok else f"unavailable: {why}"
    kernels, why = _load_triton()
    if kernels is None:
        triton_state = f"unavailable: {why}"
    elif has_gpu:
        triton_state = "available: triton kernels on CUDA tensors"
    elif _interpreting():
        triton_state = "available: triton interpreter on CPU tensors (TRITON_INTERPRET=1)"
    else:
        triton_state = "unavailable: triton imports but no CUDA device is visible and TRITON_INTERPRET is not 1"
    return {"cuda": cuda, "triton": triton_state, "torch": "available: pure-torch reference (CPU and CUDA)"}


def requested_backend() -> str:
    """The value of ``MEANCACHE_BACKEND`` (``auto`` when unset), validated."""
    value = os.environ.get("MEANCACHE_BACKEND", "auto").strip().lower() or "auto"
    if value not in ("auto",) + BACKENDS:
        raise ValueError(f"MEANCACHE_BACKEND={value!r}: must be one of auto, cuda, triton, torch")
    return value


def _can_run(name: str, x: torch.Tensor) -> str | None:
    """None when backend ``name`` can run on ``x``, else the reason it cannot."""
    if name == "torch":
        return None
    if x.dtype not in KERNEL_DTYPES:
        return f"the {name} kernels take float16/bfloat16/float32 latents, not {x.dtype}"
    if name == "cuda":
        ok, why = _load_extension()
        if not ok:
            return why
        if x.device.type != "cuda":
            return f"the CUDA extension needs CUDA tensors, got {x.device}"
        return None
    kernels, why = _load_triton()
    if kernels is None:
        return why
    if x.device.type == "cuda":
        return None
    if x.device.type == "cpu" and _interpreting():
        return None
    return f"triton needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1; got {x.device}"


def select_backend(x: torch.Tensor) -> str:
    """The backend that runs a fused step on latent ``x`` under the current ``MEANCACHE_BACKEND`` policy.

    Example:
        >>> import torch
        >>> select_backend(torch.zeros(2))
        'torch'
    """
    wanted = requested_backend()
    if wanted != "auto":
        reason = _can_run(wanted, x)
        if reason is not None:
            states = "; ".join(f"{k}: {v}" for k, v in available_backends().items())
            raise RuntimeError(f"MEANCACHE_BACKEND={wanted} cannot run this call: {reason}. Backends: {states}")
        return wanted
    if x.device.type == "cuda":
        for name in ("cuda", "triton"):
            if _can_run(name, x) is None:
                return name
    return "torch"
