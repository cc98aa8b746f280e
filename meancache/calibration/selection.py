"""Choosing a schedule on inputs the search did not see: the validation split, the safe candidates, the tail-aware
score, and refinement by local moves.

A schedule is calibrated on a few inputs and then used on every input a user ever gives. The searches minimise a
price on the inputs they read, so the choice between their answers (and any setting they take, such as the gain
cap of :meth:`~meancache.calibration.joint.JointCosts.restricted`) is made on other inputs:

* :func:`validation_split` holds out every fourth input (indices 3, 7, 11, ...; at least one) of the recording:
  deterministic, so the same recording gives the same split, and the same schedule, on every machine;
* :func:`input_errors` replays a schedule over whole runs of the held-out inputs (the real engine, driven by the
  recorded velocities at the computed steps) and gives each input's relative error;
* :func:`tail_score` reduces them to one number that sees a runaway input: the root mean square (see its
  docstring for why);
* :func:`safe_candidates` are the schedules that need no search (``Schedule.default``, uniform compute steps with
  ``predict`` or ``extrapolate``): they are always in the running, so a calibration is never worse on validation
  than they are;
* :func:`refine` improves the chosen schedule by local moves (shift one compute step, change one segment's
  estimator or order), each scored on the validation inputs, and keeps a move only when it lowers the score.
"""

from __future__ import annotations

import math
from typing import Callable
from typing import Sequence

import torch

from ..estimators import FITTED
from ..estimators import NODE_ESTIMATORS
from ..estimators import POLYNOMIAL_ESTIMATORS
from ..estimators import polynomial_weights
from ..schedule import Schedule
from ..schedule import _place
from ..validation import is_int
from .recording import Recording
from .recording import record  # noqa: F401  (the doctests build recordings with it)
from .replay import replayed_final
from .search import COST_RTOL

__all__ = [
    "EARLY",
    "EARLY_CANDIDATES",
    "VALIDATION_EVERY",
    "early_schedule",
    "folds",
    "input_errors",
    "refine",
    "reuse_labelled",
    "run_score",
    "safe_candidates",
    "schedule_gain",
    "subset",
    "tail_score",
    "uniform_schedule",
    "validation_split",
]

#: One input in this many is held out for validation (indices ``VALIDATION_EVERY - 1``, ``2 * VALIDATION_EVERY -
#: 1``, ...; the last input when there are fewer).
VALIDATION_EVERY = 4
#: The estimators (name, order) a refinement move may give a multi-step segment, in the order they are tried.
MOVE_ESTIMATORS = (("predict", 1), ("extrapolate", 1), ("predict", 2), ("extrapolate", 2), ("meancache", 2),
                   ("meancache", 1))


def reuse_labelled(schedule: Schedule) -> Schedule:
    """``schedule`` with a multi-step first segment labelled ``K1`` (the published estimator, plain reuse): the one
    label rule of :func:`meancache.calibrate`'s results.

    From step 0 only ``v_0`` is known, so every estimator is plain reuse of it there: the published one with any K
    (its window holds ``v_0`` and estimates equal to it), and ``extrapolate``/``predict`` of any order (one node:
    order 0). The label follows the searches' tie rule, which gives ties to the published estimator and the
    smallest K, whichever candidate won. A fitted first segment is kept: its weights scale ``v_0``; so is the
    first segment of a schedule with a corrector, which corrects it through the next computed velocity.

    Example:
        >>> reuse_labelled(Schedule([0, 3, 4, 9], [1, 0, 2], 10, ["predict", "meancache", "predict"])).labels
        ('K1', 'K0', 'p2')
    """
    steps = schedule.compute_steps
    if steps[1] - steps[0] < 2 or (schedule.estimators[0], schedule.orders[0]) == ("meancache", 1):
        return schedule
    if schedule.estimators[0] == FITTED:  # fitted weights on v_0 scale it: not plain reuse, so kept
        return schedule
    if schedule.corrector and schedule.estimators[0] in NODE_ESTIMATORS:  # corrected at step steps[1]: kept
        return schedule
    return Schedule(steps, (1, *schedule.orders[1:]), schedule.num_steps, ("meancache", *schedule.estimators[1:]))


def validation_split(num_inputs: int) -> tuple[list[int], list[int]]:
    """``(search, validation)`` input indices: every :data:`VALIDATION_EVERY`-th input is held out (at least one).

    With a single input there is nothing to hold out: both lists are ``[0]`` (the choice is then made on the
    searched input itself; record two or more inputs to avoid that).

    Example:
        >>> validation_split(8)
        ([0, 1, 2, 4, 5, 6], [3, 7])
        >>> validation_split(2), validation_split(1)
        (([0], [1]), ([0], [0]))
    """
    if isinstance(num_inputs, bool) or not isinstance(num_inputs, int) or num_inputs < 1:
        raise ValueError(f"num_inputs={num_inputs!r}: must be an int >= 1")
    if num_inputs == 1:
        return [0], [0]
    held = [i for i in range(num_inputs) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1] or [num_inputs - 1]
    return [i for i in range(num_inputs) if i not in held], held


def folds(num_inputs: int) -> list[tuple[list[int], list[int]]]:
    """Two ``(search, validation)`` folds that together validate every input once: even and odd indices. A single
    input gives one fold that searches and validates it.

    Example:
        >>> folds(5)
        [([0, 2, 4], [1, 3]), ([1, 3], [0, 2, 4])]
    """
    if isinstance(num_inputs, bool) or not isinstance(num_inputs, int) or num_inputs < 1:
        raise ValueError(f"num_inputs={num_inputs!r}: must be an int >= 1")
    if num_inputs == 1:
        return [([0], [0])]
    even, odd = list(range(0, num_inputs, 2)), list(range(1, num_inputs, 2))
    return [(even, odd), (odd, even)]


def subset(recording: Recording, indices: Sequence[int]) -> Recording:
    """The recording of the inputs ``indices`` only (views of its tensors, no copy).

    Example:
        >>> import torch
        >>> rec = Recording([1.0, 0.5, 0.0], torch.zeros(4, 3, 2), torch.zeros(4, 2, 2))
        >>> subset(rec, [1, 3]).num_inputs
        2
    """
    idx = list(indices)
    if not idx or any(not 0 <= i < recording.num_inputs for i in idx):
        raise ValueError(f"indices={idx}: must be a non-empty list of inputs in 0..{recording.num_inputs - 1}")
    if idx == list(range(recording.num_inputs)):
        return recording
    pick = torch.tensor(idx)
    return Recording(recording.sigmas, recording.latents.index_select(0, pick),
                     recording.velocities.index_select(0, pick), recording.meta)


def _relative(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-input ``||out - ref|| / ||ref||`` (float64); the absolute distance where ``ref`` is all zero, which
    keeps every error finite so that the choice between schedules is always defined."""
    p = ref.shape[0]
    dist = torch.linalg.vector_norm((out - ref).reshape(p, -1), dim=1)
    norm = torch.linalg.vector_norm(ref.reshape(p, -1), dim=1)
    return torch.where(norm > 0, dist / torch.where(norm > 0, norm, 1.0), dist)


def input_errors(recording: Recording, schedule: Schedule) -> torch.Tensor:
    """Each input's relative final error when ``schedule`` is replayed over the whole run on the recording.

    The replay is :func:`meancache.sample` in float64 from the recorded initial latents, where each computed step
    ``c`` returns the recorded velocity ``v_c`` and every skipped step runs the schedule's estimator with the
    run-time history (its own estimates included); no model is needed.

    Args:
        recording: a :class:`Recording` with N steps, latents ``(P, N + 1, *S)``.
        schedule: a :class:`~meancache.Schedule` of N steps.

    Returns:
        float64 ``(P,)``: ``||x^_N - x_N|| / ||x_N||`` per input (the absolute distance for an all-zero ``x_N``).

    Example:
        >>> import torch
        >>> rec = record(lambda x, s: torch.sin(3 * x) - s, torch.randn(3, 4), torch.linspace(1, 0, 9),
        ...              progress=False)
        >>> e = input_errors(rec, Schedule([0, 4, 7], [2, 2], 8))
        >>> e.shape, bool((e > 0).all()), float(input_errors(rec, Schedule.full(8)).max()) < 1e-6
        (torch.Size([3]), True, True)
    """
    out = replayed_final(recording, schedule)
    return _relative(out, recording.latents[:, -1].double())


def tail_score(errors: torch.Tensor) -> float:
    """The root mean square of per-input errors: the score a validation choice minimises.

    Why the mean of squares: a schedule that runs away on one input in ten (a long high-order run the searched
    inputs never exercised) has a small median and mean but a large mean square, since one error of 0.1 weighs as
    much as a hundred of 0.01. A high quantile would see it too, but with the few validation inputs a calibration
    has (8 of 32) any quantile above 0.9 is the maximum, decided by a single input; the mean of squares uses every
    input and is continuous in each.

    Example:
        >>> import torch
        >>> round(tail_score(torch.tensor([0.01, 0.01, 0.01, 0.1])), 4)
        0.0507
    """
    if errors.numel() == 0:
        raise ValueError("errors is empty: score at least one input")
    return float(errors.double().square().mean().sqrt())


def run_score(errors: torch.Tensor) -> float:
    """The mean of per-input errors of real sampled runs: the score ``calibrate(validate="runs")`` minimises.

    Why the mean and not :func:`tail_score`'s mean of squares, or a score that damps the worst inputs: with real
    runs the errors already include how a trajectory that left the reference feeds back into the model. On eight
    Gaussian-mixture flows the bench does not use (``bench/candidate_study.py``: B = 6 to 25 of 50, 32
    calibration inputs, 4,096 held-out ones), the candidate with the least mean beat AB2, TaylorSeer-lite and
    ``Schedule.default`` in both held-out measures in 26 of 40 cells, with a held-out median 1.27x that of the
    best candidate (geometric mean over the cells) and a rel L2 1.89x. The least root mean square: 24 cells,
    median 1.68x, rel L2 1.79x (a single calibration input decides it); the geometric mean, the mean without the
    worst inputs or relative to each input's best candidate: 23 to 25 cells, median 1.01x to 1.09x, rel L2 2.20x
    to 2.30x; the 90th percentile: 25 cells, 1.48x, 1.90x.

    Example:
        >>> import torch
        >>> round(run_score(torch.tensor([0.01, 0.01, 0.01, 0.1])), 4)
        0.0325
    """
    if errors.numel() == 0:
        raise ValueError("errors is empty: score at least one input")
    return float(errors.double().mean())


def schedule_gain(schedule: Schedule, sigmas: Sequence[float]) -> float:
    """The largest gain ``sum_j |w_j|`` of any skipped step of ``schedule`` on the grid ``sigmas``: how much its
    estimates can amplify an error in the computed velocities they read (1 for the published estimator, whose
    weights are positive and sum to one). The same weights the engine uses
    (:func:`~meancache.estimators.polynomial_weights`, or a fitted segment's stored weights).

    Example:
        >>> sig = [1 - i / 10 for i in range(11)]
        >>> round(schedule_gain(Schedule([0, 2, 4, 9], [1, 1, 1], 10, ["predict"] * 3), sig), 9)  # 1 + 2 * 2
        5.0
    """
    steps = schedule.compute_steps
    worst = 1.0
    for rows in schedule.weights or ():  # fitted segments: their stored weights
        worst = max([worst] + [sum(abs(x) for x in w) for w in rows or ()])
    for j, (a, b, est, order) in enumerate(schedule.segments):
        if est not in POLYNOMIAL_ESTIMATORS or b - a < 2:
            continue
        nodes = [sigmas[c] for c in steps[max(0, j - order) : j + 1]]
        for i in range(a + 1, b):
            _, w = polynomial_weights(est, nodes, sigmas[i], sigmas[i + 1], order)
            worst = max(worst, sum(abs(x) for x in w))
    return worst


def _segments(steps: Sequence[int], estimator: str, order: int, end: int | None = None) -> tuple[list[int], list[str]]:
    orders, names = [], []
    for a, b in zip(steps, [*steps[1:], *([end] if end is not None else [])]):
        multi = b - a > 1
        orders.append(order if multi else 0)
        names.append(estimator if multi else "meancache")
    return orders, names


def uniform_schedule(budget: int, num_steps: int, estimator: str = "predict", order: int = 1,
                     corrector: int = 0) -> Schedule:
    """``budget`` compute steps spread evenly over ``num_steps`` (``round(j * (N - 1) / (B - 1))``), every
    multi-step segment with ``estimator`` of ``order``, 1-step segments chains; ``corrector`` as in
    :class:`~meancache.Schedule` (0 where no segment skips a step).

    Example:
        >>> uniform_schedule(4, 10).compute_steps, uniform_schedule(4, 10).labels
        ((0, 3, 6, 9), ('p1', 'p1', 'p1'))
    """
    if not is_int(budget) or not 2 <= budget <= num_steps:
        raise ValueError(f"budget={budget!r}: must be an int in 2..num_steps={num_steps}")
    steps = sorted({round(j * (num_steps - 1) / (budget - 1)) for j in range(budget)})
    orders, names = _segments(steps, estimator, order)
    return Schedule(steps, orders, num_steps, names, corrector=_usable(corrector, names))


def corrected(schedule: Schedule, order: int) -> Schedule | None:
    """``schedule``'s compute steps, estimators and orders with a corrector of ``order`` (1 or 2, see
    :class:`~meancache.Schedule`), or None where it has nothing to correct: no segment with a node estimator, or
    fitted weights (they belong to the steps and estimators they were fitted for).

    Example:
        >>> s = Schedule([0, 3, 6, 9], [1, 1, 1], 10, ["predict", "meancache", "predict"])
        >>> corrected(s, 2).corrector, corrected(Schedule([0, 3, 9], [1, 2], 10), 1)
        (2, None)
    """
    if schedule.fitted or not any(e in NODE_ESTIMATORS for e in schedule.estimators):
        return None
    return Schedule(schedule.compute_steps, schedule.orders, schedule.num_steps, schedule.estimators,
                    corrector=order)


def _usable(corrector: int, names) -> int:
    """``corrector``, or 0 where no segment has an estimator it corrects (every segment a one-step chain)."""
    return corrector if any(e in NODE_ESTIMATORS for e in names) else 0


def tail_schedule(budget: int, num_steps: int, estimator: str = "extrapolate", order: int = 1,
                  corrector: int = 0) -> Schedule:
    """``budget`` compute steps spread evenly over the whole run, end included (``floor(j * N / B)``: distinct,
    and the last at most ``N - 2`` for ``B < N``), so the last ``~N / B`` steps are an open tail; every
    multi-step segment, the tail too, with ``estimator`` of ``order``, 1-step segments chains. With
    ``extrapolate`` p = 1 this is a two-step Adams-Bashforth solver on the B compute steps, run on the N-step grid: each skipped step integrates the line through the last two
    computed velocities, and the last one runs to sigma = 0 on the line instead of a last evaluation.
    ``corrector`` as in :class:`~meancache.Schedule` (the open tail, which no computed step ends, is not corrected).

    Example:
        >>> tail_schedule(6, 50).compute_steps, tail_schedule(6, 50).labels
        ((0, 8, 16, 25, 33, 41), ('e1', 'e1', 'e1', 'e1', 'e1', 'e1'))
    """
    if not is_int(budget) or not 2 <= budget < num_steps:
        raise ValueError(f"budget={budget!r}: must be an int in 2..num_steps - 1 = {num_steps - 1} (an open tail "
                         "leaves at least the last step to the estimate)")
    steps = [j * num_steps // int(budget) for j in range(budget)]
    orders, names = _segments(steps, estimator, order, num_steps)
    return Schedule(steps, orders, num_steps, names, corrector=_usable(corrector, names))


def safe_candidates(budget: int, num_steps: int) -> list[tuple[str, Schedule]]:
    """The schedules every calibration weighs beside its searches' answers, named: ``Schedule.default``
    (``predict`` p = 1 on its compute-density placement), uniform compute steps with ``predict`` p = 1, and
    evenly spread compute steps over the whole run with an open tail (:func:`tail_schedule`: budgets below
    ``num_steps`` only) with ``extrapolate`` p = 1 (``tail e1``, which integrates the line through the last two
    velocities over each step, as a two-step Adams-Bashforth solver does) and ``predict`` p = 1 (``tail p1``, the
    line's value at each step's start, as the Euler run the error is measured against takes the velocity there).
    Then ``uniform p1`` and ``tail p1`` with a corrector of order 1 and 2 (:data:`CORRECTED`): the same
    evaluations, with each segment's skipped velocities re-estimated by interpolation once the next velocity is
    computed (the open tail is not corrected). Last, ``early p1 c2`` and ``early p2 c2`` (:func:`early_schedule`:
    compute steps a little denser at the start, ``predict`` p = 1 or 2, a corrector of order 2; budgets below
    ``num_steps`` only; :data:`EARLY_CANDIDATES`). All have gains of a few units at most (:func:`schedule_gain`).

    Tried and dropped: uniform steps with ``predict`` p = 2 and no corrector (on a sharp held-out flow they looked
    best on the validation inputs at B = 10 and 17 and then ran away on held-out ones: rel L2 0.13 and 0.09, medians
    0.006 and 0.001; ``early p2 c2``, with the corrector, held up on the eight flows of
    ``bench/candidate_study.py``: bench/RESULTS.md); uniform steps with ``extrapolate`` p = 1 (``uniform e1``), once
    the corrected candidates were in: on the eight flows of ``bench/candidate_study.py`` it was never chosen, and on
    the digits model it cost about a fifteenth of the real runs.

    Example:
        >>> [name for name, _ in safe_candidates(10, 50)]  # doctest: +NORMALIZE_WHITESPACE
        ['default', 'uniform p1', 'tail e1', 'tail p1', 'uniform p1 c1', 'uniform p1 c2', 'tail p1 c1',
         'tail p1 c2', 'early p1 c2', 'early p2 c2']
    """
    found = [
        ("default", Schedule.default(budget, num_steps)),
        ("uniform p1", uniform_schedule(budget, num_steps, "predict", 1)),
    ]
    if budget < num_steps:
        found.append(("tail e1", tail_schedule(budget, num_steps)))
        found.append(("tail p1", tail_schedule(budget, num_steps, "predict", 1)))
    for name, c in CORRECTED:
        if name.startswith("uniform"):
            found.append((name, uniform_schedule(budget, num_steps, "predict", 1, corrector=c)))
        elif budget < num_steps:
            found.append((name, tail_schedule(budget, num_steps, "predict", 1, corrector=c)))
    if budget < num_steps:
        for name, order in EARLY_CANDIDATES:
            found.append((name, early_schedule(budget, num_steps, "predict", order, corrector=2)))
    return found


#: The name of the safe candidate with compute steps a little denser at the start (:func:`early_schedule`,
#: ``predict`` p = 1, corrector of order 2); last but one, so that ties go to the others.
EARLY = "early p1 c2"
#: The early candidates, name -> ``predict`` order (both with a corrector of order 2), in the order they are
#: weighed: p = 1, then p = 2 (the line, then the parabola through the last three computed velocities).
EARLY_CANDIDATES = ((EARLY, 1), ("early p2 c2", 2))
#: The power of :func:`early_schedule`'s placement: compute step j of B at ``(N - 1) * (j / (B - 1)) ** power``.
EARLY_POWER = 1.15


def early_schedule(budget: int, num_steps: int, estimator: str = "predict", order: int = 1, corrector: int = 0,
                   power: float = EARLY_POWER) -> Schedule:
    """``budget`` compute steps placed at ``(N - 1) * (j / (B - 1)) ** power`` (rounded to distinct steps by the
    placement of :meth:`~meancache.Schedule.default`; first and last step computed): with the default power 1.15
    the gaps grow steadily from the start to the end, between :func:`uniform_schedule` (power 1) and
    ``Schedule.default``'s dense head. Every multi-step segment with ``estimator`` of ``order``, 1-step segments
    chains; ``corrector`` as in :class:`~meancache.Schedule`.

    Why: where a few inputs run away into another mixture component, denser early steps keep more of them on the
    Euler run's track (``Schedule.default`` has the lowest held-out rel L2 at small budgets on such flows), while
    evenly spread steps with a corrector have the lowest typical error. Powers 1.15, 1.3, 1.5 and 1.75, open and
    closed ends, ``predict`` and ``extrapolate`` of orders 1 and 2, correctors 0 to 2 were measured on the quality
    bench's six analytic flows (bench/RESULTS.md); power 1.15 with ``predict`` p = 1 and 2 and a corrector of
    order 2 (:data:`EARLY_CANDIDATES`), added to the candidates, raised the cells the choice wins there and on the
    eight flows of ``bench/candidate_study.py`` and lost no cell in either.

    Example:
        >>> early_schedule(6, 50).compute_steps, early_schedule(6, 50, corrector=2).labels
        ((0, 8, 17, 27, 38, 49), ('p1', 'p1', 'p1', 'p1', 'p1'))
    """
    if not is_int(budget) or not 2 <= budget <= num_steps:
        raise ValueError(f"budget={budget!r}: must be an int in 2..num_steps={num_steps}")
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not 1.0 <= power <= 4.0:
        raise ValueError(f"power={power!r}: must be a number in 1..4 (1: evenly spread steps)")
    targets = [(num_steps - 1) * (j / (budget - 1)) ** power for j in range(budget)]
    steps = _place(targets, num_steps)
    orders, names = _segments(steps, estimator, order)
    return Schedule(steps, orders, num_steps, names, corrector=_usable(corrector, names))


#: The safe candidates with a corrector (:class:`~meancache.Schedule`'s ``corrector``), after the others so that
#: ties go to those: name -> corrector order; each is ``uniform p1`` or ``tail p1`` with that corrector.
CORRECTED = (("uniform p1 c1", 1), ("uniform p1 c2", 2), ("tail p1 c1", 1), ("tail p1 c2", 2))


def _moves(schedule: Schedule):
    """Every local move of ``schedule``, in a fixed order: each interior compute step one step earlier or later,
    then each multi-step segment (not the first, where every estimator is plain reuse; an open tail is one) with
    another estimator. A fitted schedule has none: its weights belong to its steps and estimators."""
    if schedule.fitted:
        return
    steps = list(schedule.compute_steps)
    orders, names = list(schedule.orders), list(schedule.estimators)
    n = schedule.num_steps
    tail = schedule.open_tail
    # with an open tail the last compute step moves too, short of N - 1 (it keeps the tail open)
    movable = range(1, len(steps) if tail else len(steps) - 1)
    for j in movable:
        for d in (-1, 1):
            c = steps[j] + d
            if steps[j - 1] < c < (steps[j + 1] if j + 1 < len(steps) else n - 1):
                new = steps[:j] + [c] + steps[j + 1 :]
                ends = new[1:] + [n]
                o, e = list(orders), list(names)
                for s in (j - 1, j):  # a segment that became one step long is a chain; one that grew needs K/p
                    if s >= len(o):
                        continue
                    length = ends[s] - new[s]
                    if length == 1:
                        o[s], e[s] = 0, "meancache"
                    elif o[s] == 0:
                        o[s], e[s] = 1, "predict"
                yield Schedule(new, o, n, e, corrector=_usable(schedule.corrector, e))
    ends = steps[1:] + [n]
    for s in range(1, len(orders)):
        if ends[s] - steps[s] < 2:
            continue
        for est, order in MOVE_ESTIMATORS:
            if (est, order) != (names[s], orders[s]):
                o, e = list(orders), list(names)
                o[s], e[s] = order, est
                yield Schedule(steps, o, n, e, corrector=_usable(schedule.corrector, e))


def refine(
    schedule: Schedule,
    errors: Callable[[Schedule], torch.Tensor],
    *,
    max_scores: int,
    groups: Sequence[Sequence[int]] | None = None,
    progress: bool = False,
    score: Callable[[torch.Tensor], float] = tail_score,
) -> tuple[Schedule, float, int]:
    """Improve ``schedule`` by local moves scored on per-input errors, until no move improves or ``max_scores``
    scorings were spent.

    A move is kept when it lowers the ``score`` of all inputs (default :func:`tail_score`) by more than
    :data:`COST_RTOL` (so rounding never decides) **and** raises the score of no group (with ``groups``, for
    example the two :func:`folds`) by more than :data:`COST_RTOL`: a move that helps some inputs by hurting others
    is what a new input would pay for, so it is not taken. The moves (:func:`_moves`): shift one interior compute
    step by one step, or give one multi-step segment another estimator or order from :data:`MOVE_ESTIMATORS`. First
    improvement: the moves are tried in a fixed order and the first kept one restarts the search from the new
    schedule. The result's score is never above the start's.

    Args:
        schedule: the start.
        errors: per-input errors of a schedule, lower is better: for example :func:`input_errors` on a recording,
            or the errors of real sampled runs of the model. A schedule to avoid may score ``inf``.
        max_scores: the most calls of ``errors`` (the start's included), >= 1.
        groups: lists of input indices that must not get worse one by one (None: only the total counts).
        progress: a tqdm progress bar over the scorings.
        score: per-input errors ``(P,)`` -> one number, lower is better: :func:`tail_score` (default) or
            :func:`run_score`, the mean, which :func:`meancache.calibrate` uses with the validation draws.

    Returns:
        ``(schedule, its score, scorings spent)``.

    Example:
        >>> import torch
        >>> rec = record(lambda x, s: torch.sin(3 * x) - s, torch.randn(4, 4), torch.linspace(1, 0, 13),
        ...              progress=False)
        >>> start = Schedule([0, 6, 11], [1, 1], 12)
        >>> best, value, spent = refine(start, lambda s: input_errors(rec, s), max_scores=50, groups=[[0, 2], [1, 3]])
        >>> value <= tail_score(input_errors(rec, start)), spent <= 50
        (True, True)
    """
    if isinstance(max_scores, bool) or not isinstance(max_scores, int) or max_scores < 1:
        raise ValueError(f"max_scores={max_scores!r}: must be an int >= 1")
    if not callable(score):
        raise ValueError(f"score={score!r}: must be a callable from per-input errors to one number")
    parts = [list(g) for g in groups] if groups else []

    def scores(e: torch.Tensor) -> tuple[float, list[float]]:
        return score(e), [score(e[g]) for g in parts]

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_scores, desc="meancache: refining", unit="run")
    try:
        best, best_parts = scores(errors(schedule))
        spent = 1
        if bar is not None:
            bar.update(1)
        improved = True
        while improved and spent < max_scores:
            improved = False
            for move in _moves(schedule):
                if spent >= max_scores:
                    break
                value, value_parts = scores(errors(move))
                spent += 1
                if bar is not None:
                    bar.update(1)
                if value < best - COST_RTOL * best and all(
                    v <= b + COST_RTOL * b for v, b in zip(value_parts, best_parts)
                ):
                    schedule, best, best_parts, improved = move, value, value_parts, True
                    break
    finally:
        if bar is not None:
            bar.close()
    return schedule, best, spent


def choose(named: Sequence[tuple[str, Schedule]], score: Callable[[Schedule], float]) -> tuple[str, Schedule, dict]:
    """The candidate with the least ``score``; scores within :data:`COST_RTOL` of the least are ties, won by the
    earliest candidate. Returns ``(name, schedule, {name: score})``; a schedule offered twice is scored once.

    Example:
        >>> s = Schedule.full(4)
        >>> choose([("a", s), ("b", Schedule([0, 3], [1], 4))], lambda x: 0.0 if x == s else 1.0)[0]
        'a'
    """
    if not named:
        raise ValueError("no candidates: give at least one schedule")
    scores: dict[str, float] = {}
    seen: dict[Schedule, float] = {}
    for name, sched in named:
        if sched not in seen:
            seen[sched] = float(score(sched))
        scores[name] = seen[sched]
    finite = [v for v in scores.values() if math.isfinite(v)]
    least = min(finite) if finite else math.inf
    name, sched = next((nm, s) for nm, s in named if scores[nm] <= least + COST_RTOL * least)
    return name, sched, scores
