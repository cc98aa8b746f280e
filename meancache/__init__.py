"""meancache: training-free MeanCache acceleration for flow-matching samplers (ICLR 2026, arXiv 2601.19961).

Public API:

* :class:`Schedule` - which steps run the model and the window K of the others; published presets.
* :func:`sample` - an Euler sampler that calls the model only at the schedule's compute steps.
* :func:`accelerate` / :func:`disable` / :func:`reset` - MeanCache for a module inside your own Euler loop.
* :mod:`meancache.ops` - the fused steps as ``torch.library`` ops; :func:`available_backends` - which
  implementation (CUDA extension, Triton, pure torch) can run them here, and why not.
"""

from __future__ import annotations

from .api import accelerate
from .api import disable
from .api import reset
from .api import summary
from .config import MeanCacheConfig
from .engine import Stats
from ._backend import available_backends
from .calibrate import Recording
from .calibrate import calibrate
from .calibrate import record
from .history import History
from .sampler import sample
from .schedule import MAX_ORDER
from .schedule import Schedule
from .schedule import StepPlan
from .schedule import preset_names

__version__ = "0.1.0"

__all__ = [
    "MAX_ORDER",
    "History",
    "MeanCacheConfig",
    "Recording",
    "Schedule",
    "Stats",
    "StepPlan",
    "__version__",
    "accelerate",
    "available_backends",
    "calibrate",
    "disable",
    "preset_names",
    "record",
    "reset",
    "sample",
    "summary",
]
