"""Issue 19: schedules chosen on inputs the search did not see, safe candidates always in the running, gain caps,
refinement that never makes validation worse, and every budget 2..N with the defaults."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import meancache
from meancache import Schedule
from meancache.calibrate import AUTO_REFINE
from meancache.calibrate import DRAW_ELEMENTS
from meancache.calibrate import DRAW_ROWS
from meancache.calibrate import GAIN_CAPS
from meancache.calibrate import REFINE_ROWS
from meancache.calibrate import SEARCH_CORRECTORS
from meancache.calibrate import auto_max_len
from meancache.calibration import COST_RTOL
from meancache.calibration import joint_costs
from meancache.calibration import joint_solve
from meancache.calibration.runs import validation_draws
from meancache.calibration.selection import corrected
from meancache.calibration.selection import folds
from meancache.calibration.selection import input_errors
from meancache.calibration.selection import refine
from meancache.calibration.selection import run_score
from meancache.calibration.selection import safe_candidates
from meancache.calibration.selection import schedule_gain
from meancache.calibration.selection import subset
from meancache.calibration.selection import tail_score
from meancache.calibration.selection import tail_schedule
from meancache.calibration.selection import uniform_schedule
from meancache.calibration.selection import validation_split
from meancache.flows import GaussianMixtureFlow
from meancache.flows import shifted_sigmas


def _recording(seed=3, steps=20, inputs=8, dim=8, scale=None, spread=3.0):
    flow = GaussianMixtureFlow(dim=dim, components=5, seed=seed, spread=spread, scale=scale)
    x = torch.randn(inputs, dim, generator=torch.Generator().manual_seed(100 + seed))
    return flow, x, shifted_sigmas(steps, 3.0), meancache.record(flow, x, shifted_sigmas(steps, 3.0), progress=False)


def test_the_split_and_the_folds_are_fixed_lists():
    """Deterministic: the same number of inputs gives the same split on every machine (no random draw)."""
    assert validation_split(8) == ([0, 1, 2, 4, 5, 6], [3, 7])
    assert validation_split(3) == ([0, 1], [2])
    assert folds(6) == [([0, 2, 4], [1, 3, 5]), ([1, 3, 5], [0, 2, 4])]
    assert folds(1) == [([0], [0])]
    for p in range(1, 40):
        search, held = validation_split(p)
        assert held and search and (p == 1 or not set(search) & set(held))
        covered = sorted(i for _, val in folds(p) for i in val)
        assert covered == list(range(p))  # every input validates once


def test_the_same_recording_gives_the_same_schedules_within_the_tie_rule():
    _, _, _, rec = _recording(seed=4)
    first, again = [], []
    a = meancache.calibrate(rec, budget=[5, 8], report=first)
    b = meancache.calibrate(rec, budget=[5, 8], report=again)
    assert a == b and [r["chosen"] for r in first] == [r["chosen"] for r in again]
    # another machine rounds differently: latents moved by ~1e-7 relative. Compare the score of what it picks,
    # never the pick itself among near-ties
    nudged = meancache.Recording(rec.sigmas, rec.latents * (1 + 1e-7), rec.velocities, rec.meta)
    other = []
    meancache.calibrate(nudged, budget=[5, 8], report=other)
    for mine, theirs in zip(first, other):
        assert theirs["scores"][theirs["chosen"]] == pytest.approx(mine["scores"][mine["chosen"]], rel=1e-3)


@pytest.mark.parametrize("seed, scale", [(3, None), (5, 0.4), (7, 0.45)])
def test_the_choice_is_never_worse_than_any_candidate_on_validation(seed, scale):
    """The chosen candidate's out-of-fold score is the least (within COST_RTOL) of every candidate in the running,
    the safe schedules and the published search included."""
    _, _, _, rec = _recording(seed=seed, scale=scale, spread=2.5, steps=30)
    report = []
    meancache.calibrate(rec, budget=[4, 6, 10], report=report)  # B = 4: Schedule.default's segments exceed 8
    for entry in report:
        scores = {k: v for k, v in entry["scores"].items() if v is not None}
        assert {"default", "uniform p1", "tail e1", "published"} <= set(scores)  # always in the running
        least = min(scores.values())
        assert scores[entry["chosen"]] <= least * (1 + COST_RTOL), entry
        # the safe candidates are scored on every input, by the same replay
        for name, sched in safe_candidates(entry["budget"], rec.num_steps):
            assert scores[name] == pytest.approx(tail_score(input_errors(rec, sched)), rel=1e-12)


def test_a_flow_where_the_safe_prediction_is_exact_is_calibrated_exactly():
    """v = alpha + beta * sigma: ``predict`` p = 1 reproduces the Euler reference once two velocities are known,
    while extrapolate (the step's mean) and the published estimator (a damped trend) do not. Schedule.default
    computes steps 0 and 1 at these budgets, so it is exact; the calibration must find an exact schedule."""
    alpha = torch.tensor([0.5, -1.0, 0.25, 2.0])
    beta = torch.tensor([2.0, 1.0, -3.0, 0.5])
    sigmas = torch.linspace(1, 0, 17)  # dyadic: the float32 run is exact
    rec = meancache.record(lambda x, s: alpha + beta * s + 0 * x, torch.zeros(4, 4), sigmas, progress=False)
    report = []
    for sched in meancache.calibrate(rec, budget=[6, 9], report=report):
        assert tail_score(input_errors(rec, sched)) < 1e-6
    for entry in report:
        assert entry["scores"]["default"] < 1e-6 and entry["scores"]["tail e1"] > 1e-4
        assert entry["scores"]["published"] > 1e-4


def test_a_flow_where_the_published_search_is_right_is_not_lost():
    """A recording where only the published estimator's replay is good (the polynomial ones are disabled by
    estimators=): the safe candidates drop out and the published search is chosen."""
    _, _, _, rec = _recording(seed=6)
    report = []
    found = meancache.calibrate(rec, budget=6, estimators=("meancache",), report=report)
    assert found.published and report[0]["chosen"] == "published"


def test_gain_caps_keep_every_polynomial_segment_under_the_cap():
    _, _, sig, rec = _recording(seed=8, steps=24)
    graph = joint_costs(rec, max_len=6)
    for cap in GAIN_CAPS:
        sched = joint_solve(graph.restricted(max_gain=cap), 8)
        assert schedule_gain(sched, rec.sigmas) <= cap * (1 + 1e-12)
    with pytest.raises(ValueError, match=r"max_gain=0.5: must be None or a number >= 1"):
        graph.restricted(max_gain=0.5)


@pytest.mark.parametrize("inputs, draws", [(8, 0), (8, None), (REFINE_ROWS, 0)],
                         ids=["validation split", "inputs and draws", "REFINE_ROWS inputs"])
def test_refinement_never_increases_the_validation_error(inputs, draws):
    """The final score is the refinement's own measure of the returned schedule, and never above the start's:
    with a few inputs and no draws the root mean square over the validation split; with the default draws, or
    REFINE_ROWS inputs, the mean over the rows that chose the candidates (the inputs, then any draws)."""
    flow, x, sig, rec = _recording(seed=9, steps=20, inputs=inputs)
    report = []
    found = meancache.calibrate(flow, x, sigmas=sig, budget=[5, 8], refine=400, draws=draws, report=report,
                                progress=False)
    if draws is None:
        rows, score = torch.cat([x, validation_draws(x, DRAW_ROWS - inputs)]), run_score
    elif inputs >= REFINE_ROWS:
        rows, score = x, run_score
    else:
        _, val = validation_split(inputs)
        rows, score = x[val], tail_score
    with torch.no_grad():
        ref = meancache.sample(flow, rows, sig, Schedule.full(20)).double()

    def real(schedule):  # the scorer's own measure: real runs of the model from those rows
        with torch.no_grad():
            out = meancache.sample(flow, rows, sig, schedule).double()
        return score((out - ref).norm(dim=1) / ref.norm(dim=1))

    for entry, final in zip(report, found):
        assert entry["score"] == pytest.approx(real(final), rel=1e-5)
        assert entry["score"] <= real(entry["start"]) * (1 + COST_RTOL) + 1e-12


def test_refinement_is_on_by_default_where_the_runs_hold_refine_rows():
    """refine=None (the default) spends AUTO_REFINE evaluations where the runs that choose hold REFINE_ROWS rows
    (a cheap model's small rows), and none where they do not (larger rows under the element cap, draws=0)."""
    flow, x, sig, _ = _recording(seed=9, steps=20, inputs=8)
    auto, explicit, off = [], [], []
    found = meancache.calibrate(flow, x, sigmas=sig, budget=[5, 8], report=auto, progress=False)
    again = meancache.calibrate(flow, x, sigmas=sig, budget=[5, 8], refine=AUTO_REFINE, report=explicit,
                                progress=False)
    plain = meancache.calibrate(flow, x, sigmas=sig, budget=[5, 8], refine=0, report=off, progress=False)
    assert found == again and [e["score"] for e in auto] == [e["score"] for e in explicit]
    assert any(e["refined"] for e in auto) and found != plain  # the moves changed something on this flow
    assert plain == [e["start"] for e in auto] and all(e["score"] is None for e in off)
    # 8 inputs alone; 8 inputs + 32 draws = 40 rows; 63 rows (8 inputs + 55 draws); 64 rows (8 + 56): the first on;
    # 64 inputs without draws: on while they hold at most DRAW_ELEMENTS elements (64 x 1,024), not above (64 x 1,040)
    cases = ((8, 8, dict(draws=0), False), (8, DRAW_ELEMENTS // 40, {}, False),
             (8, DRAW_ELEMENTS // (REFINE_ROWS - 1), {}, False), (8, DRAW_ELEMENTS // REFINE_ROWS, {}, True),
             (REFINE_ROWS, 8, dict(draws=0), True), (REFINE_ROWS, DRAW_ELEMENTS // REFINE_ROWS, {}, True),
             (REFINE_ROWS, DRAW_ELEMENTS // (REFINE_ROWS - 1), {}, False))
    for count, dim, kwargs, on in cases:
        wide = GaussianMixtureFlow(dim=dim, components=3, seed=2)
        xs = torch.randn(count, dim, generator=torch.Generator().manual_seed(9))
        report = []
        meancache.calibrate(wide, xs, sigmas=sig, budget=5, report=report, progress=False, **kwargs)
        assert (report[0]["score"] is not None) == on and (on or not report[0]["refined"]), (count, dim, kwargs)


def test_refine_keeps_only_moves_that_help_every_group():
    """A move that helps the total by hurting one group is not taken."""
    start = Schedule([0, 4, 9], [1, 1], 10, ["predict", "predict"])

    def errors(s):  # any move trades input 1 for input 0: better in total, worse for group [1]
        return torch.tensor([1.0, 1.0], dtype=torch.float64) if s == start else torch.tensor([0.1, 1.2])

    best, value, spent = refine(start, errors, max_scores=10, groups=[[0], [1]])
    assert best == start and value == tail_score(torch.tensor([1.0, 1.0])) and spent <= 10
    best, _, _ = refine(start, errors, max_scores=10)
    assert best != start
    with pytest.raises(ValueError, match="max_scores=0"):
        refine(start, errors, max_scores=0)


def test_refine_minimises_the_score_it_is_given():
    """A move that lowers the mean and raises the root mean square: taken by score=run_score, not by the default
    tail_score; a score that is not callable is named before any scoring."""
    start = Schedule([0, 4, 9], [1, 1], 10, ["predict", "predict"])

    def errors(s):
        return torch.tensor([0.5, 0.5], dtype=torch.float64) if s == start else torch.tensor([0.05, 0.9])

    assert refine(start, errors, max_scores=5)[0] == start
    best, value, _ = refine(start, errors, max_scores=5, score=run_score)
    assert best != start and value == pytest.approx(0.475)
    with pytest.raises(ValueError, match="score=3: must be a callable"):
        refine(start, lambda s: pytest.fail("scored before the check"), max_scores=5, score=3)


@pytest.mark.parametrize("steps", [6, 12])
def test_every_budget_calibrates_with_the_defaults(steps):
    _, _, _, rec = _recording(seed=10, steps=steps, inputs=4)
    found = meancache.calibrate(rec, budget=list(range(2, steps + 1)))
    assert [s.budget for s in found] == list(range(2, steps + 1))
    assert found[0] == Schedule([0, steps - 1], [1], steps) and found[-1] == Schedule.full(steps)


def test_small_budgets_on_fifty_steps_need_no_max_len():
    """B = 3 and 4 of 50 need segments of 25 and 17 steps: the default lengthens them (issue 19: budget 6
    used to raise unless max_len was raised by hand) and bounds the graph by dropping high orders."""
    _, _, _, rec = _recording(seed=11, steps=50, inputs=4, dim=4)
    assert auto_max_len(50, 3) == 25 and auto_max_len(50, 6) == 10 and auto_max_len(50, 17) == 8
    for b, sched in zip((3, 4, 6), meancache.calibrate(rec, budget=[3, 4, 6])):
        gaps = [y - x for x, y, _, _ in sched.segments]
        assert sched.budget == b and max(gaps) <= auto_max_len(50, b)


def test_labels_of_a_segment_from_step_zero_follow_one_rule():
    """Issue 18 item 15: from step 0 every estimator is plain reuse; calibrate labels it K1 whichever candidate
    won (the tie rule gives ties to the published estimator). The exception: with a corrector the first segment
    is corrected through the next computed velocity, which is no longer plain reuse, so its label stays."""
    for seed in (3, 12):
        _, _, _, rec = _recording(seed=seed)
        for sched in meancache.calibrate(rec, budget=[4, 6, 9]):
            if sched.compute_steps[1] > 1:
                assert sched.labels[0] == ("p1" if sched.corrector else "K1")


def test_report_is_checked():
    _, _, _, rec = _recording(seed=3, steps=8, inputs=2)
    with pytest.raises(ValueError, match="report is a dict: must be None or a list"):
        meancache.calibrate(rec, budget=4, report={})
    with pytest.raises(ValueError, match=r"refine=-1: must be None or an int >= 0"):
        meancache.calibrate(rec, budget=4, refine=-1)


def test_uniform_schedule_and_safe_candidates():
    s = uniform_schedule(6, 50, "extrapolate", 1)
    assert s.compute_steps == (0, 10, 20, 29, 39, 49) and set(s.labels) == {"e1"}
    assert [n for n, _ in safe_candidates(6, 50)] == ["default", "uniform p1", "tail e1", "tail p1",
                                                      "uniform p1 c1", "uniform p1 c2", "tail p1 c1", "tail p1 c2",
                                                      "early p1 c2", "early p2 c2"]
    assert [n for n, _ in safe_candidates(50, 50)] == ["default", "uniform p1", "uniform p1 c1", "uniform p1 c2"]
    for n in (3, 7, 50, 51):  # every budget below N leaves an open tail, evenly spaced, all of it extrapolate p1
        for b in range(2, n):
            t = tail_schedule(b, n)
            assert t.budget == b and t.open_tail and t.compute_steps[-1] <= n - 2
            assert max(e - a for a, e, _, _ in t.segments) - min(e - a for a, e, _, _ in t.segments) <= 1
            assert {lab for lab, (a, e, _, _) in zip(t.labels, t.segments) if e - a > 1} == {"e1"}
    with pytest.raises(ValueError, match=r"budget=5: must be an int in 2..num_steps - 1 = 4"):
        tail_schedule(5, 5)
    assert subset(_recording(steps=6, inputs=3)[3], [0, 2]).num_inputs == 2
    with pytest.raises(ValueError, match="budget=1"):
        uniform_schedule(1, 10)
    assert math.isclose(tail_score(torch.tensor([3.0, 4.0])), math.sqrt(12.5))


@pytest.mark.parametrize("draws", [0, 120])
@pytest.mark.parametrize("seed,scale", [(3, None), (6, 0.45)])
def test_real_runs_choose_the_least_mean_error_of_every_candidate(seed, scale, draws):
    """validate="runs" (the default with a velocity_fn): every candidate, safe ones included, is sampled for real
    from the calibration inputs and, with ``draws``, from that many new noise rows; the chosen one's mean
    per-input error is the least within COST_RTOL, and the scores are those of real runs of the schedules the
    report gives, from the inputs then the draws (refine=0: the choice alone)."""
    flow, x, sig, _ = _recording(seed=seed, scale=scale, spread=2.5, steps=30)
    report = []
    got = meancache.calibrate(flow, x, sigmas=sig, budget=[4, 6, 10], report=report, progress=False, draws=draws,
                              refine=0)
    rows = x if draws == 0 else torch.cat([x, validation_draws(x, draws)])
    full = meancache.sample(flow, rows, sig, Schedule.full(30))
    for entry, schedule in zip(report, got):
        assert entry["measure"] == "runs"
        scores = {k: v for k, v in entry["scores"].items() if v is not None}
        assert {"default", "uniform p1", "tail e1", "published"} <= set(scores)
        assert scores[entry["chosen"]] <= min(scores.values()) * (1 + COST_RTOL), entry
        assert schedule == meancache.calibration.selection.reuse_labelled(entry["candidates"][entry["chosen"]])
        for name in ("default", entry["chosen"]):  # the score is the mean error of a real run of that schedule
            out = meancache.sample(flow, rows, sig, entry["candidates"][name])
            per_input = (out - full).double().norm(dim=1) / full.double().norm(dim=1)
            assert per_input.mean().item() == pytest.approx(scores[name], rel=1e-4, abs=1e-7)
            # the report's per-input errors are those of the run, and their mean is the score
            assert entry["errors"][name] == pytest.approx(per_input.tolist(), rel=1e-4, abs=1e-7)
            assert sum(entry["errors"][name]) / len(entry["errors"][name]) == pytest.approx(scores[name], rel=1e-12)


def test_draws_are_checked_before_any_model_call():
    """A draws count where draws do not apply, or a bad value, is a ValueError naming the rule before the model
    runs; the default (None) applies everywhere, with no draws where they do not apply (the report's errors list
    the inputs only)."""
    flow, x, sig, rec = _recording(seed=5)
    calls = []

    def counted(z, s):
        calls.append(1)
        return flow(z, s)

    cases = [
        (dict(draws=-1), r"draws=-1: must be None or an int >= 0"),
        (dict(draws=2.5), r"draws=2.5: must be None or an int >= 0"),
        (dict(draws=True), r"draws=True: must be None or an int >= 0"),
        (dict(draws="4"), r"draws='4': must be None or an int >= 0"),
        (dict(draws=4, validate="replay"), r"draws=4: new noise rows need the choice by real runs"),
        (dict(draws=4, select=False), r"draws=4: new noise rows need the choice by real runs"),
        (dict(draws=4, fit=True), r"draws=4: new noise rows need fit=False"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            meancache.calibrate(counted, x, sigmas=sig, budget=6, progress=False, **kwargs)
    with pytest.raises(ValueError, match=r"draws=4: new noise rows need a grid that starts at sigma = 1"):
        meancache.calibrate(counted, x, sigmas=sig[1:], budget=6, progress=False, draws=4)
    with pytest.raises(ValueError, match=r"draws=4: new noise rows need a velocity_fn target with one batched"):
        meancache.calibrate(counted, list(x.split(2)), sigmas=sig, budget=6, progress=False, draws=4)
    with pytest.raises(ValueError, match=r"draws=4: new noise rows need a velocity_fn target with one batched"):
        meancache.calibrate(rec, budget=6, draws=4)
    assert not calls
    for kwargs, rows in ((dict(inputs=list(x.split(2))), len(x) // 2), (dict(inputs=x, sigmas=sig[1:]), len(x)),
                         (dict(inputs=x, fit=True), len(x))):
        report = []
        meancache.calibrate(counted, **{"sigmas": sig, **kwargs}, budget=6, progress=False, report=report)
        assert {len(e) for e in report[0]["errors"].values()} == {rows}, kwargs


@pytest.mark.parametrize("inputs,dim,expected", [(8, 8, DRAW_ROWS - 8), (8, DRAW_ELEMENTS // 40, 32),
                                                  (4, DRAW_ELEMENTS // 2, 0)])
def test_default_draws_bring_cheap_runs_to_draw_rows(inputs, dim, expected):
    """draws=None (the default) with one batched tensor of noise inputs: new rows until the runs hold DRAW_ROWS
    rows or DRAW_ELEMENTS latent elements, whichever comes first, none where the inputs alone reach that; the
    scores are the mean over the inputs and those draws (the report's errors, inputs first)."""
    flow = GaussianMixtureFlow(dim=dim, components=3, seed=2)
    sig = shifted_sigmas(12, 3.0)
    x = torch.randn(inputs, dim, generator=torch.Generator().manual_seed(9))
    report = []
    got = meancache.calibrate(flow, x, sigmas=sig, budget=4, report=report, progress=False)
    errors = report[0]["errors"]
    assert {len(e) for e in errors.values()} == {inputs + expected}
    explicit = []
    again = meancache.calibrate(flow, x, sigmas=sig, budget=4, report=explicit, progress=False, draws=expected)
    assert again == got and explicit[0]["errors"] == errors


def test_validation_draws_are_seeded_rows_like_the_inputs():
    """The same rows on every call whatever the inputs' values, in the inputs' dtype, and the user's global random
    stream left where it was."""
    a, b = validation_draws(torch.zeros(2, 3), 5), validation_draws(torch.ones(7, 3, dtype=torch.float64), 5)
    assert a.shape == (5, 3) and b.dtype == torch.float64 and torch.equal(a, b.float())
    assert a.std() > 0.2 and not torch.equal(a[0], a[1])
    state = torch.get_rng_state()
    validation_draws(torch.zeros(2, 3), 5)
    assert torch.equal(torch.get_rng_state(), state)


def _extras(entry) -> dict[str, str]:
    """The report's corrected search candidates: name -> the search it corrects."""
    safe = {name for name, _ in safe_candidates(entry["budget"], entry["candidates"]["default"].num_steps)}
    return {n: n.rsplit(" ", 1)[0] for n in entry["scores"]
            if n not in safe and n.rsplit(" ", 1)[-1] in ("c1", "c2")}


@pytest.mark.parametrize("seed,scale", [(3, None), (6, 0.45)])
def test_real_runs_weigh_the_best_search_with_a_corrector(seed, scale):
    """With real runs, the best-scored search (the tie rule among the searches) joins the running again with each
    corrector order of SEARCH_CORRECTORS, as the same steps and estimators; no other search does."""
    flow, x, sig, _ = _recording(seed=seed, scale=scale, spread=2.5, steps=30)
    report = []
    meancache.calibrate(flow, x, sigmas=sig, budget=[4, 6, 10], report=report, progress=False)
    seen = 0
    for entry in report:
        extras = _extras(entry)
        cands = entry["candidates"]
        searched = {n: v for n, v in entry["scores"].items()
                    if n not in extras and n not in dict(safe_candidates(entry["budget"], 30)) and v is not None}
        least = min(searched.values())
        best = next(n for n, v in searched.items() if v <= least * (1 + COST_RTOL))
        assert set(extras.values()) <= {best}
        for name in extras:
            s, base = cands[name], cands[best]
            assert (s.compute_steps, s.estimators, s.orders) == (base.compute_steps, base.estimators, base.orders)
            assert s.corrector == int(name[-1]) and name in entry["errors"]
            seen += 1
        for c in SEARCH_CORRECTORS:  # left out only where it is nothing new: no node estimator, or a candidate
            if f"{best} c{c}" not in extras:
                fixed = corrected(cands[best], c)
                assert fixed is None or fixed in cands.values()
    assert seen > 0


def test_a_schedule_scored_in_an_earlier_group_is_not_run_again():
    """The searches, the corrected search and the safe candidates are scored in turn; a schedule that an earlier
    candidate already has takes its result (its score and per-input errors) instead of new runs."""
    from meancache.calibrate import _score_more

    s1 = Schedule([0, 3, 9], [1, 1], 10, ["predict"] * 2)
    s2 = Schedule([0, 5, 9], [1, 1], 10, ["predict"] * 2)
    ran = []

    def errors(schedule, which=None):
        ran.append(schedule)
        return torch.tensor([0.1, 0.3]) if schedule == s1 else torch.tensor([0.2, 0.2])

    runs = (errors, 1, None)
    candidates = {"search": s1, "none": None, "safe a": s2, "safe b": s1}
    state = ({}, {}, {})
    _score_more(runs, {"search": s1, "none": None}, 2, candidates, state)
    _score_more(runs, {"safe a": s2, "safe b": s1}, 2, candidates, state)
    assert ran == [s1, s2]
    assert state[0] == pytest.approx({"search": 0.2, "none": math.inf, "safe a": 0.2, "safe b": 0.2})
    assert state[2]["safe b"].tolist() == pytest.approx([0.1, 0.3])


def test_losing_runs_meet_the_hard_inputs_first():
    """Once a candidate's runs complete, the others run the inputs in falling order of its errors, so a loser
    stops on the input where everyone errs most; the per-input errors come back in input order."""
    from meancache.calibrate import _score_more

    table = {  # per-input errors: input 3 is hard for every schedule
        Schedule([0, 3, 9], [1, 1], 10, ["predict"] * 2): [0.10, 0.10, 0.10, 2.00],
        Schedule([0, 5, 9], [1, 1], 10, ["predict"] * 2): [0.12, 0.10, 0.10, 3.00],
        Schedule([0, 6, 9], [1, 1], 10, ["predict"] * 2): [0.11, 0.30, 0.30, 3.00],
    }
    first, second, third = table
    ran = []

    def errors(schedule, which=None):
        ran.append((schedule, tuple(which)))
        return torch.tensor([table[schedule][i] for i in which], dtype=torch.float64)

    runs = (errors, 4, None)  # one call per input, as for a list of inputs
    candidates = {"a": first, "b": second, "c": third}
    state = ({}, {}, {})
    _score_more(runs, {"a": first}, 4, candidates, state)
    assert [w for _, w in ran] == [(0,), (1,), (2,), (3,)]
    ran.clear()
    _score_more(runs, {"b": second, "c": third}, 4, candidates, state)
    # the first input is a's hardest (3); b and c stop there: 3.12 and 3.11 already exceed a's sum 2.30
    assert sorted(ran, key=str) == sorted([(second, (3,)), (third, (3,))], key=str)
    assert state[1] == pytest.approx({"b": 3.0 / 4, "c": 3.0 / 4})
    assert state[2]["a"].tolist() == pytest.approx(table[first])


def test_a_flow_where_a_corrected_search_is_right_chooses_one():
    """A 16-d mixture at B = 17 of 50 (one of bench/candidate_study.py's flows): the best search with a corrector
    scores well below every other candidate on the 32 calibration inputs, and on 512 held-out inputs its mean
    error is below 0.8x that of every other candidate (measured 0.71x; at B = 25 `early p2 c2` is better)."""
    flow = GaussianMixtureFlow(dim=16, components=4, seed=41)
    sig = shifted_sigmas(50, 1.0)
    cal = torch.randn(32, 16, generator=torch.Generator().manual_seed(55))
    held = torch.randn(512, 16, generator=torch.Generator().manual_seed(7))
    report = []
    got = meancache.calibrate(flow, cal, sigmas=sig, budget=17, report=report, progress=False)
    entry = report[0]
    assert entry["chosen"] in _extras(entry)
    full = meancache.sample(flow, held, sig, Schedule.full(50))

    def held_error(s):
        out = meancache.sample(flow, held, sig, s)
        return ((out - full).double().norm(dim=1) / full.double().norm(dim=1)).mean().item()

    mine = held_error(got)
    others = [held_error(s) for n, s in entry["candidates"].items() if n not in _extras(entry) and s is not None]
    assert mine < 0.8 * min(others)


def test_validate_modes_and_their_targets():
    flow, x, sig, rec = _recording(seed=5)
    replayed, ran = [], []
    by_replay = meancache.calibrate(flow, x, sigmas=sig, budget=6, validate="replay", report=replayed,
                                    progress=False)
    assert replayed[0]["measure"] == "replay"
    assert by_replay == meancache.calibrate(rec, budget=6)  # replay from the model = replay from its recording
    meancache.calibrate(rec, budget=6, report=ran)
    assert ran[0]["measure"] == "replay"  # a recording has no model to run
    with pytest.raises(ValueError, match=r"validate='runs' with a Recording target"):
        meancache.calibrate(rec, budget=6, validate="runs")
    for bad in ("Runs", None, 1):
        with pytest.raises(ValueError, match=rf"validate={bad!r}: must be one of"):
            meancache.calibrate(flow, x, sigmas=sig, budget=6, validate=bad, progress=False)


def test_real_runs_find_an_exact_schedule_where_the_safe_prediction_is_exact():
    """v = alpha + beta * sigma (as above): Schedule.default is exact by real runs too, and the runs must choose a
    schedule that is exact, while the candidates that are not (extrapolate, the published estimator) score worse."""
    alpha = torch.tensor([0.5, -1.0, 0.25, 2.0])
    beta = torch.tensor([2.0, 1.0, -3.0, 0.5])
    sigmas = torch.linspace(1, 0, 17)

    def field(x, s):
        return alpha + beta * s + 0 * x

    report = []
    got = meancache.calibrate(field, torch.zeros(4, 4), sigmas=sigmas, budget=[6, 9], report=report,
                              progress=False)
    full = meancache.sample(field, torch.zeros(4, 4), sigmas, Schedule.full(16))
    for sched, entry in zip(got, report):
        assert torch.allclose(meancache.sample(field, torch.zeros(4, 4), sigmas, sched), full, atol=1e-6)
        assert entry["scores"]["default"] < 1e-6
        assert entry["scores"]["tail e1"] > 1e-4 and entry["scores"]["published"] > 1e-4


def _counted_calibration(flow, inputs, sig, budgets, monkeypatch, draws=0, **settings):
    """``(schedules, report, model calls)`` of ``calibrate(flow, inputs, draws=draws)`` with the module settings
    given by name (``STOP_LOSING_RUNS`` of meancache.calibrate, ``SHARED_BYTES`` of meancache.calibration.runs)."""
    for name, value in settings.items():
        module = "meancache.calibration.runs" if name == "SHARED_BYTES" else "meancache.calibrate"
        monkeypatch.setattr(importlib.import_module(module), name, value)
    calls = []

    def counted(z, sigma):
        calls.append(sigma)
        return flow(z, sigma)

    report = []
    got = meancache.calibrate(counted, inputs, sigmas=sig, budget=budgets, report=report, progress=False,
                              draws=draws)
    return got, report, len(calls)


@pytest.mark.parametrize("seed,scale", [(3, None), (6, 0.45)])
def test_stopping_losing_runs_never_changes_the_choice(seed, scale, monkeypatch):
    """With a list of inputs (one model call each) a candidate's runs stop once it cannot win: the choice, and the
    score of every candidate that ran to the end, are those of complete runs; a stopped candidate's bound is below
    its complete score; fewer model calls are made."""
    flow, x, sig, _ = _recording(seed=seed, scale=scale, spread=2.5, steps=30, inputs=6)
    inputs = [row[None] for row in x]  # six inputs, one call each
    def run(stop):
        return _counted_calibration(flow, inputs, sig, [5, 8, 12], monkeypatch, STOP_LOSING_RUNS=stop)

    complete, full_report, full_calls = run(False)
    stopped, report, few_calls = run(True)
    assert few_calls < full_calls
    assert any(entry.get("stopped") for entry in report)
    for entry, full, got, want in zip(report, full_report, stopped, complete):
        assert "stopped" not in full
        # the two modes sum the errors in another order: a choice may differ only between candidates that the
        # complete runs score within COST_RTOL of each other (the tie rule), and then the schedules may differ too
        least = min(v for v in full["scores"].values() if v is not None)
        assert full["scores"][entry["chosen"]] <= least * (1 + COST_RTOL)
        assert entry["chosen"] != full["chosen"] or got == want
        for name, value in entry["scores"].items():
            if name in entry.get("stopped", {}):
                assert value is None and entry["stopped"][name] <= full["scores"][name] * (1 + 1e-12)
                assert full["scores"][name] > full["scores"][full["chosen"]] * (1 + COST_RTOL)
            else:
                assert value == pytest.approx(full["scores"][name], rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("batched,draws", [(True, 0), (True, 60), (False, 0)])
def test_shared_calls_change_no_score(batched, draws, monkeypatch):
    """The runs of one input share the model calls where the latents repeat (step 0 for every schedule, the second
    compute step within a family, a corrected schedule's calls up to its first correction): every candidate's
    score is that of unshared runs, with fewer calls; a cap on the kept bytes keeps the first calls only (step 0
    here), still exact. With draws the batched runs hold the inputs and the draws, shared the same way."""
    flow, x, sig, _ = _recording(seed=3, steps=30, inputs=4)
    inputs = x if batched else [row[None] for row in x]
    def run(shared):
        return _counted_calibration(flow, inputs, sig, [5, 8], monkeypatch, SHARED_BYTES=shared,
                                    STOP_LOSING_RUNS=False, draws=draws)

    plain, plain_report, plain_calls = run(0)
    rows = len(x) + draws
    step0 = 2 * x.element_size() * x[0].numel() * rows  # the latents and velocity of step 0, nothing more
    capped, capped_report, capped_calls = run(step0)
    shared, report, shared_calls = run(256 * 2**20)
    assert shared == plain and capped == plain
    for entry, capped_entry, want in zip(report, capped_report, plain_report):
        assert entry["scores"] == want["scores"] and capped_entry["scores"] == want["scores"]
    # step 0 once per input (batched: once) instead of once per run; more shared without the cap
    assert shared_calls < capped_calls < plain_calls


def _batch_bound(flow, rows: int):
    """A velocity_fn whose conditioning is tied to a batch of ``rows`` (as prompt embeddings would be), counting
    its calls."""
    calls = []

    def velocity(z, s):
        calls.append(z.shape[0])
        if z.shape[0] != rows:
            raise RuntimeError(f"conditioning holds {rows} rows, got {z.shape[0]}")
        return flow(z, s)

    return velocity, calls


def test_a_model_that_cannot_take_the_draws_is_found_before_the_recording():
    """The default draws=None: a velocity_fn tied to the inputs' batch fails on the draws' one probing call (the
    inputs and the draws, the batch the runs use), which warns and chooses on the inputs alone (the schedules of
    draws=0); a count given is a ValueError naming it, and the probe is the only model call made. A model returning
    the wrong shape for them is treated alike."""
    flow, x, sig, _ = _recording(seed=5)
    velocity, calls = _batch_bound(flow, len(x))
    report = []
    with pytest.warns(UserWarning, match=r"velocity_fn failed on the 8 inputs with 1016 new noise rows after them, "
                                          r"a batch of 1024 \(RuntimeError: conditioning holds 8 rows, got 1024\)"
                                          r".*calibration inputs alone"):
        got = meancache.calibrate(velocity, x, sigmas=sig, budget=[5, 8], report=report, progress=False)
    assert calls[0] == DRAW_ROWS and set(calls[1:]) == {len(x)}
    assert {len(e) for entry in report for e in entry["errors"].values()} == {len(x)}
    assert got == meancache.calibrate(flow, x, sigmas=sig, budget=[5, 8], progress=False, draws=0)
    calls.clear()
    with pytest.raises(ValueError, match=r"draws=40: velocity_fn failed on the 8 inputs with 40 new noise rows "
                                         r"after them, a batch of 48 .*needs draws=0"):
        meancache.calibrate(velocity, x, sigmas=sig, budget=5, progress=False, draws=40)
    assert calls == [48]

    def wrong_shape(z, s):
        return flow(z, s)[:8]

    with pytest.raises(ValueError, match=r"draws=12: velocity_fn failed .*ValueError: velocity_fn returned velocity "
                                         r"of shape \(8, 8\) for latents of shape \(20, 8\)"):
        meancache.calibrate(wrong_shape, x, sigmas=sig, budget=5, progress=False, draws=12)


def test_the_probe_sees_the_batch_of_the_runs_when_the_draws_match_the_inputs():
    """With as many draws as inputs (512 of 8-d: the default brings them to 1,024 rows), a model tied to a batch of
    512 takes the draws alone but not the runs' batch of inputs and draws: the probe, made on that batch, still
    finds it before the recording."""
    flow = GaussianMixtureFlow(dim=8, components=3, seed=2)
    sig = shifted_sigmas(8, 3.0)
    x = torch.randn(DRAW_ROWS // 2, 8, generator=torch.Generator().manual_seed(9))
    velocity, calls = _batch_bound(flow, len(x))
    with pytest.warns(UserWarning, match=r"on the 512 inputs with 512 new noise rows after them, a batch of 1024"):
        meancache.calibrate(velocity, x, sigmas=sig, budget=3, progress=False)
    assert calls[0] == DRAW_ROWS and set(calls[1:]) == {len(x)}


def test_bad_out_or_report_raise_before_the_draws_probe(tmp_path):
    """The draws' probe is a model call, so a bad ``out`` or ``report`` is an error before it (no call made)."""
    flow, x, sig, _ = _recording(seed=5)
    velocity, calls = _batch_bound(flow, 10**6)  # any call would be seen
    with pytest.raises(ValueError, match=r"out=.*must name a file in an existing folder"):
        meancache.calibrate(velocity, x, sigmas=sig, budget=5, progress=False, out=str(tmp_path / "no" / "r.pt"))
    with pytest.raises(ValueError, match=r"report is a dict: must be None or a list"):
        meancache.calibrate(velocity, x, sigmas=sig, budget=5, progress=False, report={})
    assert calls == []
