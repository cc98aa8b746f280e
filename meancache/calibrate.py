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

import math
import os
import warnings

from typing import Iterable
from typing import Sequence

import torch

from .calibration import COST_FLOOR  # noqa: F401
from .calibration import COST_RTOL
from .calibration import DEFAULT_GAMMA
from .calibration import RECORDING_FORMAT  # noqa: F401
from .calibration import RECORDING_FORMAT_VERSION  # noqa: F401
from .calibration import Recording
from .calibration import record
from .calibration import segment_costs  # noqa: F401
from .calibration import solve
from .calibration.joint import DEFAULT_ESTIMATORS
from .calibration.joint import _check_estimators
from .calibration.joint import _check_orders
from .calibration.joint import joint_costs
from .calibration.joint import joint_solve
from .calibration.joint import JointCosts
from .calibration.joint import shared_weights
from .calibration.recording import _check_inputs
from .calibration.recording import _check_out
from .calibration.fitting import cross_fitted
from .calibration.fitting import fit_schedule
from .calibration.runs import generator_states
from .calibration.runs import model_runs
from .calibration.runs import pipeline_runs
from .calibration.runs import validation_draws
from .calibration.selection import corrected
from .calibration.selection import folds
from .calibration.selection import input_errors
from .calibration.selection import refine as refine_moves
from .calibration.selection import reuse_labelled
from .calibration.selection import run_score
from .calibration.selection import safe_candidates
from .calibration.selection import schedule_gain
from .calibration.selection import subset
from .calibration.selection import tail_score
from .calibration.recording import _pipeline_inputs
from .calibration.search import _check_budgets
from .calibration.search import _per_order_costs
from .calibration.search import costs_from_orders
from .calibration.search import shared_costs
from .calibration.search import _check_gamma
from .calibration.search import _check_max_len
from .estimators import MAX_EXTRAPOLATION_ORDER
from .estimators import POLYNOMIAL_ESTIMATORS
from .hooks import is_pipeline
from .sampler import sample
from .schedule import DEFAULT_MAX_SEGMENT
from .schedule import MAX_ORDER
from .schedule import Schedule
from .schedule import _check_num_steps
from .sigmas import as_sigma_list
from .validation import check_velocity
from .validation import is_int

# the stage names stay importable from here (their former home); the front door itself is calibrate()
__all__ = ["calibrate"]


#: Latent elements per input the search and the validation read by default (see ``calibrate(elements=)``).
#: Measured on a 64-channel Gaussian-mixture field of 8,192 elements per input (4 inputs, N = 50, budgets 6, 8, 10,
#: 17, 25): 256, 1,024 and 4,096 elements found the full-data schedules at every budget but one (1,024 at B = 17:
#: another schedule, 0.8 % lower held-out rel L2), in 7 %, 24 % and 52 % of the full search's time.
SEARCH_ELEMENTS = 1024


def calibrate(
    target,
    inputs=None,
    *,
    budget: int | Sequence[int],
    sigmas=None,
    num_steps: int | None = None,
    gamma: float = DEFAULT_GAMMA,
    max_len: int | None = None,
    estimators: Sequence[str] = DEFAULT_ESTIMATORS,
    extrapolation_orders: Iterable[int] = range(1, MAX_EXTRAPOLATION_ORDER + 1),
    select: bool = True,
    fit: bool = False,
    validate: str = "auto",
    refine: int | None = None,
    report: list | None = None,
    elements: int | None = SEARCH_ELEMENTS,
    draws: int | None = None,
    progress: bool = True,
    out: str | os.PathLike | None = None,
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
        max_len: longest segment, in steps. None (default): 8 (the longest in the published tables) or as long
            as the smallest budget needs (:func:`auto_max_len`), so every budget from 2 to N calibrates; one graph
            at that length serves every budget unless it would drop polynomial orders that a shorter length keeps
            (the highest orders are dropped where a long segment would make the joint graph larger than
            :data:`JOINT_SIZE_CAP`): then each length gets its own graph. Budget 2 and budget N are answered at
            once.
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
        select: choose each budget's schedule on inputs the search did not see (the default). The candidates are
            the safe schedules that need no search (:func:`~meancache.calibration.selection.safe_candidates`:
            ``Schedule.default``, uniform compute steps with ``predict`` p = 1, and ``tail e1`` and ``tail p1``,
            evenly spread over the whole run with an open tail, ``extrapolate`` or ``predict`` p = 1 (``tail e1``
            is a two-step Adams-Bashforth solver on the B compute steps), and ``uniform p1`` and ``tail p1`` with a
            corrector of
            order 1 and 2 (``uniform p1 c1`` ... ``tail p1 c2``, :data:`~meancache.calibration.selection.CORRECTED`:
            each segment re-estimated by interpolation once the next velocity is computed, see
            :class:`~meancache.Schedule`), and ``early p1 c2`` and ``early p2 c2``, compute steps a little denser
            at the start with ``predict`` p = 1 or 2 and that corrector
            (:func:`~meancache.calibration.selection.early_schedule`); those whose estimators are in
            ``estimators``) and the
            searches: the published estimator's, and the joint search under each gain cap of :data:`GAIN_CAPS` (with every estimator, and
            with the polynomial ones only), and the joint search free to end in an open tail (``joint g4 tail``,
            ``joint g8 tail``: the last steps estimated, their evaluation spent earlier; see
            :class:`~meancache.Schedule`). Why the tails: on the eight flows named under ``validate``, adding them
            lowered the held-out rel L2 of the choice by 0.84x and its median by 0.70x (geometric means over 40
            cells; lower in both in 21 cells, higher in both in 2) (bench/RESULTS.md). With real runs
            (``validate="runs"``) the best-scored search is also run with a corrector of order 2 (named
            ``"joint g8 c2"`` and so on; :data:`SEARCH_CORRECTORS`): on those eight flows this raised the cells that
            beat AB2, TaylorSeer-lite and ``Schedule.default`` in both held-out measures from 26 to 31 of 40. With
            ``validate="replay"`` each search runs on two folds of the inputs (even and odd indices) and is scored
            on the other fold, so every input validates it once; the safe schedules are scored on every input. The
            score is the root mean square of the per-input relative errors of whole-run replays
            (:func:`~meancache.calibration.selection.tail_score`: it sees a runaway input); ties (within
            :data:`COST_RTOL`) go to the earlier candidate, safe ones first. The winner is then searched (or
            taken) on all inputs and refined (``refine``). False: the joint search's schedules on all inputs, as
            they are.
        fit: also weigh the *fitted* candidates (``select`` only, and only with ``"predict"`` in ``estimators``):
            ``tail f1`` and ``uniform f1``, the compute steps of ``tail p1`` and ``uniform p1`` with each skipped
            step's weights on the last two computed velocities fitted to the recording by least squares
            (:func:`~meancache.calibration.fitting.fit_schedule`; the schedule stores them and the grid, and a run
            on another grid uses ``predict``). Each is scored on inputs its weights were not fitted on (fitted on
            one fold, scored on the other, both ways) and stays in the running only when it beats the best other
            candidate in both the mean and the root mean square of the per-input errors; the winner is fitted on
            every input. The report's ``fitted`` entry gives both measures. Off by default: on the bench (8 flows,
            B = 6 to 25, held-out inputs), before the corrected candidates, it changed the choice in 8 of 40 cells
            and lowered the median per-input error in all 8 (geometric mean 0.52x), but raised the rel L2 in 4 of
            them (up to 1.71x): a few more inputs run away, which 32 calibration inputs do not show. With them it
            changes 3 cells, too few to show that this has gone, and costs about a third more on the digits model
            (bench/RESULTS.md).
        validate: how ``select`` scores the candidates. ``"runs"``: real sampled runs of the model from every
            calibration input (B evaluations per input and candidate), each candidate searched on all inputs, the
            score the mean per-input relative error (:func:`~meancache.calibration.selection.run_score`); needs the
            model: a ``velocity_fn``, or a pipeline whose inputs each carry a seeded ``generator`` (each run
            restores the state it had before recording, so it draws the recorded noise again). ``"replay"``: the
            two folds and whole-run replays described under ``select`` (no model needed). ``"auto"`` (default):
            ``"runs"`` with a ``velocity_fn`` target, ``"replay"`` with a recording or a pipeline (a pipeline's run
            per candidate and input costs B transformer calls, about 9x the recording over five budgets). Why:
            on eight Gaussian-mixture flows the bench does not use (B = 6 to 25 of 50; the candidates before the
            corrected ones), the candidate chosen by real runs had a held-out rel L2 1.24x that of the best
            candidate (geometric mean over the 40 cells), against 1.63x for the replay folds, and 1.43x when the
            runs scored fold searches on the other fold (searches on half the inputs are worse, and a run does not
            score what the search priced, so scoring on the searched inputs costs little) (bench/RESULTS.md).
        refine: model evaluations per budget for local moves after the choice
            (:func:`~meancache.calibration.selection.refine`: shift one compute step, change one segment's
            estimator or order), never raising the largest gain above the cap or the start's, each kept only when
            it lowers the score and makes neither half of the scored rows worse. With the model (a
            ``velocity_fn``, or a pipeline whose inputs carry seeded generators) the moves are scored by real
            sampled runs of it: where the choice ran validation draws (``draws``) or its batched runs hold at
            least :data:`REFINE_ROWS` rows, on those same rows (the inputs, then any draws) by the same mean
            (:func:`~meancache.calibration.selection.run_score`); otherwise from the validation inputs (every
            fourth, :func:`~meancache.calibration.selection.validation_split`) by the root mean square
            (:func:`~meancache.calibration.selection.tail_score`); B evaluations per run (a batched run of all rows
            counts once). With a recording, by whole-run replays on the recording (counted as B evaluations each).
            None (default): :data:`AUTO_REFINE` where the batched runs that choose hold at least
            :data:`REFINE_ROWS` = 64 rows, inputs and draws, and without draws at most :data:`DRAW_ELEMENTS`
            latent elements in all (a cheap model's rows of up to 1,024 elements, as the default draws give; never
            a real model's image latents), else none; 0: none. Why only there: scored on the few validation
            inputs the moves fit those inputs (on two sharp held-out flows they lowered the held-out median but
            raised the rel L2 at B = 8, 10 and 25); scored by the mean over 1,024 rows, on the eight flows of
            ``bench/candidate_study.py`` they lowered the held-out rel L2 and median in 120 of 160 cells and raised
            both in 5 (geometric means 0.80x and 0.68x); over 64 rows (inputs and draws, or 64 inputs) they still
            raised the cells that meet issue 19's bar there and on the demo flow (bench/RESULTS.md).
        report: a list to which one dict per budget is appended, saying how its schedule was chosen:
            ``budget``, ``measure`` (``"runs"`` or ``"replay"``, see ``validate``), ``scores`` (each candidate's
            validation score, None for a candidate not in the running), ``chosen`` (its name), ``start`` (the
            chosen schedule before refinement), ``refined`` (whether refinement changed it), ``score`` (the final
            schedule's score, by the refinement's measure) and ``candidates`` (each candidate's schedule on all
            inputs, None where it has none, before refinement); with real runs of inputs that run one call each
            (a list of inputs, a pipeline), ``stopped``: the candidates whose runs stopped once they could not win
            (score None), each with a lower bound of its score (:data:`STOP_LOSING_RUNS`); with real runs,
            ``errors``: each candidate's per-input relative errors (a list of floats) for the candidates whose runs
            completed, so that an input that runs away under a candidate shows beside the mean. Budgets answered at
            once (2, N, or ``select=False``) give only ``budget`` and ``chosen``.
        elements: search and validate on a fixed, seeded subset of this many elements of each input's latent
            (:meth:`Recording.elements`, the same subset on every machine; default :data:`SEARCH_ELEMENTS`), so
            the search costs the same for any latent size; with a model target only these elements are recorded
            too (:func:`record`). Every estimator acts element by element, so the subset's costs are unbiased
            estimates of the full ones. None: every element.
        draws: new noise rows that join the real runs which choose between the candidates (``validate`` runs),
            each scored against its own uncached run; the searches still read the calibration inputs only. For a
            ``velocity_fn`` with one batched tensor of inputs ``(P, *shape)`` whose grid starts at sigma = 1 (so
            the inputs are noise), with ``fit=False``; each run then holds ``P + draws`` rows. Rows from
            :func:`~meancache.calibration.runs.validation_draws` (seeded: the same on every machine); the report's
            ``errors`` list the inputs, then the draws. None (default): enough rows to bring the runs to
            :data:`DRAW_ROWS` rows while those rows hold at most :data:`DRAW_ELEMENTS` latent elements in all (a
            cheap model's small rows: a 16-d flow with 32 inputs gets 992, the demo's 1,024-d one 32, a real
            model's image latent none), 0 where draws do not apply. 0: none. Before the recording, one call of the
            model on the inputs and the draws checks that it takes them: a velocity_fn whose conditioning is tied
            to the inputs' batch cannot, and then the default chooses on the inputs alone with a warning, while a
            count given is a ValueError. Why: the mean error over a few inputs is decided by the one or two that run away, so the
            choice between candidates whose tails differ is close to chance; with the early candidates in the
            running, choosing on 1,024 rows met the issue-19 bar in 132 of 160 cells of
            ``bench/candidate_study.py``'s eight flows (4, 8, 16 and 32 calibration inputs) against 117 without,
            and in 28 of the quality bench's 40 cells against 24; it lowers the held-out rel L2 of the pick (0.66x
            to 0.85x) and raises its median (1.14x to 1.35x; bench/RESULTS.md).
        progress: tqdm progress bar while recording.
        out: with a model or pipeline target, stream the recording this calibration makes to this file
            (:func:`record`'s ``out``: memory-mapped as it is made, :meth:`Recording.save`'s format), so it can be
            searched again later (``calibrate(Recording.load(out), ...)``) without running the model. Checked
            before any model evaluation. None (default): the recording is kept in memory and dropped.

    Cost (after the recording): with ``E = min(elements, latent size)`` elements per input, P inputs and N steps,
    each longest-segment length L in use (one per budget group, :func:`auto_max_len`) builds at most three joint
    graphs (two folds and all inputs), each ``O(N * L ** (p + 1))`` states and segments for the orders p kept under
    :data:`JOINT_SIZE_CAP` (so at most ``O(JOINT_SIZE_CAP)``), priced with ``O(N * L ** (p + 1) * P * E)``
    arithmetic; the published search prices ``N * L <= PUBLISHED_SIZE_CAP`` segments at ``O(L * P * E)`` each;
    every candidate is validated by whole-run replays, ``O(N * P * E)`` each (with ``validate="runs"``: no folds,
    one graph, and a real run of the model per candidate, ``B * P`` evaluations). None of it grows with the latent
    past ``elements``, and no budget makes it grow as a power of N above the caps: above them fewer orders (then
    only the safe schedules) are weighed. Measured figures are in bench/RESULTS.md.

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
    if not isinstance(fit, bool):
        raise ValueError(f"fit={fit!r}: must be True or False")
    if validate not in VALIDATE_MODES:
        raise ValueError(f"validate={validate!r}: must be one of {VALIDATE_MODES}")
    extrapolation_orders = _check_orders(extrapolation_orders, "extrapolation_orders", MAX_EXTRAPOLATION_ORDER)
    if max_len is not None:
        max_len = _check_max_len(max_len)
    if draws is not None and (not is_int(draws) or draws < 0):
        raise ValueError(f"draws={draws!r}: must be None or an int >= 0 (new noise rows for the real runs)")
    if elements is not None and (not is_int(elements) or elements < 1):
        raise ValueError(f"elements={elements!r}: must be None or an int >= 1 (latent elements per input)")
    if refine is not None and (not is_int(refine) or refine < 0):
        raise ValueError(f"refine={refine!r}: must be None or an int >= 0 (model evaluations)")
    gamma = _check_gamma(gamma)
    if not isinstance(progress, bool):
        raise ValueError(f"progress={progress!r}: must be True or False")
    if num_steps is not None and (not is_int(num_steps) or num_steps < 2):
        raise ValueError(f"num_steps={num_steps!r}: must be None or an int >= 2")
    if isinstance(target, Recording):
        if out is not None:
            raise ValueError(f"out={out!r} given with a Recording: out is where a calibration that records writes its "
                             "recording; this one records nothing (save the recording with Recording.save)")
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
    model_fn = callable(target) and not isinstance(target, Recording) and not is_pipeline(target)
    if validate == "runs" and isinstance(target, Recording):
        raise ValueError("validate='runs' with a Recording target: real runs need the model (a velocity_fn or a "
                         "pipeline); use 'replay' or 'auto'")
    auto_draws = draws is None
    draws = _draws(draws, model_fn, inputs, sigmas, select, validate, fit)
    if pipeline_kwargs and not is_pipeline(target):
        raise ValueError(f"{sorted(pipeline_kwargs)}: extra keyword arguments apply to pipeline targets only")
    if n is not None:
        if num_steps is not None and num_steps != n:
            raise ValueError(f"num_steps={num_steps} disagrees with {where}")
        if n < 2:
            raise ValueError(f"num_steps={n}: a schedule needs at least 2 steps")
        _check_num_steps(n)  # the schedules could not hold more steps: say so before recording
        budgets, many = _check_budgets(budget, n, n - 1 if max_len is None else max_len)
    else:
        # types and lower bounds now, before the expensive recording; the rest once the step count is known
        for b in budget if isinstance(budget, (list, tuple)) else [budget]:
            if not is_int(b) or b < 2:
                raise ValueError(f"budget={b!r}: must be an int >= 2")

    if report is not None and not isinstance(report, list):
        raise ValueError(f"report is a {type(report).__name__}: must be None or a list to append to")
    if draws:
        _check_out(out)  # the probe below is a model call: every argument is checked before it
        draws = _probe_draws(target, inputs, sigmas, draws, auto_draws)
    rows = _run_rows(model_fn, inputs, select, validate, fit, draws)
    if refine is None:  # on where the moves are scored on REFINE_ROWS cheap rows of the runs that choose (see refine)
        cheap = rows >= REFINE_ROWS and (draws or rows * _row_elements(inputs) <= DRAW_ELEMENTS)
        refine = AUTO_REFINE if cheap else 0

    if isinstance(target, Recording):
        rec = target
    elif is_pipeline(target):
        states = None
        if refine or validate == "runs":  # before recording: the runs must draw each input's recorded noise again
            states = generator_states(inputs, f"refine={refine}" if refine else "validate='runs'")
        rec = record(target, inputs, progress=progress, elements=elements, out=out, **pipeline_kwargs)
        n = rec.num_steps
        _check_num_steps(n)
        budgets, many = _check_budgets(budget, n, n - 1 if max_len is None else max_len)
    else:
        rec = record(target, inputs, sigmas, progress=progress, elements=elements, out=out)
    scorer = runs = None
    if model_fn:
        if select and validate in ("auto", "runs"):
            runs = model_runs(target, inputs, rec, every=True, draws=draws)
        if refine and (draws or rows >= REFINE_ROWS):  # scored as the candidates were: the mean over the rows
            scorer = (*runs, run_score)
        elif refine:
            scorer = (*model_runs(target, inputs, rec), tail_score)
    elif is_pipeline(target):
        scorer = (*pipeline_runs(target, inputs, states, rec, pipeline_kwargs), tail_score) if refine else None
        if select and validate == "runs":
            runs = pipeline_runs(target, inputs, states, rec, pipeline_kwargs, every=True)
    if elements is not None:
        rec = rec.elements(elements)
    # the folds and the full recording share one grid: their weight tables and per-K replays are computed once
    with shared_weights(), shared_costs():
        schedules = _calibrated(rec, budgets, families, gamma, max_len, extrapolation_orders, select, refine,
                                scorer, progress, report if report is not None else [], report is not None, runs,
                                fit and "predict" in families, draws)
    return schedules if many else schedules[0]


#: Gain caps (:meth:`~meancache.calibration.joint.JointCosts.restricted`) of the searched candidates. Uncapped
#: searches were dropped: on a sharp held-out flow (48-d mixture, component std 0.4) the uncapped joint schedule had
#: 2-10x the held-out rel L2 of the cap-4 one at B = 8..25 (0.0143 against 0.0012 at B = 25).
GAIN_CAPS = (8.0, 4.0)
#: The ways ``calibrate(validate=)`` scores the candidates it chooses between.
VALIDATE_MODES = ("auto", "runs", "replay")
#: Largest ``N * max_len ** (p + 1)`` (states times segments of an order-p joint graph) the default search builds;
#: above it the highest orders are dropped (a long max_len for a small budget), so no budget meets an N^5 corner.
JOINT_SIZE_CAP = 500_000
#: Largest ``N * max_len`` (segments) the published search prices (each segment K = 1..6 replays over the
#: elements); above it (N above 2,500 at max_len 8) only the joint graph, if it fits, and the safe schedules are
#: weighed, so no N and budget make the search's cost explode.
PUBLISHED_SIZE_CAP = 20_000


#: Rows the real runs that choose reach with ``calibrate(draws=None)``'s new noise rows (inputs and draws).
DRAW_ROWS = 1024
#: Model evaluations per budget that ``calibrate(refine=None)`` spends on local moves where the real runs hold at
#: least :data:`REFINE_ROWS` rows (inputs and draws): up to 500 scored moves at B = 6, 120 at B = 25.
AUTO_REFINE = 3000
#: Fewest rows (inputs and draws) of the batched real runs that choose on which ``calibrate(refine=None)`` refines,
#: scoring the moves on those rows: 64 is what the draws give the demo's 1,024-d flow under :data:`DRAW_ELEMENTS`,
#: so rows of up to 1,024 latent elements refine, with the draws or 64 inputs or more; without draws only while
#: the rows hold at most :data:`DRAW_ELEMENTS` elements in all, so a real model's image latents never. Scored on 8
#: validation inputs the moves fit them; on 64 rows (inputs and draws, or 64 inputs) they raised the cells that
#: meet issue 19's bar on the study's flows and on the demo flow (bench/RESULTS.md).
REFINE_ROWS = 64
#: Most latent elements those rows may hold in all (whole rows, not the element subset): new rows are drawn only
#: while they are cheap, so a real model's calibration costs what it did.
DRAW_ELEMENTS = 2**16


def _batched_runs_rule(model_fn: bool, inputs, select: bool, validate: str, fit: bool) -> str | None:
    """Why the candidates are not chosen by batched real runs of rows (a velocity_fn with one batched tensor of
    inputs, ``select=True``, ``validate`` runs, ``fit=False``), or None where they are: only there can new noise
    rows join the runs (``draws``) and the moves be scored on the rows that chose (``refine``)."""
    if not model_fn or not isinstance(inputs, torch.Tensor):
        return "a velocity_fn target with one batched tensor of inputs"
    if not select or validate == "replay":
        return "the choice by real runs (select=True, validate='auto' or 'runs')"
    if fit:
        return "fit=False (the fitted candidates are weighed input by input against the calibration inputs)"
    return None


def _run_rows(model_fn: bool, inputs, select: bool, validate: str, fit: bool, draws: int) -> int:
    """Rows of the batched real runs that choose (the inputs, then ``draws`` new ones), 0 where the choice is not
    made by such runs (:func:`_batched_runs_rule`): what ``refine=None`` and the moves' scorer look at."""
    if _batched_runs_rule(model_fn, inputs, select, validate, fit) is not None:
        return 0
    return inputs.shape[0] + draws


def _row_elements(inputs: torch.Tensor) -> int:
    """Latent elements of one row of a batched tensor of inputs ``(P, *shape)`` (at least 1)."""
    return max(1, math.prod(inputs.shape[1:]))


def _draws(draws: int | None, model_fn: bool, inputs, sigmas, select: bool, validate: str, fit: bool) -> int:
    """The new noise rows of ``calibrate(draws=)`` (see there): None picks them (:data:`DRAW_ROWS`,
    :data:`DRAW_ELEMENTS`; 0 where draws do not apply); a count given where they do not apply is a ValueError
    naming the rule."""
    why = _batched_runs_rule(model_fn, inputs, select, validate, fit)
    if why is None and float(as_sigma_list(sigmas)[0]) != 1.0:
        why = "a grid that starts at sigma = 1, where the inputs are standard-normal noise"
    if draws is None:
        if why is not None:
            return 0
        return max(0, min(DRAW_ROWS, DRAW_ELEMENTS // _row_elements(inputs)) - inputs.shape[0])
    if draws and why is not None:
        raise ValueError(f"draws={draws}: new noise rows need {why}")
    return int(draws)


def _probe_draws(velocity_fn, inputs: torch.Tensor, sigmas, draws: int, auto: bool) -> int:
    """``draws``, once ``velocity_fn`` has returned a velocity shaped like its input for the batch the candidates'
    runs will use, the inputs followed by ``draws`` new noise rows, at the grid's first sigma (one call, before the
    recording). A velocity_fn whose conditioning is tied to the inputs' batch (prompt embeddings of P rows, say)
    cannot take them: with the default (``auto``) the choice then runs on the calibration inputs alone, with a
    warning; with a count the caller gave, a ValueError naming it."""
    rows = torch.cat([inputs, validation_draws(inputs, draws)])
    try:
        with torch.no_grad():
            check_velocity(velocity_fn(rows, as_sigma_list(sigmas)[0]), rows, "velocity_fn")
    except Exception as err:  # the user's model: any failure on the extra rows means it cannot take them
        why = (f"velocity_fn failed on the {inputs.shape[0]} inputs with {draws} new noise rows after them, a batch "
               f"of {rows.shape[0]} ({type(err).__name__}: {err})")
        if not auto:
            raise ValueError(f"draws={draws}: {why}; a velocity_fn whose conditioning is tied to the inputs' batch "
                             "needs draws=0") from err
        warnings.warn(f"calibrate: {why}; choosing on the {inputs.shape[0]} calibration inputs alone (draws=0 "
                      "skips this check)", stacklevel=3)
        return 0
    return draws


def auto_max_len(num_steps: int, budget: int) -> int:
    """The longest segment the search allows for ``budget`` compute steps over ``num_steps`` steps by default:
    :data:`~meancache.schedule.DEFAULT_MAX_SEGMENT`, or as long as the budget needs to reach the last step.

    Example:
        >>> auto_max_len(50, 17), auto_max_len(50, 6), auto_max_len(50, 3)
        (8, 10, 25)
    """
    return min(num_steps - 1, max(DEFAULT_MAX_SEGMENT, -(-(num_steps - 1) // (budget - 1))))


def _bounded_orders(num_steps: int, max_len: int, orders: list[int]) -> list[int]:
    return [p for p in orders if num_steps * max_len ** (p + 1) <= JOINT_SIZE_CAP]


class _Searches:
    """The searched candidates on one recording and one longest segment ``L``, each graph and each cost table
    built once and every budget solved in one pass: ``solve(name, budgets)`` gives one schedule (or None where the
    candidate has no path) per budget. Names, in tie order: ``published``, ``joint g4``, ``joint g8``,
    ``polynomial g4`` (those the estimators allow)."""

    def __init__(self, rec: Recording, families, orders, gamma, max_len: int):
        self.rec, self.families, self.gamma, self.max_len = rec, families, gamma, max_len
        self.num_steps = rec.num_steps
        self.polynomial = tuple(f for f in families if f in POLYNOMIAL_ESTIMATORS)
        self.orders = _bounded_orders(rec.num_steps, max_len, orders) if self.polynomial else []
        self._graph = None
        self._published = None
        names = ["published"] if "meancache" in families and rec.num_steps * max_len <= PUBLISHED_SIZE_CAP else []
        if self.orders:
            names += [f"joint g{cap:g}" for cap in sorted(GAIN_CAPS)]
            if "meancache" in families:
                names.append(f"polynomial g{min(GAIN_CAPS):g}")
            # the same searches free to leave the last steps to an open tail (one graph serves both kinds)
            names += [f"joint g{cap:g} tail" for cap in sorted(GAIN_CAPS)]
        self.names = names

    @classmethod
    def combined(cls, parts: list["_Searches"], sizes: list[int]) -> "_Searches":
        """The searches of the union of the parts' (disjoint) inputs, from their priced costs: every cost is a mean
        over inputs, so the union's is the size-weighted mean and nothing is priced again."""
        first = parts[0]
        out = cls.__new__(cls)
        out.__dict__.update({k: v for k, v in first.__dict__.items() if k not in ("rec", "_graph", "_published")})
        out.rec = None
        out._graph = JointCosts.mean([p.graph() for p in parts], sizes) if first.orders else None
        out._published = None
        if "published" in first.names:
            per_k = sum(p.per_k() * (w / sum(sizes)) for p, w in zip(parts, sizes))
            out._published = costs_from_orders(per_k, list(range(1, MAX_ORDER + 1)), first.max_len)
        return out

    def per_k(self) -> torch.Tensor:
        return _per_order_costs(self.rec, self.max_len, list(range(1, MAX_ORDER + 1)))

    def graph(self):
        if self._graph is None:
            self._graph = joint_costs(self.rec, estimators=self.families, max_len=self.max_len,
                                      extrapolation_orders=self.orders, open_end=True)
        return self._graph

    def solve(self, name: str, budgets: list[int]) -> list[Schedule | None]:
        if name == "published":
            if self._published is None:
                self._published = costs_from_orders(self.per_k(), list(range(1, MAX_ORDER + 1)), self.max_len)
            cost, best_k = self._published
            return [_published_path(cost, best_k, b, self.gamma, self.max_len, self.num_steps) for b in budgets]
        tail = name.endswith(" tail")
        base = name[: -len(" tail")] if tail else name
        if base == "joint":
            graph = self.graph()
        elif base.startswith("joint g"):
            graph = self.graph().restricted(max_gain=float(base[len("joint g"):]))
        else:
            graph = self.graph().restricted(self.polynomial, max_gain=float(base[len("polynomial g"):]))
        try:
            return joint_solve(graph, list(budgets), gamma=self.gamma, tail=tail)
        except ValueError:  # a budget with no path under this gain cap: the others still have theirs
            out = []
            for b in budgets:
                try:
                    out.append(joint_solve(graph, b, gamma=self.gamma, tail=tail))
                except ValueError:
                    out.append(None)
            return out


def _calibrated(rec, budgets, families, gamma, max_len, orders, select, refine, scorer, progress, report,
                reported=False, runs=None, fit=False, draws=0):
    """One schedule per budget (see :func:`calibrate`); ``runs``, the scorer of real sampled runs on every input
    and ``draws`` new noise rows after them (:func:`~meancache.calibration.runs.model_runs` or
    ``pipeline_runs``), when the choice is made by them (``validate``), else the replay folds; ``fit``: weigh the
    fitted candidates (:data:`FIT_BASES`) too."""
    n = rec.num_steps
    polynomial = tuple(f for f in families if f in POLYNOMIAL_ESTIMATORS)
    found: dict[int, Schedule] = {}
    entries: dict[int, dict] = {}
    by_len: dict[int, list[int]] = {}
    for b in dict.fromkeys(budgets):
        if b >= n:
            found[b], entries[b] = Schedule.full(n), {"budget": b, "chosen": "full"}
        elif b == 2:  # one segment from step 0: every estimator is plain reuse of v_0 there
            found[b], entries[b] = Schedule([0, n - 1], [1], n), {"budget": b, "chosen": "reuse"}
        else:
            by_len.setdefault(max_len if max_len is not None else auto_max_len(n, b), []).append(b)
    if max_len is None and len(by_len) > 1:
        # one graph at the longest length serves every budget when it keeps the same orders: the shorter budgets'
        # paths are all in it, and the graphs are the search's main cost
        longest, shortest = max(by_len), min(by_len)
        if _bounded_orders(n, longest, orders) == _bounded_orders(n, shortest, orders):
            by_len = {longest: [b for group in by_len.values() for b in group]}
    for L, group in by_len.items():
        everything = _Searches(rec, families, orders, gamma, L)
        if not select or not polynomial:
            name = "joint" if everything.orders and polynomial else "published"
            if name == "joint" or "published" in everything.names:
                for b, sched in zip(group, everything.solve(name, group)):
                    found[b], entries[b] = sched, {"budget": b, "chosen": name}
                continue
            if not polynomial:
                raise ValueError(
                    f"num_steps={n}, max_len={L}: the published estimator's search prices N * max_len segments, "
                    f"at most {PUBLISHED_SIZE_CAP}; add the polynomial estimators (the default) or use fewer steps"
                )
        if runs is not None:
            scored = rec.num_inputs + draws
            # real runs of each candidate searched on all inputs, scored on those inputs: measured, this chose
            # better on held-out inputs than real runs of fold searches on the other fold (RESULTS.md)
            for b in group:
                safe = _safe(b, n, families, max_len, L)
                candidates = _candidates(safe, everything, b)
                # the searches run first, their runs stopping against the best search only: which search is best
                # must not depend on the stopping, since its corrected versions join the running; those run
                # next, and the safe candidates last, each stopping against the best so far
                scores, stopped, complete = state = {}, {}, {}
                _score_more(runs, {k: candidates[k] for k in everything.names}, scored, candidates, state)
                extra = _corrected_search(candidates, scores, everything.names)
                candidates.update(extra)
                for part in (extra, dict(safe)):
                    _score_more(runs, part, scored, candidates, state)
                # the tie order of the choice: safe candidates, then the searches, then the corrected one
                scores = {k: scores[k] for k in candidates}
                complete = {k: complete[k] for k in candidates if k in complete}
                fitted = {}
                if fit:
                    leader = complete[_least(scores)]
                    for name, base in _fit_bases(safe, rec):
                        errs = _cross_errors(rec, base, lambda s, val: runs[0](s, val))
                        fitted[name] = _fit_entry(errs, leader)
                        scores[name] = fitted[name]["score"]
                        candidates[name] = fit_schedule(rec, base)
                found[b], entries[b] = _chosen(rec, b, "runs", scores, candidates, refine, scorer, progress,
                                               reported)
                if stopped:
                    entries[b]["stopped"] = stopped
                # the per-input errors behind the scores: an input that runs away shows here
                entries[b]["errors"] = {name: e.tolist() for name, e in complete.items()}
                if fitted:
                    entries[b]["fitted"] = fitted
            continue
        # every searched candidate is judged on inputs its search did not read: two folds validate every input once
        errors = {name: torch.zeros(len(group), rec.num_inputs, dtype=torch.float64) for name in everything.names}
        parts = []
        for search_idx, val_idx in folds(rec.num_inputs):
            fold = _Searches(subset(rec, search_idx), families, orders, gamma, L)
            parts.append(fold)
            vrec = subset(rec, val_idx)
            for name in everything.names:
                for j, sched in enumerate(fold.solve(name, group)):
                    errors[name][j, val_idx] = math.inf if sched is None else input_errors(vrec, sched)
        if rec.num_inputs > 1:  # the two folds' searched inputs are all the inputs: their costs give the union's
            everything = _Searches.combined(parts, [len(search_idx) for search_idx, _ in folds(rec.num_inputs)])
        for j, b in enumerate(group):
            safe = _safe(b, n, families, max_len, L)
            scores = {name: tail_score(input_errors(rec, s)) for name, s in safe}
            scores.update({name: tail_score(e[j]) for name, e in errors.items()})
            bases = dict(_fit_bases(safe, rec)) if fit else {}
            fitted = {}
            if bases:
                lead = _least(scores)
                leader = (input_errors(rec, dict(safe)[lead]) if lead in dict(safe)
                          else errors[lead][j])  # a search's errors on the fold that did not search it
                for name, base in bases.items():
                    errs = _cross_errors(rec, base, lambda s, val: input_errors(subset(rec, val), s))
                    fitted[name] = _fit_entry(errs, leader, tail_score)
                    scores[name] = fitted[name]["score"]
            if reported:  # every candidate's answer on all inputs (a solve each); else only the winner's
                candidates = _candidates(safe, everything, b)
                candidates.update({name: fit_schedule(rec, base) for name, base in bases.items()})
            else:
                name = _least(scores)
                candidates = {name: fit_schedule(rec, bases[name]) if name in bases else dict(safe)[name]
                              if name in dict(safe) else everything.solve(name, [b])[0]}
            found[b], entries[b] = _chosen(rec, b, "replay", scores, candidates, refine, scorer, progress,
                                           reported)
            if fitted:
                entries[b]["fitted"] = fitted
    report.extend(entries[b] for b in budgets)
    return [reuse_labelled(found[b]) for b in budgets]


def _safe(budget: int, num_steps: int, families, max_len, length: int) -> list[tuple[str, Schedule]]:
    """The safe candidates in the running: those that keep to the estimators asked for, and to a longest segment
    the caller set (the default length only bounds the search's graph: a safe schedule is always in the running)."""
    return [(name, s) for name, s in safe_candidates(budget, num_steps)
            if set(s.estimators) <= set(families) | {"meancache"}
            and (max_len is None or max(b - a for a, b, _, _ in s.segments) <= length)]


#: The fitted candidates (:mod:`~meancache.calibration.fitting`): name -> the safe candidate whose steps and
#: orders they keep, with weights fitted to the recording. Scored on inputs the weights were not fitted on (the two
#: folds, :func:`_cross_errors`), then fitted on every input; after every other candidate, so ties go to those.
FIT_BASES = {"tail f1": "tail p1", "uniform f1": "uniform p1"}


def _fit_bases(safe: list, rec: Recording) -> list[tuple[str, Schedule]]:
    """``(fitted candidate name, its base schedule)`` for the bases among ``safe`` (none for a single input: no
    input would be left to score a fit on)."""
    found = dict(safe)
    if rec.num_inputs < 2:
        return []
    return [(name, found[base]) for name, base in FIT_BASES.items() if base in found]


def _fit_entry(errors: torch.Tensor, leader: torch.Tensor, score=run_score) -> dict:
    """A fitted candidate's report entry: its cross-fitted per-input ``errors`` against the best other candidate's
    (``leader``), by the mean and by the root mean square (:func:`tail_score`); ``score`` is its score for the
    choice (``score(errors)``), or None, out of the running, unless it is lower in *both* measures. Why both:
    measured on the bench flows, fitted weights lower the typical input's error (the mean, the median) more than
    the few runaway inputs' (the root mean square, the rel L2), and sometimes raise those (bench/RESULTS.md)."""
    mine = (run_score(errors), tail_score(errors))
    theirs = (run_score(leader), tail_score(leader))
    wins = all(m < t * (1 - COST_RTOL) for m, t in zip(mine, theirs))
    return {"mean": mine[0], "rms": mine[1], "leader_mean": theirs[0], "leader_rms": theirs[1],
            "score": score(errors) if wins else None}


def _cross_errors(rec: Recording, base: Schedule, errors) -> torch.Tensor:
    """Per-input errors ``(P,)`` of ``base`` fitted on one fold and scored by ``errors(schedule, inputs)`` on the
    other, for both folds: every input scored by weights fitted without it."""
    out = torch.full((rec.num_inputs,), math.inf, dtype=torch.float64)
    for sched, val in cross_fitted(rec, base, folds(rec.num_inputs)):
        out[val] = errors(sched, val).double()
    return out


def _candidates(safe: list, searches: "_Searches", budget: int) -> dict[str, Schedule | None]:
    """Every candidate's schedule at ``budget``: the safe ones, then each search's answer (None where it has
    no path), in the tie order."""
    return {**dict(safe), **{nm: searches.solve(nm, [budget])[0] for nm in searches.names}}


#: The corrector orders tried on the best searched schedule when real runs choose (:func:`_corrected_search`).
#: Order 2 only: on the study's flows, order 1 as well changed 2 of 40 choices (31 cells either way; held-out rel
#: L2 0.78x against 0.80x, median 0.92x against 0.94x), for a third more candidate runs.
SEARCH_CORRECTORS = (2,)


def _score_more(runs, part: dict[str, Schedule | None], count: int, candidates: dict, state) -> None:
    """Score the candidates of ``part`` by :func:`_run_scores` and fold the answer into ``state``, the running
    ``(scores, stopped, complete)``: their runs stop against the least complete score in it, and a schedule that a
    candidate already scored has (``candidates`` gives the schedules) takes that one's result without running again
    (stopped there, it cannot win here either: the least complete score only falls)."""
    scores = state[0]
    seen = {candidates[n]: n for n in scores if candidates[n] is not None}
    new = {n: s for n, s in part.items() if s is None or s not in seen}
    done = [v for v in scores.values() if v is not None and math.isfinite(v)]
    complete = state[2]
    # the inputs on which the best complete candidate erred most go first: a loser's sum passes the best sooner
    lead = min(complete.values(), key=lambda e: float(e.sum())) if complete else None
    for whole, answer in zip(state, _run_scores(runs, new, count, min(done, default=math.inf) * count, lead)):
        whole.update(answer)
    for n, s in part.items():
        if n not in new:
            for whole in state:
                if seen[s] in whole:
                    whole[n] = whole[seen[s]]


def _corrected_search(candidates: dict, scores: dict, searched) -> dict[str, Schedule]:
    """The best-scored searched candidate (:func:`_least` among the searches whose runs completed) with each
    corrector of :data:`SEARCH_CORRECTORS`, named ``"<name> c<order>"``; none where no search has a
    schedule, or where the best has nothing to correct (:func:`~meancache.calibration.selection.corrected`).

    Why only the best: the searches price their segments without a corrector, and on eight Gaussian-mixture
    flows the bench does not use (``bench/candidate_study.py``'s cells; B = 6 to 25 of 50, 32 calibration inputs,
    4,096 held-out ones) adding the best one with a corrector of order 2 raised the cells that beat AB2,
    TaylorSeer-lite and ``Schedule.default`` in both held-out measures from 26 to 31 of 40, with a held-out rel L2
    0.80x and median 0.94x those of the choice without it (geometric means; lower in both in 7 cells, higher in
    both in none), for one more candidate's runs per budget (bench/RESULTS.md)."""
    ranked = {name: scores[name] for name in searched if scores.get(name) is not None and math.isfinite(scores[name])}
    if not ranked:
        return {}
    best = _least(ranked)
    out = {f"{best} c{c}": corrected(candidates[best], c) for c in SEARCH_CORRECTORS}
    # a corrected answer that is already a candidate (a search that found uniform steps) is not run twice
    return {name: s for name, s in out.items() if s is not None and s not in candidates.values()}


def _chosen(rec, budget, measure, scores, candidates, refine, scorer, progress, reported) -> tuple[Schedule, dict]:
    """The least-scored candidate (:func:`_least`), refined, and its report entry."""
    name = _least(scores)
    final, value, kept = _refined(rec, candidates[name], refine, scorer, progress)
    entry = {"budget": budget, "measure": measure, "chosen": name, "start": candidates[name], "refined": kept,
             "score": value, "scores": {k: (v if v is not None and math.isfinite(v) else None)
                                                      for k, v in scores.items()}}
    if reported:  # for a caller who weighs the candidates itself
        entry["candidates"] = candidates
    return final, entry


#: Stop a candidate's real runs once its error summed over the inputs run so far exceeds the best complete sum (it
#: cannot win); only where the inputs run one call each (a list of inputs, or a pipeline), never changing the choice.
STOP_LOSING_RUNS = True


def _run_scores(runs, candidates: dict[str, Schedule | None], count: int, best: float = math.inf,
                lead: torch.Tensor | None = None) -> tuple[dict[str, float], dict, dict]:
    """Each candidate's :func:`run_score` from real runs (``runs``: a scorer of
    :mod:`~meancache.calibration.runs`), ``inf`` for a candidate without a schedule, the candidates whose runs
    were stopped early, ``{name: lower bound of its score}`` (their score is None), and the per-input errors
    ``(count,)`` of every candidate whose runs completed (what the fitted candidates are weighed against).

    A schedule that several candidates share is run once. Where each input runs in its own model call (a list of
    inputs, a pipeline) and :data:`STOP_LOSING_RUNS` is set, every schedule first runs one input; then, in the
    order of that error, each runs the others one by one and stops as soon as its summed error exceeds the least
    complete sum by more than ``2 * COST_RTOL``: errors are never negative, so it cannot come within
    :data:`COST_RTOL` of the least, and the choice (:func:`_least`) is the one of complete runs. The inputs go in
    falling order of the best complete candidate's errors (``lead``, from an earlier call, then each new best;
    input order before any), since the inputs hard for one schedule are mostly hard for the others: a loser passes
    the bound sooner. On the digits model (4 inputs, 11 candidates, five budgets) stopping cut ``calibrate(model)``
    from 67.2 s to 46.0 s, and the hard inputs first cut its model calls from 2,554 to 2,420 (bench/RESULTS.md).
    ``best``: the least complete error sum of candidates scored before (by an earlier call), so that later
    candidates stop against it too."""
    errors, per_run, _ = runs
    distinct: dict[Schedule, list[str]] = {}
    for name, s in candidates.items():
        if s is not None:
            distinct.setdefault(s, []).append(name)
    scores: dict[str, float | None] = {name: math.inf for name in candidates}
    stopped: dict[str, float] = {}
    complete: dict[str, torch.Tensor] = {}
    if per_run == 1 or count < 2 or not STOP_LOSING_RUNS:
        for s, names in distinct.items():
            e = errors(s)
            scores.update(dict.fromkeys(names, run_score(e)))
            complete.update(dict.fromkeys(names, e))
        return scores, stopped, complete
    order = _hardest_first(lead, count)
    first = {s: errors(s, [order[0]]).double() for s in distinct}
    for s in sorted(distinct, key=lambda s: float(first[s][0])):  # stable: equal errors keep the candidates' order
        parts = {order[0]: first[s]}
        total = float(first[s][0])
        for i in order[1:]:
            if total > best * (1 + 2 * COST_RTOL):
                break
            parts[i] = errors(s, [i]).double()
            total += float(parts[i][0])
        if len(parts) == count:  # complete (its last input may still have put it above the best)
            errs = torch.cat([parts[i] for i in range(count)])
            if total < best:
                order = order[:1] + _hardest_first(errs, count, order[1:])
            best = min(best, total)
            scores.update(dict.fromkeys(distinct[s], total / count))
            complete.update(dict.fromkeys(distinct[s], errs))
        else:
            scores.update(dict.fromkeys(distinct[s], None))
            stopped.update(dict.fromkeys(distinct[s], total / count))
    return scores, stopped, complete


def _hardest_first(errors: torch.Tensor | None, count: int, among: list[int] | None = None) -> list[int]:
    """The inputs ``among`` (default all ``count``) in falling order of ``errors`` (``(count,)``, a complete
    candidate's), ties and a missing ``errors`` in input order: the order :func:`_run_scores` runs them in."""
    among = list(range(count)) if among is None else among
    return among if errors is None else sorted(among, key=lambda i: -float(errors[i]))


def _least(scores: dict[str, float]) -> str:
    """The first candidate (in ``scores``' order: safe ones first) within :data:`COST_RTOL` of the least finite
    score, so rounding never decides between near-ties."""
    least = min(v for v in scores.values() if v is not None and math.isfinite(v))
    return next(nm for nm, v in scores.items() if v is not None and v <= least + COST_RTOL * least)


def _refined(rec: Recording, start: Schedule, refine, scorer, progress) -> tuple[Schedule, float | None, bool]:
    """``start`` improved by local moves (:func:`~meancache.calibration.selection.refine`), scored by real runs
    of the model when ``scorer`` is given, else by whole-run replays on the recording with the two folds as groups
    that must not get worse one by one; never a move that raises the estimate's gain above
    ``max(min(GAIN_CAPS), gain of start)``. Never worse on the score than ``start``."""
    if not refine:
        return start, None, False
    sig = rec.sigmas
    limit = max(min(GAIN_CAPS), schedule_gain(start, sig))
    if scorer is not None:
        base, per_run, groups, score = scorer
        max_scores = max(1, refine // (start.budget * per_run))
    else:
        def base(s):
            return input_errors(rec, s)

        groups = [val for _, val in folds(rec.num_inputs)] if rec.num_inputs > 1 else None
        max_scores = max(1, refine // start.budget)
        score = tail_score

    def errors(s):
        e = base(s)
        return e if schedule_gain(s, sig) <= limit else torch.full_like(e, math.inf)

    best, value, _ = refine_moves(start, errors, max_scores=max_scores, groups=groups,
                                  progress=progress and scorer is not None, score=score)
    return best, value, best != start


def _published_path(cost, best_k, budget: int, gamma, max_len: int, num_steps: int) -> Schedule:
    """The published estimator's search (the plain PSSP of the shipped presets) at one budget, from its costs."""
    steps = solve(cost, budget, gamma=gamma, max_len=max_len)
    orders = [int(best_k[a, b]) if b - a > 1 else 0 for a, b in zip(steps, steps[1:])]
    return Schedule(steps, orders, num_steps)
