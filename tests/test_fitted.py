"""Fitted segments: per-step weights on the last computed velocities, fitted to a recording (the schedule format,
every front-end, the fit, and ``calibrate(fit=True)``)."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from fields import rel_err
from test_accelerate import GUIDANCE
from test_accelerate import SIGMAS
from test_accelerate import FlowModel
from test_accelerate import _noise
from test_accelerate import euler_loop
from test_accelerate import guided
from test_accelerate import guided_module_run

import meancache
from meancache import Schedule
from meancache.calibration.fitting import cross_fitted
from meancache.calibration.fitting import fit_schedule
from meancache.calibration.selection import _moves
from meancache.calibration.selection import folds
from meancache.calibration.selection import reuse_labelled
from meancache.calibration.selection import schedule_gain
from meancache.calibration.selection import tail_schedule
from meancache.calibration.selection import uniform_schedule
from meancache.estimators import polynomial_weights
from meancache.examples import tiny_pipelines
from meancache.schedule import StepPlan

N = 50


def _predict_as_fitted(schedule: Schedule, grid) -> Schedule:
    """``schedule`` (predict segments) with each predict segment written as a fitted one whose weights are the
    predict weights on ``grid``: the same estimate, through the fitted path."""
    names, weights = [], []
    steps = schedule.compute_steps
    for j, (a, b, est, order) in enumerate(schedule.segments):
        if est != "predict":
            names.append(est)
            weights.append(None)
            continue
        nodes = [grid[c] for c in steps[max(0, j - order) : j + 1]]
        rows = []
        for i in range(a + 1, b):
            q, w = polynomial_weights("predict", nodes, grid[i], grid[i + 1], order)
            assert q == len(nodes) - 1  # no order lowered on these grids, so every node carries a weight
            rows.append(w)
        names.append("fitted")
        weights.append(rows)
    return Schedule(steps, schedule.orders, schedule.num_steps, names, weights=weights, grid=grid)


def _small_fitted():
    grid = [1.0 - i / 6 for i in range(7)]
    # segments 0->2 (1 node), 2->3 (chain), 3->6 open tail (order 1: 2 nodes)
    return Schedule([0, 2, 3], [1, 0, 1], 6, ["fitted", "meancache", "fitted"],
                    weights=[[(0.9,)], None, [(1.5, -0.5), (2.0, -1.0)]], grid=grid)


# -- the schedule ---------------------------------------------------------------------------------------------------
def test_fitted_schedule_views():
    s = _small_fitted()
    assert s.fitted and s.open_tail and s.labels == ("f1", "K0", "f1")
    assert s.pattern() == ("C.CC..", "-f--ff")
    assert s.depth == 2
    plan = s.expand()
    assert plan[1] == StepPlan(False, 1, "fitted", (0.9,))
    assert plan[5].weights == (2.0, -1.0) and plan[3].weights is None
    assert "weights=" in repr(s) and "grid=" in repr(s)
    assert schedule_gain(s, s.grid) == 3.0  # |2| + |-1|, the largest stored gain


@pytest.mark.parametrize("kwargs,match", [
    (dict(weights=None), "needs weights= and grid="),
    (dict(grid=None), "needs weights= and grid="),
    (dict(grid=[1.0, 0.5, 0.0]), r"grid: must be num_steps \+ 1 = 7"),
    (dict(grid=[1.0, 0.8, 0.6, float("nan"), 0.3, 0.1, 0.0]), "finite"),
    (dict(weights=[[(0.9,)], None]), r"weights: length 2 != 3 segments"),
    (dict(weights=[[(0.9,)], [(1.0,)], [(1.5, -0.5), (2.0, -1.0)]]), r"weights\[1\]: must be None"),
    (dict(weights=[[(0.9,), (0.8,)], None, [(1.5, -0.5), (2.0, -1.0)]]), r"weights\[0\]: 2 rows != 1 skipped"),
    (dict(weights=[[(0.9, 0.1)], None, [(1.5, -0.5), (2.0, -1.0)]]), r"weights\[0\]\[0\]=\[0.9, 0.1\]: must be 1"),
    (dict(weights=[[(0.9,)], None, [(1.5,), (2.0, -1.0)]]), r"weights\[2\]\[0\]=\[1.5\]: must be 2"),
    (dict(weights=[[(math.inf,)], None, [(1.5, -0.5), (2.0, -1.0)]]), "finite numbers"),
    (dict(weights=[[("a",)], None, [(1.5, -0.5), (2.0, -1.0)]]), "finite numbers"),
])
def test_fitted_schedule_refuses_bad_weights(kwargs, match):
    good = dict(weights=[[(0.9,)], None, [(1.5, -0.5), (2.0, -1.0)]], grid=[1.0 - i / 6 for i in range(7)])
    with pytest.raises(ValueError, match=match):
        Schedule([0, 2, 3], [1, 0, 1], 6, ["fitted", "meancache", "fitted"], **{**good, **kwargs})


def test_weights_without_a_fitted_segment_are_refused():
    with pytest.raises(ValueError, match="no segment is 'fitted'"):
        Schedule([0, 2, 3], [1, 0], 4, ["predict", "meancache"], weights=[[(1.0,)], None], grid=[1, 0.6, 0.3, 0])


def test_fitted_json_roundtrip_and_versions():
    s = _small_fitted()
    data = json.loads(s.to_json())
    assert data["version"] == 4 and data["weights"][1] is None and len(data["grid"]) == 7
    back = Schedule.from_json(s.to_json())
    assert back == s and hash(back) == hash(s) and back.to_json() == s.to_json()
    other = Schedule(s.compute_steps, s.orders, 6, s.estimators,
                     weights=[[(0.8,)], None, [(1.5, -0.5), (2.0, -1.0)]], grid=s.grid)
    assert other != s  # the weights are part of the schedule
    for version in (2, 3):
        with pytest.raises(ValueError, match="need version 4"):
            Schedule.from_dict({**data, "version": version})
        bare = {k: v for k, v in data.items() if k not in ("weights", "grid")}
        with pytest.raises(ValueError, match="fitted segments need version 4"):
            Schedule.from_dict({**bare, "version": version})


def test_unfitted_resample_and_other_grids(caplog):
    from meancache.schedule import _WARNED

    _WARNED.clear()  # the warnings are once per process: start from none
    s = _small_fitted()
    plain = s.unfitted()
    assert plain.estimators == ("predict", "meancache", "predict") and not plain.fitted
    assert plain.compute_steps == s.compute_steps and plain.orders == s.orders
    with caplog.at_level(logging.WARNING, logger="meancache"):
        assert s.resample(12) == plain.resample(12)  # the weights belong to the 6-step grid
    assert "resampled to 12 steps uses predict" in caplog.text
    caplog.clear()
    assert s.for_grid(list(s.grid)) is s
    moved = [g * 0.99 if 0 < g < 1 else g for g in s.grid]
    with caplog.at_level(logging.WARNING, logger="meancache"):
        assert s.for_grid(moved) == plain
        assert s.for_grid(moved) == plain
    assert caplog.text.count("fitted on another sigma grid") == 1  # once per schedule and grid


def test_fitted_schedules_are_not_moved_and_keep_their_first_segment():
    s = _small_fitted()
    assert list(_moves(s)) == []
    assert reuse_labelled(s) is s  # a fitted first segment scales v_0: not plain reuse


# -- the front-ends -------------------------------------------------------------------------------------------------
def _flow():
    return meancache.flows.GaussianMixtureFlow(dim=6, components=3, seed=4)


def test_sample_applies_the_stored_weights_to_the_right_nodes():
    """An independent loop: computed steps call the flow, skipped steps combine the kept velocities with the
    stored weights (oldest first)."""
    flow = _flow()
    grid = meancache.flows.shifted_sigmas(12, 2.0).tolist()
    g = torch.Generator().manual_seed(0)
    base = tail_schedule(4, 12, "predict", 2)
    weights = [None if e != "predict" else
               [tuple(torch.randn(min(k, j) + 1, generator=g, dtype=torch.float64).tolist()) for _ in range(b - a - 1)]
               for j, (a, b, e, k) in enumerate(base.segments)]
    names = ["fitted" if w is not None else e for w, e in zip(weights, base.estimators)]
    s = Schedule(base.compute_steps, base.orders, 12, names, weights=weights, grid=grid)
    x0 = torch.randn(5, 6, dtype=torch.float64, generator=g)
    out = meancache.sample(flow, x0, grid, s)
    x, kept = x0, []
    for i, p in enumerate(s.expand()):
        if p.computed:
            v = flow(x, grid[i])
            kept.append(v)
        else:
            v = sum(w * node for w, node in zip(p.weights, kept[-len(p.weights):]))
        x = x + (grid[i + 1] - grid[i]) * v
    assert rel_err(out, x) <= 1e-12


def test_predict_weights_through_the_fitted_path_equal_predict():
    flow = _flow()
    grid = meancache.flows.shifted_sigmas(N, 3.0).tolist()
    base = uniform_schedule(10, N, "predict", 2)
    x0 = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert rel_err(meancache.sample(flow, x0, grid, _predict_as_fitted(base, grid)),
                   meancache.sample(flow, x0, grid, base)) <= 1e-12


def test_a_module_runs_fitted_weights_on_every_guidance_branch():
    base = tail_schedule(9, N, "predict", 1)
    fitted = _predict_as_fitted(base, SIGMAS)
    scaled = Schedule(fitted.compute_steps, fitted.orders, N, fitted.estimators, grid=SIGMAS,
                      weights=[None if w is None else [tuple(0.9 * x for x in r) for r in w] for w in fitted.weights])
    for schedule in (fitted, scaled):
        out, expected = guided_module_run(schedule, 7)
        assert rel_err(out, expected) <= 1e-12
    plain = meancache.sample(guided(FlowModel()), _noise(7), SIGMAS, base)
    assert rel_err(expected, plain) > 1e-6  # the scaled weights were used, not predict's


def test_a_module_on_another_grid_uses_predict(caplog):
    base = tail_schedule(9, N, "predict", 1)
    fitted = _predict_as_fitted(base, meancache.flows.shifted_sigmas(N, 1.0).tolist())  # not SIGMAS' shift 3
    model = FlowModel()
    x0 = _noise(8)
    expected = meancache.sample(guided(model), x0, SIGMAS, base)
    meancache.accelerate(model, fitted, sigmas=SIGMAS)
    with caplog.at_level(logging.WARNING, logger="meancache"):
        out = euler_loop(model, x0, guidance=GUIDANCE)
    assert rel_err(out, expected) <= 1e-12
    assert "fitted on another sigma grid" in caplog.text


@pytest.mark.parametrize("name", ["flux", "qwen-image"])
def test_a_pipeline_runs_fitted_weights(name):
    """Inside a diffusers pipeline: predict weights through the fitted path give predict's latents; scaled
    weights change them."""
    pipe, kw, info = tiny_pipelines.build(name)
    rec = meancache.record(pipe, [tiny_pipelines.fresh_kwargs(kw)], progress=False)
    n = rec.num_steps
    base = tail_schedule(3, n, "predict", 1)
    fitted = _predict_as_fitted(base, rec.sigmas)
    outs = {}
    for label, schedule in (("predict", base), ("fitted", fitted), ("refit", fit_schedule(rec, base))):
        pipe, kw, info = tiny_pipelines.build(name)
        meancache.accelerate(pipe, schedule=schedule)
        outs[label] = getattr(pipe(**kw), info["output_attr"])
        assert meancache.summary(pipe).computed_steps == 3
    assert rel_err(outs["fitted"], outs["predict"]) <= 1e-5
    assert rel_err(outs["refit"], outs["predict"]) > 1e-6


# -- the fit --------------------------------------------------------------------------------------------------------
def test_fit_recovers_the_line_on_a_velocity_linear_in_sigma():
    """v = a + b * sigma per input: the predict line is exact, so the least-squares weights are its weights."""
    a, b = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    grid = meancache.flows.shifted_sigmas(16, 2.0)
    rec = meancache.record(lambda x, s: a + b * s, torch.zeros(8, 5, dtype=torch.float64), grid, progress=False)
    base = tail_schedule(5, 16, "predict", 1)
    fit = fit_schedule(rec, base)
    expected = _predict_as_fitted(base, rec.sigmas)
    checked = 0
    for got, want in zip(fit.weights, expected.weights):
        if want is None or len(want[0]) == 1:  # the first segment has one node: no line through it
            continue
        for r1, r2 in zip(got, want):
            assert max(abs(x - y) for x, y in zip(r1, r2)) <= 1e-4  # float32 recording
            checked += 1
    assert checked == 16 - 5 - 2  # every skipped step after the first segment (steps 1 and 2)


def test_fit_is_the_least_squares_optimum_per_step():
    """On a curved flow, each fitted step's teacher-forced squared error is at most predict's (the fit minimises
    it; the ridge costs at most a relative 1e-3)."""
    flow = _flow()
    grid = meancache.flows.shifted_sigmas(20, 3.0)
    rec = meancache.record(flow, torch.randn(16, 6, generator=torch.Generator().manual_seed(3)), grid,
                           progress=False)
    base = tail_schedule(5, 20, "predict", 2)
    fit, plain = fit_schedule(rec, base), _predict_as_fitted(base, rec.sigmas)
    v = rec.velocities.double()
    steps = base.compute_steps
    better = 0
    for i, (pf, pp) in enumerate(zip(fit.expand(), plain.expand())):
        if pf.computed:
            continue
        j = max(k for k, c in enumerate(steps) if c < i)
        nodes = steps[j + 1 - len(pf.weights) : j + 1]

        def err(w):
            return float(((sum(x * v[:, c] for x, c in zip(w, nodes)) - v[:, i]) ** 2).sum())

        assert err(pf.weights) <= err(pp.weights) * (1 + 1e-3)
        better += err(pf.weights) < 0.9 * err(pp.weights)
    assert better > 0  # the flow curves: somewhere the fit is clearly better than the line


def test_fit_checks_its_arguments():
    rec = meancache.record(_flow(), torch.randn(4, 6), meancache.flows.shifted_sigmas(10, 1.0), progress=False)
    with pytest.raises(ValueError, match=r"schedule.num_steps=12 != the recording's 10"):
        fit_schedule(rec, tail_schedule(3, 12, "predict", 1))
    with pytest.raises(ValueError, match=r"inputs=\[4\]"):
        fit_schedule(rec, tail_schedule(3, 10, "predict", 1), [4])
    with pytest.raises(ValueError, match="ridge=-1"):
        fit_schedule(rec, tail_schedule(3, 10, "predict", 1), ridge=-1)
    published = Schedule([0, 4, 9], [2, 2], 10)
    assert fit_schedule(rec, published) is published  # nothing to fit


def test_cross_fitting_leaves_each_fold_out():
    rec = meancache.record(_flow(), torch.randn(6, 6, generator=torch.Generator().manual_seed(5)),
                           meancache.flows.shifted_sigmas(10, 1.0), progress=False)
    base = tail_schedule(3, 10, "predict", 1)
    pairs = cross_fitted(rec, base, folds(6))
    assert [val for _, val in pairs] == [[1, 3, 5], [0, 2, 4]]
    assert pairs[0][0] == fit_schedule(rec, base, [0, 2, 4]) and pairs[0][0] != fit_schedule(rec, base)


# -- calibrate(fit=True) --------------------------------------------------------------------------------------------
def _scaled(x, sigma):
    """``v = c(sigma) x`` with a non-polynomial ``c``: on any run every latent is its input's noise times one scalar
    per step, so a skipped step's exact velocity is the newest computed one scaled (one fitted weight), which no
    line through two velocities gives."""
    return 2.0 * math.sin(6.0 * sigma) * x


def test_calibrate_with_fit_finds_the_exact_weights():
    grid = meancache.flows.shifted_sigmas(N, 1.0)
    x0 = torch.randn(16, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    report: list = []
    fitted = meancache.calibrate(_scaled, x0, sigmas=grid, budget=6, fit=True, report=report, progress=False)
    plain = meancache.calibrate(_scaled, x0, sigmas=grid, budget=6, progress=False)
    assert "fitted" in fitted.estimators and not plain.fitted
    assert report[0]["chosen"] in ("tail f1", "uniform f1") and set(report[0]["fitted"]) == {"tail f1", "uniform f1"}
    entry = report[0]["fitted"][report[0]["chosen"]]
    assert entry["mean"] < entry["leader_mean"] and entry["rms"] < entry["leader_rms"]
    # the leader's errors are those its runs scored: the mean is the least score of the other candidates
    others = [v for k, v in report[0]["scores"].items() if k not in report[0]["fitted"] and v is not None]
    assert entry["leader_mean"] == pytest.approx(min(others), rel=1e-12)
    # one call per input (a list): losing candidates stop early, and the leader's complete runs are reused
    listed: list = []
    per_input = meancache.calibrate(_scaled, list(x0.split(1)), sigmas=grid, budget=6, fit=True, report=listed,
                                    progress=False)
    assert per_input.fitted and listed[0]["chosen"] in listed[0]["fitted"]
    lead = listed[0]["fitted"][listed[0]["chosen"]]
    complete = [v for k, v in listed[0]["scores"].items() if k not in listed[0]["fitted"] and v is not None]
    assert lead["leader_mean"] == pytest.approx(min(complete), rel=1e-12)
    held_out = torch.randn(64, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    full = meancache.sample(_scaled, held_out, grid, Schedule.full(N))
    ours = rel_err(meancache.sample(_scaled, held_out, grid, fitted), full)
    theirs = rel_err(meancache.sample(_scaled, held_out, grid, plain), full)
    assert ours <= 1e-3 and theirs > 10 * ours
    # from the recording alone (the replay folds) the fitted weights win too
    rec = meancache.record(_scaled, x0, grid, progress=False)
    again = meancache.calibrate(rec, budget=6, fit=True, progress=False)
    assert again.fitted and rel_err(meancache.sample(_scaled, held_out, grid, again), full) <= 1e-3
    replay: list = []
    assert meancache.calibrate(rec, budget=6, fit=True, report=replay, progress=False) == again
    chosen = replay[0]["chosen"]
    assert replay[0]["measure"] == "replay" and chosen in replay[0]["fitted"] and replay[0]["candidates"][chosen] == again


def test_fit_needs_the_predict_family_and_a_bool():
    grid = meancache.flows.shifted_sigmas(20, 1.0)
    rec = meancache.record(_flow(), torch.randn(8, 6), grid, progress=False)
    report: list = []
    published = meancache.calibrate(rec, budget=6, fit=True, estimators=("meancache",), report=report, progress=False)
    assert not published.fitted and "fitted" not in report[0]
    with pytest.raises(ValueError, match="fit='yes': must be True or False"):
        meancache.calibrate(rec, budget=6, fit="yes")


def test_cli_fit_writes_a_fitted_schedule_and_its_plot(tmp_path, capsys):
    from meancache import cli

    grid = meancache.flows.shifted_sigmas(N, 1.0)
    rec = meancache.record(_scaled, torch.randn(16, 4, generator=torch.Generator().manual_seed(6)), grid,
                           progress=False)
    rec.save(tmp_path / "rec.pt")
    args = ["calibrate", "--recording", str(tmp_path / "rec.pt"), "--budget", "6", "--quiet"]
    assert cli.main([*args, "--fit", "--out", str(tmp_path / "fit")]) == 0
    line = json.loads(capsys.readouterr().out)
    schedule = Schedule.load(line["json"])
    assert schedule == meancache.calibrate(rec, budget=6, fit=True, progress=False) and schedule.fitted
    png = (tmp_path / "fit" / "schedule-B6.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert not Schedule.load(json.loads(capsys.readouterr().out)["json"]).fitted


def test_a_fitted_segment_is_priced_as_its_polynomial_is():
    """schedule_costs (the plots' and the searches' price): predict weights through the fitted path cost what the
    predict segments cost, and other weights cost something else."""
    from meancache.calibration.joint import schedule_costs

    grid = meancache.flows.shifted_sigmas(20, 3.0)
    rec = meancache.record(_flow(), torch.randn(6, 6, generator=torch.Generator().manual_seed(9)), grid,
                           progress=False)
    base = tail_schedule(6, 20, "predict", 2)
    same = _predict_as_fitted(base, rec.sigmas)
    want, got = schedule_costs(rec, base), schedule_costs(rec, same)
    assert len(got) == len(want) and max(abs(x - y) for x, y in zip(got, want)) <= 1e-9 * max(want)
    assert schedule_costs(rec, fit_schedule(rec, base)) != want
