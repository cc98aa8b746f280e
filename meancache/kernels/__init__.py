"""Triton kernels for the fused MeanCache steps. Importing this module imports triton; meancache does so lazily.

Set ``TRITON_INTERPRET=1`` before the first import to run the kernels on CPU tensors (tests only).
"""

from .compute_step import compute_step_triton
from .estimate import estimate_triton
from .skip_step import skip_step_triton
from .weighted_step import weighted_step_triton

__all__ = ["compute_step_triton", "estimate_triton", "skip_step_triton", "weighted_step_triton"]
