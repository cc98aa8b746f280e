"""Quality of calibrated MeanCache against fewer-step solvers, TaylorSeer-lite, the default schedule and plain reuse.

For each analytic flow (exact Gaussian-mixture velocities, :class:`meancache.flows.GaussianMixtureFlow`, two of
them *sharp*: every component's std fixed at 0.40 or 0.45), and for the embedded digits model (its guided velocity
on the pipeline's grid, :mod:`meancache.examples.digits`), at budgets of 6, 8, 10, 17 and 25 model evaluations out
of 50 steps, every method starts from the same held-out noise and is compared with the full 50-step Euler run:
``rel L2 = ||x - x_full|| / ||x_full||`` over the whole batch, and the median over samples of the per-sample
relative error (robust to the few samples that end in another mixture component, which dominate rel L2 at small
budgets). Methods at each budget B:

* ``calibrated (default)``: :func:`meancache.calibrate` with every default, given the model as a user with the
  model calls it (``calibrate(velocity, calibration_noise, sigmas=grid, budget=B)``: each candidate, the safe
  schedules and the searches on all calibration inputs, sampled for real from them and, on the analytic flows,
  from the default's new noise rows (``draws``: the runs hold 1,024 rows, or 64 on ``demo``; none on the digits
  model, whose inputs are a list), the least mean per-input error chosen), on separate calibration noise;
  ``report=`` gives the chosen candidate per budget;
* ``calibrated (recording only)``: every default from the recording alone (``calibrate(recording, budget=B)``: the
  searches scored on the fold of the calibration inputs they did not read, the safe schedules beside them, the
  least root-mean-square replay error chosen and re-solved on all inputs), what the CLI's recordings get;
* ``calibrated (published)``: the published estimator only (``estimators=("meancache",)``);
* ``joint search (select=False)``: the joint search's schedule on all calibration inputs, no choice on held-out
  folds (what the selection is measured against);
* ``calibrated (previous code)`` (only with ``--base PATH``): the calibration of another checkout of the library
  (the code before a change), run in a subprocess on the same recording;
* ``preset <name>``: the shipped tables that exist at B (algorithm.md §6.2);
* ``default``: :meth:`meancache.Schedule.default` (its default estimator, ``predict`` p = 1);
* ``default K2/K4``: the same compute steps with the published estimator (``Schedule.default(B, 50, "meancache")``);
* ``plain reuse``: the published-estimator calibration's compute steps with K = 1 on every multi-step segment;
* ``uniform steps K=2``: evenly spaced compute steps, K = 2 on every multi-step segment;
* ``TaylorSeer-lite uniform`` / ``TaylorSeer-lite calibrated steps``: an output-level TaylorSeer (its ``lite``
  mode, first order): a skipped step extrapolates the last two computed velocities linearly *in step index*
  (:func:`taylorseer_lite`), Euler on the full grid; on the uniform compute steps and on those of
  ``calibrated (default)``. On a uniform grid this is ``predict`` p = 1 (the line in sigma at the step's start);
  on a shifted grid the two differ;
* ``Euler B steps``: B Euler steps on the same kind of grid (``shifted_sigmas(B, shift)``);
* ``AB2 B steps``: Adams-Bashforth 2 on that grid, B evaluations (first step Euler).

**The bar** (:data:`BAR`, :func:`bar`): in a (flow, budget) cell the default calibration must have a lower rel L2
*and* a lower median than each of AB2, TaylorSeer-lite (uniform and on the calibrated steps), ``Schedule.default``,
the published-only calibration and plain reuse. :func:`bar_markdown` counts the cells met and gives, for each lost
one, the ratio to the best comparator and its name.

One flow is **held out**: ``mixture-heldout`` (32-d, 10 components, seed 11, shift-2 grid) is scored with the
schedules calibrated on ``mixture-shift3`` (``... from mixture-shift3`` rows: the generalisation check) beside its
own calibration. Calibration noise (seed 101; digits: seeds 10000+) is never the evaluation noise (seed 2; digits:
seeds 0+).

Also recorded: the full run's own distance to the exact ODE solution (RK4, 100 steps, float64), which is the floor
an accurate solver such as AB2 meets when scored against the full Euler run. ``make bench`` runs a reduced version
on the CPU (:data:`TEST_PROBLEMS`, one budget, fewer inputs). Script mode (one torch thread):

* ``python bench/bench_quality.py [--base PATH] [flow ...]``: the full tables as markdown, the bar and the
  calibration times (``--base``: also the previous code's calibration and its time);
* ``--calibration-time [--base PATH] [flow ...]``: only the calibration wall times, new against ``--base``;
* ``--bound [flow ...]``: every candidate of the default calibration held to the bar as if chosen
  (:func:`candidate_bound`): which cells a better choice among today's candidates could still win;
* ``--stability [flow ...]``: the share of resamples of the held-out inputs in which the default calibration meets
  the bar (:func:`bar_stability`): which verdicts the held-out sample itself decides;
* ``--refine [flow ...]``: the default calibration with and without refinement by real model runs
  (``refine=REFINE_EVALS``) on held-out noise (default flows: the sharp ones);
* ``--gamma``: the measurement behind the default gamma (:func:`gamma_sweep`); ``--defaults``: the candidates for
  :meth:`meancache.Schedule.default`'s estimators (:func:`defaults_sweep`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
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
# flow of `python -m meancache.examples.flow_demo` (1024-d, 2048 components: its velocity costs ~80 ms per call of
# 512 inputs here, so fewer samples); "mixture-heldout" is used by nothing else and is calibrated on HELD_OUT[...]
# too; "sharp-0.40" and "sharp-0.45" have every component's std fixed (narrow components: trajectories that bend
# late and hard, where a long extrapolation runs away).
FLOWS = {
    "mixture-shift3": (dict(dim=16, components=6, seed=3, spread=3.0), 3.0, 32, 8192, 1024),
    "mixture-linear": (dict(dim=16, components=6, seed=5, spread=3.0), 1.0, 32, 8192, 1024),
    "mixture-default": (dict(), 3.0, 32, 8192, 1024),
    "demo": (dict(dim=1024, components=2048, seed=0), 3.0, 32, 512, 32),
    "mixture-heldout": (dict(dim=32, components=10, seed=11), 2.0, 32, 8192, 1024),
    "sharp-0.40": (dict(dim=48, components=8, seed=21, spread=2.5, scale=0.4), 3.0, 32, 8192, 1024),
    "sharp-0.45": (dict(dim=32, components=10, seed=31, spread=2.5, scale=0.45), 2.0, 32, 8192, 1024),
}
SHARP = ("sharp-0.40", "sharp-0.45")
# held-out flow -> the flow whose calibration it is also scored with
HELD_OUT = {"mixture-heldout": "mixture-shift3"}
# The embedded digits model (guided velocity, the pipeline's own grid), calibrated as its shipped preset is
# (meancache.examples.digits.calibration: 4 x 10 inputs, seeds 10000+) and scored on the demo's noise (seeds 0+).
DIGITS_SAMPLES = 512
DIGITS_EXACT = 20
PROBLEMS = list(FLOWS) + ["digits"]
# RK4 steps of the exact reference (on the flows above, 100 and 200 steps agree to ~1e-6)
EXACT_STEPS = 100
DEFAULT_CAL = "calibrated (default)"
REPLAY_CAL = "calibrated (recording only)"
PUBLISHED = "calibrated (published)"
JOINT_RAW = "joint search (select=False)"
PREVIOUS = "calibrated (previous code)"
TS_UNIFORM = "TaylorSeer-lite uniform"
TS_CALIBRATED = "TaylorSeer-lite calibrated steps"
FIT_CAL = "calibrated (fit=True)"
TS_FIT = "TaylorSeer-lite fit=True steps"
AB2 = "AB2 B steps"
#: The comparators of the bar: the default calibration must be below each of them in rel L2 and in median.
BAR = (AB2, TS_UNIFORM, TS_CALIBRATED, "default", PUBLISHED, "plain reuse")
#: The same bar for the ``fit=True`` row (fitted candidates in the running), TaylorSeer-lite on its own steps.
FIT_BAR = (AB2, TS_UNIFORM, TS_FIT, "default", PUBLISHED, "plain reuse")
#: Model evaluations per budget of the ``--refine`` measurement (``calibrate(..., refine=REFINE_EVALS)``).
REFINE_EVALS = 60 * 25
# the reduced case of `make bench` (pytest): these problems (a smooth flow, the held-out one, a sharp one, the
# digits model), one budget, at most this many evaluation inputs and fewer calibration inputs on the analytic flows
# (the searches' time grows with P * D; the digits model keeps its 4 x 10); no select=False row
TEST_PROBLEMS = ("mixture-shift3", "mixture-heldout", "sharp-0.40", "digits")
TEST_BUDGETS = (10,)
TEST_INPUTS = {"digits": 20}
TEST_INPUTS_DEFAULT = 1024
TEST_CALIBRATION_INPUTS = {}
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


def code_stamp() -> str:
    """The first 12 hex digits of the SHA-256 of the calibration code on disk (``meancache/calibrate.py`` and
    ``meancache/calibration/*.py``): which version a table was measured with."""
    root = pathlib.Path(meancache.__file__).parent
    h = hashlib.sha256()
    for path in [root / "calibrate.py", *sorted((root / "calibration").glob("*.py"))]:
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:12]


#: :func:`code_stamp` when this module was imported (the files may change on disk during a long run).
CODE_STAMP = code_stamp()


def _recording(name: str, calibration_inputs: int | None = None):
    """``(recording, seconds)``: the uncached 50-step run of one problem's calibration inputs."""
    flow, grid, calib, _, _, _ = _problem(name, eval_inputs=1, calibration_inputs=calibration_inputs)
    t0 = time.perf_counter()
    recording = meancache.record(flow, calib, grid(STEPS), progress=False)
    return recording, time.perf_counter() - t0


# The previous code's calibration, run in a subprocess that imports the library from another checkout (the editable
# install's finder would otherwise hand it this tree): argv = checkout, recording file, [[max_len, [budgets]], ...].
_PREVIOUS_SCRIPT = r"""
import json, sys, time
base, path, groups = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path.insert(0, base)
import torch
torch.set_num_threads(1)
torch.set_grad_enabled(False)
import meancache
assert meancache.__file__.startswith(base), meancache.__file__
d = torch.load(path)
rec = meancache.Recording(d["sigmas"], d["latents"], d["velocities"])
found = {}
t0 = time.perf_counter()
for max_len, budgets in groups:
    found.update(zip(budgets, meancache.calibrate(rec, budget=budgets, max_len=max_len, progress=False)))
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "schedules": {
    b: [list(s.compute_steps), list(s.orders), list(s.estimators)] for b, s in found.items()}}))
"""


def previous_calibration(recording, budgets, base: str) -> tuple[dict[int, Schedule], float]:
    """``({budget: Schedule}, seconds)`` from the default ``calibrate`` of the checkout at ``base`` on
    ``recording`` (one torch thread, in a subprocess; the seconds are its calibrate calls only). That code takes a
    fixed ``max_len`` (default 8): budgets are grouped by the longest segment they need (:func:`max_segment`), as
    :func:`calibrated` does."""
    groups: dict[int, list[int]] = {}
    for b in budgets:
        groups.setdefault(max_segment(b, recording.num_steps), []).append(b)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "recording.pt")
        torch.save({"sigmas": list(recording.sigmas), "latents": recording.latents,
                    "velocities": recording.velocities}, path)
        done = subprocess.run(
            [sys.executable, "-c", _PREVIOUS_SCRIPT, base, path, json.dumps(sorted(groups.items()))],
            cwd=base, env={**os.environ, "PYTHONPATH": base}, capture_output=True, text=True,
        )
    if done.returncode != 0:
        raise RuntimeError(f"previous calibrate at {base} failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    n = recording.num_steps
    return {int(b): Schedule(s, o, n, e) for b, (s, o, e) in out["schedules"].items()}, out["seconds"]


def _calibrations(name: str, budgets, calibration_inputs: int | None = None, *, raw: bool = True,
                  base: str | None = None) -> dict:
    """One problem's calibrations at ``budgets``, each ``{budget: Schedule}``: ``"default"`` (every default, all
    budgets in one call, from the model, as a user with the model calls it: candidates chosen by real runs),
    ``"replay"`` (every default, from the recording: candidates chosen by the replay folds), ``"published"``,
    ``"raw"`` (``select=False``; only with ``raw``) and ``"previous"`` (the checkout at ``base``; only with it), plus ``"report"`` (the default calibration's ``report=`` entries) and
    ``"seconds"`` (record, and each calibration's wall time)."""
    budgets = list(budgets)
    recording, record_s = _recording(name, calibration_inputs)
    seconds = {"record": record_s}
    report: list = []
    flow, grid, calib, _, _, _ = _problem(name, eval_inputs=1, calibration_inputs=calibration_inputs)
    t0 = time.perf_counter()
    out = {"default": dict(zip(budgets, meancache.calibrate(flow, calib, sigmas=grid(STEPS), budget=budgets,
                                                            report=report, progress=False)))}
    seconds["default"] = time.perf_counter() - t0  # the recording included
    fit_report: list = []
    t0 = time.perf_counter()
    out["fit"] = dict(zip(budgets, meancache.calibrate(flow, calib, sigmas=grid(STEPS), budget=budgets, fit=True,
                                                       report=fit_report, progress=False)))
    seconds["fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["replay"] = dict(zip(budgets, meancache.calibrate(recording, budget=budgets, progress=False)))
    seconds["replay"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["published"] = dict(zip(budgets, meancache.calibrate(recording, budget=budgets, estimators=("meancache",),
                                                             progress=False)))
    seconds["published"] = time.perf_counter() - t0
    if raw:
        t0 = time.perf_counter()
        out["raw"] = dict(zip(budgets, meancache.calibrate(recording, budget=budgets, select=False,
                                                           progress=False)))
        seconds["raw"] = time.perf_counter() - t0
    if base is not None:
        out["previous"], seconds["previous"] = previous_calibration(recording, budgets, base)
    out["report"], out["fit_report"], out["seconds"] = report, fit_report, seconds
    return out


def measure(
    name: str, budgets=BUDGETS, eval_inputs: int | None = None, calibration_inputs: int | None = None, *,
    raw: bool = True, base: str | None = None,
) -> dict:
    """Every method at every budget for one flow: ``{"rows": {method: {budget: (l2, median)}}, ...}``.

    ``eval_inputs`` and ``calibration_inputs`` cap the inputs (the reduced ``make bench`` case); None uses the
    flow's own counts. ``raw``: also the ``select=False`` row; ``base``: also the previous code's row (a checkout).
    """
    budgets = tuple(budgets)
    flow, grid, _, noise, n_exact, flow_args = _problem(name, eval_inputs, calibration_inputs)
    sigmas = grid(STEPS)
    cal = _calibrations(name, budgets, calibration_inputs, raw=raw, base=base)
    ours, published = cal["default"], cal["published"]
    transfer = _calibrations(HELD_OUT[name], budgets, calibration_inputs, raw=False) if name in HELD_OUT else None

    full = meancache.sample(flow, noise, sigmas, Schedule.full(STEPS))
    exact = rk4(flow, noise[:n_exact].double(), grid(EXACT_STEPS))
    rows: dict[str, dict[int, tuple[float, float]]] = {}

    def put(method, budget, out):
        rows.setdefault(method, {})[budget] = errors(out, full)

    def cached(schedule):
        return meancache.sample(flow, noise, sigmas, schedule)

    presets = meancache.preset_names()
    for b in budgets:
        put(DEFAULT_CAL, b, cached(ours[b]))
        put(FIT_CAL, b, cached(cal["fit"][b]))
        put(TS_FIT, b, taylorseer_lite(flow, noise, sigmas, cal["fit"][b].compute_steps))
        put(REPLAY_CAL, b, cached(cal["replay"][b]))
        put(PUBLISHED, b, cached(published[b]))
        if "raw" in cal:
            put(JOINT_RAW, b, cached(cal["raw"][b]))
        if "previous" in cal:
            put(PREVIOUS, b, cached(cal["previous"][b]))
        if transfer is not None:
            put(f"{DEFAULT_CAL} from {HELD_OUT[name]}", b, cached(transfer["default"][b]))
            put(f"{PUBLISHED} from {HELD_OUT[name]}", b, cached(transfer["published"][b]))
        for preset, have in presets.items():
            # a preset made by this very calibration (the digits ones) would only tie its calibrated row
            if b in have and Schedule.preset(preset, b) not in (ours[b], published[b]):
                put(f"preset {preset}", b, cached(Schedule.preset(preset, b)))
        put("default", b, cached(Schedule.default(b, STEPS)))
        put("default K2/K4", b, cached(Schedule.default(b, STEPS, "meancache")))
        put("plain reuse", b, cached(published[b].with_order(1)))
        uniform = uniform_steps(b)
        put("uniform steps K=2", b, cached(Schedule(uniform, [1] * (len(uniform) - 1), STEPS).with_order(2)))
        put(TS_UNIFORM, b, taylorseer_lite(flow, noise, sigmas, uniform))
        put(TS_CALIBRATED, b, taylorseer_lite(flow, noise, sigmas, ours[b].compute_steps))
        put("Euler B steps", b, euler(flow, noise, grid(b)))
        put(AB2, b, adams_bashforth2(flow, noise, grid(b)))
    result = {
        "flow": name,
        "flow_args": flow_args,
        "budgets": budgets,
        "exact_inputs": n_exact,
        "rows": rows,
        "schedules": {b: " ".join(ours[b].pattern()) for b in budgets},
        "schedules_published": {b: " ".join(published[b].pattern()) for b in budgets},
        "chosen": {r["budget"]: r["chosen"] for r in cal["report"]},
        "chosen_fit": {r["budget"]: r["chosen"] for r in cal["fit_report"]},
        "scores": {r["budget"]: r.get("scores") for r in cal["report"]},
        "full_vs_exact": errors(full[:n_exact], exact),
        "seconds": cal["seconds"],
        "code": CODE_STAMP,
    }
    if "previous" in cal:
        result["schedules_previous"] = {b: " ".join(cal["previous"][b].pattern()) for b in budgets}
    if transfer is not None:
        result["calibrated_on"] = HELD_OUT[name]
    return result


def bar(result: dict, comparators=BAR, ours_row: str = DEFAULT_CAL) -> dict[int, dict]:
    """The bar per budget: ``{budget: {"met": bool, "lost": [(metric, winner, winner's value, ours, ours /
    winner's)]}}``. Met: ``calibrated (default)`` below every comparator in rel L2 and in median (:func:`below`).
    For a lost metric, the winner is the comparator with the lowest value (ties, within :data:`TIE`, count as
    lost, ratio 1.00)."""
    rows = result["rows"]
    out = {}
    for b in result["budgets"]:
        lost = []
        for j, metric in enumerate(("rel L2", "median")):
            ours = rows[ours_row][b][j]
            value, winner = min((rows[m][b][j], m) for m in comparators if b in rows.get(m, {}))
            if not below(ours, value):
                lost.append((metric, winner, value, ours, ours / value if value > 0 else math.inf))
        out[b] = {"met": not lost, "lost": lost}
    return out


def bar_markdown(results: list[dict], comparators=BAR, ours_row: str = DEFAULT_CAL) -> str:
    """The bar over several flows: one line per flow, a cell per budget (``met``, or per lost metric the ratio of
    ours to the winner's and the winner), then the count of cells met."""
    budgets = sorted({b for r in results for b in r["budgets"]})
    lines = ["| flow | " + " | ".join(f"B={b}" for b in budgets) + " | met |", "|---|" + "---|" * (len(budgets) + 1)]
    met = cells = 0
    for r in results:
        verdicts = bar(r, comparators, ours_row)
        row = []
        for b in budgets:
            if b not in verdicts:
                row.append("-")
                continue
            v = verdicts[b]
            cells += 1
            met += v["met"]
            row.append("met" if v["met"] else "; ".join(
                f"{metric} {ratio:.2f}x {winner}" for metric, winner, _, _, ratio in v["lost"]))
        lines.append(f"| {r['flow']} | " + " | ".join(row) + f" | {sum(v['met'] for v in verdicts.values())} of "
                     f"{len(verdicts)} |")
    lines.append(f"\n**{met} of {cells} cells met** by {ours_row} (lower rel L2 and lower median than each of: "
                 f"{', '.join(comparators)}).")
    return "\n".join(lines)


def winners(result: dict) -> list[str]:
    """Per budget: the method with the lowest rel L2 over every row, and where that is not ``calibrated
    (default)``, by how much it trails: ``"B=10: AB2 B steps 0.0326 lowest; calibrated (default) 0.0400 (1.23x)"``."""
    out = []
    for b in result["budgets"]:
        ranked = sorted((by_budget[b][0], m) for m, by_budget in result["rows"].items() if b in by_budget)
        l2, best = ranked[0]
        ours = result["rows"][DEFAULT_CAL][b][0]
        if best == DEFAULT_CAL:
            second_l2, second = ranked[1]
            out.append(f"B={b}: {DEFAULT_CAL} {ours:.4f} lowest; next {second} {second_l2:.4f} "
                       f"({second_l2 / ours:.2f}x)")
        else:
            out.append(f"B={b}: {best} {l2:.4f} lowest; {DEFAULT_CAL} {ours:.4f} ({ours / l2:.2f}x)")
    return out


def losses(result: dict) -> list[str]:
    """Where ``calibrated (default)`` is not strictly the lowest among every row, per metric:
    ``"B=10 rel L2: AB2 B steps 0.0823 <= calibrated (default) 0.1269"``."""
    out = []
    for b in result["budgets"]:
        for j, metric in enumerate(("rel L2", "median")):
            ours = result["rows"][DEFAULT_CAL][b][j]
            for method, by_budget in result["rows"].items():
                if method != DEFAULT_CAL and b in by_budget and by_budget[b][j] <= ours:
                    out.append(f"B={b} {metric}: {method} {by_budget[b][j]:.4f} <= {DEFAULT_CAL} {ours:.4f}")
    return out


def calibration_times(name: str, budgets=BUDGETS, base: str | None = None) -> dict:
    """Wall seconds of one problem's calibration (one torch thread): ``record``, ``default`` (this tree's
    ``calibrate(recording, budget=budgets)``, one call), ``model`` (``calibrate(velocity, inputs, ...)``: the
    recording and the real runs that choose included) and, with ``base``, ``previous`` (that checkout's, in a
    subprocess, its calibrate calls only), plus each budget's chosen candidate."""
    recording, record_s = _recording(name)
    report: list = []
    t0 = time.perf_counter()
    meancache.calibrate(recording, budget=list(budgets), report=report, progress=False)
    out = {"flow": name, "record": record_s, "default": time.perf_counter() - t0,
           "chosen": {r["budget"]: r["chosen"] for r in report}, "inputs": recording.num_inputs}
    flow, grid, calib, _, _, _ = _problem(name, eval_inputs=1)
    t0 = time.perf_counter()
    meancache.calibrate(flow, calib, sigmas=grid(STEPS), budget=list(budgets), progress=False)
    out["model"] = time.perf_counter() - t0  # recording and the real runs that choose included
    if base is not None:
        out["previous"] = previous_calibration(recording, budgets, base)[1]
    return out


def refine_measure(name: str, budgets=BUDGETS, evals: int = REFINE_EVALS) -> dict:
    """The default calibration with and without refinement by real runs of the model (``calibrate(flow, inputs,
    sigmas=..., budget=B, refine=evals)``), both scored on the held-out noise: ``{"rows": {method: {budget: (l2,
    median)}}, "refined": {budget: whether refinement changed the schedule}, "seconds": {...}, ...}``."""
    budgets = list(budgets)
    flow, grid, calib, noise, _, flow_args = _problem(name)
    sigmas = grid(STEPS)
    full = meancache.sample(flow, noise, sigmas, Schedule.full(STEPS))
    rows: dict = {}
    seconds = {}
    schedules = {}
    reports = {}
    for label, kwargs in ((DEFAULT_CAL, {}), (f"{DEFAULT_CAL}, refine={evals}", {"refine": evals})):
        report: list = []
        t0 = time.perf_counter()
        found = meancache.calibrate(flow, calib, sigmas=sigmas, budget=budgets, report=report, progress=False,
                                    **kwargs)
        seconds[label] = time.perf_counter() - t0
        schedules[label], reports[label] = dict(zip(budgets, found)), report
        rows[label] = {b: errors(meancache.sample(flow, noise, sigmas, s), full) for b, s in zip(budgets, found)}
    refined_label = f"{DEFAULT_CAL}, refine={evals}"
    return {
        "flow": name, "flow_args": flow_args, "budgets": tuple(budgets), "rows": rows, "seconds": seconds,
        "chosen": {r["budget"]: r["chosen"] for r in reports[refined_label]},
        "refined": {r["budget"]: r.get("refined") for r in reports[refined_label]},
        "schedules": {lab: {b: " ".join(s.pattern()) for b, s in sch.items()} for lab, sch in schedules.items()},
        "code": CODE_STAMP,
    }


#: Relative margin under which two errors count as a tie: the same method reached by two code paths (``tail p1``
#: and TaylorSeer-lite on its own steps on the digits model's linear grid) differs by float32 rounding, either way
#: (1.7e-7 relative at B = 6, 2026-12-04); the margin sits well above that, and a gain under 0.01 % is one no
#: table here shows (four digits) and no user sees.
TIE = 1e-4


def below(mine: float, other: float) -> bool:
    """Whether the error ``mine`` is below ``other`` by more than :data:`TIE` (relative): a tie is not below."""
    return mine < other * (1 - TIE)


def below_all(mine: tuple[float, float], others) -> bool:
    """Whether ``mine`` (rel L2, median) is below each of ``others`` in both (:func:`below`: a tie is not below)."""
    return all(below(mine[0], o[0]) and below(mine[1], o[1]) for o in others)


def _fixed_outputs(flow, grid, noise, budget: int, published: Schedule) -> dict[str, torch.Tensor]:
    """The final latents of the bar's comparators that do not depend on the chosen steps (TaylorSeer-lite on the
    chosen steps does): AB2, TaylorSeer-lite uniform, ``Schedule.default``, the published-only calibration and
    plain reuse, sampled from ``noise``."""
    sigmas = grid(STEPS)
    return {AB2: adams_bashforth2(flow, noise, grid(budget)),
            TS_UNIFORM: taylorseer_lite(flow, noise, sigmas, uniform_steps(budget)),
            "default": meancache.sample(flow, noise, sigmas, Schedule.default(budget, STEPS)),
            PUBLISHED: meancache.sample(flow, noise, sigmas, published),
            "plain reuse": meancache.sample(flow, noise, sigmas, published.with_order(1))}


def candidate_bound(name: str, budgets=BUDGETS) -> dict[int, dict]:
    """How far a better choice could go on one flow: every candidate of the default calibration (``report=``'s
    ``candidates``) sampled from the held-out noise and held to the bar as if it were the one chosen (TaylorSeer-lite
    on *its* compute steps): ``{budget: {"chosen": name, "meets": [names of the candidates that meet the bar]}}``."""
    budgets = list(budgets)
    flow, grid, calib, noise, _, _ = _problem(name)
    sigmas = grid(STEPS)
    recording, _ = _recording(name)
    report: list = []
    meancache.calibrate(flow, calib, sigmas=sigmas, budget=budgets, report=report, progress=False)
    published = meancache.calibrate(recording, budget=budgets, estimators=("meancache",), progress=False)
    full = meancache.sample(flow, noise, sigmas, Schedule.full(STEPS))
    out = {}
    for entry, pub in zip(report, published):
        b = entry["budget"]
        fixed = [errors(o, full) for o in _fixed_outputs(flow, grid, noise, b, pub).values()]
        verdict: dict[Schedule, bool] = {}
        for s in {s for s in entry["candidates"].values() if s is not None}:
            mine = errors(meancache.sample(flow, noise, sigmas, s), full)
            others = [*fixed, errors(taylorseer_lite(flow, noise, sigmas, s.compute_steps), full)]
            verdict[s] = below_all(mine, others)
        out[b] = {"chosen": entry["chosen"],
                  "meets": [n for n, s in entry["candidates"].items() if s is not None and verdict[s]]}
    return out


STABILITY_RESAMPLES = 400


def bar_stability(name: str, budgets=BUDGETS, resamples: int = STABILITY_RESAMPLES) -> dict[int, tuple[bool, float]]:
    """How sure the bar's verdict is on one flow: the default calibration's schedules and every comparator sampled
    from the held-out noise, which is then resampled with replacement ``resamples`` times (seed 0), the bar's test
    remade on each resample (every row's rel L2 and median on the same rows). ``{budget: (verdict on the full
    held-out set, share of resamples in which it meets the bar)}``."""
    budgets = list(budgets)
    flow, grid, calib, noise, _, _ = _problem(name)
    sigmas = grid(STEPS)
    recording, _ = _recording(name)
    chosen = meancache.calibrate(flow, calib, sigmas=sigmas, budget=budgets, progress=False)
    published = meancache.calibrate(recording, budget=budgets, estimators=("meancache",), progress=False)
    full = meancache.sample(flow, noise, sigmas, Schedule.full(STEPS)).double().flatten(1)
    f2 = full.pow(2).sum(1)
    rows = torch.randint(0, len(noise), (resamples, len(noise)), generator=torch.Generator().manual_seed(0))

    def measures(out: torch.Tensor, which=None) -> tuple[torch.Tensor, torch.Tensor]:
        d2 = (out.double().flatten(1) - full).pow(2).sum(1)
        if which is None:
            return (d2.sum() / f2.sum()).sqrt(), (d2 / f2).sqrt().median()
        return (d2[which].sum(-1) / f2[which].sum(-1)).sqrt(), (d2 / f2).sqrt()[which].median(-1).values

    out = {}
    for b, s, pub in zip(budgets, chosen, published):
        others = [*_fixed_outputs(flow, grid, noise, b, pub).values(),
                  taylorseer_lite(flow, noise, sigmas, s.compute_steps)]
        mine = meancache.sample(flow, noise, sigmas, s)
        whole = below_all(tuple(float(v) for v in measures(mine)),
                          [tuple(float(v) for v in measures(o)) for o in others])
        m = measures(mine, rows)
        meets = torch.ones(resamples, dtype=torch.bool)
        for o in others:
            l2, med = measures(o, rows)
            meets &= (m[0] < l2) & (m[1] < med)
        out[b] = (whole, meets.double().mean().item())
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
    budget in bold; below it the default calibration's chosen candidate per budget."""
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
    if result.get("chosen"):
        lines += ["", f"{DEFAULT_CAL} chose: " + ", ".join(f"B={b} {c}" for b, c in result["chosen"].items())]
    if result.get("chosen_fit"):
        lines += ["", f"{FIT_CAL} chose: " + ", ".join(f"B={b} {c}" for b, c in result["chosen_fit"].items())]
    return "\n".join(lines)


def refine_markdown(result: dict) -> str:
    """The ``--refine`` table of one flow: the default calibration without and with refinement, ``rel L2
    (median)`` on the held-out noise, and whether refinement changed each budget's schedule."""
    budgets = result["budgets"]
    lines = [f"**{result['flow']}** ({result['flow_args']})", "",
             "| method | " + " | ".join(f"B={b}" for b in budgets) + " | calibrate wall time |",
             "|---|" + "---|" * (len(budgets) + 1)]
    for method, by_budget in result["rows"].items():
        cells = [f"{by_budget[b][0]:.4f} ({by_budget[b][1]:.4f})" for b in budgets]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {result['seconds'][method]:.1f} s |")
    lines.append("| refinement changed the schedule | " + " | ".join(
        {True: "yes", False: "no", None: "-"}[result["refined"][b]] for b in budgets) + " | |")
    return "\n".join(lines)


def times_markdown(times: list[dict]) -> str:
    """The ``--calibration-time`` table: per flow, record and calibrate wall seconds, new against previous."""
    lines = ["| flow | inputs | record | calibrate(recording), this tree (5 budgets, one call) | calibrate(model), "
             "recording and real runs included | calibrate(recording), previous code | ratio (recording) |",
             "|---|---|---|---|---|---|---|"]
    for t in times:
        prev = t.get("previous")
        lines.append(
            f"| {t['flow']} | {t['inputs']} | {t['record']:.1f} s | {t['default']:.1f} s | {t['model']:.1f} s | "
            + (f"{prev:.1f} s | {t['default'] / prev:.2f}x |" if prev is not None else "not measured | - |")
        )
    return "\n".join(lines)


@pytest.mark.parametrize("flow_name", TEST_PROBLEMS)
def test_quality(benchmark, flow_name, machine_info, capsys):
    # the reduced case (a few problems, one budget, fewer inputs) keeps `make bench` short; the tables come from
    # the script mode
    args = (flow_name, TEST_BUDGETS, TEST_INPUTS.get(flow_name, TEST_INPUTS_DEFAULT),
            TEST_CALIBRATION_INPUTS.get(flow_name, TEST_CALIBRATION_INPUTS_DEFAULT))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: on a shared 2-core machine more threads only oversubscribe it
    try:
        result = benchmark.pedantic(measure, args=args, kwargs={"raw": False}, rounds=1, iterations=1)
    finally:
        torch.set_num_threads(threads)
    for method, by_budget in result["rows"].items():
        # a preset row has only the budgets its table has
        assert set(by_budget) <= set(TEST_BUDGETS) and (method.startswith("preset") or len(by_budget) == 1)
        for l2, med in by_budget.values():
            assert 0.0 <= med and math.isfinite(l2)
    assert all(m in result["rows"] for m in (DEFAULT_CAL, *BAR))
    assert (f"{DEFAULT_CAL} from mixture-shift3" in result["rows"]) == (flow_name == "mixture-heldout")
    assert set(result["chosen"]) == set(TEST_BUDGETS) and set(bar(result)) == set(TEST_BUDGETS)
    assert all(m in result["rows"] for m in (FIT_CAL, *FIT_BAR)) and set(result["chosen_fit"]) == set(TEST_BUDGETS)
    assert set(bar(result, FIT_BAR, FIT_CAL)) == set(TEST_BUDGETS)
    benchmark.extra_info.update(machine_info)
    benchmark.extra_info.update(
        flow=result["flow"],
        flow_args=result["flow_args"],
        errors={m: {str(b): list(v) for b, v in rows.items()} for m, rows in result["rows"].items()},
        schedules={str(b): s for b, s in result["schedules"].items()},
        chosen={str(b): c for b, c in result["chosen"].items()},
        chosen_fit={str(b): c for b, c in result["chosen_fit"].items()},
        full_vs_exact=list(result["full_vs_exact"]),
        seconds=result["seconds"],
        lowest=winners(result),
    )
    with capsys.disabled():
        print("\n" + markdown(result))
        for line in winners(result):
            print("  " + line)


def test_bar_counts_ties_as_lost():
    rows = {DEFAULT_CAL: {8: (0.1, 0.01)}, **{m: {8: (0.2, 0.02)} for m in BAR}}
    assert bar({"budgets": (8,), "rows": rows})[8] == {"met": True, "lost": []}
    rows[AB2] = {8: (0.05, 0.01)}
    lost = bar({"budgets": (8,), "rows": rows})[8]["lost"]
    assert [(m, w) for m, w, *_ in lost] == [("rel L2", AB2), ("median", AB2)]
    assert lost[0][4] == pytest.approx(2.0) and lost[1][4] == pytest.approx(1.0)


def test_a_difference_in_the_eighth_digit_is_a_tie():
    # digits B = 6: `tail p1` and TaylorSeer-lite on its steps, the same method, measured 2026-12-04
    assert below(0.07618773505, 0.07618774788) is False and below(0.0761877, 0.0761877 * (1 + 2 * TIE)) is True
    assert below_all((0.1, 0.01), [(0.1 * (1 + TIE / 2), 0.02)]) is False
    assert below_all((0.1, 0.01), [(0.11, 0.02)]) is True


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


def _header(mode: str) -> str:
    return (f"{mode}: {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
            f"{torch.get_num_threads()} torch thread(s), calibration code {CODE_STAMP}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)  # two measurements can run side by side on a 2-core machine
    argv = sys.argv[1:]
    base = None
    if "--base" in argv:
        i = argv.index("--base")
        base = os.path.abspath(argv[i + 1])
        del argv[i : i + 2]
    if "--gamma" in argv:
        print("| gamma | geo-mean rel L2 | geo-mean median per-sample |\n|---|---|---|")
        for g, (l2, med) in gamma_sweep().items():
            print(f"| {g:g} | {l2:.4f} | {med:.4f} |")
        sys.exit(0)
    if "--defaults" in argv:
        t0 = time.perf_counter()
        sweep = defaults_sweep()
        print(f"{len(sweep['cases'])} cases: {len(DEFAULTS_FLOWS)} flows {list(DEFAULTS_FLOWS)} x shifts "
              f"{list(DEFAULTS_SHIFTS)} x budgets {list(DEFAULTS_BUDGETS)} of {STEPS}; 1024 inputs each\n")
        print(defaults_markdown(sweep))
        best = min(sweep["geo"], key=lambda n: sweep["geo"][n][0])
        print(f"\nlowest geometric-mean rel L2: {best} ({time.perf_counter() - t0:.0f} s)")
        sys.exit(0)
    if "--calibration-time" in argv:
        print(_header("calibration time") + (f", previous code {base}" if base else ""), flush=True)
        times = []
        for flow_name in [a for a in argv if not a.startswith("--")] or PROBLEMS:
            times.append(calibration_times(flow_name, base=base))
            print(f"    {times[-1]}", flush=True)
        print("\n" + times_markdown(times))
        sys.exit(0)
    if "--bound" in argv:
        print(_header("the bound on the choice"), flush=True)
        met = bound = 0
        for flow_name in [a for a in argv if not a.startswith("--")] or PROBLEMS:
            for b, cell in candidate_bound(flow_name).items():
                met += cell["chosen"] in cell["meets"]
                bound += bool(cell["meets"])
                print(f"    {flow_name} B={b}: chose {cell['chosen']}; meeting the bar: {cell['meets']}", flush=True)
        print(f"\nchosen candidate meets the bar in {met} cells; some candidate in {bound}")
        sys.exit(0)
    if "--stability" in argv:
        print(_header(f"how sure the bar's verdicts are ({STABILITY_RESAMPLES} resamples)"), flush=True)
        print("| flow | " + " | ".join(f"B={b}" for b in BUDGETS) + " |\n|---|" + "---|" * len(BUDGETS))
        for flow_name in [a for a in argv if not a.startswith("--")] or PROBLEMS:
            cells = bar_stability(flow_name)
            print(f"| {flow_name} | " + " | ".join(f"{share:.2f}{'' if met else ' (lost)'}"
                                                   for met, share in cells.values()) + " |", flush=True)
        sys.exit(0)
    if "--refine" in argv:
        print(_header(f"refine={REFINE_EVALS}"), flush=True)
        for flow_name in [a for a in argv if not a.startswith("--")] or SHARP:
            res = refine_measure(flow_name)
            print(refine_markdown(res))
            print(f"\n    chosen: {res['chosen']}")
            for label, by_budget in res["schedules"].items():
                for b, s in by_budget.items():
                    print(f"    B={b} {label}: {s}")
            print(flush=True)
        sys.exit(0)
    print(_header("quality") + (f", previous code {base}" if base else ""), flush=True)
    results = []
    for flow_name in argv or PROBLEMS:
        res = measure(flow_name, base=base)
        results.append(res)
        print(markdown(res))
        print()
        for b in res["budgets"]:
            print(f"    B={b} default:   {res['schedules'][b]}")
            print(f"    B={b} published: {res['schedules_published'][b]}")
            if "schedules_previous" in res:
                print(f"    B={b} previous:  {res['schedules_previous'][b]}")
            print(f"    B={b} scores: {res['scores'][b]}")
        print("    seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in res["seconds"].items()))
        for line in winners(res):
            print("    " + line)
        print("    fit=True chose: " + ", ".join(f"B={b} {c}" for b, c in res["chosen_fit"].items()))
        print("\n" + bar_markdown([res]) + "\n", flush=True)
        print(bar_markdown([res], FIT_BAR, FIT_CAL) + "\n", flush=True)
        with open(os.environ.get("BENCH_QUALITY_JSON", os.devnull), "a") as f:
            f.write(json.dumps({k: v for k, v in res.items()}, default=str) + "\n")
    print(bar_markdown(results))
    print()
    print(bar_markdown(results, FIT_BAR, FIT_CAL))
