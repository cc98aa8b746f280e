"""Tests for :class:`meancache.Schedule` (algorithm.md §6).

The published tables are checked against ``tests/restatement.py``, a transcription of algorithm.md §6.2/§6.3 written
without reading the package, so a transcription error in the shipped preset JSON files shows up here.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time

import numpy as np
import pytest
import torch

import meancache
from meancache import MAX_ORDER
from meancache import Schedule
from meancache import StepPlan
from meancache import preset_names
from meancache.schedule import MAX_STEPS
from meancache.schedule import SCHEDULE_FORMAT_VERSION
from meancache.schedule import STRETCHED_CHAIN_ORDER
from restatement import PATTERNS
from restatement import PUBLISHED
from restatement import SKIP_COUNTS
from restatement import expand_official

REF_STEPS = 50  # the only step count the published tables exist for
RESAMPLE_STEPS = (8, 20, 28, 30, 100)
DEFAULT_STEPS = (8, 20, 28, 30, 50, 100)

# the published (official) presets; meancache's own calibrated `digits` preset is tested in tests/test_digits.py
PRESETS = [(name, budget) for name, budgets in sorted(preset_names().items()) if name in PUBLISHED for budget in budgets]
OWN_PRESETS = {"digits", "digits-joint"}
PRESET_IDS = [f"{name}-B{budget}" for name, budget in PRESETS]
PRESET_RESAMPLES = [(name, budget, m) for name, budget in PRESETS for m in RESAMPLE_STEPS]
PRESET_RESAMPLE_IDS = [f"{name}-B{budget}-to{m}" for name, budget, m in PRESET_RESAMPLES]


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------


def segments(s: Schedule):
    """(start, end, K) for every segment between consecutive compute steps."""
    st = s.compute_steps
    return list(zip(st, st[1:], s.orders))


def assert_valid(s: Schedule) -> None:
    """Check every §6.1 invariant directly (not through the constructor), then that the constructor agrees."""
    n, st, ks = s.num_steps, s.compute_steps, s.orders
    assert isinstance(st, tuple) and isinstance(ks, tuple)
    assert type(n) is int and n >= 2
    assert all(type(c) is int for c in st) and all(type(k) is int for k in ks)
    assert 2 <= s.budget == len(st) <= n
    assert st[0] == 0 and st[-1] == n - 1
    assert all(a < b for a, b in zip(st, st[1:]))
    assert len(ks) == len(st) - 1
    assert all(0 <= k <= MAX_ORDER for k in ks)
    assert all(k >= 1 for a, b, k in segments(s) if b - a > 1), "K=0 on a segment that skips steps"
    assert Schedule(st, ks, n, s.estimators) == s


def random_schedule(rng: random.Random, max_steps: int = 60) -> Schedule:
    """A random valid schedule: N in 2..max_steps, any budget, K=0 only on 1-step segments."""
    n = rng.randint(2, max_steps)
    budget = rng.randint(2, n)
    steps = [0] + sorted(rng.sample(range(1, n - 1), budget - 2)) + [n - 1]
    orders = [rng.randint(0, MAX_ORDER) if b - a == 1 else rng.randint(1, MAX_ORDER) for a, b in zip(steps, steps[1:])]
    return Schedule(steps, orders, n)


def greedy_place(targets, num_steps):
    """A simple feasible rounding (round, then push apart forwards and backwards) used as an upper bound on the
    least-squares cost of the resampling placement."""
    b = len(targets)
    n = [int(round(t)) for t in targets]
    n[0], n[-1] = 0, num_steps - 1
    for j in range(1, b):
        n[j] = max(n[j], n[j - 1] + 1)
    for j in range(b - 1, -1, -1):
        n[j] = min(n[j], num_steps - 1 - (b - 1 - j))
    for j in range(1, b):
        n[j] = max(n[j], n[j - 1] + 1)
    return n


# ---------------------------------------------------------------------------------------------------------------------
# construction and accessors
# ---------------------------------------------------------------------------------------------------------------------


def test_accessors():
    s = Schedule([0, 1, 4, 5], [0, 2, 0], num_steps=6)
    assert s.compute_steps == (0, 1, 4, 5)
    assert s.orders == (0, 2, 0)
    assert s.num_steps == 6
    assert s.budget == 4
    assert isinstance(s.compute_steps, tuple) and isinstance(s.orders, tuple)


def test_accepts_any_iterable_and_copies_input():
    steps, orders = [0, 3, 7], [2, 5]
    s = Schedule(steps, orders, 8)
    steps.append(9)
    orders[0] = 0
    assert s.compute_steps == (0, 3, 7) and s.orders == (2, 5)
    assert Schedule(range(4), iter([0, 0, 0]), 4) == Schedule.full(4)
    assert Schedule((x for x in (0, 2)), (k for k in (1,)), 3).compute_steps == (0, 2)


def test_is_read_only():
    s = Schedule([0, 2], [1], 3)
    for field in ("compute_steps", "orders", "num_steps", "budget", "window"):
        with pytest.raises(AttributeError):
            setattr(s, field, None)
    with pytest.raises(AttributeError):
        s.extra = 1  # __slots__


def test_minimal_schedule():
    s = Schedule([0, 1], [0], 2)
    assert s.budget == 2 and s.pattern() == ("CC", "--") and s.window == 1
    s = Schedule([0, 5], [6], 6)
    assert s.budget == 2 and s.pattern() == ("C....C", "-6666-") and s.window == 6


# Every violated invariant: (compute_steps, orders, num_steps, [regexes that must all appear in the message]).
# The first regex names the field and the bad value, the others the rule.
INVALID = {
    "unsorted": ([0, 3, 2, 5], [1, 1, 1], 6, [re.escape("compute_steps=[0, 3, 2, 5]"), "unsorted", "increasing"]),
    "repeated": ([0, 2, 2, 5], [1, 1, 1], 6, [re.escape("compute_steps=[0, 2, 2, 5]"), "repeated", "increasing"]),
    "first-not-0": ([1, 3, 5], [1, 1], 6, [re.escape("compute_steps=[1, 3, 5]"), "first step 1", "0"]),
    "first-negative": ([-1, 3, 5], [1, 1], 6, [re.escape("compute_steps=[-1, 3, 5]"), "first step -1"]),
    "last-missing": ([0, 2, 4], [1, 1], 6, [re.escape("compute_steps=[0, 2, 4]"), "last step 4", "5"]),
    "last-beyond": ([0, 2, 7], [1, 1], 6, [re.escape("compute_steps=[0, 2, 7]"), "last step 7", "5"]),
    "orders-too-short": ([0, 2, 5], [1], 6, [re.escape("orders=[1]"), "length 1", "budget - 1 = 2"]),
    "orders-too-long": ([0, 2, 5], [1, 1, 1], 6, [re.escape("orders=[1, 1, 1]"), "length 3", "budget - 1 = 2"]),
    "orders-empty": ([0, 5], [], 6, [re.escape("orders=[]"), "length 0", "budget - 1 = 1"]),
    "K-negative": ([0, 2, 5], [1, -1], 6, [re.escape("orders[1]=-1"), re.escape("0..6")]),
    "K-too-large": ([0, 2, 5], [7, 1], 6, [re.escape("orders[0]=7"), re.escape("0..6")]),
    "K-huge": ([0, 1, 5], [0, 100], 6, [re.escape("orders[1]=100"), re.escape("0..6")]),
    "K0-on-long-segment": ([0, 1, 4, 5], [0, 0, 0], 6, [re.escape("orders[1]=0"), re.escape("1->4"), "1-step"]),
    "K0-on-2-step-segment": ([0, 2], [0], 3, [re.escape("orders[0]=0"), re.escape("0->2"), "1-step"]),
    "budget-1": ([0], [], 5, [re.escape("compute_steps=[0]"), "budget 1 < 2"]),
    "budget-0": ([], [], 5, [re.escape("compute_steps=[]"), "budget 0 < 2"]),
    "budget-over-num_steps": ([0, 1, 2, 3, 4], [0, 0, 0, 0], 4, [re.escape("compute_steps=[0, 1, 2, 3, 4]"),
                                                                 "budget 5 > num_steps=4"]),
    "step-float": ([0, 2.0, 5], [1, 1], 6, [re.escape("compute_steps=[0, 2.0, 5]"), "int", re.escape("2.0")]),
    "step-bool": ([0, True, 5], [0, 1], 6, [re.escape("compute_steps=[0, True, 5]"), "int", "True"]),
    "step-str": ([0, "2", 5], [1, 1], 6, [re.escape("compute_steps=[0, '2', 5]"), "int", re.escape("'2'")]),
    "step-None": ([0, None, 5], [1, 1], 6, [re.escape("compute_steps=[0, None, 5]"), "int", "None"]),
    "order-float": ([0, 2, 5], [1, 1.5], 6, [re.escape("orders=[1, 1.5]"), "int", re.escape("1.5")]),
    "order-bool": ([0, 2, 5], [True, 1], 6, [re.escape("orders=[True, 1]"), "int", "True"]),
    "order-str": ([0, 2, 5], ["2", 1], 6, [re.escape("orders=['2', 1]"), "int"]),
    "num_steps-float": ([0, 2, 5], [1, 1], 6.0, [re.escape("num_steps=6.0"), "int"]),
    "num_steps-str": ([0, 2, 5], [1, 1], "6", [re.escape("num_steps='6'"), "int"]),
    "num_steps-bool": ([0, 1], [0], True, [re.escape("num_steps=True"), "int"]),
    "num_steps-1": ([0], [], 1, [re.escape("num_steps=1"), ">= 2"]),
    "num_steps-0": ([0, 1], [0], 0, [re.escape("num_steps=0"), ">= 2"]),
}


@pytest.mark.parametrize("case", list(INVALID), ids=list(INVALID))
def test_invalid_raises_value_error_naming_field_value_and_rule(case):
    steps, orders, n, patterns = INVALID[case]
    with pytest.raises(ValueError, match=patterns[0]) as info:
        Schedule(steps, orders, n)
    message = str(info.value)
    for pattern in patterns[1:]:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"


def test_k0_allowed_on_one_step_segments():
    s = Schedule([0, 1, 2, 5, 6], [0, 0, 3, 0], 7)
    assert s.pattern() == ("CCC..CC", "---33--")
    assert Schedule.full(5).orders == (0, 0, 0, 0)


@pytest.mark.parametrize("k", range(0, MAX_ORDER + 1), ids=[f"K{k}" for k in range(MAX_ORDER + 1)])
def test_any_k_allowed_on_one_step_segments(k):
    # the published tables put K >= 1 labels on 1-step edges (e.g. qwen-image-2512 B=25); they have no effect
    s = Schedule([0, 1, 2, 4], [k, k, 1], 5)
    assert s.orders == (k, k, 1)
    computed, skipped = StepPlan(True, 0), StepPlan(False, 1)
    assert s.expand() == (computed, computed, computed, skipped, computed)
    assert s.window == 1


@pytest.mark.parametrize("k", range(1, MAX_ORDER + 1), ids=[f"K{k}" for k in range(1, MAX_ORDER + 1)])
def test_every_k_from_1_to_max_allowed_on_long_segments(k):
    s = Schedule([0, 4], [k], 5)
    assert s.pattern() == ("C...C", "-" + str(k) * 3 + "-")
    assert s.window == k


# ---------------------------------------------------------------------------------------------------------------------
# expand / pattern / window
# ---------------------------------------------------------------------------------------------------------------------


def test_expand_and_pattern_small():
    s = Schedule([0, 1, 4, 5], [0, 2, 0], num_steps=6)
    assert s.pattern() == ("CC..CC", "--22--")
    plan = s.expand()
    assert isinstance(plan, tuple) and len(plan) == 6
    assert all(isinstance(p, StepPlan) for p in plan)
    assert plan[2] == StepPlan(computed=False, order=2)
    assert plan[2].computed is False and plan[2].order == 2
    assert plan[0] == (True, 0, "meancache", None)  # StepPlan gained the estimator, then fitted weights
    assert Schedule([0, 3], [4], num_steps=4).expand()[1] == StepPlan(computed=False, order=4)
    assert Schedule([0, 2, 3], [1, 0], num_steps=4).pattern() == ("C.CC", "-1--")
    assert s.expand() == s.expand()  # stable across calls


def test_expand_mixed_windows():
    s = Schedule([0, 3, 4, 8, 9], [5, 6, 1, 0], 10)
    assert s.pattern() == ("C..CC...CC", "-55--111--")
    assert [p.order for p in s.expand()] == [0, 5, 5, 0, 0, 1, 1, 1, 0, 0]
    assert s.window == 5  # the 6 sits on a 1-step segment and is never used


def test_full():
    for n in (2, 3, 8, 50):
        s = Schedule.full(n)
        assert_valid(s)
        assert s.compute_steps == tuple(range(n))
        assert s.orders == (0,) * (n - 1)
        assert s.budget == n == s.num_steps
        assert s.pattern() == ("C" * n, "-" * n)
        assert all(p == StepPlan(True, 0) for p in s.expand())
        assert s.window == 1


@pytest.mark.parametrize("n", [1, 0, -3, 5.0, "5", None, True], ids=repr)
def test_full_rejects_bad_num_steps(n):
    with pytest.raises(ValueError, match=re.escape(f"num_steps={n!r}")):
        Schedule.full(n)


def test_window():
    assert Schedule.full(10).window == 1
    assert Schedule([0, 2, 3], [1, 0], 4).window == 1
    assert Schedule([0, 2, 3, 6], [3, 6, 4], 7).window == 4
    assert Schedule([0, 1, 2], [6, 6], 3).window == 1  # nothing skipped


# ---------------------------------------------------------------------------------------------------------------------
# published tables
# ---------------------------------------------------------------------------------------------------------------------


def test_preset_names_match_the_published_tables():
    names = preset_names()
    assert {k: v for k, v in names.items() if k not in OWN_PRESETS} == {
        model: sorted(tables, reverse=True) for model, tables in PUBLISHED.items()
    }
    assert set(names) - set(PUBLISHED) == OWN_PRESETS
    assert meancache.preset_names is preset_names


@pytest.mark.parametrize("name,budget", PRESETS, ids=PRESET_IDS)
def test_preset_equals_published_table(name, budget):
    calc, orders = PUBLISHED[name][budget]
    s = Schedule.preset(name, budget)
    assert_valid(s)
    assert s == Schedule(calc, orders, REF_STEPS)
    assert s.compute_steps == tuple(calc)
    assert s.orders == tuple(orders)
    assert s.num_steps == REF_STEPS
    assert s.budget == budget
    assert Schedule.preset(name, budget, num_steps=REF_STEPS) == s
    assert Schedule.preset(name, budget, REF_STEPS) == s


@pytest.mark.parametrize("name,budget", PRESETS, ids=PRESET_IDS)
def test_preset_pattern_and_expansion(name, budget):
    s = Schedule.preset(name, budget)
    assert s.pattern() == PATTERNS[(name, budget)]
    calc, orders = PUBLISHED[name][budget]
    compute, k_at = expand_official(calc, orders, REF_STEPS)
    plan = s.expand()
    assert [p.computed for p in plan] == compute
    assert [p.order for p in plan] == k_at
    skipped = [p.order for p in plan if not p.computed]
    assert (len(skipped), skipped.count(1), sum(k >= 2 for k in skipped)) == SKIP_COUNTS[(name, budget)]
    k_line = PATTERNS[(name, budget)][1]
    assert s.window == max((int(c) for c in k_line if c != "-"), default=1)


def test_window_ignores_inert_labels_of_qwen_image_2512_b25():
    # §6.4: s5 labels on the 1-step edges 46->47, 47->48 have no effect
    s = Schedule.preset("qwen-image-2512", 25)
    assert max(s.orders) == 5
    assert s.window == 2


def test_preset_docstring_example():
    assert Schedule.preset("qwen-image", 10).compute_steps == (0, 1, 3, 7, 14, 21, 28, 35, 42, 49)
    assert Schedule.preset("qwen-image", 10, num_steps=20).budget == 10


@pytest.mark.parametrize("name", ["flux", "", "Qwen-Image", "qwen_image", None], ids=repr)
def test_preset_unknown_name_lists_available(name):
    with pytest.raises(ValueError, match=re.escape(f"name={name!r}")) as info:
        Schedule.preset(name, 10)
    message = str(info.value)
    for known in preset_names():
        assert known in message, message


@pytest.mark.parametrize("name", sorted(PUBLISHED), ids=str)
@pytest.mark.parametrize("budget", [11, 0, 50, -10, "10", None], ids=repr)
def test_preset_unknown_budget_lists_budgets(name, budget):
    with pytest.raises(ValueError, match=re.escape(f"budget={budget!r}")) as info:
        Schedule.preset(name, budget)
    message = str(info.value)
    assert name in message
    listed = [int(x) for x in re.findall(r"\d+", message.split("available", 1)[-1])]
    assert listed == preset_names()[name], message


@pytest.mark.parametrize("n", [1, 0, 20.0, "20"], ids=repr)
def test_preset_bad_num_steps(n):
    with pytest.raises(ValueError, match=re.escape(f"num_steps={n!r}")):
        Schedule.preset("qwen-image", 10, num_steps=n)


def test_preset_is_not_shared_mutable_state():
    a = Schedule.preset("z-image", 13)
    b = Schedule.preset("z-image", 13)
    assert a == b and hash(a) == hash(b)
    # the returned objects are immutable, so sharing the cached instance is harmless
    with pytest.raises(AttributeError):
        a.compute_steps = (0, 49)
    assert Schedule.preset("z-image", 13).compute_steps == tuple(PUBLISHED["z-image"][13][0])


# ---------------------------------------------------------------------------------------------------------------------
# resampling
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,budget,m", PRESET_RESAMPLES, ids=PRESET_RESAMPLE_IDS)
def test_preset_resampled(name, budget, m, caplog):
    table = Schedule.preset(name, budget)
    with caplog.at_level(logging.WARNING, logger="meancache"):
        s = Schedule.preset(name, budget, num_steps=m)
    assert_valid(s)
    assert s.num_steps == m
    assert s.compute_steps[0] == 0 and s.compute_steps[-1] == m - 1
    assert s.budget == min(budget, m)
    assert s == table.resample(m)
    assert Schedule.preset(name, budget, num_steps=m) == s  # deterministic
    if budget >= m:
        assert s == Schedule.full(m)
        assert s.pattern() == ("C" * m, "-" * m)
        if budget > m:
            assert any("exceeds" in r.getMessage() for r in caplog.records)
        return
    assert not caplog.records
    # the j-th segment comes from the j-th table segment and keeps its K, except stretched chains
    for (a, b, k), (_, _, k_ref) in zip(segments(s), segments(table)):
        if k_ref == 0 and b - a > 1:
            assert k == STRETCHED_CHAIN_ORDER
        else:
            assert k == k_ref
    # placement is the least-squares rounding of the scaled positions: no worse than a naive rounding
    scale = (m - 1) / (REF_STEPS - 1)
    targets = [c * scale for c in table.compute_steps]
    cost = sum((n - t) ** 2 for n, t in zip(s.compute_steps, targets))
    naive = greedy_place(targets, m)
    assert sum((n - t) ** 2 for n, t in zip(naive, targets)) >= cost - 1e-9


@pytest.mark.parametrize(
    "name,budget,m",
    [(name, budget, 100) for name, budget in PRESETS]
    + [(name, 10, m) for name in sorted(PUBLISHED) if 10 in PUBLISHED[name] for m in (20, 28, 30)],
    ids=lambda v: str(v),
)
def test_resample_keeps_relative_positions(name, budget, m):
    table = Schedule.preset(name, budget)
    s = table.resample(m)
    for c, n in zip(table.compute_steps, s.compute_steps):
        target = c * (m - 1) / (REF_STEPS - 1)
        assert abs(n - target) <= 1.0 + 1e-9, (c, n, target)


def test_resample_upsampling_rounds_to_nearest():
    # at 100 steps the scaled positions are > 2 apart, so each one rounds to its nearest integer
    for name, budget in PRESETS:
        s = Schedule.preset(name, budget, num_steps=100)
        table = Schedule.preset(name, budget)
        for c, n in zip(table.compute_steps, s.compute_steps):
            assert abs(n - c * 99 / 49) <= 0.5 + 1e-9


def test_resample_docstring_example():
    assert Schedule.preset("qwen-image", 10).resample(20).compute_steps == (0, 1, 2, 3, 5, 8, 11, 14, 16, 19)


def test_resample_stretched_chain_gets_k2():
    assert STRETCHED_CHAIN_ORDER == 2
    s = Schedule([0, 1, 2, 3], [0, 0, 0], 4).resample(10)
    assert s.compute_steps == (0, 3, 6, 9)
    assert s.orders == (2, 2, 2)
    # a chain that stays one step long stays K=0; other segments keep their K
    s = Schedule([0, 1, 9], [0, 1], 10).resample(11)
    assert s.compute_steps == (0, 1, 10) and s.orders == (0, 1)
    s = Schedule([0, 1, 5, 6], [0, 5, 0], 7).resample(13)
    assert s.compute_steps == (0, 2, 10, 12) and s.orders == (2, 5, 2)
    # every chain of qwen-image B=25 is stretched at 100 steps
    table = Schedule.preset("qwen-image", 25)
    up = table.resample(100)
    assert up.orders[:16] == (STRETCHED_CHAIN_ORDER,) * 16
    assert up.orders[16:22] == table.orders[16:22]


def test_resample_identity_and_full():
    s = Schedule([0, 3, 4, 8, 9], [5, 6, 1, 0], 10)
    assert s.resample(10) == s
    assert s.resample(5) == Schedule.full(5)  # budget == num_steps: every step computed
    assert s.resample(3) == Schedule.full(3)
    assert s.resample(2) == Schedule.full(2)
    assert Schedule.full(7).resample(31) == Schedule([0, 5, 10, 15, 20, 25, 30], [2] * 6, 31)


def test_resample_warns_when_budget_exceeds_steps(caplog):
    with caplog.at_level(logging.WARNING, logger="meancache"):
        Schedule.preset("z-image", 25).resample(20)
    assert any("25" in r.getMessage() and "20" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("n", [1, 0, -5, 20.0, "20", None, True], ids=repr)
def test_resample_rejects_bad_num_steps(n):
    with pytest.raises(ValueError, match=re.escape(f"num_steps={n!r}")):
        Schedule.preset("qwen-image", 10).resample(n)


def test_resample_deterministic():
    for name, budget in PRESETS:
        table = Schedule.preset(name, budget)
        for m in (9, 21, 37, 64, 99):
            a, b = table.resample(m), table.resample(m)
            assert a == b and a.to_json() == b.to_json()


# ---------------------------------------------------------------------------------------------------------------------
# default
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", DEFAULT_STEPS, ids=lambda n: f"N{n}")
def test_default_valid_for_every_budget(n):
    for budget in range(2, n + 1):
        s = Schedule.default(budget, n)
        assert_valid(s)
        assert s.budget == budget and s.num_steps == n
        assert Schedule.default(budget, n) == s  # deterministic
        # the measured default estimator: predict of order 1 wherever a step is skipped
        assert all((e, k) == ("predict", 1) for (a, b, k), e in zip(segments(s), s.estimators) if b - a > 1)
        # the same steps with the published estimator: segments near the end that skip steps use a JVP window
        published = Schedule.default(budget, n, "meancache")
        assert published.compute_steps == s.compute_steps and published.published
        for a, b, k in segments(published):
            if a / (n - 1) >= 0.85 and b - a > 1:
                assert k >= 2, (budget, a, b, k)
        # at most 8 steps apart wherever the budget can span the steps with such segments
        if 8 * (budget - 1) >= n - 1:
            assert max(b - a for a, b, _ in segments(s)) <= 8, (budget, s)
    assert Schedule.default(n, n) == Schedule.full(n)


@pytest.mark.parametrize("budget", [10, 13, 17, 20, 25], ids=lambda b: f"B{b}")
def test_default_shape_at_50(budget):
    n = 50
    s = Schedule.default(budget, n, "meancache")
    segs = segments(s)
    lengths = [b - a for a, b, _ in segs]
    middle = [b - a for a, b, _ in segs if 0.2 <= a / (n - 1) < 0.85]
    head = [b - a for a, b, _ in segs if a / (n - 1) < 0.2]
    assert middle and head
    # dense start: the first few segments are shorter than the middle ones
    assert max(lengths[:3]) < max(middle), lengths
    assert sum(head) / len(head) < sum(middle) / len(middle), lengths
    # no long run of skipped steps
    assert max(middle) <= 8 and max(lengths) <= 8, lengths
    for a, b, k in segs:
        if a / (n - 1) >= 0.85 and b - a > 1:
            assert k >= 2
    assert s.window <= MAX_ORDER


@pytest.mark.parametrize("budget", range(8, 51), ids=lambda b: f"B{b}")
def test_default_longest_segment_at_most_8(budget):
    s = Schedule.default(budget, 50)
    assert max(b - a for a, b, _ in segments(s)) <= 8


def test_default_docstring_example():
    assert Schedule.default(10, 50).compute_steps == (0, 2, 5, 7, 11, 19, 27, 35, 43, 49)


def test_default_estimator_and_order_choices():
    steps = Schedule.default(12, 40).compute_steps
    for estimator, order, want in [("extrapolate", None, 1), ("predict", 2, 2), ("meancache", 3, 3)]:
        s = Schedule.default(12, 40, estimator, order)
        assert s.compute_steps == steps
        assert {(e, k) for (a, b, k), e in zip(segments(s), s.estimators) if b - a > 1} == {(estimator, want)}
    with pytest.raises(ValueError, match="estimator='jvp': must be one of meancache, extrapolate, predict"):
        Schedule.default(12, 40, "jvp")
    with pytest.raises(ValueError, match=r"order=4: the predict estimator takes an int in 1\.\.3"):
        Schedule.default(12, 40, order=4)
    with pytest.raises(ValueError, match=r"order=0: the meancache estimator takes an int in 1\.\.6"):
        Schedule.default(12, 40, "meancache", 0)


@pytest.mark.parametrize(
    "budget,n",
    [(1, 50), (0, 50), (-1, 50), (51, 50), (9, 8), (10.0, 50), ("10", 50), (None, 50), (True, 50)],
    ids=lambda v: repr(v),
)
def test_default_rejects_bad_budget(budget, n):
    with pytest.raises(ValueError, match=re.escape(f"budget={budget!r}")):
        Schedule.default(budget, n)


@pytest.mark.parametrize("n", [1, 0, 50.0, "50", None], ids=repr)
def test_default_rejects_bad_num_steps(n):
    with pytest.raises(ValueError, match=re.escape(f"num_steps={n!r}")):
        Schedule.default(2, n)


# ---------------------------------------------------------------------------------------------------------------------
# equality, hash, repr
# ---------------------------------------------------------------------------------------------------------------------


def test_equality_and_hash():
    a = Schedule([0, 2, 5], [1, 3], 6)
    b = Schedule((0, 2, 5), (1, 3), 6)
    assert a == b and not (a != b) and hash(a) == hash(b)
    assert a != Schedule([0, 3, 5], [1, 3], 6)  # steps differ
    assert a != Schedule([0, 2, 5], [1, 4], 6)  # orders differ
    assert a != Schedule([0, 2, 6], [1, 3], 7)  # num_steps differ
    assert Schedule([0, 1], [0], 2) != Schedule([0, 1], [1], 2)  # an inert label still counts
    assert a != "Schedule" and a != ((0, 2, 5), (1, 3), 6) and a != None  # noqa: E711
    assert len({a, b, Schedule.full(6)}) == 2
    assert {a: 1}[b] == 1


def test_repr():
    s = Schedule([0, 2, 5], [1, 3], 6)
    assert repr(s) == "Schedule(compute_steps=[0, 2, 5], orders=[1, 3], num_steps=6)"
    for name, budget in PRESETS:
        p = Schedule.preset(name, budget)
        assert eval(repr(p), {"Schedule": Schedule}) == p


# ---------------------------------------------------------------------------------------------------------------------
# serialisation
# ---------------------------------------------------------------------------------------------------------------------

CUSTOM = {
    "minimal": Schedule([0, 1], [0], 2),
    "one-segment-K6": Schedule([0, 9], [6], 10),
    "mixed": Schedule([0, 3, 4, 8, 9], [5, 6, 1, 0], 10),
    "full-7": Schedule.full(7),
    "default-13-of-30": Schedule.default(13, 30),
    "resampled-qwen10-to-28": Schedule.preset("qwen-image", 10, num_steps=28),
}
OPEN_TAILS = {
    "tail-e1": Schedule([0, 8, 17, 25, 33, 42], [1, 1, 1, 1, 1, 1], 50, ["meancache"] + ["extrapolate"] * 5),
    "tail-K3": Schedule([0, 1, 4], [0, 2, 3], 7),
    "tail-of-2": Schedule([0, 1, 2], [0, 0, 1], 4, ["meancache", "meancache", "predict"]),
    "corrected": Schedule([0, 3, 5], [2, 1, 1], 7, ["meancache", "predict", "extrapolate"], corrector=2),
}
FITTED = {
    "fitted-tail": Schedule([0, 2, 3], [1, 0, 1], 6, ["fitted", "meancache", "fitted"],
                            weights=[[(0.9,)], None, [(1.5, -0.5), (2.0, -1.0)]], grid=[1 - i / 6 for i in range(7)]),
    "fitted-closed": Schedule([0, 3, 5], [1, 2], 6, ["predict", "fitted"], weights=[None, [(-0.25, 1.25)]],
                              grid=[1 - i / 6 for i in range(7)]),
}
ROUNDTRIP = {**{f"{n}-B{b}": Schedule.preset(n, b) for n, b in PRESETS}, **CUSTOM, **OPEN_TAILS, **FITTED}


@pytest.mark.parametrize("key", list(ROUNDTRIP), ids=list(ROUNDTRIP))
def test_json_roundtrip(key):
    s = ROUNDTRIP[key]
    text = s.to_json()
    assert isinstance(text, str)
    back = Schedule.from_json(text)
    assert back == s and hash(back) == hash(s)
    assert back.to_json() == text
    assert back.pattern() == s.pattern()
    data = json.loads(text)
    # the oldest version that holds it: 2 without a tail (which releases before the tail read), 3 with one, 4 with
    # fitted weights, 5 with a corrector (the newest)
    assert data["version"] == (5 if s.corrector else 4 if s.fitted else 3 if s.open_tail else 2)
    assert isinstance(data["format"], str) and data["format"]
    assert data["num_steps"] == s.num_steps
    assert data["compute_steps"] == list(s.compute_steps)
    assert data["orders"] == list(s.orders)
    assert Schedule.from_dict(s.to_dict()) == s


@pytest.mark.parametrize("key", list(ROUNDTRIP), ids=list(ROUNDTRIP))
def test_save_load_roundtrip(key, tmp_path):
    s = ROUNDTRIP[key]
    path = tmp_path / f"{key}.json"
    s.save(path)
    back = Schedule.load(path)
    assert back == s
    assert back.to_json() == s.to_json()
    assert path.read_text(encoding="utf-8").strip() == s.to_json()
    # str paths work too
    s.save(str(path))
    assert Schedule.load(str(path)) == s


def _doc(**changes):
    data = json.loads(Schedule([0, 2, 5], [1, 3], 6).to_json())
    for k, v in changes.items():
        if v is _DROP:
            del data[k]
        else:
            data[k] = v
    return json.dumps(data)


_DROP = object()

BAD_JSON = {
    "version-2": (_doc(version=SCHEDULE_FORMAT_VERSION + 1), re.escape(f"version={SCHEDULE_FORMAT_VERSION + 1}")),
    "version-0": (_doc(version=0), re.escape("version=0")),
    "version-string": (_doc(version=str(SCHEDULE_FORMAT_VERSION)), re.escape(f"version='{SCHEDULE_FORMAT_VERSION}'")),
    "version-missing": (_doc(version=_DROP), "version"),
    "format-wrong": (_doc(format="meancache.preset"), re.escape("format='meancache.preset'")),
    "format-missing": (_doc(format=_DROP), "format"),
    "num_steps-missing": (_doc(num_steps=_DROP), "num_steps"),
    "compute_steps-missing": (_doc(compute_steps=_DROP), "compute_steps"),
    "orders-missing": (_doc(orders=_DROP), "orders"),
    "malformed-truncated": ('{"format": "meancache.schedule", "version": 1', "malformed"),
    "malformed-empty": ("", "malformed"),
    "malformed-garbage": ("not json at all", "malformed"),
    "not-an-object": ("[0, 2, 5]", "object"),
    "null": ("null", "object"),
    "invalid-schedule": (_doc(orders=[0, 3]), re.escape("orders[0]=0")),
    "float-num_steps": (_doc(num_steps=6.0), re.escape("num_steps=6.0")),
    "float-step": (_doc(compute_steps=[0, 2.0, 5]), re.escape("compute_steps=[0, 2.0, 5]")),
    # `true == 1` in Python: a boolean is not a version number
    "version-true": (_doc(version=True), re.escape("version=True")),
    # loads, then `window` builds a list per step: bounded by MAX_STEPS instead
    "num_steps-1e9": (_doc(num_steps=10**9, compute_steps=[0, 10**9 - 1], orders=[6]),
                      re.escape("num_steps=1000000000: must be <= MAX_STEPS=10000")),
    "num_steps-1e30": (_doc(num_steps=10**30, compute_steps=[0, 10**30 - 1], orders=[6]),
                       re.escape(f"num_steps={10**30}: must be <= MAX_STEPS")),
}


@pytest.mark.parametrize("key", list(BAD_JSON), ids=list(BAD_JSON))
def test_from_json_rejects(key):
    text, pattern = BAD_JSON[key]
    with pytest.raises(ValueError, match=pattern):
        Schedule.from_json(text)


@pytest.mark.parametrize("key", list(BAD_JSON), ids=list(BAD_JSON))
def test_load_rejects_and_names_path(key, tmp_path):
    text, pattern = BAD_JSON[key]
    path = tmp_path / "bad schedule.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        Schedule.load(path)
    assert re.search(pattern, str(info.value)), str(info.value)


# ---------------------------------------------------------------------------------------------------------------------
# property-style: random schedules
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4), ids=lambda s: f"seed{s}")
def test_random_schedules_roundtrip_and_resample(seed, tmp_path):
    rng = random.Random(seed)
    for case in range(50):
        s = random_schedule(rng)
        assert_valid(s)
        # expansion agrees with the independent restatement
        compute, k_at = expand_official(list(s.compute_steps), list(s.orders), s.num_steps)
        assert [p.computed for p in s.expand()] == compute
        assert [p.order for p in s.expand()] == k_at
        line1, line2 = s.pattern()
        assert len(line1) == len(line2) == s.num_steps and line1.count("C") == s.budget
        # serialisation
        text = s.to_json()
        back = Schedule.from_json(text)
        assert back == s and back.to_json() == text and hash(back) == hash(s)
        if case % 10 == 0:
            path = tmp_path / f"{case}.json"
            s.save(path)
            assert Schedule.load(path) == s
        # resampling to a random step count
        m = rng.randint(2, 80)
        r = s.resample(m)
        assert_valid(r)
        assert r.num_steps == m
        assert r.budget == min(s.budget, m)
        assert r == s.resample(m)
        assert Schedule.from_json(r.to_json()) == r
        if s.budget >= m:
            assert r == Schedule.full(m)
        else:
            for (a, b, k), (_, _, k_ref) in zip(segments(r), segments(s)):
                assert k == (STRETCHED_CHAIN_ORDER if k_ref == 0 and b - a > 1 else k_ref)


# ---------------------------------------------------------------------------------------------------------------------
# sizes, files and argument types (issue 10)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: Schedule([0, MAX_STEPS], [6], MAX_STEPS + 1),
        lambda: Schedule.full(10**9),
        lambda: Schedule.default(10, 10**9),
        lambda: Schedule.preset("qwen-image", 10).resample(10**5),
        lambda: Schedule.preset("qwen-image", 10, num_steps=MAX_STEPS + 1),
    ],
    ids=["constructor", "full", "default", "resample", "preset"],
)
def test_step_count_is_bounded(make):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"num_steps=\d+: must be <= MAX_STEPS=10000") as info:
        make()
    assert "largest supported step count" in str(info.value)
    assert time.perf_counter() - t0 < 1.0  # rejected up front, before building anything of that size


def test_max_steps_itself_is_accepted():
    assert MAX_STEPS == 10_000
    s = Schedule.full(MAX_STEPS)
    assert s.num_steps == MAX_STEPS and s.window == 1
    assert Schedule.from_json(Schedule([0, MAX_STEPS - 1], [6], MAX_STEPS).to_json()).window == 6


@pytest.mark.parametrize(
    "make, seconds",
    [
        (lambda: Schedule.preset("qwen-image", 10).resample(MAX_STEPS), 30),
        (lambda: Schedule.preset("z-image", 25).resample(MAX_STEPS - 1), 30),
        (lambda: Schedule.default(10, MAX_STEPS), 17),
        (lambda: Schedule.default(25, MAX_STEPS), 40),
    ],
    ids=["resample-qwen10", "resample-z25", "default-10", "default-25"],
)
def test_resample_and_default_scale_linearly(make, seconds):
    """Each took ``seconds`` or more with the quadratic placement; now milliseconds. The bound is a tenth of the
    old time, far above the new one even on a loaded machine."""
    t0 = time.perf_counter()
    s = make()
    assert time.perf_counter() - t0 < seconds / 10
    assert_valid(s)


def _place_loop(targets, num_steps, max_gap=None):
    """The placement as a plain O(B * W**2) loop: the reference the vectorised one must equal, ties included."""
    b = len(targets)
    width = num_steps - b + 1
    if max_gap is None or max_gap * (b - 1) < num_steps - 1:
        max_gap = num_steps
    cost = [0.0 if o == 0 else math.inf for o in range(width)]
    back = []
    for j in range(1, b):
        cur, arg = [math.inf] * width, [0] * width
        for o in range(width):
            best_o = min(range(max(0, o - max_gap + 1), o + 1), key=cost.__getitem__)  # first minimiser
            cur[o] = cost[best_o] + (j + o - targets[j]) ** 2
            arg[o] = best_o
        if j == b - 1:
            cur = [math.inf] * (width - 1) + [cur[-1]]
        back.append(arg)
        cost = cur
    o = width - 1
    offsets = [o]
    for arg in reversed(back):
        o = arg[o]
        offsets.append(o)
    return [j + o for j, o in enumerate(reversed(offsets))]


@pytest.mark.parametrize("seed", range(3))
def test_placement_equals_the_plain_loop(seed):
    from meancache.schedule import _place

    rng = random.Random(seed)
    for case in range(200):
        n = rng.randint(2, 70)
        b = rng.randint(2, n)
        kind = case % 4
        if kind == 0:
            targets = sorted(rng.uniform(0, n - 1) for _ in range(b))
        elif kind == 1:  # halves: exact ties between two roundings
            targets = sorted(round(rng.uniform(0, n - 1) * 2) / 2 for _ in range(b))
        elif kind == 2:  # repeated integers: ties between pushing left and right
            targets = sorted(rng.randint(0, n - 1) for _ in range(b))
        else:
            targets = [j * (n - 1) / (b - 1) for j in range(b)]
        for max_gap in (None, 2, 3, 8, n):
            assert _place(targets, n, max_gap) == _place_loop(targets, n, max_gap), (targets, n, max_gap)


def test_with_order_accepts_numpy_integers():
    s = Schedule([0, 3, 4, 6], [4, 0, 2], num_steps=7)
    for order in (np.int64(2), np.int32(2), np.uint8(2)):
        out = s.with_order(order)
        assert out == s.with_order(2) and all(type(k) is int for k in out.orders)
    for bad in (np.float64(2.0), True, np.int64(7), 0):
        with pytest.raises(ValueError, match=re.escape(f"order={bad!r}")):
            s.with_order(bad)


@pytest.mark.parametrize(
    "content",
    [b"\xff\xfe{\x00}", bytes(range(256)), "{\"format\": \"meancache.schedule\"}".encode("utf-16")],
    ids=["latin-garbage", "binary", "utf-16"],
)
def test_load_of_a_non_utf8_file_names_the_path(tmp_path, content):
    path = tmp_path / "binary schedule.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        Schedule.load(path)
    assert "not UTF-8" in str(info.value) and type(info.value) is ValueError


# -- open tails: the last step estimated ----------------------------------------------------------------------------
@pytest.mark.parametrize("key", list(OPEN_TAILS), ids=list(OPEN_TAILS))
def test_open_tail_expands_to_estimated_last_steps(key):
    s = OPEN_TAILS[key]
    plan = s.expand()
    c = s.compute_steps[-1]
    assert s.open_tail and len(s.orders) == s.budget == len(s.estimators)
    assert [p.computed for p in plan].count(True) == s.budget
    assert all(not p.computed for p in plan[c + 1 :])
    assert {(p.estimator, p.order) for p in plan[c + 1 :]} == {(s.estimators[-1], s.orders[-1])}
    assert s.segments[-1][:2] == (c, s.num_steps)
    assert len(s.pattern()[0]) == s.num_steps


def test_open_tail_errors_name_the_rule():
    with pytest.raises(ValueError, match=r"open tail 4->6.*budget = 3 entries, not 2"):
        Schedule([0, 2, 4], [1, 1], 6)
    with pytest.raises(ValueError, match=r"orders\[2\]=0 on segment 4->6"):
        Schedule([0, 2, 4], [1, 1, 0], 6)
    with pytest.raises(ValueError, match=r"orders\[2\]=4: the polynomial order p of the predict segment 4->6"):
        Schedule([0, 2, 4], [1, 1, 4], 6, ["meancache", "meancache", "predict"])
    with pytest.raises(ValueError, match=r"length 2 != budget = 3 \(one estimator per segment, the open tail"):
        Schedule([0, 2, 4], [1, 1, 1], 6, ["meancache", "predict"])
    # a closed schedule is unchanged: one order per gap
    with pytest.raises(ValueError, match=r"length 3 != budget - 1 = 2"):
        Schedule([0, 2, 5], [1, 1, 1], 6)


def test_open_tail_needs_format_version_3():
    data = OPEN_TAILS["tail-e1"].to_dict()
    assert data["version"] == 3
    data["version"] = 2
    with pytest.raises(ValueError, match=r"open tail, which needs schedule format version 3 \(the file says 2\)"):
        Schedule.from_dict(data)


def test_open_tail_with_order_keeps_the_tail():
    s = OPEN_TAILS["tail-e1"].with_order(2)
    assert s.published and s.open_tail and s.orders == (2,) * 6


@pytest.mark.parametrize("m", [10, 25, 49, 51, 100, 200])
def test_open_tail_resample_keeps_budget_and_share_of_the_run(m):
    s = OPEN_TAILS["tail-e1"]
    r = s.resample(m)
    assert r.budget == s.budget and r.num_steps == m and r.compute_steps[0] == 0
    if r.open_tail:
        assert r.estimators[-1] == "extrapolate"
        # the tail keeps its fraction of the run (8 of 50 steps) to within one step of rounding
        assert abs((m - r.compute_steps[-1]) / m - 8 / 50) <= 1.0 / m + 1e-12
    else:
        assert r.compute_steps[-1] == m - 1 and len(r.orders) == r.budget - 1


def test_open_tail_runs_the_last_steps_on_the_estimate():
    # v(sigma) = 0.5 + 2 sigma: the extrapolate line through two computed velocities is exact, and its mean over a
    # step is its value at the step's midpoint; the first segment reuses v_0. The last 3 of 8 steps are never
    # evaluated.
    calls = []

    def line(x, sigma):
        calls.append(sigma)
        return 0.5 + 2.0 * sigma + 0 * x

    sig = torch.linspace(1, 0, 9, dtype=torch.float64)
    s = Schedule([0, 2, 4], [1, 1, 1], 8, ["meancache", "extrapolate", "extrapolate"])
    out = meancache.sample(line, torch.zeros(2, 3, dtype=torch.float64), sig, s)
    assert len(calls) == 3
    g = sig.tolist()
    v = lambda t: 0.5 + 2.0 * t  # noqa: E731
    used = [v(g[0]), v(g[0]), v(g[2]), v((g[3] + g[4]) / 2), v(g[4])] + [v((g[i] + g[i + 1]) / 2) for i in (5, 6, 7)]
    expected = sum((g[i + 1] - g[i]) * u for i, u in enumerate(used))
    assert torch.allclose(out, torch.full((2, 3), expected, dtype=torch.float64), rtol=0, atol=1e-12)
