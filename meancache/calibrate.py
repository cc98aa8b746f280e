"""Schedule search for MeanCache: record reference trajectories, cost every cached segment, solve the budgeted path.

The published schedules were found offline by a search the authors did not release ("Peak-Suppressed Shortest
Path", PSSP). This module is our reconstruction of it (algorithm.md §8), in three stages:

1. :func:`record` runs the *uncached* Euler sampler on a few calibration inputs and keeps every latent ``x_i`` and
   velocity ``v_i`` (a :class:`Recording`; it can be saved and reused, since this is the only expensive stage).
2. :func:`segment_costs` prices every candidate segment ``a -> b`` (compute at ``a`` and ``b``, estimate the
   steps between with window K) by replaying the run-time estimator from the reference state at ``a`` (§8
   "Option B"), and keeps the best K of each segment (the smallest among those within :data:`COST_RTOL`, so that
   the same recording gives the same schedule on every machine).
3. :func:`solve` finds the exact minimum of ``sum cost[a][b] ** gamma`` over paths from step 0 to step N-1 with
   exactly ``budget`` nodes, by dynamic programming over (step, evaluations used).

With the polynomial estimators (``extrapolate``, ``predict``) searched too (the default), stages 2 and 3 are the joint search of
:mod:`meancache.calibration.joint`: :func:`joint_costs` prices every segment with its best estimator given the
compute steps before it (an extrapolation reads them), and :func:`joint_solve` is the exact budgeted path over
states that hold those steps.

:func:`calibrate` (this module, the front door) chains the three, from :mod:`meancache.calibration`, and returns :class:`~meancache.Schedule` objects, one per requested budget.
"""

from __future__ import annotations

from typing import Iterable
from typing import Sequence

from .calibration import COST_FLOOR  # noqa: F401
from .calibration import COST_RTOL  # noqa: F401
from .calibration import DEFAULT_GAMMA
from .calibration import RECORDING_FORMAT  # noqa: F401
from .calibration import RECORDING_FORMAT_VERSION  # noqa: F401
from .calibration import Recording
from .calibration import record
from .calibration import segment_costs  # noqa: F401
from .calibration import solve  # noqa: F401
from .calibration.joint import DEFAULT_ESTIMATORS
from .calibration.joint import _check_estimators
from .calibration.joint import _check_orders
from .calibration.joint import joint_costs
from .calibration.joint import joint_solve
from .calibration.recording import _check_inputs
from .calibration.replay import pick_by_replay
from .calibration.recording import _pipeline_inputs
from .calibration.search import _check_budgets
from .calibration.search import _check_gamma
from .calibration.search import _check_max_len
from .estimators import MAX_EXTRAPOLATION_ORDER
from .estimators import POLYNOMIAL_ESTIMATORS
from .hooks import is_pipeline
from .schedule import DEFAULT_MAX_SEGMENT
from .schedule import Schedule
from .schedule import _check_num_steps
from .sigmas import as_sigma_list
from .validation import is_int

# the stage names stay importable from here (their former home); the front door itself is calibrate()
__all__ = ["calibrate"]


def calibrate(
    target,
    inputs=None,
    *,
    budget: int | Sequence[int],
    sigmas=None,
    num_steps: int | None = None,
    gamma: float = DEFAULT_GAMMA,
    max_len: int = DEFAULT_MAX_SEGMENT,
    estimators: Sequence[str] = DEFAULT_ESTIMATORS,
    extrapolation_orders: Iterable[int] = range(1, MAX_EXTRAPOLATION_ORDER + 1),
    select: bool = True,
    progress: bool = True,
    **pipeline_kwargs,
) -> Schedule | list[Schedule]:
    """Search MeanCache schedules for a model: record (or reuse a recording), cost the segments, solve the path.

    Args:
        target: a :class:`Recording` (from :func:`record` or :meth:`Recording.load`), a
            ``velocity_fn(x, sigma) -> v`` (then ``inputs`` and ``sigmas`` are required and :func:`record` runs
            first), or a diffusers pipeline (then ``inputs`` is a list of prompts or dicts of call arguments, and
            ``pipeline_kwargs`` such as ``num_inference_steps`` and ``guidance_scale`` go to every call).
        inputs: calibration latents for a ``velocity_fn``: one tensor ``(P, *shape)`` or a list of tensors, as for
            :func:`record`. Must be None with a Recording. Use different noise from the one you evaluate on.
        budget: model evaluations B (an int), or a list of them: one recording serves every budget, and a list
            returns a list of schedules in the same order.
        sigmas: the grid (``N + 1`` values) for a ``velocity_fn``; must be None with a Recording.
        num_steps: optional check: must equal N of the grid or recording.
        gamma: peak-suppression exponent of :func:`solve` (default :data:`DEFAULT_GAMMA`).
        max_len: longest segment, in steps (default 8, the longest in the published tables).
        estimators: the estimator families searched per segment, a non-empty tuple from ``("meancache",
            "extrapolate", "predict")``. All three (the default): the joint search (:func:`joint_costs`,
            :func:`joint_solve`) chooses the compute steps and each segment's estimator together, every window K
            of the published estimator and every polynomial order p, ties going to meancache and smaller K, then
            extrapolate, then predict, lower p first. ``("meancache",)``: the published estimator only
            (:func:`segment_costs` and :func:`solve`, the search of the shipped presets).
        extrapolation_orders: the orders p searched for ``extrapolate`` and ``predict`` segments (ints in 1..3,
            default all). The
            joint search's states hold the last ``max(p)`` compute steps, and pricing order p takes
            ``O(N * max_len ** (p + 1))`` passes over the recording's ``P * D`` elements: with large latents,
            ``(1,)`` or ``(1, 2)`` is much cheaper.
        select: with both the published and the polynomial estimators in ``estimators``, also search the
            polynomial ones alone and the published one alone, and keep per budget the schedule whose whole-run
            replay on the recording ends closest to the reference (:func:`~meancache.calibration.replay.
            pick_by_replay`): the segment costs replay each segment from the reference history, which flatters
            long MeanCache windows by an amount that depends on the model (measured in
            :mod:`meancache.calibration.replay`). False: the joint search's schedules as they are.
        progress: tqdm progress bar while recording.

    Returns:
        A :class:`~meancache.Schedule` (int budget) or a list of them (list budget), with the best estimator and
        order of each multi-step segment (``schedule.estimators``, ``schedule.orders``) and ``("meancache", 0)``
        ("chain") on 1-step segments.

    Raises:
        ValueError: naming the argument, its value and the rule, before any model evaluation.

    Example:
        >>> import torch
        >>> sched = calibrate(lambda x, s: torch.sin(3 * x) - 1, torch.randn(4, 8), budget=[4, 6],
        ...                   sigmas=torch.linspace(1, 0, 11), max_len=4, progress=False)
        >>> [s.budget for s in sched], sched[0].num_steps
        ([4, 6], 10)
        >>> set(sched[1].estimators) <= {"meancache", "extrapolate", "predict"}
        True
    """
    families = _check_estimators(estimators)
    if not isinstance(select, bool):
        raise ValueError(f"select={select!r}: must be True or False")
    extrapolation_orders = _check_orders(extrapolation_orders, "extrapolation_orders", MAX_EXTRAPOLATION_ORDER)
    max_len = _check_max_len(max_len)
    gamma = _check_gamma(gamma)
    if not isinstance(progress, bool):
        raise ValueError(f"progress={progress!r}: must be True or False")
    if num_steps is not None and (not is_int(num_steps) or num_steps < 2):
        raise ValueError(f"num_steps={num_steps!r}: must be None or an int >= 2")
    if isinstance(target, Recording):
        if inputs is not None:
            raise ValueError("inputs given with a Recording: the recording already holds its inputs; pass inputs=None")
        if sigmas is not None:
            raise ValueError("sigmas given with a Recording: the recording already holds its grid; pass sigmas=None")
        n = target.num_steps
        where = f"the recording's {n} steps"
    elif is_pipeline(target):
        if sigmas is not None:
            raise ValueError("sigmas given with a pipeline: its scheduler sets the grid; pass num_inference_steps")
        inputs = _pipeline_inputs(inputs)
        n = num_steps = None  # known once recorded
        where = "the pipeline's steps"
    elif callable(target):
        if inputs is None:
            raise ValueError("inputs=None: a velocity_fn target needs calibration inputs (tensor or list of tensors)")
        if sigmas is None:
            raise ValueError("sigmas=None: a velocity_fn target needs the sigma grid (num_steps + 1 values)")
        _check_inputs(inputs)
        n = len(as_sigma_list(sigmas)) - 1
        where = f"len(sigmas) - 1 = {n}"
    else:
        raise ValueError(
            f"target={type(target).__name__}: must be a meancache.Recording or a velocity_fn(x, sigma) callable"
        )
    if pipeline_kwargs and not is_pipeline(target):
        raise ValueError(f"{sorted(pipeline_kwargs)}: extra keyword arguments apply to pipeline targets only")
    if n is not None:
        if num_steps is not None and num_steps != n:
            raise ValueError(f"num_steps={num_steps} disagrees with {where}")
        if n < 2:
            raise ValueError(f"num_steps={n}: a schedule needs at least 2 steps")
        _check_num_steps(n)  # the schedules could not hold more steps: say so before recording
        budgets, many = _check_budgets(budget, n, max_len)
    else:
        # types and lower bounds now, before the expensive recording; the rest once the step count is known
        for b in budget if isinstance(budget, (list, tuple)) else [budget]:
            if not is_int(b) or b < 2:
                raise ValueError(f"budget={b!r}: must be an int >= 2")

    if isinstance(target, Recording):
        rec = target
    elif is_pipeline(target):
        rec = record(target, inputs, progress=progress, **pipeline_kwargs)
        n = rec.num_steps
        _check_num_steps(n)
        budgets, many = _check_budgets(budget, n, max_len)
    else:
        rec = record(target, inputs, sigmas, progress=progress)
    polynomial = tuple(f for f in families if f in POLYNOMIAL_ESTIMATORS)
    if not polynomial:
        schedules = _published_search(rec, budgets, gamma, max_len)
        return schedules if many else schedules[0]
    graph = joint_costs(rec, estimators=families, max_len=max_len, extrapolation_orders=extrapolation_orders)
    schedules = joint_solve(graph, budgets, gamma=gamma)
    if select and "meancache" in families:
        # the polynomial-only search is the same graph without the meancache candidates: nothing priced twice
        others = (joint_solve(graph.restricted(polynomial), budgets, gamma=gamma),
                  _published_search(rec, budgets, gamma, max_len))
        schedules = [pick_by_replay(rec, candidates) for candidates in zip(schedules, *others)]
    return schedules if many else schedules[0]


def _published_search(rec: Recording, budgets: list[int], gamma, max_len) -> list[Schedule]:
    """One schedule per budget from the published estimator's search (the plain PSSP of the shipped presets)."""
    cost, best_k = segment_costs(rec, max_len=max_len)
    schedules = []
    for b in budgets:
        steps = solve(cost, b, gamma=gamma, max_len=max_len)
        orders = [int(best_k[s, e]) if e - s > 1 else 0 for s, e in zip(steps, steps[1:])]
        schedules.append(Schedule(steps, orders, rec.num_steps))
    return schedules
