"""The corrector: at a compute step that ends a node-estimator segment, the segment's skipped velocities are
re-estimated by interpolation through the new velocity and the difference is added to the latent (no extra model
evaluation). Held to an independent loop, through every front-end and grad mode, in files and in the calibration."""

from __future__ import annotations

import math

import pytest
import torch
from fields import rel_err
from test_accelerate import SIGMAS
from test_accelerate import FlowModel
from test_accelerate import _noise
from test_accelerate import guided
from test_accelerate import guided_module_run

import meancache
from meancache import Schedule
from meancache.calibration.selection import CORRECTED
from meancache.calibration.selection import EARLY
from meancache.calibration.selection import EARLY_CANDIDATES
from meancache.calibration.selection import EARLY_POWER
from meancache.calibration.selection import _moves
from meancache.calibration.selection import early_schedule
from meancache.calibration.selection import reuse_labelled
from meancache.calibration.selection import safe_candidates
from meancache.calibration.selection import tail_schedule
from meancache.calibration.selection import uniform_schedule
from meancache.estimators import correction_weights
from meancache.examples import tiny_pipelines

N = 50


def _lagrange(points, s):
    """Lagrange basis values at ``s`` of the nodes ``points`` (independent of the library's helpers)."""
    out = []
    for j, pj in enumerate(points):
        value = 1.0
        for m, pm in enumerate(points):
            if m != j:
                value *= (s - pm) / (pj - pm)
        out.append(value)
    return out


def independent_run(velocity, x, sigmas, compute_steps, order, corrector):
    """Euler on the grid; computed steps call ``velocity``; skipped steps take the degree-min(order, known - 1)
    polynomial through the last computed velocities at the step's start (``predict``); at a computed step after
    skipped steps, with ``corrector`` c > 0, the latent gains ``sum dt_i (P(sigma_i) - v_hat_i)``, ``P`` through
    the last c earlier computed velocities and the new one."""
    s = [float(v) for v in sigmas]
    nodes, pending = [], []
    for i in range(len(s) - 1):
        if i in compute_steps:
            v = velocity(x, s[i])
            if corrector and pending:
                points = (nodes + [(s[i], v)])[-(corrector + 1):]
                for sigma, dt, estimate in pending:
                    w = _lagrange([p for p, _ in points], sigma)
                    x = x + dt * (sum(wj * vj for wj, (_, vj) in zip(w, points)) - estimate)
            nodes, pending = nodes + [(s[i], v)], []
        else:
            used = nodes[-min(order, len(nodes) - 1) - 1:]
            w = _lagrange([p for p, _ in used], s[i])
            v = sum(wj * vj for wj, (_, vj) in zip(w, used))
            pending.append((s[i], s[i + 1] - s[i], v))
        x = x + (s[i + 1] - s[i]) * v
    return x


def _flow():
    return meancache.flows.GaussianMixtureFlow(dim=6, components=3, seed=4)


# -- the weights ----------------------------------------------------------------------------------------------------
def test_correction_weights_by_hand():
    # one skipped step at 0.5 that reused v(1.0) over dt = -0.5; the line through v(1.0) and v(0.0) gives their
    # mean there: delta = -0.5 * ((v1 + v0) / 2 - v1) = 0.25 v1 - 0.25 v0
    assert correction_weights([1.0], 0.0, [(0.5, -0.5, (1.0,))], 1) == ((0.25,), -0.25)
    # order 2 with one earlier node falls back to the line
    assert correction_weights([1.0], 0.0, [(0.5, -0.5, (1.0,))], 2) == ((0.25,), -0.25)


def test_correction_weights_vanish_where_the_prediction_is_already_the_interpolant():
    """Velocities on a line in sigma: predict p = 1 through two nodes is exact, so the line through the segment's
    ends agrees with it and the correction is zero for any velocities on that line."""
    nodes, new = [1.0, 0.8], 0.2
    skipped = []
    for sigma, nxt in ((0.6, 0.4), (0.4, 0.2)):
        w = _lagrange(nodes, sigma)
        skipped.append((sigma, nxt - sigma, tuple(w)))
    old, a_new = correction_weights(nodes, new, skipped, 1)
    line = lambda s: 3.0 - 2.0 * s  # noqa: E731
    total = sum(a * line(s) for a, s in zip(old, nodes[-len(old):])) + a_new * line(new)
    assert abs(total) <= 1e-12


@pytest.mark.parametrize("args, match", [
    (([1.0], 0.0, [], 0), "corrector order"),
    (([1.0], 0.0, [], 3), "corrector order"),
    (([1.0], 0.0, [], True), "corrector order"),
    (([], 0.0, [], 1), "nodes=\\[\\]"),
    (([1.0], 0.0, [(0.5, -0.5, (0.5, 0.5))], 1), "weights on 2 nodes"),
])
def test_correction_weights_check_their_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        correction_weights(*args)


# -- the schedule ---------------------------------------------------------------------------------------------------
def test_schedule_corrector_views_json_and_versions():
    s = Schedule([0, 3, 6], [1, 1, 1], 9, ["predict"] * 3, corrector=2)
    assert s.corrector == 2 and "corrector=2" in repr(s)
    data = s.to_dict()
    assert data["version"] == 5 and data["corrector"] == 2
    assert Schedule.from_json(s.to_json()) == s
    assert s != Schedule([0, 3, 6], [1, 1, 1], 9, ["predict"] * 3)
    assert Schedule([0, 3, 6], [1, 1, 1], 9, ["predict"] * 3).to_dict()["version"] == 3
    old = dict(data, version=4)
    with pytest.raises(ValueError, match="corrector in a version 4 schedule"):
        Schedule.from_dict(old)
    missing = {k: v for k, v in data.items() if k != "corrector"}
    with pytest.raises(ValueError, match="version 5 schedule must give its corrector"):
        Schedule.from_dict(missing)
    with pytest.raises(ValueError, match="corrector=True"):
        Schedule.from_dict(dict(data, corrector=True))


@pytest.mark.parametrize("value", [-1, 3, 1.0, True, "1", None])
def test_schedule_refuses_a_bad_corrector(value):
    with pytest.raises(ValueError, match="corrector="):
        Schedule([0, 3, 6], [1, 1, 1], 9, ["predict"] * 3, corrector=value)


def test_schedule_refuses_a_corrector_with_nothing_to_correct():
    with pytest.raises(ValueError, match="corrects extrapolate, predict and fitted segments only"):
        Schedule([0, 3, 8], [2, 2], 9, corrector=1)


def test_resample_unfitted_moves_and_labels_keep_the_corrector():
    s = uniform_schedule(10, N, "predict", 1, corrector=1)
    assert s.resample(30).corrector == 1
    assert s.resample(5).corrector == 0  # budget >= N: every step computed
    assert s.unfitted() is s
    assert all(m.corrector == 1 for m in _moves(s))
    t = tail_schedule(6, N, "predict", 1, corrector=2)
    assert reuse_labelled(t) == t  # the corrected first segment is not relabelled plain reuse
    assert reuse_labelled(tail_schedule(6, N, "predict", 1)).labels[0] == "K1"


def test_safe_candidates_include_the_corrected_ones():
    found = dict(safe_candidates(10, N))
    for name, c in CORRECTED:
        assert found[name].corrector == c
        assert found[name].compute_steps == found[name.rsplit(" ", 1)[0]].compute_steps
    assert "tail p1 c1" not in dict(safe_candidates(N, N))


def test_early_schedule_places_steps_denser_at_the_start():
    for n, b in [(50, 6), (50, 10), (30, 8), (50, 17), (12, 4)]:
        s = early_schedule(b, n, corrector=2)
        steps = s.compute_steps
        assert steps[0] == 0 and steps[-1] == n - 1 and s.budget == b and not s.open_tail
        assert all(abs(st - (n - 1) * (j / (b - 1)) ** EARLY_POWER) <= 1.0 for j, st in enumerate(steps))
        gaps = [e - a for a, e in zip(steps, steps[1:])]
        assert gaps[0] < gaps[-1] and all(g2 >= g1 - 1 for g1, g2 in zip(gaps, gaps[1:]))  # growing, up to rounding
        assert s.corrector == 2 and all(lab == ("p1" if e - a > 1 else "K0") for (a, e, _, _), lab in
                                        zip(s.segments, s.labels))
    # power 1 is evenly spread: within a step of uniform_schedule's rounding
    for b in (3, 6, 10, 17):
        assert all(abs(a - u) <= 1 for a, u in zip(early_schedule(b, 50, power=1.0).compute_steps,
                                                   uniform_schedule(b, 50).compute_steps))
    assert early_schedule(50, 50, corrector=2).corrector == 0  # every step computed: nothing to correct
    for bad, match in [(dict(power=True), r"power=True: must be a number in 1..4"),
                       (dict(power=0.9), r"power=0.9: must be a number in 1..4"),
                       (dict(power="1.2"), r"power='1.2': must be a number in 1..4"),
                       (dict(budget=1), r"budget=1: must be an int in 2..num_steps=50")]:
        with pytest.raises(ValueError, match=match):
            early_schedule(**{"budget": 6, "num_steps": 50, **bad})
    for name, order in EARLY_CANDIDATES:
        assert dict(safe_candidates(10, N))[name] == early_schedule(10, N, "predict", order, corrector=2)
        assert name not in dict(safe_candidates(N, N))
    assert early_schedule(10, N, "predict", 2).labels[2:4] == ("p2", "p2")


# -- the engine and its front-ends ----------------------------------------------------------------------------------
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("corrector", [1, 2])
@pytest.mark.parametrize("kind", ["uniform", "tail"])
def test_sample_equals_an_independent_loop(order, corrector, kind):
    flow = _flow()
    grid = meancache.flows.shifted_sigmas(N, 3.0).tolist()
    make = uniform_schedule if kind == "uniform" else tail_schedule
    s = make(8, N, "predict", order, corrector=corrector)
    x0 = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(order + 3 * corrector))
    expected = independent_run(flow, x0, grid, set(s.compute_steps), order, corrector)
    out = meancache.sample(flow, x0, grid, s)
    assert rel_err(out, expected) <= 1e-12
    plain = meancache.sample(flow, x0, grid, make(8, N, "predict", order))
    assert rel_err(out, plain) > 1e-4  # the correction did something


def test_meancache_segments_and_the_open_tail_are_not_corrected():
    """Only node-estimator segments that a computed step ends are corrected: here none is."""
    flow = _flow()
    grid = meancache.flows.shifted_sigmas(12, 2.0).tolist()
    x0 = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    names = ["meancache", "meancache", "predict"]
    with_c = Schedule([0, 3, 6], [2, 2, 1], 12, names, corrector=1)
    assert torch.equal(meancache.sample(flow, x0, grid, with_c),
                       meancache.sample(flow, x0, grid, Schedule([0, 3, 6], [2, 2, 1], 12, names)))


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_every_grad_mode_gives_the_same_corrected_run(mode):
    flow = _flow()
    grid = meancache.flows.shifted_sigmas(N, 3.0).tolist()
    s = uniform_schedule(8, N, "predict", 1, corrector=2)
    x0 = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    expected = independent_run(flow, x0, grid, set(s.compute_steps), 1, 2)
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with context():
        out = meancache.sample(flow, x0, grid, s)
    assert rel_err(out.detach(), expected) <= 1e-12


@pytest.mark.parametrize("corrector", [1, 2])
def test_a_module_corrects_every_guidance_branch(corrector):
    out, expected = guided_module_run(tail_schedule(9, N, "predict", 1, corrector=corrector), 7)
    assert rel_err(out, expected) <= 1e-6
    plain = meancache.sample(guided(FlowModel()), _noise(7), SIGMAS, tail_schedule(9, N, "predict", 1))
    assert rel_err(expected, plain) > 1e-6


@pytest.mark.parametrize("name", ["flux", "qwen-image"])
def test_a_pipeline_runs_the_corrector(name):
    """Inside a diffusers pipeline the correction rides on the velocity the scheduler steps with: with the same
    three transformer evaluations, the final latents move away from the uncorrected run's. (The correction's
    arithmetic is held to an independent loop by the ``sample`` and module tests above; this one checks that the
    scheduler path applies it.)"""
    pipe, kw, info = tiny_pipelines.build(name)
    rec = meancache.record(pipe, [tiny_pipelines.fresh_kwargs(kw)], progress=False)
    n = rec.num_steps
    outs = {}
    for c in (0, 1):
        schedule = tail_schedule(3, n, "predict", 1, corrector=c)
        pipe, kw, info = tiny_pipelines.build(name)
        meancache.accelerate(pipe, schedule=schedule)
        outs[c] = getattr(pipe(**kw), info["output_attr"])
        assert meancache.summary(pipe).computed_steps == 3
    assert rel_err(outs[1], outs[0]) > 1e-6


# -- the calibration ------------------------------------------------------------------------------------------------
def _bending(x, sigma):
    """A velocity that oscillates in sigma (about two periods over the run): with 8 evaluations, interpolating
    between computed velocities is far closer than extrapolating past them (measured: the best corrected
    candidate's score is 0.31x the best other's; the test asks for 0.5x)."""
    return math.sin(12.0 * float(sigma)) * (1.0 + 0.1 * x)


def _steep_start(x, sigma):
    """A velocity whose change is steepest at sigma = 1 (``sqrt(1 - sigma)``): evenly spread compute steps miss the
    start; ``early p1 c2``'s denser first steps and corrector follow it (measured at B = 10 of 30: its score is
    0.065x the best score of the candidates that are not early ones; the test asks for 0.2x)."""
    return math.sqrt(max(0.0, 1.0 - float(sigma))) * (1.0 + 0.1 * x)


def _log_rise(x, sigma):
    """``log(2.05 - sigma)``: smooth, with a curvature that the parabola of ``early p2 c2`` follows better than the
    line of ``early p1 c2`` (measured at B = 8 of 30: its score is 0.092x the best other candidate's, ``early p1 c2``
    included; the test asks for 0.2x)."""
    return math.log(2.05 - float(sigma)) * (1.0 + 0.1 * x)


@pytest.mark.parametrize("name, velocity, budget, rivals", [
    (EARLY, _steep_start, 10, "not early"),
    ("early p2 c2", _log_rise, 8, "all"),
])
def test_calibrate_chooses_an_early_candidate_where_it_is_the_right_answer(name, velocity, budget, rivals):
    early = dict(EARLY_CANDIDATES)
    grid = meancache.flows.shifted_sigmas(30, 1.0)
    cal = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    report = []
    chosen = meancache.calibrate(velocity, cal, sigmas=grid, budget=budget, report=report, progress=False)
    scores = {k: v for k, v in report[0]["scores"].items() if v is not None}
    others = min(v for k, v in scores.items() if k != name and (rivals == "all" or k not in early))
    assert scores[name] <= min(scores.values()) and scores[name] < 0.2 * others  # the right answer here ...
    assert scores[report[0]["chosen"]] <= scores[name] * (1 + 1e-9)  # ... and the calibration never loses to it
    held = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    full = meancache.sample(velocity, held, grid, Schedule.full(30))
    best_other = min(rel_err(meancache.sample(velocity, held, grid, s), full)
                     for n, s in safe_candidates(budget, 30) if n not in early)
    assert rel_err(meancache.sample(velocity, held, grid, chosen), full) < best_other


def test_calibrate_chooses_a_corrected_candidate_where_it_is_the_right_answer():
    grid = meancache.flows.shifted_sigmas(N, 1.0)
    cal = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    report = []
    chosen = meancache.calibrate(_bending, cal, sigmas=grid, budget=8, report=report, progress=False)
    scores = {k: v for k, v in report[0]["scores"].items() if v is not None}
    corrected = min(scores[name] for name, _ in CORRECTED)
    others = min(v for k, v in scores.items() if k not in dict(CORRECTED))
    assert corrected < 0.5 * others  # the corrector is the right answer here ...
    assert scores[report[0]["chosen"]] <= corrected * (1 + 1e-9)  # ... and the calibration never loses to it
    assert chosen.corrector > 0
    held = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    full = meancache.sample(_bending, held, grid, Schedule.full(N))
    best_plain = min(rel_err(meancache.sample(_bending, held, grid, s), full)
                     for name, s in safe_candidates(8, N) if name not in dict(CORRECTED))
    assert rel_err(meancache.sample(_bending, held, grid, chosen), full) < best_plain
