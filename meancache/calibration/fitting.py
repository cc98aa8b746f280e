"""Fitted estimators: per-step weights on the last computed velocities, fitted by least squares to a recording.

A ``predict`` segment of order p estimates a skipped step's velocity as a fixed combination of the last p + 1
computed velocities: the weights of the polynomial through them, which depend on the sigmas only. A *fitted*
segment keeps the same nodes but takes, for each skipped step i, the weights ``w`` that make
``sum_k w_k v_{c_k}`` closest to the recorded ``v_i`` over every recorded input and element (teacher forcing: the
nodes are the recorded velocities of the uncached run). That is 1 to 4 numbers per skipped step fitted to
``P * E`` equations, so they do not memorise the inputs; a small ridge pulls them towards the ``predict`` weights
where the nodes are nearly collinear (:data:`FIT_RIDGE`).

Why: at small budgets the line through two velocities far behind the step is the main error of every cache and
of Adams-Bashforth alike; fitted weights take the model's own curvature into account. Measured on the bench flows
and the digits model (bench/RESULTS.md), but only as one more candidate: :func:`meancache.calibrate` scores it on
inputs its weights were not fitted on (:func:`cross_fitted`) beside all the others.

The weights belong to the grid they were fitted on: the schedule stores that grid, and a run on another grid or
step count uses ``predict`` of the same order instead (:meth:`~meancache.Schedule.unfitted`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..estimators import FITTED
from ..estimators import POLYNOMIAL_ESTIMATORS
from ..estimators import polynomial_weights
from ..schedule import Schedule
from ..validation import is_real
from .recording import Recording
from .recording import record  # noqa: F401  (the doctests build recordings with it)

__all__ = ["FIT_RIDGE", "cross_fitted", "fit_schedule"]

#: Ridge of the least-squares fit, relative to the mean diagonal of the normal matrix, towards the ``predict``
#: weights: negligible where the nodes are well apart, and a bound on the weights where two nodes are nearly equal
#: (adjacent compute steps), which would otherwise amplify any velocity error far from the recorded inputs.
FIT_RIDGE = 1e-4


def _prior(nodes: Sequence[float], sigma_now: float, sigma_next: float, count: int) -> list[float]:
    """The ``predict`` weights on ``count`` nodes (oldest first), zero on nodes a lowered order leaves out."""
    q, w = polynomial_weights("predict", list(nodes), sigma_now, sigma_next, max(1, count - 1))
    return [0.0] * (count - q - 1) + list(w)


def fit_schedule(recording: Recording, schedule: Schedule, inputs: Sequence[int] | None = None,
                 ridge: float = FIT_RIDGE) -> Schedule:
    """``schedule`` with every ``extrapolate`` and ``predict`` segment (open tail included) turned into a fitted
    segment of the same order, its weights fitted on ``recording``.

    Args:
        recording: a :class:`~meancache.calibration.recording.Recording` of N steps (float32 velocities
            ``(P, N, *S)``, read in float64).
        schedule: a :class:`~meancache.Schedule` of the same N steps; its meancache segments are kept.
        inputs: indices of the recorded inputs to fit on (default: all).
        ridge: see :data:`FIT_RIDGE` (>= 0).

    Returns:
        A :class:`~meancache.Schedule` with fitted segments and ``grid`` = the recording's sigmas (the schedule
        itself when it has no polynomial segment).

    Example:
        >>> import torch
        >>> from meancache.calibration.selection import tail_schedule
        >>> rec = record(lambda x, s: torch.sin(3 * x) - s, torch.randn(6, 5), torch.linspace(1, 0, 13),
        ...              progress=False)
        >>> fit = fit_schedule(rec, tail_schedule(4, 12, "predict", 1))
        >>> fit.labels, len(fit.weights[1]), len(fit.weights[1][0])
        (('f1', 'f1', 'f1', 'f1'), 2, 2)
    """
    if schedule.num_steps != recording.num_steps:
        raise ValueError(f"schedule.num_steps={schedule.num_steps} != the recording's {recording.num_steps} steps")
    if not is_real(ridge) or not ridge >= 0:
        raise ValueError(f"ridge={ridge!r}: must be a number >= 0")
    picked = list(range(recording.num_inputs)) if inputs is None else list(inputs)
    if not picked or any(not 0 <= i < recording.num_inputs for i in picked):
        raise ValueError(f"inputs={inputs!r}: must be a non-empty list of indices in 0..{recording.num_inputs - 1}")
    if not any(e in POLYNOMIAL_ESTIMATORS and b - a > 1 for a, b, e, _ in schedule.segments):
        return schedule
    sig = recording.sigmas
    vel = recording.velocities[picked].double().flatten(2)  # (P, N, E)
    steps = schedule.compute_steps
    names, weights = [], []
    for j, (a, b, est, order) in enumerate(schedule.segments):
        if est not in POLYNOMIAL_ESTIMATORS or b - a < 2:
            names.append(est)
            weights.append(None)
            continue
        nodes = list(steps[max(0, j - order) : j + 1])
        a_mat = vel[:, nodes]  # (P, q + 1, E)
        gram = torch.einsum("pae,pbe->ab", a_mat, a_mat)
        lam = ridge * float(gram.diagonal().mean())
        eye = torch.eye(len(nodes), dtype=gram.dtype)
        rows = []
        for i in range(a + 1, b):
            prior = torch.tensor(_prior([sig[c] for c in nodes], sig[i], sig[i + 1], len(nodes)), dtype=gram.dtype)
            rhs = torch.einsum("pae,pe->a", a_mat, vel[:, i]) + lam * prior
            w = torch.linalg.lstsq(gram + lam * eye, rhs.unsqueeze(1)).solution.squeeze(1)
            rows.append(tuple(float(x) for x in w))
        names.append(FITTED)
        weights.append(rows)
    return Schedule(steps, schedule.orders, schedule.num_steps, names, weights=weights, grid=sig,
                    corrector=schedule.corrector)


def cross_fitted(recording: Recording, schedule: Schedule, folds) -> list[tuple[Schedule, list[int]]]:
    """``[(fitted on the other folds' inputs, the fold's inputs)]`` for each ``(search, validation)`` index pair
    of ``folds`` (:func:`~meancache.calibration.selection.folds`): a fitted schedule scored on inputs its weights
    never saw.

    Example:
        >>> import torch
        >>> from meancache.calibration.selection import folds, tail_schedule
        >>> rec = record(lambda x, s: torch.sin(3 * x) - s, torch.randn(4, 5), torch.linspace(1, 0, 9),
        ...              progress=False)
        >>> [val for _, val in cross_fitted(rec, tail_schedule(3, 8, "predict", 1), folds(4))]
        [[1, 3], [0, 2]]
    """
    return [(fit_schedule(recording, schedule, search), list(val)) for search, val in folds]
