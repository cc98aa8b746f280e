"""Calibration by stage: :mod:`.recording` (reference trajectories and their file format), then :mod:`.search`
(segment costs and the exact budgeted path). :func:`meancache.calibrate` is the front door."""

from .recording import RECORDING_FORMAT
from .recording import RECORDING_FORMAT_VERSION
from .recording import Recording
from .recording import record
from .recording import record_pipeline
from .search import COST_FLOOR
from .search import COST_RTOL
from .search import DEFAULT_GAMMA
from .search import segment_costs
from .search import solve

__all__ = [
    "COST_FLOOR",
    "COST_RTOL",
    "DEFAULT_GAMMA",
    "RECORDING_FORMAT",
    "RECORDING_FORMAT_VERSION",
    "Recording",
    "record",
    "record_pipeline",
    "segment_costs",
    "solve",
]
