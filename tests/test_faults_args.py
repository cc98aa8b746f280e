"""Issue 18, items 9 and 11: what the ops read, and one rule per kind of argument.

Item 9: ``ops.weighted_step`` reads only ring rows (and computed velocities) that a step already logged, the rule
``skip_step`` holds its window to, and takes finite host numbers for ``dt``, ``out_scale`` and the weights; so do
the other ops' sigmas. Every check is metadata only and runs on every path (eager, ``torch.ops``, fake tensors under
``torch.compile``), before any write.

Item 11: integers follow :func:`meancache.validation.is_int` (numpy integers count, ``bool`` does not) and reals
:func:`meancache.validation.is_real` (``bool`` excluded) everywhere: ``accelerate``'s config, schedule files'
version, the ops' scalars. Each refusal names the argument, the value and the rule.
"""

from __future__ import annotations

import json
import math
import re
import types

import pytest
import torch

import meancache
from meancache import MeanCacheConfig
from meancache import Schedule
from meancache import ops
from meancache import schedule as schedule_module

np = pytest.importorskip("numpy")

SHAPE = (2, 8)
CAPACITY, DEPTH = 6, 4
SIGMAS = (0.92, 0.71, 0.66)


def _ring(capacity=CAPACITY, depth=DEPTH, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    xs = torch.randn((capacity, *SHAPE), generator=g)
    vs = torch.randn((capacity, *SHAPE), generator=g)
    vc = torch.randn((depth, *SHAPE), generator=g)
    return x, xs, vs, vc


def _refused(call, message, *rings):
    """``call()`` raises ValueError matching ``message`` and leaves ``rings`` as they were."""
    before = [r.clone() for r in rings]
    with pytest.raises(ValueError, match=message):
        call()
    assert all(torch.equal(a, b) for a, b in zip(rings, before)), "a refused call wrote into the ring"


# -- item 9: rows no step has written ----------------------------------------------------------------------------

_RULE = "a skipped step reads only steps already logged"

# (id, vc?, step, v_slots, x_slot, x_weight, message): every call reads a row that holds nothing yet
UNLOGGED = [
    ("step0-vs", False, 0, [0], 0, 0.0,
     rf"weighted_step: v_slots entry 0 at step=0: vs row 0 holds no logged step \(before step 0 the ring of C=6 "
     rf"holds no step yet\); {_RULE}"),
    ("step0-vc", True, 0, [0], 0, 0.0,
     rf"weighted_step: v_slots entry 0 at step=0: vc row 0 holds no computed velocity .*only rows below 0.*{_RULE}"),
    ("written-slot-before-full", False, 2, [0, 2], 0, 0.0,
     rf"weighted_step: v_slots entry 2 at step=2: vs row 2 holds no logged step \(before step 2 the ring of C=6 "
     rf"holds steps 0..1 in slots 0..1\); {_RULE}"),
    ("slot-ahead", False, 3, [4], 0, 0.0, rf"weighted_step: v_slots entry 4 at step=3: vs row 4 holds no logged step"),
    ("vc-row-ahead", True, 2, [0, 2], 0, 0.0,
     rf"weighted_step: v_slots entry 2 at step=2: vc row 2 holds no computed velocity \(vc fills its 4 rows in "
     rf"order, one per computed step, and at most 2 steps precede step 2, so only rows below 2 can\); {_RULE}"),
    ("x-slot-ahead", False, 2, [0, 1], 3, 0.5,
     rf"weighted_step: x_slot=3 at step=2: xs row 3 holds no logged step \(before step 2 the ring of C=6 holds "
     rf"steps 0..1 in slots 0..1\); {_RULE}"),
    ("x-slot-written-at-step0", True, 1, [0], 1, -2.0, rf"weighted_step: x_slot=1 at step=1: xs row 1 holds no"),
]


@pytest.mark.parametrize("use_vc, step, v_slots, x_slot, x_weight, message", [c[1:] for c in UNLOGGED],
                         ids=[c[0] for c in UNLOGGED])
def test_weighted_step_refuses_rows_no_step_has_written(use_vc, step, v_slots, x_slot, x_weight, message):
    x, xs, vs, vc = _ring()
    vc = vc if use_vc else None
    weights = [1.0 / len(v_slots)] * len(v_slots)
    rings = (xs, vs) if vc is None else (xs, vs, vc)
    _refused(lambda: ops.weighted_step(x, xs, vs, vc, step, v_slots, weights, x_slot, x_weight, -0.1), message,
             *rings)
    # the same rule on the dispatcher path (the op called directly) and with autograd recording
    _refused(lambda: torch.ops.meancache.weighted_step(x, xs, vs, vc, step, v_slots, weights, x_slot, x_weight, -0.1,
                                                       1.0, torch.float32, True), message, *rings)
    xg = x.clone().requires_grad_(True)
    _refused(lambda: ops.weighted_step(xg, xs, vs, vc, step, v_slots, weights, x_slot, x_weight, -0.1), message,
             *rings)


def test_fake_tensors_apply_the_logged_rows_rule():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, xs, vs, vc = torch.empty(SHAPE), torch.empty(6, *SHAPE), torch.empty(6, *SHAPE), torch.empty(4, *SHAPE)
        assert ops.weighted_step(x, xs, vs, vc, 2, [0, 1], [-1.0, 2.0]).shape == SHAPE
        with pytest.raises(ValueError, match=r"v_slots entry 0 at step=0: vs row 0 holds no logged step"):
            ops.weighted_step(x, xs, vs, None, 0, [0], [1.0])
        with pytest.raises(ValueError, match=r"v_slots entry 3 at step=3: vc row 3 holds no computed velocity"):
            ops.weighted_step(x, xs, vs, vc, 3, [3], [1.0])
        with pytest.raises(ValueError, match=r"weighted_step: dt=nan: must be finite"):
            ops.weighted_step(x, xs, vs, vc, 3, [0], [1.0], dt=math.nan)


@pytest.mark.parametrize("step, v_slots, x_slot, x_weight, use_vc", [
    (1, [0], 0, 0.5, False),        # the one logged step
    (2, [0, 1], 1, 0.5, False),     # every logged step, the latent of the newest
    (6, [0, 5], 0, 0.5, False),     # a full ring: the written slot holds step 0, read before the write
    (9, [5, 2], 5, 0.5, False),     # the published form at K = 4, as skip_step(step=9, k=4) reads it
    (2, [0, 1], 4, 0.0, False),     # a left-out latent term reads nothing: its slot may be ahead
    (2, [1, 0], 0, 0.0, True),      # the velocities of the two steps computed so far
    (9, [0, 1, 2, 3], 0, 0.0, True),
], ids=["step1", "step2-all", "full-ring", "published-K4", "latent-left-out", "vc-two", "vc-full"])
def test_weighted_step_accepts_every_logged_row(step, v_slots, x_slot, x_weight, use_vc):
    x, xs, vs, vc = _ring()
    weights = [1.0 / len(v_slots)] * len(v_slots)
    out = ops.weighted_step(x, xs, vs, vc if use_vc else None, step, v_slots, weights, x_slot, x_weight, -0.1)
    assert torch.isfinite(out).all()


def test_weighted_step_window_matches_skip_steps_rule():
    # skip_step reads steps step - k .. step - 1 with k <= min(step, C); the weighted form of that window is
    # accepted for every such k, and one row further back (k = step + 1) is refused by both
    x, xs, vs, _ = _ring(capacity=3)
    for step in range(1, 7):
        for k in range(1, min(step, 3) + 1):
            start, last = (step - k) % 3, (step - 1) % 3
            ops.skip_step(x, xs.clone(), vs.clone(), step, k, *SIGMAS)
            ops.weighted_step(x, xs.clone(), vs.clone(), None, step, [start, last], [0.5, 0.5], start, 0.5, -0.1)
    with pytest.raises(ValueError, match=r"skip_step: k=2 at step=1"):
        ops.skip_step(x, xs, vs, 1, 2, *SIGMAS)
    with pytest.raises(ValueError, match=r"weighted_step: v_slots entry 2 at step=1: vs row 2 holds no logged step"):
        ops.weighted_step(x, xs, vs, None, 1, [2, 0], [0.5, 0.5], 2, 0.5, -0.1)


NON_FINITE = [
    ("dt-nan", dict(dt=math.nan), r"weighted_step: dt=nan: must be finite"),
    ("dt-inf", dict(dt=-math.inf), r"weighted_step: dt=-inf: must be finite"),
    ("out-scale-inf", dict(out_scale=math.inf, euler=False), r"weighted_step: out_scale=inf: must be finite"),
    ("out-scale-nan", dict(out_scale=math.nan), r"weighted_step: out_scale=nan: must be finite"),
    ("weight-inf", dict(v_weights=[1.0, math.inf]), r"weighted_step: v_weights holds inf: every weight must be finite"),
    ("dt-bool", dict(dt=True), r"weighted_step: dt=True: must be a real number \(int or float\), not a bool"),
    ("out-scale-tensor", dict(out_scale=torch.tensor(1.0)),
     r"weighted_step: out_scale=tensor\(1\.\): must be a real number \(int or float\), not a Tensor"),
    ("x-weight-str", dict(x_weight="0.5"), r"weighted_step: x_weight='0.5': must be a real number"),
    ("weight-bool", dict(v_weights=[1.0, False]), r"weighted_step: v_weights entry=False: must be a real number"),
    ("weights-scalar", dict(v_weights=1.0), r"weighted_step: v_weights=1.0: v_slots and v_weights must be lists"),
]


@pytest.mark.parametrize("change, message", [c[1:] for c in NON_FINITE], ids=[c[0] for c in NON_FINITE])
def test_weighted_step_scalars_are_finite_host_reals(change, message):
    x, xs, vs, vc = _ring()
    kwargs = dict(vc=vc, step=9, v_slots=[0, 1], v_weights=[-1.0, 2.0], x_slot=0, x_weight=0.0, dt=-0.1,
                  out_scale=1.0, euler=True)
    ops.weighted_step(x, xs.clone(), vs.clone(), **kwargs)  # the good call runs
    kwargs.update(change)
    _refused(lambda: ops.weighted_step(x, xs, vs, **kwargs), message, xs, vs)


def test_weighted_step_refuses_non_finite_scalars_on_the_dispatcher_path():
    x, xs, vs, vc = _ring()
    for dt, out_scale, name in ((math.nan, 1.0, "dt=nan"), (-0.1, math.inf, "out_scale=inf")):
        _refused(lambda: torch.ops.meancache.weighted_step(x, xs, vs, vc, 9, [0, 1], [-1.0, 2.0], 0, 0.0, dt,
                                                           out_scale, torch.float32, False),
                 rf"weighted_step: {name}: must be finite", xs, vs)


@pytest.mark.parametrize("op, arg, value, message", [
    ("skip_step", "sigma_next", math.nan, r"skip_step: sigma_next=nan: must be finite"),
    ("skip_step", "sigma_start", True, r"skip_step: sigma_start=True: must be a real number \(int or float\), not a"
                                       r" bool"),
    ("estimate", "out_scale", math.inf, r"estimate: out_scale=inf: must be finite"),
    ("estimate", "sigma_now", torch.tensor(0.7), r"estimate: sigma_now=tensor\(0\.7000\): must be a real number"),
    ("compute_step", "sigma_next", -math.inf, r"compute_step: sigma_next=-inf: must be finite"),
    ("compute_step", "sigma_now", "0.7", r"compute_step: sigma_now='0.7': must be a real number"),
])
def test_the_other_ops_take_finite_host_reals(op, arg, value, message):
    x, xs, vs, _ = _ring()
    a = dict(sigma_start=SIGMAS[0], sigma_now=SIGMAS[1], sigma_next=SIGMAS[2], out_scale=1.0)
    a[arg] = value

    def call():
        if op == "compute_step":
            return ops.compute_step(x, x.clone(), xs, vs, 9, a["sigma_now"], a["sigma_next"])
        if op == "skip_step":
            return ops.skip_step(x, xs, vs, 9, 4, a["sigma_start"], a["sigma_now"], a["sigma_next"])
        return ops.estimate(x, xs, vs, 9, 4, a["sigma_start"], a["sigma_now"], a["sigma_next"], a["out_scale"])

    _refused(call, message, xs, vs)


def test_numpy_scalars_are_accepted_by_the_ops():
    x, xs, vs, vc = _ring()
    a = ops.weighted_step(x, xs.clone(), vs.clone(), vc, np.int64(9), [np.int32(0), 1], [np.float32(-1.0), 2.0],
                          np.int64(0), np.float64(0.0), np.float32(-0.25))
    b = ops.weighted_step(x, xs.clone(), vs.clone(), vc, 9, [0, 1], [-1.0, 2.0], 0, 0.0, -0.25)
    assert torch.equal(a, b)
    c = ops.skip_step(x, xs.clone(), vs.clone(), 9, 4, np.float32(SIGMAS[0]), np.float64(SIGMAS[1]), SIGMAS[2])
    d = ops.skip_step(x, xs.clone(), vs.clone(), 9, 4, float(np.float32(SIGMAS[0])), SIGMAS[1], SIGMAS[2])
    assert torch.equal(c, d)


# Polynomial segments from step 1 on: the engine's weighted steps read vc and the ring from the earliest step the
# rule allows, so a rule stricter than the data would fail here.
EARLY = Schedule([0, 1, 4, 5, 8, 9], [0, 3, 0, 1, 0], 10, ["meancache", "predict", "meancache", "extrapolate",
                                                              "meancache"])


def _flow():
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(3)) / 4

    def velocity(x, sigma):
        return torch.tanh(x @ w) * (1.0 + sigma) - sigma * x

    return velocity


def test_the_engine_never_trips_the_rule_with_polynomial_segments():
    sigmas = torch.linspace(1.0, 0.0, 11).tolist()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(4))
    out = meancache.sample(_flow(), x, sigmas, EARLY)
    assert torch.isfinite(out).all()


def test_weighted_steps_trace_under_compile_fullgraph():
    sigmas = torch.linspace(1.0, 0.0, 11).tolist()
    velocity = _flow()

    def run(x):
        return meancache.sample(velocity, x, sigmas, EARLY)

    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    eager = run(x)
    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(compiled, eager)


# -- item 11: one rule per kind of argument ------------------------------------------------------------------------

_SIGMA_GRID = torch.linspace(1.0, 0.0, 11)


class _Flow(torch.nn.Module):
    def forward(self, x, timestep):
        return x - 1.0


def _run_module(model, steps=10):
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(6))
    for i in range(steps):
        v = model(x, timestep=1000 * _SIGMA_GRID[i])
        x = x + (_SIGMA_GRID[i + 1] - _SIGMA_GRID[i]) * v
    return x


@pytest.mark.parametrize("budget", [np.int64(4), np.int32(4), np.uint8(4)], ids=["int64", "int32", "uint8"])
def test_accelerate_takes_a_numpy_integer_budget_end_to_end(budget):
    model = meancache.accelerate(_Flow(), budget=budget, sigmas=_SIGMA_GRID)
    try:
        out = _run_module(model)
        assert torch.isfinite(out).all()
        assert model.meancache.stats.model_calls == 4
    finally:
        meancache.disable(model)


def test_accelerate_online_takes_numpy_budget_and_tolerance():
    model = meancache.accelerate(_Flow(), mode="online", budget=np.int64(5), tolerance=np.float32(0.05),
                                 sigmas=_SIGMA_GRID)
    try:
        out = _run_module(model)
        assert torch.isfinite(out).all()
        assert model.meancache.stats.model_calls <= 5
    finally:
        meancache.disable(model)


def test_config_stores_valid_numpy_scalars_as_python_numbers():
    cfg = MeanCacheConfig(budget=np.int64(4), tolerance=np.float32(0.25), timestep_scale=np.float32(1000.0),
                          output_sign=np.int64(-1))
    assert (type(cfg.budget), type(cfg.tolerance), type(cfg.timestep_scale), type(cfg.output_sign)) == (
        int, float, float, float)
    assert (cfg.budget, cfg.tolerance, cfg.timestep_scale, cfg.output_sign) == (4, 0.25, 1000.0, -1.0)
    assert type(cfg.replace(budget=np.int16(6)).budget) is int


@pytest.mark.parametrize("options, message", [
    (dict(budget=True), r"budget=True: must be an int >= 2"),
    (dict(budget=4.0), r"budget=4\.0: must be an int >= 2"),
    (dict(budget=np.float64(4.0)), rf"budget={re.escape(repr(np.float64(4.0)))}: must be an int >= 2"),
    (dict(mode="online", budget=4, tolerance=True), r"tolerance=True: must be a finite real number > 0"),
    (dict(mode="online", budget=4, tolerance=math.nan), r"tolerance=nan: must be a finite real number > 0"),
    (dict(mode="online", budget=4, tolerance="0.1"), r"tolerance='0\.1': must be a finite real number > 0"),
    (dict(budget=4, timestep_scale=True), r"timestep_scale=True: must be a finite real number > 0"),
    (dict(budget=4, output_sign=True), r"output_sign=True: must be the number 1 or -1 \(not a bool\)"),
], ids=["budget-bool", "budget-float", "budget-np-float", "tolerance-bool", "tolerance-nan", "tolerance-str",
        "timestep-scale-bool", "output-sign-bool"])
def test_accelerate_refuses_bools_and_floats_where_numbers_of_a_kind_are_taken(options, message):
    model = _Flow()
    with pytest.raises(ValueError, match=message):
        meancache.accelerate(model, sigmas=_SIGMA_GRID, **options)
    assert not hasattr(model, "meancache"), "refused, yet installed"


@pytest.mark.parametrize("value", ["predict", b"predict"], ids=["str", "bytes"])
def test_schedule_estimators_as_a_string_gets_the_estimators_rule(value):
    with pytest.raises(ValueError) as info:
        Schedule([0, 3, 4], [1, 0], 5, estimators=value)
    message = str(info.value)
    assert message.startswith(f"estimators={value!r}: must be a sequence of estimator names"), message
    assert "meancache, extrapolate, predict" in message and "one per segment" in message, message
    assert "sequence of ints" not in message, message


def test_schedule_estimators_not_iterable_gets_the_estimators_rule():
    with pytest.raises(ValueError, match=r"estimators=3: must be a sequence of estimator names .* \(got int\)"):
        Schedule([0, 3, 4], [1, 0], 5, estimators=3)
    with pytest.raises(ValueError, match=r"orders='10': must be a sequence of ints \(one order per segment\)"):
        Schedule([0, 3, 4], "10", 5)


def _schedule_doc(**changes):
    data = Schedule.default(4, 10).to_dict()
    data.update(changes)
    return data


@pytest.mark.parametrize("version", [2.0, 1.0, np.float64(2.0)], ids=["2.0", "1.0", "np-2.0"])
def test_schedule_version_must_be_an_int(version):
    with pytest.raises(ValueError, match=rf"version={re.escape(repr(version))}: this meancache reads schedule format "
                                         r"versions 1, 2, 3, 4, 5 \(an integer\)"):
        Schedule.from_dict(_schedule_doc(version=version))


def test_schedule_file_with_a_float_version_is_refused(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(_schedule_doc(version=2.0)), encoding="utf-8")
    with pytest.raises(ValueError, match=r"s\.json: version=2\.0: this meancache reads schedule format versions"):
        Schedule.load(path)
    path.write_text(json.dumps(_schedule_doc(version=2)), encoding="utf-8")
    assert Schedule.load(path) == Schedule.default(4, 10)


def test_preset_file_with_a_float_version_is_refused(tmp_path, monkeypatch):
    presets = tmp_path / "presets"
    presets.mkdir()
    table = {"compute_steps": [0, 2, 3], "orders": [1, 0]}
    doc = {"format": "meancache.preset", "version": 2.0, "name": "x", "num_steps": 4, "schedules": {"3": table}}
    (presets / "x.json").write_text(json.dumps(doc), encoding="utf-8")
    monkeypatch.setattr(schedule_module, "resources", types.SimpleNamespace(files=lambda package: tmp_path))
    schedule_module._preset_tables.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"x\.json: format='meancache\.preset', version=2\.0: not a meancache preset "
                                             r"file of version 1, 2 or 3 \(an integer\)"):
            schedule_module._preset_tables()
        doc["version"] = 2
        (presets / "x.json").write_text(json.dumps(doc), encoding="utf-8")
        assert schedule_module._preset_tables()["x"][1][3].compute_steps == (0, 2, 3)
    finally:
        schedule_module._preset_tables.cache_clear()


def test_schedule_constructors_take_numpy_integers():
    s = Schedule([np.int64(0), np.int32(3), 4], [np.uint8(1), 0], np.int64(5))
    assert s.num_steps == 5 and type(s.num_steps) is int and s.compute_steps == (0, 3, 4)
    assert Schedule.default(np.int64(4), np.int32(10)) == Schedule.default(4, 10)
    assert Schedule.preset("qwen-image", np.int64(10)) == Schedule.preset("qwen-image", 10)


# -- one rule for each kind of argument in the remaining constructors (issue 18, item 11) --------------------------


def test_online_plan_history_and_grids_take_numpy_integers():
    import numpy as np

    from meancache import History
    from meancache.flows import shifted_sigmas
    from meancache.online import OnlinePlan

    plan = OnlinePlan(np.int64(4), np.int32(10), order=np.int64(1))
    assert (plan.budget, plan.num_steps, plan.order) == (4, 10, 1) and type(plan.budget) is int
    assert History(np.int64(2), np.int64(1)).capacity == 2
    assert len(shifted_sigmas(np.int64(4))) == 5


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: __import__("meancache.online", fromlist=["OnlinePlan"]).OnlinePlan(4, 10, tolerance=True),
         r"tolerance=True: must be a finite number > 0"),
        (lambda: __import__("meancache.online", fromlist=["OnlinePlan"]).OnlinePlan(True, 10), r"budget=True"),
        (lambda: meancache.History(True), r"capacity=True: must be an int in 1\.\.6"),
        (lambda: meancache.History(2, depth=True), r"depth=True"),
        (lambda: meancache.sample(lambda x, s: x, torch.zeros(2), [1.0, True, 0.0], Schedule.full(2)),
         r"sigmas\[1\]=True: every sigma must be a real number"),
        (lambda: meancache.sample(lambda x, s: x, torch.zeros(2), ["1.0", "0.5", "0"], Schedule.full(2)),
         r"sigmas\[0\]='1\.0': every sigma must be a real number"),
        (lambda: __import__("meancache.flows", fromlist=["x"]).shifted_sigmas(True), r"num_steps=True"),
        (lambda: __import__("meancache.flows", fromlist=["x"]).shifted_sigmas(4, shift=True), r"shift=True"),
    ],
    ids=["online-tolerance-bool", "online-budget-bool", "history-capacity-bool", "history-depth-bool",
         "sigma-bool", "sigma-str", "shifted-steps-bool", "shifted-shift-bool"],
)
def test_bools_and_strings_are_refused_where_numbers_are_taken(build, match):
    with pytest.raises(ValueError, match=match):
        build()
