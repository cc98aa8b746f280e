"""Whole-run replay of a schedule on a recording, and the choice between the schedules of several searches.

The segment costs of the searches replay each segment from the *reference* state, so a MeanCache window that
reaches back past the segment start reads reference entries, where at run time it reads the previous segment's
estimates. That makes long MeanCache windows look better to the search than they run, and how much depends on the
model. :func:`replay_error` runs the real engine over the whole trajectory instead, driven by the recorded
velocities at the computed steps (the model itself is not needed), and :func:`pick_by_replay` keeps, per budget,
the candidate schedule whose replay ends closest to the reference.

Measured (held-out inputs, budgets 6 to 25 of 50 steps): on the embedded digits model the search over the
polynomial estimators alone beat the search over all estimators by 0.5 to 5.1 dB, and the replay picked the better
of the two at all 5 budgets; on two Gaussian-mixture flows the search over all estimators was the better one at 6
of 8 budgets, and the replay picked the better candidate at 5 of 8 (at the three misses the picked schedule had a
1.1x, 1.1x and 1.9x higher error).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..sampler import sample
from ..schedule import Schedule
from .recording import Recording
from .recording import record  # noqa: F401  (the doctests build recordings with it)
from .search import COST_RTOL

__all__ = ["pick_by_replay", "replay_error", "replayed_final"]


def replay_error(recording: Recording, schedule: Schedule) -> float:
    """Relative L2 distance between the reference's final latents and a run of ``schedule`` replayed on the
    recording: :func:`meancache.sample` in float64 from the recorded initial latents, where each computed step
    ``c`` returns the recorded velocity ``v_c`` and every skipped step runs the schedule's estimator with the
    run-time history (its own estimates included).

    Args:
        recording: a :class:`Recording` with N steps, latents ``(P, N + 1, *S)``.
        schedule: a :class:`~meancache.Schedule` of N steps.

    Returns:
        ``||x^_N - x_N|| / ||x_N||`` over all inputs (float; 0 for the full schedule); ``||x^_N - x_N||`` when the
        reference ``x_N`` is all zero.

    Example:
        >>> import torch
        >>> from meancache import Schedule
        >>> rec = record(lambda x, s: torch.sin(3 * x) - s, torch.randn(3, 4), torch.linspace(1, 0, 9),
        ...              progress=False)
        >>> replay_error(rec, Schedule.full(8)) < 1e-6, replay_error(rec, Schedule([0, 4, 7], [2, 2], 8)) > 0
        (True, True)
    """
    out = replayed_final(recording, schedule)
    ref = recording.latents[:, -1].double()
    dist = float(torch.linalg.vector_norm(out - ref))
    norm = float(torch.linalg.vector_norm(ref))
    # an all-zero reference has no relative error (0/0): the distance itself keeps every pick defined
    return dist / norm if norm > 0 else dist


def replayed_final(recording: Recording, schedule: Schedule) -> torch.Tensor:
    """The final latents ``(P, *S)`` float64 of ``schedule`` replayed over the whole run on the recording: the
    engine (:func:`meancache.sample` in float64) from the recorded initial latents, where each computed step ``c``
    returns the recorded velocity ``v_c`` and every skipped step runs the schedule's estimator with the run-time
    history (its own estimates included); no model is needed.

    Example:
        >>> import torch
        >>> from meancache import Schedule
        >>> rec = record(lambda x, s: x - 1.0, torch.zeros(2, 3), [1.0, 0.5, 0.0], progress=False)
        >>> replayed_final(rec, Schedule.full(2)).tolist()
        [[0.75, 0.75, 0.75], [0.75, 0.75, 0.75]]
    """
    if schedule.num_steps != recording.num_steps:
        raise ValueError(f"schedule.num_steps={schedule.num_steps} != the recording's {recording.num_steps} steps")
    latents = recording.latents.double()
    velocities = recording.velocities.double()
    computed = iter(schedule.compute_steps)  # the engine calls the velocity once per computed step, in order

    def recorded(x, sigma):
        return velocities[:, next(computed)]

    with torch.no_grad():
        return sample(recorded, latents[:, 0], recording.sigmas, schedule)


def pick_by_replay(recording: Recording, candidates: Sequence[Schedule]) -> Schedule:
    """The candidate with the least :func:`replay_error`; errors within ``COST_RTOL`` of the least are ties, won
    by the earliest candidate (so rounding never decides).

    Example:
        >>> import torch
        >>> from meancache import Schedule
        >>> rec = record(lambda x, s: torch.sin(3 * x) - s, torch.randn(3, 4), torch.linspace(1, 0, 9),
        ...              progress=False)
        >>> pick_by_replay(rec, [Schedule([0, 4, 7], [1, 1], 8), Schedule.full(8)]) == Schedule.full(8)
        True
    """
    if not candidates:
        raise ValueError("candidates=[]: give at least one schedule")
    errors = [replay_error(recording, s) for s in candidates]
    least = min(errors)
    return next(s for s, e in zip(candidates, errors) if e <= least + COST_RTOL * least)
