"""Calibration by stage: :mod:`.recording` (reference trajectories and their file format), then :mod:`.search`
(segment costs and the exact budgeted path) or :mod:`.joint` (the joint search over compute steps and per-segment
estimators), and :mod:`.replay` (whole-run replays that choose between the searches' schedules). :func:`meancache.calibrate` is the front door."""

from .recording import RECORDING_FORMAT
from .recording import RECORDING_FORMAT_VERSION
from .recording import Recording
from .recording import record
from .recording import record_pipeline
from .distributed import RankFailed
from .distributed import record_sharded
from .joint import JointCosts
from .joint import extrapolation_costs
from .joint import joint_costs
from .joint import joint_solve
from .joint import schedule_costs
from .replay import pick_by_replay
from .replay import replay_error
from .search import COST_FLOOR
from .search import COST_RTOL
from .search import DEFAULT_GAMMA
from .search import segment_costs
from .search import solve

__all__ = [
    "COST_FLOOR",
    "COST_RTOL",
    "DEFAULT_GAMMA",
    "JointCosts",
    "RECORDING_FORMAT",
    "RECORDING_FORMAT_VERSION",
    "RankFailed",
    "Recording",
    "extrapolation_costs",
    "joint_costs",
    "joint_solve",
    "pick_by_replay",
    "record",
    "record_pipeline",
    "record_sharded",
    "replay_error",
    "schedule_costs",
    "segment_costs",
    "solve",
]
