"""The estimators beside the published one (issue 12): their weights, schedules that carry them (format v2), and
every front-end running them through the one engine, against a plain loop written here."""

from __future__ import annotations

import json
import math

import pytest
import restatement
import torch
from fields import SmoothField
from fields import rel_err
from meancache.examples import tiny_pipelines

import meancache
from meancache import Schedule
from meancache.estimators import MAX_GAIN
from meancache.estimators import extrapolation_weights
from meancache.estimators import meancache_weights
from meancache.estimators import polynomial_weights
from meancache.estimators import prediction_weights
from meancache.flows import shifted_sigmas
from meancache.history import History
from meancache.reference import average_velocity
from meancache.reference import step_scalars

N = 20
SIGMAS = shifted_sigmas(N, shift=3.0).tolist()
MIXED = Schedule(
    [0, 1, 4, 9, 13, 19], [0, 2, 1, 3, 2], N, estimators=["meancache", "meancache", "extrapolate", "extrapolate",
                                                         "extrapolate"]
)


# -- the weights --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 2, 3])
def test_extrapolation_averages_every_polynomial_of_its_order_exactly(order):
    g = torch.Generator().manual_seed(order)
    nodes = sorted(torch.rand(order + 1, generator=g, dtype=torch.float64).tolist(), reverse=True)
    nodes = [0.4 + 0.6 * s for s in nodes]  # distinct, in 0.4..1, so the guard keeps the order
    s0, s1 = 0.35, 0.3
    q, w = extrapolation_weights(nodes, s0, s1, order)
    assert q == order and len(w) == order + 1
    for degree in range(order + 1):
        coeff = torch.randn(degree + 1, generator=g, dtype=torch.float64).tolist()

        def poly(s):
            return sum(c * s**k for k, c in enumerate(coeff))

        # the exact mean of the polynomial over [s1, s0] from its antiderivative
        def anti(s):
            return sum(c * s ** (k + 1) / (k + 1) for k, c in enumerate(coeff))

        mean = (anti(s1) - anti(s0)) / (s1 - s0)
        assert sum(wj * poly(s) for wj, s in zip(w, nodes)) == pytest.approx(mean, rel=1e-12, abs=1e-12)


def test_weights_sum_to_one_and_a_zero_length_step_takes_the_value_there():
    q, w = extrapolation_weights([1.0, 0.7, 0.5], 0.3, 0.3, 2)
    assert q == 2 and sum(w) == pytest.approx(1.0, abs=1e-14)
    # value of the parabola through the nodes at 0.3, by Lagrange's formula written out
    nodes = [1.0, 0.7, 0.5]
    lag = [math.prod((0.3 - m) / (s - m) for m in nodes if m != s) for s in nodes]
    assert list(w) == pytest.approx(lag, rel=1e-13)


def test_fewer_nodes_than_the_order_truncates_it():
    assert extrapolation_weights([0.9], 0.8, 0.7, 3) == (0, (1.0,))
    q, w = extrapolation_weights([0.9, 0.85], 0.8, 0.7, 3)
    assert q == 1 and len(w) == 2


def test_guard_repeated_sigmas_and_bunched_nodes_near_zero():
    # a repeated node cannot carry a polynomial: the order drops until the nodes are distinct
    q, w = extrapolation_weights([0.5, 0.2, 0.2], 0.1, 0.05, 2)
    assert q == 0 and w == (1.0,)
    # nodes bunched at the end of a shifted grid, extrapolated far: every order that fits the gain bound is kept,
    # and the weights of what is kept never amplify the stored velocities by more than MAX_GAIN
    grid = shifted_sigmas(50, shift=3.0).tolist()
    for order in (1, 2, 3):
        for last in range(order, 45):
            nodes = grid[last - order : last + 1]
            for ahead in range(1, 6):
                i = last + ahead
                q, w = extrapolation_weights(nodes, grid[i], grid[i + 1], order)
                assert all(math.isfinite(x) for x in w)
                assert sum(abs(x) for x in w) <= MAX_GAIN
                assert sum(w) == pytest.approx(1.0, abs=1e-9)
    # a tiny node spacing carried far ahead exceeds the bound, so the order is lowered
    q, w = extrapolation_weights([1e-3, 1e-3 - 1e-9], 0.5e-3, 0.4e-3, 1)
    assert q == 0


def test_bad_order_and_no_nodes_are_named():
    with pytest.raises(ValueError, match=r"order=4: must be an int in 1\.\.3"):
        extrapolation_weights([1.0, 0.5], 0.4, 0.3, 4)
    with pytest.raises(ValueError, match="order=True"):
        extrapolation_weights([1.0, 0.5], 0.4, 0.3, True)
    with pytest.raises(ValueError, match="nodes"):
        extrapolation_weights([], 0.4, 0.3, 1)


def test_published_estimator_as_weights_is_the_published_formula():
    g = torch.Generator().manual_seed(0)
    x, x0, v0, vl = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(4))
    inv_d, dt = step_scalars(0.9, 0.7, 0.6)
    w_start, w_last, x_weight = meancache_weights(inv_d, dt)
    torch.testing.assert_close(w_last * vl + w_start * v0 + x_weight * (x - x0),
                               average_velocity(x, x0, v0, vl, inv_d, dt), rtol=1e-13, atol=1e-13)


# -- schedules carry the estimator --------------------------------------------------------------------------------


def test_schedule_labels_pattern_depth_and_window():
    assert MIXED.labels == ("K0", "K2", "e1", "e3", "e2")
    assert MIXED.pattern() == ("CC..C....C...C.....C", "--22-llll-ccc-qqqqq-")
    assert MIXED.depth == 4 and MIXED.window == 2 and not MIXED.published
    assert Schedule.preset("qwen-image", 10).published and Schedule.preset("qwen-image", 10).depth == 0


def test_format_v2_round_trip_and_v1_files_load_unchanged(tmp_path):
    assert Schedule.from_json(MIXED.to_json()) == MIXED
    data = json.loads(MIXED.to_json())
    assert data["version"] == 2 and data["estimators"][2] == "extrapolate"
    v1 = {"format": "meancache.schedule", "version": 1, "num_steps": 6, "compute_steps": [0, 1, 4, 5],
          "orders": [0, 2, 0]}
    old = Schedule.from_dict(v1)
    assert old == Schedule([0, 1, 4, 5], [0, 2, 0], 6) and old.estimators == ("meancache",) * 3
    path = tmp_path / "s.json"
    path.write_text(json.dumps(v1))
    assert Schedule.load(path) == old
    # equal steps and orders with different estimators are different schedules
    assert MIXED != Schedule(MIXED.compute_steps, MIXED.orders, N)
    assert eval(repr(MIXED), {"Schedule": Schedule}) == MIXED


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(estimators=["extrapolate"] * 2), r"estimators=\['extrapolate', 'extrapolate'\]: length 2 != budget - 1 = 3"),
        (dict(estimators=["meancache", "taylor", "meancache"]),
         r"estimators\[1\]='taylor': must be one of meancache, extrapolate, predict"),
        (dict(estimators=["meancache", "predict", "meancache"], orders=[0, 5, 0]),
         r"orders\[1\]=5: the polynomial order p of the predict segment 1->4 must be in 1\.\.3"),
        (dict(estimators=["meancache", "extrapolate", "meancache"], orders=[0, 4, 0]),
         r"orders\[1\]=4: the polynomial order p of the extrapolate segment 1->4 must be in 1\.\.3"),
        (dict(estimators=["meancache", "extrapolate", "meancache"], orders=[0, 0, 0]), r"orders\[1\]=0: the polynomial order p of the extrapolate"),
        (dict(estimators="meancache"), r"estimators='meancache': must be a sequence"),
    ],
)
def test_bad_estimators_are_named(kwargs, match):
    args = dict(compute_steps=[0, 1, 4, 5], orders=kwargs.pop("orders", [0, 2, 0]), num_steps=6)
    with pytest.raises(ValueError, match=match):
        Schedule(**args, **kwargs)


def test_v2_documents_are_validated():
    good = json.loads(MIXED.to_json())
    for change, match in [
        ({"estimators": None}, "estimators"),
        ({"version": 6}, "versions 1, 2, 3, 4, 5"),
        ({"version": 1}, "version 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            Schedule.from_dict({**good, **change})
    missing = {k: v for k, v in good.items() if k != "estimators"}
    with pytest.raises(ValueError, match=r"missing field\(s\) \['estimators'\]"):
        Schedule.from_dict(missing)


def test_resampling_keeps_each_segments_estimator():
    for m in (12, 33, 100):
        r = MIXED.resample(m)
        assert r.budget == MIXED.budget and r.estimators == MIXED.estimators
        assert [o for o, e in zip(r.orders, r.estimators) if e == "extrapolate"] == [1, 3, 2]
    assert Schedule.preset("qwen-image", 10).resample(30).published


# -- the engine: every front-end against a plain loop -------------------------------------------------------------


def plain_loop(fn, x, sigmas, schedule):
    """The schedule run by hand in float64 with full, unbounded logs: MeanCache windows as the official loop, the
    polynomial estimators from every computed velocity so far (nodes chosen by polynomial_weights from that list)."""
    compute, _ = restatement.expand_official(list(schedule.compute_steps), list(schedule.orders), len(sigmas) - 1)
    plan = schedule.expand()
    log = []  # (x_i, v_i) of every step
    computed = []  # (sigma, v) of every computed step
    x = x.to(torch.float64)
    for i in range(len(sigmas) - 1):
        dt = sigmas[i + 1] - sigmas[i]
        if compute[i]:
            v = fn(x, sigmas[i]).to(torch.float64)
            computed.append((sigmas[i], v))
        elif plan[i].estimator != "meancache":
            q, w = polynomial_weights(plan[i].estimator, [s for s, _ in computed], sigmas[i], sigmas[i + 1],
                                      plan[i].order)
            v = sum(wj * vj for wj, (_, vj) in zip(w, computed[-q - 1 :]))
        else:
            k = min(plan[i].order, i)
            inv_d, _ = step_scalars(sigmas[i - k], sigmas[i], sigmas[i + 1])
            x0, v0 = log[i - k]
            v = log[i - 1][1] - (v0 - (x - x0) * inv_d) * inv_d * dt
        log.append((x, v))
        x = x + dt * v
    return x


def test_sample_follows_the_plain_loop_with_extrapolation():
    field = SmoothField(8, seed=3)
    x0 = torch.randn(2, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = meancache.sample(field, x0, SIGMAS, MIXED)
    assert rel_err(out, plain_loop(field, x0, SIGMAS, MIXED)) <= 1e-12
    # and the estimators matter: the published estimator everywhere gives another result
    assert rel_err(out, meancache.sample(field, x0, SIGMAS, MIXED.with_order(2))) > 1e-6


def test_extrapolation_of_a_field_linear_in_sigma_is_exact():
    a, b = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    sched = Schedule([0, 1, 9, 19], [0, 1, 2], N, estimators=["meancache", "extrapolate", "extrapolate"])
    x0 = torch.zeros(6, dtype=torch.float64)
    out = meancache.sample(lambda x, s: a + b * s, x0, SIGMAS, sched)
    # computed steps take Euler steps of the field; skipped steps its exact mean over the step
    expected = x0.clone()
    computed = set(sched.compute_steps)
    for i in range(N):
        s0, s1 = SIGMAS[i], SIGMAS[i + 1]
        expected = expected + (s1 - s0) * (a + b * s0 if i in computed else a + b * (s0 + s1) / 2)
    assert rel_err(out, expected) <= 1e-13


def test_float32_latents_match_the_float64_loop_to_float32_rounding():
    field = SmoothField(8, seed=4)
    x0 = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    out = meancache.sample(field, x0, SIGMAS, MIXED)
    assert out.dtype == torch.float32
    assert rel_err(out.double(), plain_loop(field, x0.double(), SIGMAS, MIXED)) <= 1e-5


def test_module_front_end_with_guidance_matches_sample():
    from test_accelerate import GUIDANCE, FlowModel, _noise, euler_loop, guided

    n = 50
    grid = shifted_sigmas(n, shift=3.0).tolist()
    sched = Schedule([0, 1, 3, 10, 20, 30, 40, 49], [0, 2, 1, 2, 3, 1, 4], n,
                     estimators=["meancache", "meancache", "extrapolate", "extrapolate", "extrapolate",
                                 "extrapolate", "meancache"])
    model = FlowModel()
    x0 = _noise(5)
    expected = meancache.sample(guided(model), x0, grid, sched)
    meancache.accelerate(model, sched, sigmas=grid)
    out = euler_loop(model, x0, sigmas=grid, guidance=GUIDANCE)
    assert model.calls == 2 * sched.budget
    # CFG is linear and so are both estimators: per-branch estimates combine into the guided one
    assert rel_err(out, expected) <= 1e-12
    assert model.meancache.stats.schedule == sched


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_pipeline_front_end_matches_a_plain_scheduler(name):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

    n = 8
    sched = Schedule([0, 1, 4, 6, 7], [0, 1, 2, 0], n, estimators=["meancache", "extrapolate", "predict", "meancache"])

    class PlainRule(FlowMatchEulerDiscreteScheduler):
        """The rule restated inside a scheduler of a never-accelerated pipeline (its transformer still runs)."""

        def step(self, model_output, timestep, sample, *args, return_dict=True, **kwargs):
            if self.step_index is None:
                self._init_step_index(timestep)
                self._log, self._computed = [], []
            sig = [float(s) for s in self.sigmas]
            i = self.step_index
            plan = sched.expand()[i]
            x = sample.to(torch.float32)
            dt = sig[i + 1] - sig[i]
            if plan.computed:
                v = model_output.to(torch.float32)
                self._computed.append((sig[i], v))
            elif plan.estimator != "meancache":
                q, w = polynomial_weights(plan.estimator, [s for s, _ in self._computed], sig[i], sig[i + 1],
                                          plan.order)
                v = sum(wj * vj for wj, (_, vj) in zip(w, self._computed[-q - 1 :]))
            else:
                k = min(plan.order, i)
                inv_d, _ = step_scalars(sig[i - k], sig[i], sig[i + 1])
                x0, v0 = self._log[i - k]
                v = self._log[i - 1][1] - (v0 - (x - x0) * inv_d) * inv_d * dt
            self._log.append((x, v))
            self._step_index += 1
            out = (x + dt * v).to(model_output.dtype)
            return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=out) if return_dict else (out,)

    pipe, kw, info = tiny_pipelines.build(name)  # 8 steps
    plain, kw2, _ = tiny_pipelines.build(name)
    plain.scheduler = PlainRule.from_config(plain.scheduler.config)
    expected = getattr(plain(**kw2), info["output_attr"])
    meancache.accelerate(pipe, schedule=sched)
    out = getattr(pipe(**kw), info["output_attr"])
    assert meancache.summary(pipe).schedule == sched
    assert rel_err(out, expected) <= 1e-5


def test_extra_memory_is_the_kept_computed_velocities_whatever_n():
    field = SmoothField(16, seed=0)
    x0 = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    for n in (20, 200):
        grid = shifted_sigmas(n).tolist()
        published = Schedule.default(8, n, "meancache")
        for sched, depth in ((published, 0), (Schedule(published.compute_steps, [1 if o == 0 else 3 for o in
                                                                                     published.orders], n,
                                                       ["extrapolate"] * (published.budget - 1)), 4)):
            h = History(6)
            meancache.sample(field, x0, grid, sched, history=h)
            assert h.depth == depth
            extra = depth * x0.numel() * 4
            ring = 2 * 6 * x0.numel() * 4
            assert h.nbytes == ring + extra


def test_compiled_loop_with_extrapolation_has_no_graph_breaks_and_equals_eager():
    torch._dynamo.reset()
    field = SmoothField(16, seed=1)
    sched = Schedule([0, 1, 5, 11], [0, 2, 1], 12, estimators=["meancache", "extrapolate", "extrapolate"])
    grid = shifted_sigmas(12).tolist()

    def run(x):
        return meancache.sample(field, x, grid, sched)

    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(3))
    explanation = torch._dynamo.explain(run)(x)
    assert explanation.graph_break_count == 0
    assert torch.equal(torch.compile(run, fullgraph=True, backend="aot_eager")(x), run(x))


# -- online plans extrapolate -------------------------------------------------------------------------------------


def test_online_plan_extrapolates_and_reports_the_schedule_it_followed():
    from meancache.online import OnlinePlan

    field = SmoothField(8, seed=6)
    x0 = torch.randn(4, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    plan = OnlinePlan(6, N)
    out = meancache.sample(field, x0, SIGMAS, plan)
    followed = plan.schedule()
    assert followed.budget <= 6 and set(followed.estimators) <= {"predict", "meancache"}
    assert all(e == "predict" and o == 2 for e, o, a, b in zip(followed.estimators, followed.orders,
                                                               followed.compute_steps, followed.compute_steps[1:])
               if b - a > 1)
    # the same steps replayed as a static schedule give the same result, through the plain loop too
    assert rel_err(out, meancache.sample(field, x0, SIGMAS, followed)) <= 1e-13
    assert rel_err(out, plain_loop(field, x0, SIGMAS, followed)) <= 1e-12
    # the former rule is one argument away
    old = OnlinePlan(6, N, estimator="meancache")
    meancache.sample(field, x0, SIGMAS, old)
    assert set(old.schedule().labels) <= {"K0", "K2"}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(estimator="taylor"), r"estimator='taylor': must be one of meancache, extrapolate, predict"),
        (dict(order=4), r"order=4: the predict estimator takes an int in 1\.\.3"),
        (dict(estimator="extrapolate", order=0), r"order=0: the extrapolate estimator takes an int in 1\.\.3"),
        (dict(estimator="meancache", order=7), r"order=7: the meancache estimator takes an int in 1\.\.6"),
        (dict(order=True), r"order=True"),
    ],
)
def test_online_plan_rejects_bad_estimators(kwargs, match):
    from meancache.online import OnlinePlan

    with pytest.raises(ValueError, match=match):
        OnlinePlan(6, N, **kwargs)


# -- predict: the polynomial at the step's start -------------------------------------------------------------------


def test_prediction_is_the_polynomial_at_the_step_start():
    nodes = [0.9, 0.6, 0.45, 0.3]
    for order in (1, 2, 3):
        q, w = prediction_weights(nodes, 0.2, order)
        used = nodes[-q - 1 :]
        assert q == order
        for degree in range(order + 1):
            def poly(s):
                return (s - 0.1) ** degree + 0.5 * s
            assert sum(wj * poly(s) for wj, s in zip(w, used)) == pytest.approx(poly(0.2), rel=1e-12, abs=1e-12)
    assert polynomial_weights("predict", nodes, 0.2, 0.1, 2) == prediction_weights(nodes, 0.2, 2)
    assert polynomial_weights("extrapolate", nodes, 0.2, 0.1, 2) == extrapolation_weights(nodes, 0.2, 0.1, 2)
    with pytest.raises(ValueError, match="estimator='meancache': must be one of extrapolate, predict"):
        polynomial_weights("meancache", nodes, 0.2, 0.1, 2)


def test_prediction_of_a_field_linear_in_sigma_reproduces_the_full_euler_run():
    a, b = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    sched = Schedule([0, 1, 9, 19], [0, 1, 3], N, estimators=["meancache", "predict", "predict"])
    assert sched.pattern()[1] == "--LLLLLLL-CCCCCCCCC-" and sched.labels == ("K0", "p1", "p3") and sched.depth == 4
    x0 = torch.zeros(6, dtype=torch.float64)
    field = lambda x, s: a + b * s  # noqa: E731
    out = meancache.sample(field, x0, SIGMAS, sched)
    assert rel_err(out, meancache.sample(field, x0, SIGMAS, Schedule.full(N))) <= 1e-13


def test_predict_runs_through_every_backend_path_like_the_plain_loop():
    field = SmoothField(8, seed=7)
    sched = Schedule(MIXED.compute_steps, MIXED.orders, N, ["meancache", "predict", "predict", "extrapolate",
                                                            "predict"])
    x0 = torch.randn(2, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    out = meancache.sample(field, x0, SIGMAS, sched)
    assert rel_err(out, plain_loop(field, x0, SIGMAS, sched)) <= 1e-12
    assert rel_err(out, meancache.sample(field, x0, SIGMAS, MIXED)) > 1e-6
    assert Schedule.from_json(sched.to_json()) == sched and sched.resample(40).estimators == sched.estimators


@pytest.mark.parametrize("budget", [6, 10, 25])
def test_the_digits_joint_preset_runs_like_the_plain_loop(budget):
    sched = Schedule.preset("digits-joint", budget)
    assert not sched.published
    field = SmoothField(8, seed=budget)
    x0 = torch.randn(3, 8, generator=torch.Generator().manual_seed(budget), dtype=torch.float64)
    grid = shifted_sigmas(50, shift=3.0).tolist()
    assert rel_err(meancache.sample(field, x0, grid, sched), plain_loop(field, x0, grid, sched)) <= 1e-12
