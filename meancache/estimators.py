"""The estimators a skipped step can use, written as host-side weights on stored rows.

Every estimator is a linear combination of stored velocities plus, for MeanCache, one latent difference::

    v_hat = sum_j w_j * V[slot_j]  +  x_weight * (x_i - xs[x_slot])

with weights that depend only on sigmas. They are computed here, in float64 on the host, and one fused op
(:func:`meancache.ops.weighted_step`) applies them, so nothing here touches a tensor.

* ``meancache`` (window K = 0..6): the published estimator of algorithm.md §2.2,
  ``v_hat = v_last - (v_start - (x_i - x_start) / D) / D * dt``. Its run-time path is the dedicated
  ``skip_step``/``estimate`` op, exactly as in the official release; :func:`meancache_weights` restates it in the
  weighted form above (used to hold the generic op to the published one).
* ``extrapolate`` (order p = 1..3): the polynomial in sigma through the last p + 1 *computed* ``(sigma, v)`` pairs,
  averaged exactly over the step ``[sigma_i, sigma_{i+1}]`` (:func:`extrapolation_weights`). Its weight on node j
  is the mean of the Lagrange basis polynomial L_j over the step. p = 0 would be plain reuse, which MeanCache
  K = 1 already is.
* ``predict`` (order p = 1..3): the same polynomial evaluated at the step's start ``sigma_i``
  (:func:`prediction_weights`): a prediction of the velocity the model would return there, which is what the
  uncached Euler sampler uses. Averaging over the step approximates the exact flow of the ODE; the reference a user
  compares with is the full Euler run, and on it the prediction is the closer estimate (measured on the digits
  model, the shipped preset's compute steps, 100 held-out samples: 59.7 against 51.6 dB at B = 25, 52.2 against
  50.5 dB at B = 17, 40.9 against 40.3 dB at B = 10, order 1). The calibration chooses between them per segment.
* ``fitted`` (order p = 1..3): weights on the same last p + 1 computed velocities, but fitted by least squares to
  a recording of the model, one set per skipped step, and stored in the schedule with the grid they were fitted on
  (:func:`meancache.calibration.fitting.fit_schedule`). They depend on that grid, not on the run's sigmas: a run on
  another grid uses ``predict`` of the same order instead (logged).

A schedule may also carry a **corrector** of order c = 1 or 2 (:func:`correction_weights`): at each compute step
that ends a segment of these node estimators, the velocity just computed is a node *past* the segment's skipped
steps, so their velocities can be interpolated instead of extrapolated. The skipped steps' estimates are already
spent in the latent, so the difference ``sum_i dt_i * (interpolated_i - estimate_i)`` is added at that compute
step: a predictor-corrector pair (the corrected latent is not evaluated again, as in PEC multistep solvers and
UniPC's corrector), with no extra model evaluation.
"""

from __future__ import annotations

import math
from .validation import is_int
from typing import Sequence

__all__ = [
    "ESTIMATORS",
    "FITTED",
    "correction_weights",
    "NODE_ESTIMATORS",
    "POLYNOMIAL_ESTIMATORS",
    "SCHEDULE_ESTIMATORS",
    "MAX_CORRECTOR",
    "MAX_EXTRAPOLATION_ORDER",
    "MAX_GAIN",
    "MAX_TERMS",
    "estimator_label",
    "extrapolation_weights",
    "meancache_weights",
    "polynomial_weights",
    "prediction_weights",
]

#: Names of the estimators a schedule segment can carry.
ESTIMATORS = ("meancache", "extrapolate", "predict")
#: The estimators that combine the last p + 1 computed velocities with polynomial weights (order p = 1..3).
POLYNOMIAL_ESTIMATORS = ("extrapolate", "predict")
#: The estimator whose weights on the last p + 1 computed velocities were fitted to a recording, one set per
#: skipped step, stored in the schedule (:mod:`meancache.calibration.fitting`); no search prices it.
FITTED = "fitted"
#: Every estimator a schedule segment can carry: the searched ones and the fitted one.
SCHEDULE_ESTIMATORS = ESTIMATORS + (FITTED,)
#: The estimators that read the kept computed velocities (the nodes) rather than the history ring.
NODE_ESTIMATORS = POLYNOMIAL_ESTIMATORS + (FITTED,)
_LABEL = {"meancache": "K", "extrapolate": "e", "predict": "p", FITTED: "f"}
#: Highest polynomial order of ``extrapolate`` (a cubic through 4 computed velocities).
MAX_EXTRAPOLATION_ORDER = 3
#: Highest corrector order: a line through the segment's two ends (1), or the quadratic through them and the
#: computed velocity before the segment (2).
MAX_CORRECTOR = 2
#: Most velocity terms one weighted step combines (the 4 nodes of a cubic).
MAX_TERMS = MAX_EXTRAPOLATION_ORDER + 1
#: Conditioning guard of :func:`extrapolation_weights`: the largest allowed ``sum_j |w_j|``, the factor by which
#: the weights can amplify an error in the stored velocities. Plain reuse has gain 1; a line through two computed
#: steps h apart, extrapolated to a step t*h past the newest, has gain 1 + 2t, so 32 still admits a line carried
#: 15 node spacings ahead (longer than any segment the search allows, 8 steps, after two adjacent computes). A
#: higher order, or nodes bunched close together near sigma = 0 (shifted grids), that would exceed it is lowered
#: one order at a time until it fits.
MAX_GAIN = 32.0

# The two-point Gauss-Legendre rule integrates polynomials up to degree 3 exactly: the mean of a cubic over
# [a, b] is the average of its values at the midpoint -/+ (b - a) / (2 * sqrt(3)).
_GAUSS = 0.5 / math.sqrt(3.0)


def estimator_label(estimator: str, order: int) -> str:
    """Short name of a segment's estimator: ``K<order>`` for meancache, ``e<order>`` for extrapolate, ``p<order>``
    for predict, ``f<order>`` for fitted.

    Example:
        >>> estimator_label("meancache", 2), estimator_label("extrapolate", 1), estimator_label("predict", 2)
        ('K2', 'e1', 'p2')
    """
    return f"{_LABEL[estimator]}{order}"


def meancache_weights(inv_d: float, dt: float) -> tuple[float, float, float]:
    """The published estimator as weights: ``(w_start, w_last, x_weight)`` with
    ``v_hat = w_last * v_last + w_start * v_start + x_weight * (x_i - x_start)``.

    Expanding ``v_last - (v_start - (x_i - x_start) * inv_d) * inv_d * dt`` gives ``w_last = 1``,
    ``w_start = -dt * inv_d`` and ``x_weight = dt * inv_d**2``; ``inv_d`` and ``dt`` come from
    :func:`meancache.reference.step_scalars`.

    Example:
        >>> meancache_weights(-2.0, -0.25)
        (-0.5, 1.0, -1.0)
    """
    return -dt * inv_d, 1.0, dt * inv_d * inv_d


def _lagrange_means(nodes: Sequence[float], sigma_now: float, sigma_next: float) -> list[float] | None:
    """Mean of each Lagrange basis polynomial over ``[sigma_now, sigma_next]``, or None for repeated nodes."""
    mid = 0.5 * (sigma_now + sigma_next)
    half = _GAUSS * (sigma_next - sigma_now)
    points = (mid - half, mid + half)
    weights = []
    for j, sj in enumerate(nodes):
        total = 0.0
        for g in points:
            term = 1.0
            for m, sm in enumerate(nodes):
                if m != j:
                    gap = sj - sm
                    if gap == 0.0:
                        return None
                    # differences to the nodes, never monomial coefficients: stays accurate where sigma -> 0
                    term *= (g - sm) / gap
            total += term
        weights.append(0.5 * total)
    return weights


def extrapolation_weights(
    nodes: Sequence[float], sigma_now: float, sigma_next: float, order: int
) -> tuple[int, tuple[float, ...]]:
    """Weights of the ``extrapolate`` estimator of order ``order`` for the step ``sigma_now -> sigma_next``.

    ``v_hat = sum_j w_j * v(nodes[-q-1+j])`` is the mean over the step of the degree-q polynomial in sigma through
    the last ``q + 1`` computed ``(sigma, v)`` pairs, ``w_j = (1 / (sigma_next - sigma_now)) * integral of L_j``
    (exact: a two-point Gauss-Legendre rule, exact up to degree 3; a zero-length step takes the value at
    ``sigma_now``). ``q`` starts at ``min(order, len(nodes) - 1)`` (the nodes computed so far) and is lowered by
    one while the nodes repeat a sigma or ``sum |w_j|`` exceeds :data:`MAX_GAIN` (the conditioning guard); q = 0 is
    plain reuse of the newest computed velocity, weight 1. Host floats, float64.

    Args:
        nodes: sigmas of the computed steps so far, oldest first (only the last 4 are read); at least one.
        sigma_now, sigma_next: the step being estimated.
        order: the requested order p, 1..3.

    Returns:
        ``(q, weights)``: the order used and its ``q + 1`` weights for ``nodes[-q-1:]``, oldest first. They sum to 1.

    Example:
        >>> q, w = extrapolation_weights([1.0, 0.8], 0.6, 0.5, order=1)  # the line at the midpoint 0.55
        >>> q, [round(x, 12) for x in w]
        (1, [-1.25, 2.25])
        >>> extrapolation_weights([0.8], 0.6, 0.5, order=2)  # one node so far: reuse
        (0, (1.0,))
    """
    if not nodes:
        raise ValueError("nodes=[]: extrapolation needs at least one computed step")
    if not is_int(order) or not 1 <= order <= MAX_EXTRAPOLATION_ORDER:
        raise ValueError(f"order={order!r}: must be an int in 1..{MAX_EXTRAPOLATION_ORDER}")
    q = min(order, len(nodes) - 1)
    while q > 0:
        weights = _lagrange_means([float(s) for s in nodes[-q - 1 :]], float(sigma_now), float(sigma_next))
        if weights is not None and all(math.isfinite(w) for w in weights) and sum(map(abs, weights)) <= MAX_GAIN:
            return q, tuple(weights)
        q -= 1
    return 0, (1.0,)


def prediction_weights(nodes: Sequence[float], sigma_now: float, order: int) -> tuple[int, tuple[float, ...]]:
    """Weights of the ``predict`` estimator: the degree-q polynomial through the last ``q + 1`` computed
    ``(sigma, v)`` pairs, evaluated at ``sigma_now``, with the order and the guard of
    :func:`extrapolation_weights` (its zero-length step).

    Example:
        >>> q, w = prediction_weights([1.0, 0.5], 0.25, order=1)  # the line through the two nodes, at 0.25
        >>> q, [round(x, 12) for x in w]
        (1, [-0.5, 1.5])
    """
    return extrapolation_weights(nodes, sigma_now, sigma_now, order)


def polynomial_weights(
    estimator: str, nodes: Sequence[float], sigma_now: float, sigma_next: float, order: int
) -> tuple[int, tuple[float, ...]]:
    """The weights of a polynomial estimator (``"extrapolate"`` or ``"predict"``) for the step
    ``sigma_now -> sigma_next``: the one call the engine and the calibration both make.

    Example:
        >>> polynomial_weights("predict", [0.8], 0.6, 0.5, 1)
        (0, (1.0,))
    """
    if estimator == "predict":
        return prediction_weights(nodes, sigma_now, order)
    if estimator == "extrapolate":
        return extrapolation_weights(nodes, sigma_now, sigma_next, order)
    raise ValueError(f"estimator={estimator!r}: must be one of {', '.join(POLYNOMIAL_ESTIMATORS)}")


def correction_weights(
    nodes: Sequence[float], sigma_new: float, skipped: Sequence[tuple[float, float, Sequence[float]]], order: int
) -> tuple[tuple[float, ...], float]:
    """Weights of the corrector of order ``order`` at a compute step that ends a segment of node estimators.

    The segment's skipped steps ``i`` took ``x_{i+1} = x_i + dt_i * v_hat_i`` with ``v_hat_i = sum_j w_ij *
    v(nodes[-len(w_i) + j])``. Once the velocity ``v_new`` at ``sigma_new`` is known, the polynomial in sigma
    through the last ``q`` old nodes and ``(sigma_new, v_new)`` (``q = min(order, len(nodes))``) interpolates the
    velocity at each skipped step's start, and the latent is corrected by ``delta = sum_i dt_i * (P(sigma_i) -
    v_hat_i) = sum_j a_j * v(nodes[-m + j]) + a_new * v_new``. Host floats, float64.

    Args:
        nodes: sigmas of the computed steps before ``sigma_new``, oldest first (at least one).
        sigma_new: the sigma of the compute step that ends the segment.
        skipped: one ``(sigma_i, dt_i, weights_i)`` per skipped step of the segment, ``weights_i`` on the last
            ``len(weights_i)`` of ``nodes`` (as the estimator used them), oldest first.
        order: the corrector order c, 1..:data:`MAX_CORRECTOR`.

    Returns:
        ``(a, a_new)``: ``a`` on the last ``len(a)`` of ``nodes``, oldest first, and the weight of ``v_new``.

    Example:
        >>> # one skipped step at 0.5 between nodes 1.0 and 0.0, which reused v(1.0) over dt = -0.5:
        >>> # the line through both ends gives (v(1.0) + v(0.0)) / 2 there
        >>> correction_weights([1.0], 0.0, [(0.5, -0.5, (1.0,))], 1)
        ((0.25,), -0.25)
    """
    if not is_int(order) or not 1 <= order <= MAX_CORRECTOR:
        raise ValueError(f"order={order!r}: the corrector order must be an int in 1..{MAX_CORRECTOR}")
    if not nodes:
        raise ValueError("nodes=[]: a corrector needs the computed step before the segment")
    q = min(int(order), len(nodes))
    depth = max([q] + [len(w) for _, _, w in skipped])
    if depth > len(nodes):
        raise ValueError(f"skipped: weights on {depth} nodes but only {len(nodes)} are given")
    old = [float(s) for s in nodes[-depth:]]
    points = old[-q:] + [float(sigma_new)]
    a = [0.0] * depth
    a_new = 0.0
    for sigma, dt, w in skipped:
        for j, sj in enumerate(points):
            basis = 1.0
            for m, sm in enumerate(points):
                if m != j:
                    basis *= (sigma - sm) / (sj - sm)
            if j == q:
                a_new += dt * basis
            else:
                a[depth - q + j] += dt * basis
        for j, wj in enumerate(w):
            a[depth - len(w) + j] -= dt * wj
    return tuple(a), a_new
