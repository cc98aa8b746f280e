"""Quality of calibrated MeanCache against the published presets, plain reuse, TaylorSeer-lite and fewer-step solvers.

For each analytic flow (exact Gaussian-mixture velocities, :class:`meancache.flows.GaussianMixtureFlow`), and for
the embedded digits model (its guided velocity on the pipeline's grid, :mod:`meancache.examples.digits`), at budgets
of 6, 8, 10, 17 and 25 model evaluations out of 50 steps, every method starts from the same held-out noise and is
compared with the full 50-step Euler run: ``rel L2 = ||x - x_full|| / ||x_full||`` over the whole batch, and the
median over samples of the per-sample relative error (robust to the few samples that end in another mixture
component, which dominate rel L2 at small budgets). Methods at each budget B:

* ``calibrated (joint)``: :func:`meancache.calibrate` with its default estimators (each segment the published
  estimator with window K, ``extrapolate`` or ``predict`` of order 1-3), recorded on separate calibration noise;
* ``calibrated (published)``: the same search restricted to the published estimator (``estimators=("meancache",)``);
* ``preset <name>``: the shipped tables that exist at B (algorithm.md §6.2);
* ``default``: :meth:`meancache.Schedule.default` (its default estimator, ``predict`` p = 1);
* ``default K2/K4``: the same compute steps with the published estimator (``Schedule.default(B, 50, "meancache")``:
  K = 2 head and middle, K = 4 tail, the default before ``predict``);
* ``plain reuse``: the published-estimator calibration's compute steps with K = 1 on every multi-step segment;
* ``uniform steps K=2``: evenly spaced compute steps, K = 2 on every multi-step segment;
* ``TaylorSeer-lite uniform`` / ``TaylorSeer-lite joint steps``: an output-level TaylorSeer (its ``lite`` mode,
  first order): a skipped step extrapolates the last two computed velocities linearly *in step index*
  (:func:`taylorseer_lite`), Euler on the full grid; on the uniform compute steps and on those of
  ``calibrated (joint)``. On a uniform grid this is ``predict`` p = 1 (the line in sigma at the step's start);
  on a shifted grid the two differ;
* ``Euler B steps``: B Euler steps on the same kind of grid (``shifted_sigmas(B, shift)``);
* ``AB2 B steps``: Adams-Bashforth 2 on that grid, B evaluations (first step Euler).

One flow is **held out**: ``mixture-heldout`` (32-d, 10 components, seed 11, shift-2 grid) is scored with the
schedules calibrated on ``mixture-shift3`` (``... from mixture-shift3`` rows: the generalisation check) beside its
own calibration. Calibration noise (seed 101; digits: seeds 10000+) is never the evaluation noise (seed 2; digits:
seeds 0+).

Also recorded: the full run's own distance to the exact ODE solution (RK4, 100 steps, float64), which is the floor
an accurate solver such as AB2 meets when scored against the full Euler run. ``make bench`` runs a reduced version
on the CPU (two budgets, fewer inputs); ``python bench/bench_quality.py [flow ...]`` prints the full tables as
markdown, ``--gamma`` the measurement behind the default gamma (:func:`gamma_sweep`) and ``--defaults`` the
candidates for :meth:`meancache.Schedule.default`'s estimators (:func:`defaults_sweep`).
"""

from __future__ import annotations

import math
import time

import pytest
import torch

import meancache
from meancache import Schedule
from meancache.flows import GaussianMixtureFlow
from meancache.flows import shifted_sigmas
from meancache.schedule import DEFAULT_MAX_SEGMENT

STEPS = 50
BUDGETS = (6, 8, 10, 17, 25)
# name -> (flow arguments, grid shift, calibration inputs, evaluation inputs, inputs solved exactly). The first two
# are the flows of tests/test_calibrate.py; "mixture-default" is GaussianMixtureFlow's own defaults; "demo" is the
# flow of `python -m meancache.examples.flow_demo` (1024-d, 2048 components: its velocity costs ~10 ms per call here, so
# fewer samples); "mixture-heldout" is used by nothing else and is calibrated on HELD_OUT[...] too.
FLOWS = {
    "mixture-shift3": (dict(dim=16, components=6, seed=3, spread=3.0), 3.0, 32, 8192, 1024),
    "mixture-linear": (dict(dim=16, components=6, seed=5, spread=3.0), 1.0, 32, 8192, 1024),
    "mixture-default": (dict(), 3.0, 32, 8192, 1024),
    "demo": (dict(dim=1024, components=2048, seed=0), 3.0, 16, 128, 32),
    "mixture-heldout": (dict(dim=32, components=10, seed=11), 2.0, 32, 8192, 1024),
}
# held-out flow -> the flow whose calibration it is also scored with
HELD_OUT = {"mixture-heldout": "mixture-shift3"}
# The embedded digits model (guided velocity, the pipeline's own grid), calibrated as its shipped preset is
# (meancache.examples.digits.calibration: 4 x 10 inputs, seeds 10000+) and scored on the demo's noise (seeds 0+).
DIGITS_SAMPLES = 100
DIGITS_EXACT = 20
PROBLEMS = list(FLOWS) + ["digits"]
# RK4 steps of the exact reference (on the flows above, 100 and 200 steps agree to ~1e-6)
EXACT_STEPS = 100
JOINT = "calibrated (joint)"
PUBLISHED = "calibrated (published)"
# the reduced case of `make bench` (pytest): two budgets that share one search (longest segment 8), at most this
# many evaluation inputs, and fewer calibration inputs on the analytic flows (the joint search's time grows with
# P * D; the digits model keeps its 4 x 10)
TEST_BUDGETS = (10, 17)
TEST_INPUTS = {"digits": 20, "demo": 32}
TEST_INPUTS_DEFAULT = 1024
TEST_CALIBRATION_INPUTS = {"demo": 4}
TEST_CALIBRATION_INPUTS_DEFAULT = 8


def euler(velocity, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Plain Euler over the grid: one evaluation per step.

    Args:
        velocity: ``velocity(x, sigma) -> v`` of ``x``'s shape and dtype.
        x: start noise, any shape (batch first), float32 or float64.
        sigmas: ``(n + 1,)`` decreasing grid.

    Returns:
        The end point, ``x``'s shape and dtype.

    >>> flow = GaussianMixtureFlow(dim=2, components=1)
    >>> tuple(euler(flow, torch.zeros(3, 2), shifted_sigmas(4, 1.0)).shape)
    (3, 2)
    """
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        x = x + (s[i + 1] - s[i]) * velocity(x, s[i])
    return x


def adams_bashforth2(velocity, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Variable-step Adams-Bashforth 2, one evaluation per step; the first step is Euler.

    With ``h_n = sigma_{n+1} - sigma_n`` and ``r = h_n / h_{n-1}``: ``x_{n+1} = x_n + h_n ((1 + r/2) v_n - (r/2)
    v_{n-1})``, the extrapolation of the velocity's linear trend to the step midpoint. Arguments and result as
    :func:`euler`.

    >>> flow = GaussianMixtureFlow(dim=2, components=1)
    >>> x0, grid = torch.zeros(3, 2), shifted_sigmas(1, 1.0)
    >>> torch.equal(adams_bashforth2(flow, x0, grid), euler(flow, x0, grid))  # one step: Euler
    True
    """
    s = sigmas.tolist()
    v_prev = h_prev = None
    for i in range(len(s) - 1):
        v = velocity(x, s[i])
        h = s[i + 1] - s[i]
        if v_prev is None:
            x = x + h * v
        else:
            r = h / h_prev
            x = x + h * ((1.0 + 0.5 * r) * v - 0.5 * r * v_prev)
        v_prev, h_prev = v, h
    return x


def taylorseer_lite(velocity, x: torch.Tensor, sigmas: torch.Tensor, compute_steps) -> torch.Tensor:
    """Output-level TaylorSeer (lite, first order): Euler on the full grid, the model run only at ``compute_steps``.

    A skipped step i after computed steps ``c0 < c1`` uses ``v_c1 + (v_c1 - v_c0) (i - c1) / (c1 - c0)``, the line
    through the last two computed velocities *in step index* (TaylorSeer's finite differences count steps, not
    sigma); with one computed step so far it reuses it. ``len(compute_steps)`` evaluations; step 0 must be computed.
    Arguments and result as :func:`euler`, plus ``compute_steps`` (step indices).

    >>> flow = GaussianMixtureFlow(dim=2, components=1)
    >>> x0, grid = torch.zeros(3, 2), shifted_sigmas(4, 1.0)
    >>> torch.equal(taylorseer_lite(flow, x0, grid, range(4)), euler(flow, x0, grid))  # all computed: Euler
    True
    """
    s = sigmas.tolist()
    computed = set(compute_steps)
    if 0 not in computed:
        raise ValueError(f"compute_steps={sorted(computed)}: step 0 must be computed")
    last: list[tuple[int, torch.Tensor]] = []  # the last two (step, velocity) computed
    for i in range(len(s) - 1):
        if i in computed:
            v = velocity(x, s[i])
            last = (last + [(i, v)])[-2:]
        elif len(last) == 1:
            v = last[0][1]
        else:
            (c0, v0), (c1, v1) = last
            v = v1 + (v1 - v0) * ((i - c1) / (c1 - c0))
        x = x + (s[i + 1] - s[i]) * v
    return x


def rk4(velocity, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Classical Runge-Kutta 4 over the grid (the 'exact' reference; four evaluations per step).

    >>> flow = GaussianMixtureFlow(dim=2, components=1)
    >>> tuple(rk4(flow, torch.zeros(3, 2, dtype=torch.float64), shifted_sigmas(2, 1.0)).shape)
    (3, 2)
    """
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        h, t = s[i + 1] - s[i], s[i]
        k1 = velocity(x, t)
        k2 = velocity(x + 0.5 * h * k1, t + 0.5 * h)
        k3 = velocity(x + 0.5 * h * k2, t + 0.5 * h)
        k4 = velocity(x + h * k3, t + h)
        x = x + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def errors(out: torch.Tensor, full: torch.Tensor) -> tuple[float, float]:
    """``(rel L2 over the batch, median per-sample relative error)``, in float64, for batches ``(B, ...)``.

    >>> errors(torch.ones(2, 3), torch.ones(2, 3))
    (0.0, 0.0)
    """
    d, f = (out.double() - full.double()).flatten(1), full.double().flatten(1)
    return (d.norm() / f.norm()).item(), (d.norm(dim=1) / f.norm(dim=1)).median().item()


def max_segment(budget: int, steps: int = STEPS) -> int:
    """Longest segment the search must allow for ``budget`` computes to span ``steps`` steps: the default 8, more
    where fewer segments cannot reach the last step (6 of 50 needs 10).

    >>> max_segment(10), max_segment(6), max_segment(8)
    (8, 10, 8)
    """
    return max(DEFAULT_MAX_SEGMENT, math.ceil((steps - 1) / (budget - 1)))


def calibrated(recording, budgets, **kwargs) -> dict[int, Schedule]:
    """``{budget: Schedule}`` from :func:`meancache.calibrate` on ``recording`` (``kwargs`` such as ``estimators``
    go to it), one search per longest segment (:func:`max_segment`).

    >>> flow = GaussianMixtureFlow(dim=2, components=2)
    >>> rec = meancache.record(flow, torch.randn(4, 2), shifted_sigmas(12, 1.0), progress=False)
    >>> {b: s.budget for b, s in calibrated(rec, [3, 6]).items()}
    {3: 3, 6: 6}
    """
    groups: dict[int, list[int]] = {}
    for b in budgets:
        groups.setdefault(max_segment(b, recording.num_steps), []).append(b)
    found = {}
    for max_len, group in groups.items():
        found.update(zip(group, meancache.calibrate(recording, budget=group, max_len=max_len, **kwargs)))
    return found


def uniform_steps(budget: int, steps: int = STEPS) -> list[int]:
    """``budget`` evenly spaced compute steps from 0 to ``steps - 1``.

    >>> uniform_steps(4, 10)
    [0, 3, 6, 9]
    """
    return sorted({round(j * (steps - 1) / (budget - 1)) for j in range(budget)})


def _problem(name: str, eval_inputs: int | None = None, calibration_inputs: int | None = None):
    """``(velocity, grid(n), calibration inputs, evaluation noise, exact inputs, description)`` of one flow.

    ``eval_inputs`` caps the evaluation noise (its first rows; None: all of it), ``calibration_inputs`` the
    calibration noise of an analytic flow (None: the flow's count; the digits model always uses its 4 x 10).
    """
    if name == "digits":
        from meancache.examples.digits import load_pipeline
        from meancache.examples.digits.calibration import calibration_inputs
        from meancache.examples.digits.model import DEFAULT_GUIDANCE
        from meancache.examples.digits.model import guided_velocity_fn
        from meancache.examples.digits.model import sample_noise
        from meancache.examples.digits.model import sigma_grid

        n_eval = min(DIGITS_SAMPLES, eval_inputs or DIGITS_SAMPLES)
        flow = guided_velocity_fn(load_pipeline(), DEFAULT_GUIDANCE)
        calib = [i["latents"] for i in calibration_inputs()]
        args = {"model": "embedded digits (meancache.examples.digits)", "guidance": DEFAULT_GUIDANCE,
                "calibration_inputs": sum(len(c) for c in calib), "evaluation_inputs": n_eval}
        return flow, sigma_grid, calib, sample_noise(range(n_eval)), min(DIGITS_EXACT, n_eval), args
    kwargs, shift, n_cal, n_eval, n_exact = FLOWS[name]
    n_eval = min(n_eval, eval_inputs or n_eval)
    n_cal = min(n_cal, calibration_inputs or n_cal)
    flow = GaussianMixtureFlow(**kwargs)
    calib = torch.randn(n_cal, flow.dim, generator=torch.Generator().manual_seed(101))
    noise = torch.randn(n_eval, flow.dim, generator=torch.Generator().manual_seed(2))
    args = {**kwargs, "shift": shift, "calibration_inputs": n_cal, "evaluation_inputs": n_eval}
    return flow, (lambda n: shifted_sigmas(n, shift)), calib, noise, min(n_exact, n_eval), args


def _calibrations(name: str, budgets, calibration_inputs: int | None = None) -> tuple[dict, dict, float, float]:
    """``(joint, published, record seconds, search seconds)`` of one problem's calibration at ``budgets``."""
    flow, grid, calib, _, _, _ = _problem(name, eval_inputs=1, calibration_inputs=calibration_inputs)
    t0 = time.perf_counter()
    recording = meancache.record(flow, calib, grid(STEPS), progress=False)
    t1 = time.perf_counter()
    joint = calibrated(recording, budgets)
    published = calibrated(recording, budgets, estimators=("meancache",))
    return joint, published, t1 - t0, time.perf_counter() - t1


def measure(
    name: str, budgets=BUDGETS, eval_inputs: int | None = None, calibration_inputs: int | None = None
) -> dict:
    """Every method at every budget for one flow: ``{"rows": {method: {budget: (l2, median)}}, ...}``.

    ``eval_inputs`` and ``calibration_inputs`` cap the inputs (the reduced ``make bench`` case); None uses the
    flow's own counts.
    """
    budgets = tuple(budgets)
    flow, grid, _, noise, n_exact, flow_args = _problem(name, eval_inputs, calibration_inputs)
    sigmas = grid(STEPS)
    joint, published, record_s, search_s = _calibrations(name, budgets, calibration_inputs)
    transfer = _calibrations(HELD_OUT[name], budgets) if name in HELD_OUT else None

    full = meancache.sample(flow, noise, sigmas, Schedule.full(STEPS))
    exact = rk4(flow, noise[:n_exact].double(), grid(EXACT_STEPS))
    rows: dict[str, dict[int, tuple[float, float]]] = {}

    def put(method, budget, out):
        rows.setdefault(method, {})[budget] = errors(out, full)

    def cached(schedule):
        return meancache.sample(flow, noise, sigmas, schedule)

    presets = meancache.preset_names()
    for b in budgets:
        put(JOINT, b, cached(joint[b]))
        put(PUBLISHED, b, cached(published[b]))
        if transfer is not None:
            put(f"{JOINT} from {HELD_OUT[name]}", b, cached(transfer[0][b]))
            put(f"{PUBLISHED} from {HELD_OUT[name]}", b, cached(transfer[1][b]))
        for preset, have in presets.items():
            # a preset made by this very calibration (the digits ones) would only tie its calibrated row
            if b in have and Schedule.preset(preset, b) not in (joint[b], published[b]):
                put(f"preset {preset}", b, cached(Schedule.preset(preset, b)))
        put("default", b, cached(Schedule.default(b, STEPS)))
        put("default K2/K4", b, cached(Schedule.default(b, STEPS, "meancache")))
        put("plain reuse", b, cached(published[b].with_order(1)))
        uniform = uniform_steps(b)
        put("uniform steps K=2", b, cached(Schedule(uniform, [1] * (len(uniform) - 1), STEPS).with_order(2)))
        put("TaylorSeer-lite uniform", b, taylorseer_lite(flow, noise, sigmas, uniform))
        put("TaylorSeer-lite joint steps", b, taylorseer_lite(flow, noise, sigmas, joint[b].compute_steps))
        put("Euler B steps", b, euler(flow, noise, grid(b)))
        put("AB2 B steps", b, adams_bashforth2(flow, noise, grid(b)))
    result = {
        "flow": name,
        "flow_args": flow_args,
        "budgets": budgets,
        "exact_inputs": n_exact,
        "rows": rows,
        "schedules": {b: " ".join(joint[b].pattern()) for b in budgets},
        "schedules_published": {b: " ".join(published[b].pattern()) for b in budgets},
        "full_vs_exact": errors(full[:n_exact], exact),
        "record_seconds": record_s,
        "calibrate_seconds": search_s,
    }
    if transfer is not None:
        result["calibrated_on"] = HELD_OUT[name]
    return result


def winners(result: dict) -> list[str]:
    """Per budget: the method with the lowest rel L2, and where that is not ``calibrated (joint)``, by how much it
    trails: ``"B=10: AB2 B steps 0.0326; calibrated (joint) 0.0400 (1.23x)"``."""
    out = []
    for b in result["budgets"]:
        ranked = sorted((by_budget[b][0], m) for m, by_budget in result["rows"].items() if b in by_budget)
        l2, best = ranked[0]
        ours = result["rows"][JOINT][b][0]
        if best == JOINT:
            second_l2, second = ranked[1]
            out.append(f"B={b}: {JOINT} {ours:.4f} lowest; next {second} {second_l2:.4f} ({second_l2 / ours:.2f}x)")
        else:
            out.append(f"B={b}: {best} {l2:.4f} lowest; {JOINT} {ours:.4f} ({ours / l2:.2f}x)")
    return out


def losses(result: dict) -> list[str]:
    """Where ``calibrated (joint)`` is not strictly the lowest, per metric:
    ``"B=10 rel L2: AB2 B steps 0.0823 <= calibrated (joint) 0.1269"``."""
    out = []
    for b in result["budgets"]:
        for j, metric in enumerate(("rel L2", "median")):
            ours = result["rows"][JOINT][b][j]
            for method, by_budget in result["rows"].items():
                if method != JOINT and b in by_budget and by_budget[b][j] <= ours:
                    out.append(f"B={b} {metric}: {method} {by_budget[b][j]:.4f} <= {JOINT} {ours:.4f}")
    return out


def gamma_sweep(gammas=(1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 12.0)) -> dict:
    """The measurement behind ``DEFAULT_GAMMA``: geometric-mean error over 12 mixture flows (6 seeds x shift 3 and
    unshifted grids) x 2 calibration seeds x budgets 10/17/25 of 50, 32 calibration and 1024 evaluation inputs,
    the published estimator (as when the default was chosen).

    Returns ``{gamma: (geo-mean rel L2, geo-mean median per-sample error)}``.
    """
    budgets = (10, 17, 25)
    logs = {g: [0.0, 0.0] for g in gammas}
    cases = 0
    for seed in range(6):
        for shift in (3.0, 1.0):
            flow = GaussianMixtureFlow(
                dim=16 + 16 * (seed % 2), components=4 + 2 * seed, seed=20 + seed, spread=1.5 + 0.3 * seed
            )
            sigmas = shifted_sigmas(STEPS, shift)
            noise = torch.randn(1024, flow.dim, generator=torch.Generator().manual_seed(200))
            full = meancache.sample(flow, noise, sigmas, Schedule.full(STEPS))
            for cal_seed in (100, 101):
                calib = torch.randn(32, flow.dim, generator=torch.Generator().manual_seed(cal_seed))
                recording = meancache.record(flow, calib, sigmas, progress=False)
                for g in gammas:
                    found = calibrated(recording, budgets, gamma=g, estimators=("meancache",))
                    for sched in found.values():
                        l2, med = errors(meancache.sample(flow, noise, sigmas, sched), full)
                        logs[g][0] += math.log(l2)
                        logs[g][1] += math.log(med)
                cases += len(budgets)
    return {g: (math.exp(a / cases), math.exp(b / cases)) for g, (a, b) in logs.items()}


# --defaults: flows never used to design Schedule.default (the flows above, the gamma sweep's seeds 20-25): new
# seeds 60-65, dims 8/24/48 (the others used 16 and 32), components and spreads of both kinds
DEFAULTS_FLOWS = tuple(
    dict(dim=(8, 24, 48)[j % 3], components=(5, 9, 14)[j % 3] + j, seed=60 + j, spread=(1.8, 2.6, 3.2)[j % 3])
    for j in range(6)
)
DEFAULTS_BUDGETS = (10, 17, 25)
DEFAULTS_SHIFTS = (1.0, 3.0)
#: Where Schedule.default's tail starts (u = i / (N - 1) >= 0.85): its K = 4 segments.
DEFAULT_TAIL = 0.85


def default_candidates(budget: int, steps: int = STEPS) -> dict[str, Schedule]:
    """Candidates for :meth:`Schedule.default`'s estimators, all on its compute steps: the published-estimator
    default (K = 2 head and middle, K = 4 tail: ``Schedule.default(..., "meancache")``, the default when this was
    first measured), ``extrapolate`` p = 1 or p = 2 on every multi-step segment, p = 1 on the head and middle with
    K = 4 kept in the tail, and the same three with ``predict`` (the polynomial at the step's start) instead of
    ``extrapolate``. 1-step segments stay K = 0 (nothing is skipped there).

    >>> [s.labels[:2] for s in default_candidates(10).values()]  # doctest: +NORMALIZE_WHITESPACE
    [('K2', 'K2'), ('e1', 'e1'), ('e2', 'e2'), ('e1', 'e1'), ('p1', 'p1'), ('p2', 'p2'), ('p1', 'p1')]
    """
    base = Schedule.default(budget, steps, "meancache")
    pairs = list(zip(base.compute_steps, base.compute_steps[1:], base.orders))

    def build(rule):
        labels = [("meancache", 0) if b - a == 1 else rule(a, k) for a, b, k in pairs]
        return Schedule(base.compute_steps, [k for _, k in labels], steps, [e for e, _ in labels])

    out = {"default (K2 head+middle, K4 tail)": base}
    for name, short in (("extrapolate", "e"), ("predict", "p")):
        out[f"{short}1 on every segment"] = build(lambda a, k, e=name: (e, 1))
        out[f"{short}2 on every segment"] = build(lambda a, k, e=name: (e, 2))
        out[f"{short}1 head+middle, K4 tail"] = build(
            lambda a, k, e=name: ("meancache", 4) if a / (steps - 1) >= DEFAULT_TAIL else (e, 1)
        )
    return out


def defaults_sweep(flows=DEFAULTS_FLOWS, budgets=DEFAULTS_BUDGETS, shifts=DEFAULTS_SHIFTS, inputs: int = 1024) -> dict:
    """Every :func:`default_candidates` schedule on held-out mixture flows x grids x budgets: ``{"cases": [(flow
    index, shift, budget, {candidate: (rel L2, median)})], "geo": {candidate: (geo rel L2, geo median)},
    "geo_by_budget": {candidate: {budget: geo rel L2}}, "wins": {candidate: cases with the lowest rel L2}}``.
    """
    cases = []
    for j, kwargs in enumerate(flows):
        flow = GaussianMixtureFlow(**kwargs)
        noise = torch.randn(inputs, flow.dim, generator=torch.Generator().manual_seed(300 + j))
        for shift in shifts:
            sigmas = shifted_sigmas(STEPS, shift)
            full = meancache.sample(flow, noise, sigmas, Schedule.full(STEPS))
            for b in budgets:
                scores = {
                    name: errors(meancache.sample(flow, noise, sigmas, sched), full)
                    for name, sched in default_candidates(b).items()
                }
                cases.append((j, shift, b, scores))
    names = list(cases[0][3])

    def geo(values):
        values = list(values)
        return math.exp(sum(math.log(v) for v in values) / len(values))

    return {
        "cases": cases,
        "geo": {n: (geo(c[3][n][0] for c in cases), geo(c[3][n][1] for c in cases)) for n in names},
        "geo_by_budget": {
            n: {b: geo(c[3][n][0] for c in cases if c[2] == b) for b in budgets} for n in names
        },
        "geo_by_shift": {
            n: {s: geo(c[3][n][0] for c in cases if c[1] == s) for s in shifts} for n in names
        },
        "wins": {n: sum(1 for c in cases if min(c[3], key=lambda m: c[3][m][0]) == n) for n in names},
        # against the published-estimator default (the first candidate), case by case
        "beats_default": {n: sum(1 for c in cases if c[3][n][0] < c[3][names[0]][0]) for n in names},
    }


def defaults_markdown(sweep: dict) -> str:
    """The ``--defaults`` table: one line per candidate, geometric means over the cases, the lowest in bold."""
    names = list(sweep["geo"])
    budgets = list(next(iter(sweep["geo_by_budget"].values())))
    shifts = list(next(iter(sweep["geo_by_shift"].values())))
    cols = [("geo rel L2", lambda n: sweep["geo"][n][0]), ("geo median", lambda n: sweep["geo"][n][1])]
    cols += [(f"B={b}", lambda n, b=b: sweep["geo_by_budget"][n][b]) for b in budgets]
    cols += [(f"shift {s:g}", lambda n, s=s: sweep["geo_by_shift"][n][s]) for s in shifts]
    lines = [
        "| candidate | " + " | ".join(c for c, _ in cols) + " | lowest rel L2 in | below K2/K4 in |",
        "|---|" + "---|" * (len(cols) + 2),
    ]
    for n in names:
        cells = []
        for _, f in cols:
            v, best = f(n), min(f(m) for m in names)
            cells.append(f"**{v:.4f}**" if v == best else f"{v:.4f}")
        k = len(sweep["cases"])
        lines.append(
            f"| {n} | " + " | ".join(cells) + f" | {sweep['wins'][n]} of {k} | {sweep['beats_default'][n]} of {k} |"
        )
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """One flow's table: rows are methods, cells ``rel L2 (median per-sample)``; the lowest of each measure per
    budget in bold."""
    budgets = result["budgets"]
    lines = [
        f"**{result['flow']}** ({result['flow_args']}); full run vs exact ODE ({result['exact_inputs']} inputs): "
        f"{result['full_vs_exact'][0]:.4f} ({result['full_vs_exact'][1]:.4f})",
        "",
        "| method | " + " | ".join(f"B={b}" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    rows = result["rows"]
    best = {(b, j): min(r[b][j] for r in rows.values() if b in r) for b in budgets for j in (0, 1)}

    def cell(by_budget, b):
        if b not in by_budget:
            return "-"
        l2, med = (f"{v:.4f}" if v > best[b, j] else f"**{v:.4f}**" for j, v in enumerate(by_budget[b]))
        return f"{l2} ({med})"

    for method, by_budget in rows.items():
        lines.append(f"| {method} | " + " | ".join(cell(by_budget, b) for b in budgets) + " |")
    return "\n".join(lines)


@pytest.mark.parametrize("flow_name", PROBLEMS)
def test_quality(benchmark, flow_name, machine_info, capsys):
    # the reduced case (two budgets, fewer inputs) keeps `make bench` short; the tables come from the script mode
    args = (flow_name, TEST_BUDGETS, TEST_INPUTS.get(flow_name, TEST_INPUTS_DEFAULT),
            TEST_CALIBRATION_INPUTS.get(flow_name, TEST_CALIBRATION_INPUTS_DEFAULT))
    result = benchmark.pedantic(measure, args=args, rounds=1, iterations=1)
    for method, by_budget in result["rows"].items():
        # a preset row has only the budgets its table has
        assert set(by_budget) <= set(TEST_BUDGETS) and (method.startswith("preset") or len(by_budget) == 2)
        for l2, med in by_budget.values():
            assert 0.0 <= med and math.isfinite(l2)
    assert (JOINT in result["rows"]) and (PUBLISHED in result["rows"])
    assert (f"{JOINT} from mixture-shift3" in result["rows"]) == (flow_name == "mixture-heldout")
    benchmark.extra_info.update(machine_info)
    benchmark.extra_info.update(
        flow=result["flow"],
        flow_args=result["flow_args"],
        errors={m: {str(b): list(v) for b, v in rows.items()} for m, rows in result["rows"].items()},
        schedules={str(b): s for b, s in result["schedules"].items()},
        full_vs_exact=list(result["full_vs_exact"]),
        record_seconds=result["record_seconds"],
        calibrate_seconds=result["calibrate_seconds"],
        lowest=winners(result),
    )
    with capsys.disabled():
        print("\n" + markdown(result))
        for line in winners(result):
            print("  " + line)


def test_taylorseer_lite_extrapolates_in_step_index():
    # v(x, sigma) = sigma on a 4-step uniform grid, computed at 0 and 1: step 2 uses v1 + (v1 - v0) * 1, step 3
    # v1 + (v1 - v0) * 2, exactly the line in the step index
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    calls = []

    def velocity(x, s):
        calls.append(s)
        return torch.full_like(x, s)

    out = taylorseer_lite(velocity, torch.zeros(1, 1, dtype=torch.float64), sigmas, [0, 1])
    assert calls == [1.0, 0.75]
    assert out.item() == pytest.approx(-0.25 * (1.0 + 0.75 + 0.5 + 0.25))
    out = taylorseer_lite(velocity, torch.zeros(1, 1, dtype=torch.float64), sigmas, [0, 3])
    assert out.item() == pytest.approx(-0.25 * (1.0 + 1.0 + 1.0 + 0.25))  # one computed so far: reuse


def test_default_candidates_share_the_compute_steps():
    for b in DEFAULTS_BUDGETS:
        cands = default_candidates(b)
        assert len({s.compute_steps for s in cands.values()}) == 1
        for short in "ep":
            tail = cands[f"{short}1 head+middle, K4 tail"]
            for a, c, label in zip(tail.compute_steps, tail.compute_steps[1:], tail.labels):
                assert label == ("K0" if c - a == 1 else "K4" if a / (STEPS - 1) >= DEFAULT_TAIL else f"{short}1")


if __name__ == "__main__":
    import sys

    torch.set_grad_enabled(False)
    if "--gamma" in sys.argv:
        print("| gamma | geo-mean rel L2 | geo-mean median per-sample |\n|---|---|---|")
        for g, (l2, med) in gamma_sweep().items():
            print(f"| {g:g} | {l2:.4f} | {med:.4f} |")
        sys.exit(0)
    if "--defaults" in sys.argv:
        t0 = time.perf_counter()
        sweep = defaults_sweep()
        print(f"{len(sweep['cases'])} cases: {len(DEFAULTS_FLOWS)} flows {list(DEFAULTS_FLOWS)} x shifts "
              f"{list(DEFAULTS_SHIFTS)} x budgets {list(DEFAULTS_BUDGETS)} of {STEPS}; 1024 inputs each\n")
        print(defaults_markdown(sweep))
        best = min(sweep["geo"], key=lambda n: sweep["geo"][n][0])
        print(f"\nlowest geometric-mean rel L2: {best} ({time.perf_counter() - t0:.0f} s)")
        sys.exit(0)
    for flow_name in sys.argv[1:] or PROBLEMS:
        res = measure(flow_name)
        print(markdown(res))
        print()
        for b in res["budgets"]:
            print(f"    B={b} joint:     {res['schedules'][b]}")
            print(f"    B={b} published: {res['schedules_published'][b]}")
        print(f"    record {res['record_seconds']:.2f} s, both searches {res['calibrate_seconds']:.2f} s")
        for line in winners(res):
            print("    " + line)
        print()
