"""Deprecated location of :func:`meancache.calibration.record_pipeline` (kept for one release)."""

import warnings

from .calibration.recording import record_pipeline

__all__ = ["record_pipeline"]

warnings.warn(
    "meancache.pipeline_recording is deprecated; use meancache.calibration.record_pipeline (or meancache.record)",
    DeprecationWarning,
    stacklevel=2,
)
