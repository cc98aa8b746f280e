"""The joint search over compute steps and per-segment estimators (meancache K, extrapolate p): the DP against
brute force, the extrapolate cost against a plain replay of the run-time rule (and against meancache.sample
itself), the published-only search unchanged, determinism under another summation order, and validation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import meancache
from meancache import Recording
from meancache import Schedule
from meancache.calibrate import COST_RTOL
from meancache.calibrate import DEFAULT_GAMMA
from meancache.calibrate import segment_costs
from meancache.calibrate import solve
from meancache.calibration import JointCosts
from meancache.calibration import extrapolation_costs
from meancache.calibration import joint_costs
from meancache.calibration import joint_solve
from meancache.calibration import schedule_costs
from meancache.calibration.search import _per_order_costs
from meancache.estimators import extrapolation_weights
from meancache.estimators import polynomial_weights
from meancache.flows import GaussianMixtureFlow
from meancache.flows import shifted_sigmas


def _mixture_recording(seed, steps=10, inputs=3, dim=6, shift=3.0):
    flow = GaussianMixtureFlow(dim=dim, components=4, seed=seed, spread=3.0)
    noise = torch.randn(inputs, dim, generator=torch.Generator().manual_seed(seed + 100))
    return meancache.record(flow, noise, shifted_sigmas(steps, shift), progress=False)


def _reordered(rec, seed=0):
    """The same recording with its latent elements shuffled and its inputs reversed: equal in exact arithmetic,
    every sum in another order, as on a CPU with another SIMD width or thread count (as in test_calibrate.py)."""
    p, n = rec.num_inputs, rec.num_steps
    perm = torch.randperm(rec.latents[0, 0].numel(), generator=torch.Generator().manual_seed(seed))
    latents = rec.latents.reshape(p, n + 1, -1)[..., perm].flip(0).contiguous()
    velocities = rec.velocities.reshape(p, n, -1)[..., perm].flip(0).contiguous()
    return Recording(rec.sigmas, latents, velocities)


# -- brute force -----------------------------------------------------------------------------------------------------


class _Priced:
    """Each segment of a path priced independently of the DP: every candidate estimator's cost (meancache K from
    segment_costs with that K alone, from step 0 only the smallest K as there; extrapolate p from
    extrapolation_costs with the path's own nodes), then the documented tie rule."""

    def __init__(self, rec, max_len, families=("meancache", "extrapolate"), ks=range(1, 7), ps=(1, 2, 3)):
        self.rec, self.max_len, self.families, self.ks, self.ps = rec, max_len, families, list(ks), list(ps)
        self.per_k = {k: segment_costs(rec, orders=[k], max_len=max_len)[0] for k in self.ks}
        # the banded per-K table also holds the segments that end at N (open tails)
        self.band = {k: _per_order_costs(rec, max_len, [k])[0] for k in self.ks}
        self.cache = {}

    def segment(self, path, j):
        a, b = path[j], path[j + 1]
        if b - a == 1:
            return 0.0, ("meancache", 0)
        n = self.rec.num_steps
        cands = []
        if "meancache" in self.families:
            cands += [(float(self.per_k[k][a, b] if b < n else self.band[k][a, b - a]), ("meancache", k))
                      for k in self.ks if a > 0 or k == self.ks[0]]
        if "extrapolate" in self.families:
            for p in self.ps:
                nodes = tuple(path[max(0, j - p) : j + 1])
                if (nodes, b, p) not in self.cache:
                    row = [-1] * (p + 1 - len(nodes)) + list(nodes)
                    self.cache[nodes, b, p] = float(extrapolation_costs(self.rec, [row], order=p, max_len=self.max_len,
                                                                        to_end=b == n)[0, b - a])
                cands.append((self.cache[nodes, b, p], ("extrapolate", p)))
        least = min(c for c, _ in cands)
        return next((c, label) for c, label in cands if c <= least + COST_RTOL * least)

    def value(self, path, gamma):
        return sum(self.segment(path, j)[0] ** gamma for j in range(len(path) - 1))


def _brute_force(priced, n, budget, gamma, max_len):
    best = math.inf
    for inner in itertools.combinations(range(1, n - 1), budget - 2):
        path = (0, *inner, n - 1)
        if all(b - a <= max_len for a, b in zip(path, path[1:])):
            best = min(best, priced.value(path, gamma))
    return best


def _brute_force_tail(priced, n, budget, gamma, max_len):
    """The least value over every path 0 < c_1 < .. < c_{B-1} <= N - 1 that runs on to the end N (the last
    segment an open tail, or the 1-step chain from N - 1)."""
    best = math.inf
    for inner in itertools.combinations(range(1, n), budget - 1):
        path = (0, *inner, n)
        if all(b - a <= max_len for a, b in zip(path, path[1:])):
            best = min(best, priced.value(path, gamma))
    return best


def _tie_factor(gamma, budget):
    """joint_solve's documented bound: within (1 + max(1, gamma) * COST_RTOL) ** budget of the optimum."""
    return (1 + max(1.0, gamma) * COST_RTOL) ** budget * (1 + 1e-12)


@pytest.mark.parametrize(
    "seed, n, shift, families, ps",
    [
        (0, 9, 3.0, ("meancache", "extrapolate"), (1, 2, 3)),
        (1, 10, 1.0, ("meancache", "extrapolate"), (1, 2, 3)),
        (2, 10, 3.0, ("extrapolate",), (1, 2, 3)),
        (3, 9, 3.0, ("meancache", "extrapolate"), (1, 2)),
        (4, 8, 3.0, ("meancache", "extrapolate"), (1,)),
        (5, 9, 1.0, ("meancache",), (1, 2, 3)),
    ],
)
def test_joint_dp_is_the_brute_force_optimum(seed, n, shift, families, ps):
    """Exact: the DP's path value equals the minimum over every placement of the compute steps (each segment at
    its best estimator given the path before it), up to the documented tie tolerance; each segment's estimator is
    the tie rule's choice; schedule_costs prices the schedule the same way."""
    rec = _mixture_recording(seed, steps=n, shift=shift)
    checked = 0
    for max_len in (3, n - 1):
        priced = _Priced(rec, max_len, families, ps=ps)
        graph = joint_costs(rec, estimators=families, max_len=max_len, extrapolation_orders=ps)
        assert graph.depth == (max(ps) if "extrapolate" in families else 0)
        budgets = [b for b in range(2, n + 1) if (b - 1) * max_len >= n - 1]
        for gamma in (1.0, DEFAULT_GAMMA):
            for budget, sched in zip(budgets, joint_solve(graph, budgets, gamma=gamma)):
                path = sched.compute_steps
                assert sched.budget == budget and path[0] == 0 and path[-1] == n - 1
                value = priced.value(path, gamma)
                best = _brute_force(priced, n, budget, gamma, max_len)
                assert best <= value <= best * _tie_factor(gamma, budget) + 1e-300, (budget, value, best)
                labels = [priced.segment(path, j)[1] for j in range(len(path) - 1)]
                assert labels == list(zip(sched.estimators, sched.orders))
                costs = schedule_costs(rec, sched)
                assert costs == pytest.approx([priced.segment(path, j)[0] for j in range(len(path) - 1)], rel=1e-12)
                if "meancache" not in families:
                    assert all(e == "extrapolate" for e, a, b in zip(sched.estimators, path, path[1:]) if b - a > 1)
                checked += 1
    assert checked >= 10


@pytest.mark.parametrize(
    "seed, n, shift, families, ps",
    [
        (0, 9, 3.0, ("meancache", "extrapolate"), (1, 2, 3)),
        (2, 10, 3.0, ("extrapolate",), (1, 2)),
        (5, 9, 1.0, ("meancache",), (1, 2, 3)),
    ],
)
def test_open_tail_dp_is_the_brute_force_optimum(seed, n, shift, families, ps):
    """tail=True: the DP's value equals the least over every path to the end N, open tail or not, within the tie
    tolerance; it is never above the closed answer's; tail=False on the same graph is the closed search's answer
    (within the tolerance); schedule_costs prices the open tail as the DP does."""
    rec = _mixture_recording(seed, steps=n, shift=shift)
    checked = 0
    for max_len in (3, n - 1):
        priced = _Priced(rec, max_len, families, ps=ps)
        graph = joint_costs(rec, estimators=families, max_len=max_len, extrapolation_orders=ps, open_end=True)
        closed_graph = joint_costs(rec, estimators=families, max_len=max_len, extrapolation_orders=ps)
        budgets = [b for b in range(2, n) if b * max_len >= n]
        for gamma in (1.0, DEFAULT_GAMMA):
            for budget, sched in zip(budgets, joint_solve(graph, budgets, gamma=gamma, tail=True)):
                assert sched.budget == budget and sched.compute_steps[0] == 0
                path = (*sched.compute_steps, n)  # a closed answer reaches N by the chain from N - 1
                value = priced.value(path, gamma)
                best = _brute_force_tail(priced, n, budget, gamma, max_len)
                assert best <= value <= best * _tie_factor(gamma, budget + 1) + 1e-300, (budget, value, best)
                if sched.open_tail:
                    tail = priced.segment(path, len(path) - 2)
                    assert (sched.estimators[-1], sched.orders[-1]) == tail[1]
                    assert schedule_costs(rec, sched)[-1] == pytest.approx(tail[0], rel=1e-12)
                if (budget - 1) * max_len >= n - 1:
                    closed = joint_solve(graph, budget, gamma=gamma)
                    ref = joint_solve(closed_graph, budget, gamma=gamma)
                    assert not closed.open_tail
                    closed_value = priced.value(closed.compute_steps, gamma)
                    assert closed_value <= priced.value(ref.compute_steps, gamma) * _tie_factor(gamma, budget)
                    assert value <= closed_value * _tie_factor(gamma, budget + 1)
                checked += 1
    assert checked >= 8


def test_tail_needs_an_open_graph():
    rec = _mixture_recording(0, steps=8)
    with pytest.raises(ValueError, match=r"tail=True needs .*open_end=True"):
        joint_solve(joint_costs(rec, max_len=4), 3, tail=True)
    with pytest.raises(ValueError, match=r"tail='yes': must be True or False"):
        joint_solve(joint_costs(rec, max_len=4, open_end=True), 3, tail="yes")
    with pytest.raises(ValueError, match=r"open_end=1: must be True or False"):
        joint_costs(rec, max_len=4, open_end=1)
    with pytest.raises(ValueError, match=r"budget=2 cannot span num_steps=8 with max_len=3, even with an open tail"):
        joint_solve(joint_costs(rec, max_len=3, open_end=True), 2, tail=True)


def test_meancache_only_is_the_old_search():
    """estimators=("meancache",) is exactly segment_costs + solve; the joint DP restricted to the published
    estimator (no history: depth 0) reaches the same path values."""
    for seed in (0, 3):
        rec = _mixture_recording(seed, steps=20, inputs=4, dim=8)
        budgets = list(range(4, 15))
        found = meancache.calibrate(rec, budget=budgets, estimators=("meancache",))
        cost, best_k = segment_costs(rec)
        for sched, budget in zip(found, budgets):
            steps = solve(cost, budget)
            orders = [int(best_k[a, b]) if b - a > 1 else 0 for a, b in zip(steps, steps[1:])]
            assert sched == Schedule(steps, orders, 20) and sched.published
        graph = joint_costs(rec, estimators=("meancache",))
        assert graph.depth == 0
        for sched, budget in zip(joint_solve(graph, budgets), budgets):
            assert sched.published
            old = sum(c**DEFAULT_GAMMA for c in schedule_costs(rec, found[budget - 4]))
            new = sum(c**DEFAULT_GAMMA for c in schedule_costs(rec, sched))
            assert new == pytest.approx(old, rel=budget * DEFAULT_GAMMA * COST_RTOL)


# -- the extrapolate cost is the run-time rule -----------------------------------------------------------------------


def _dyadic_recording():
    """An Euler run that float32 holds exactly (dyadic sigmas and velocities): x_{a+1} = x_a + dt_a v_a exactly, so
    the plain replay below can start from x_a as the run-time rule does. Velocities vary irregularly per step."""
    sigmas = [1.0, 0.875, 0.8125, 0.6875, 0.625, 0.5, 0.375, 0.3125, 0.25, 0.125, 0.0]
    g = torch.Generator().manual_seed(7)
    v = torch.randint(-16, 17, (3, 10, 5), generator=g).float() / 8
    x = torch.zeros(3, 11, 5)
    x[:, 0] = torch.randint(-8, 9, (3, 5), generator=g).float() / 4
    for i in range(10):
        x[:, i + 1] = x[:, i] + (sigmas[i + 1] - sigmas[i]) * v[:, i]
    assert torch.equal(x.double()[:, 1:], x.double()[:, :-1] + torch.tensor(sigmas).diff()[None, :, None].double()
                       * v.double())
    return Recording(sigmas, x, v)


def _plain_replay(rec, nodes, b, order):
    """The run-time rule, step by step: from x_a, step a with v_a, then each skipped step i with the weights of
    extrapolation_weights over the path's computed steps so far (the nodes, oldest first)."""
    sig = rec.sigmas
    a = nodes[-1]
    x = rec.latents[:, a].double() + (sig[a + 1] - sig[a]) * rec.velocities[:, a].double()
    for i in range(a + 1, b):
        q, w = extrapolation_weights([sig[c] for c in nodes], sig[i], sig[i + 1], order)
        v_hat = sum(wj * rec.velocities[:, c].double() for wj, c in zip(w, nodes[len(nodes) - q - 1 :]))
        x = x + (sig[i + 1] - sig[i]) * v_hat
    return (x - rec.latents[:, b].double()).abs().mean().item() / (sig[a] - sig[b])


def test_extrapolation_cost_is_a_plain_replay_of_the_runtime_rule():
    rec = _dyadic_recording()
    n = rec.num_steps
    rows, want = [], []
    for order in (1, 2, 3):
        histories = [h for m in range(1, 6) for h in itertools.combinations(range(n - 1), m)]
        table = extrapolation_costs(rec, [[-1] * (5 - len(h)) + list(h) for h in histories], order=order, max_len=9)
        for h, costs in zip(histories, table.tolist()):
            a = h[-1]
            for length in range(10):
                if length == 0 or a + length > n - 1:
                    assert costs[length] == math.inf
                elif length == 1:
                    assert costs[length] == 0.0
                else:
                    rows.append(costs[length])
                    want.append(_plain_replay(rec, list(h), a + length, order))
    assert len(rows) > 1000
    assert rows == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_extrapolation_cost_matches_the_sampler():
    """Computing every step up to a, then extrapolating a+1 .. b-1: the sampler's x_b is x^_b of the cost (the
    float32 run against the float64 replay, hence the tolerance)."""
    flow = GaussianMixtureFlow(dim=8, components=5, seed=2)
    n = 10
    sigmas = shifted_sigmas(n, 3.0).tolist()
    x0 = torch.randn(3, 8, generator=torch.Generator().manual_seed(4))
    rec = meancache.record(flow, x0, sigmas, progress=False)
    for order in (1, 2, 3):
        table = extrapolation_costs(rec, [[max(-1, a - 3 + j) for j in range(4)] for a in range(n - 2)],
                                    order=order, max_len=3)
        for a in range(n - 2):
            for b in range(a + 2, min(n - 1, a + 3) + 1):
                seen = {}

                def velocity(x, s, b=b, seen=seen):
                    if s == sigmas[b]:
                        seen["x"] = x.clone()
                    return flow(x, s)

                sched = Schedule([*range(a + 1), b], [0] * a + [order], b + 1, estimators=["meancache"] * a
                                 + ["extrapolate"])
                meancache.sample(velocity, x0, sigmas[: b + 2], sched)
                got = (seen["x"] - rec.latents[:, b]).abs().mean().item() / (sigmas[a] - sigmas[b])
                assert table[a, b - a].item() == pytest.approx(got, rel=1e-4, abs=1e-9), (order, a, b)


def test_a_velocity_linear_in_sigma():
    """v = alpha + beta * sigma: every order p >= 1 reproduces the line exactly, so p = 1, 2, 3 price the same
    estimate (tied: p = 1 is reported) whatever the nodes. The cost is not 0: the estimate is the exact average of
    v over each step, the Euler reference uses v at the step's start, and the two differ by beta * dt / 2 per step,
    i.e. x^_b - x_b = beta / 2 * sum dt_i**2 (the Euler scheme's own error, which a skipped step cannot copy). The
    published estimator's damped trend does worse, so a search over meancache and extrapolate extrapolates every
    segment after step 0 (from step 0 extrapolation is reuse, tied with K = 1, which wins). ``predict`` (the line at
    each step's start) reproduces the Euler reference exactly and wins once every estimator is searched."""
    alpha = torch.tensor([0.5, -1.0, 0.25, 2.0])
    beta = torch.tensor([2.0, 1.0, -3.0, 0.5])
    sigmas = torch.linspace(1, 0, 17)  # dyadic: the float32 run is exact
    rec = meancache.record(lambda x, s: alpha + beta * s + 0 * x, torch.zeros(2, 4), sigmas, progress=False)
    sig = rec.sigmas
    n = rec.num_steps
    for order in (1, 2, 3):
        windows = [[-1] * (3 - m) + list(range(a - m, a + 1)) for a in range(2, n - 1) for m in range(1, 4) if a >= m]
        table = extrapolation_costs(rec, windows, order=order, max_len=8)
        for row, costs in zip(windows, table.tolist()):
            a = row[-1]
            for b in range(a + 2, min(n - 1, a + 8) + 1):
                euler = beta.abs().mean().item() / 2 * sum((sig[i + 1] - sig[i]) ** 2 for i in range(a + 1, b))
                assert costs[b - a] == pytest.approx(euler / (sig[a] - sig[b]), rel=1e-9)
    graph = joint_costs(rec, estimators=("meancache", "extrapolate"))
    multi = graph.length >= 2
    assert bool((graph.estimator[multi & (graph.states[graph.src, -1] > 0)] == 1).all())
    assert set(graph.order[multi & (graph.estimator == 1)].tolist()) == {1}
    for sched in meancache.calibrate(rec, budget=[4, 6, 9], estimators=("meancache", "extrapolate"), select=False):
        steps = sched.compute_steps
        for a, b, est, k in zip(steps, steps[1:], sched.estimators, sched.orders):
            if b - a > 1:
                assert (est, k) == (("meancache", 1) if a == 0 else ("extrapolate", 1)), sched
        published = meancache.calibrate(rec, budget=sched.budget, estimators=("meancache",), select=False)
        assert sum(c**3 for c in schedule_costs(rec, sched)) < sum(c**3 for c in schedule_costs(rec, published))
    # predict evaluates the line at each step's start, exactly what the Euler reference uses: its segments cost 0
    # (below the floor) once two nodes exist, so with every estimator searched it wins there
    for order in (1, 2, 3):
        windows = [[-1] * (3 - m) + list(range(a - m, a + 1)) for a in range(2, n - 1) for m in range(1, 4) if a >= m]
        table = extrapolation_costs(rec, windows, order=order, max_len=8, estimator="predict")
        assert float(table[torch.isfinite(table)].max()) == 0.0
    # a corrector is exact on a line too (the line through the segment's ends is v itself), from step 0 as well,
    # so the choice may be a corrected predict schedule, whose first segment keeps its label
    full = meancache.sample(lambda x, s: alpha + beta * s + 0 * x, torch.zeros(2, 4), sigmas, Schedule.full(n))
    for sched in meancache.calibrate(rec, budget=[4, 6, 9]):
        steps = sched.compute_steps
        for a, b, est, k in zip(steps, steps[1:], sched.estimators, sched.orders):
            if b - a > 1:
                first = ("predict", 1) if sched.corrector else ("meancache", 1)
                assert (est, k) == (first if a == 0 else ("predict", 1)), sched
        assert all(c == 0.0 for c, a in zip(schedule_costs(rec, sched), steps) if a > 0)
        if sched.corrector:
            out = meancache.sample(lambda x, s: alpha + beta * s + 0 * x, torch.zeros(2, 4), sigmas, sched)
            assert torch.allclose(out, full, atol=1e-6)


# -- determinism -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 6])
def test_joint_search_does_not_depend_on_summation_order(seed):
    """Rounding must not choose: the reordered recording prices every segment within 1e-12 (far inside COST_RTOL),
    with the same estimators, and gives the same schedules."""
    rec = _mixture_recording(seed, steps=14, inputs=6, dim=16)
    other = _reordered(rec)
    first, second = joint_costs(rec, max_len=5), joint_costs(other, max_len=5)
    torch.testing.assert_close(second.cost, first.cost, rtol=1e-12, atol=0)
    assert torch.equal(first.estimator, second.estimator) and torch.equal(first.order, second.order)
    budgets = list(range(4, 12))
    assert joint_solve(second, budgets) == joint_solve(first, budgets)
    assert len({e for s in joint_solve(first, budgets) for e in s.estimators}) == 3  # every family is used


def test_ties_go_to_meancache_then_lower_orders():
    """A straight trajectory: every estimator is exact, every cost 0 (below the floor): all tie, so every
    segment is meancache K = 1, and the path is the DP's tie rule's, as for the published search."""
    v = torch.tensor([[0.5, -0.25, 1.0, 2.0], [0.0, 0.75, -1.5, 0.125]])
    x0 = torch.tensor([[1.0, 0.5, -2.0, 0.25], [3.0, -1.0, 0.0, 0.5]])
    rec = meancache.record(lambda x, s: v, x0, torch.linspace(1, 0, 17), progress=False)
    graph = joint_costs(rec, max_len=5)
    assert bool((graph.cost[graph.length >= 2] == 0).all())
    assert bool((graph.estimator == 0).all()) and set(graph.order[graph.length >= 2].tolist()) == {1}
    assert joint_solve(graph, 4) == Schedule([0, 5, 10, 15], [1, 1, 1], 16)
    assert joint_solve(graph, 4) == meancache.calibrate(rec, budget=4, max_len=5, estimators=("meancache",))
    only = joint_solve(joint_costs(rec, max_len=5, estimators=("extrapolate",)), 4)
    assert only == Schedule([0, 5, 10, 15], [1, 1, 1], 16, estimators=["extrapolate"] * 3)


def test_small_and_edge_cases():
    rec = _mixture_recording(1, steps=2)
    assert meancache.calibrate(rec, budget=2) == Schedule([0, 1], [0], 2)
    rec = _mixture_recording(1, steps=6)
    assert meancache.calibrate(rec, budget=6) == Schedule.full(6)
    two = meancache.calibrate(rec, budget=2, max_len=5)
    assert two.compute_steps == (0, 5) and two.estimators == ("meancache",)  # from step 0: reuse, K = 1 wins
    assert repr(joint_costs(rec, max_len=2)).startswith("JointCosts(num_steps=6, max_len=2, depth=3")
    assert extrapolation_costs(rec, torch.zeros(0, 2, dtype=torch.int64), order=1).shape == (0, 6)


# -- validation ------------------------------------------------------------------------------------------------------


def _rec():
    return _mixture_recording(0, steps=10)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: meancache.calibrate(_rec(), budget=4, estimators="meancache"), r"estimators='meancache': must be"),
        (lambda: meancache.calibrate(_rec(), budget=4, estimators=()), r"estimators=\(\): must be a non-empty"),
        (lambda: meancache.calibrate(_rec(), budget=4, estimators=("jvp",)), r"estimators=\('jvp',\).*'jvp' is not"),
        (lambda: meancache.calibrate(_rec(), budget=4, estimators=None), "estimators=None"),
        (lambda: meancache.calibrate(_rec(), budget=4, extrapolation_orders=[4]), r"extrapolation_orders=\[4\]"),
        (lambda: meancache.calibrate(_rec(), budget=4, extrapolation_orders=[]), r"extrapolation_orders=\[\]"),
        (lambda: meancache.calibrate(_rec(), budget=4, extrapolation_orders="12"), "extrapolation_orders='12'"),
        (lambda: joint_costs(_rec(), orders=[0]), r"orders=\[0\]"),
        (lambda: joint_costs("rec"), "recording is a str"),
        (lambda: joint_costs(_rec(), max_len=0), "max_len=0"),
        (lambda: extrapolation_costs(_rec(), [[0, 1]], order=0), "order=0"),
        (lambda: extrapolation_costs(_rec(), [[0, 1]], order=4), "order=4"),
        (lambda: extrapolation_costs(_rec(), [[2, 1]], order=1), "strictly increasing"),
        (lambda: extrapolation_costs(_rec(), [[0, -1, 1]], order=1), "strictly increasing"),
        (lambda: extrapolation_costs(_rec(), [[-2, 1]], order=1), "strictly increasing"),
        (lambda: extrapolation_costs(_rec(), [[0, 10]], order=1), "must be in 0..9"),
        (lambda: extrapolation_costs(_rec(), [[0.0, 1.0]], order=1), "table of ints"),
        (lambda: extrapolation_costs(_rec(), [0, 1], order=1), r"shape \(2,\)"),
        (lambda: extrapolation_costs(_rec(), "nodes", order=1), "nodes=str"),
        (lambda: joint_solve("graph", 3), "costs is a str"),
        (lambda: joint_solve(joint_costs(_rec(), max_len=3), 3), "budget=3 cannot span num_steps=10 with max_len=3"),
        (lambda: joint_solve(joint_costs(_rec(), max_len=3), []), r"budget=\[\]"),
        (lambda: joint_solve(joint_costs(_rec(), max_len=3), 5, gamma=0), "gamma=0"),
        (lambda: schedule_costs(_rec(), Schedule.full(8)), "num_steps=8 != the recording's 10"),
        (lambda: schedule_costs(_rec(), "s"), "schedule is a str"),
    ],
)
def test_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_estimators_are_validated_before_recording():
    calls = []

    def counting(x, s):
        calls.append(s)
        return -x

    for bad in (dict(estimators=["meancache", "euler"]), dict(extrapolation_orders=[0])):
        with pytest.raises(ValueError, match="estimators|extrapolation_orders"):
            meancache.calibrate(counting, torch.zeros(2, 3), budget=10, sigmas=shifted_sigmas(50, 3.0), **bad)
    assert calls == []


def test_joint_costs_is_a_reusable_graph():
    rec = _mixture_recording(2, steps=12)
    graph = joint_costs(rec, max_len=4)
    assert isinstance(graph, JointCosts)
    many = joint_solve(graph, [4, 6, 9])
    assert many == [joint_solve(graph, b) for b in (4, 6, 9)]
    assert many == meancache.calibrate(rec, budget=[4, 6, 9], max_len=4, select=False)
    restricted = meancache.calibrate(rec, budget=6, max_len=4, extrapolation_orders=(1,), select=False)
    assert all(k == 1 for e, k in zip(restricted.estimators, restricted.orders) if e == "extrapolate")


# -- the whole-run replay that chooses between the searches ----------------------------------------------------------


def test_replay_error_is_the_engine_driven_by_the_recording():
    from meancache.calibration import replay_error

    rec = _mixture_recording(2, steps=14, inputs=5, dim=8)
    assert replay_error(rec, Schedule.full(14)) < 1e-6  # float32 recording, float64 replay
    sched = Schedule([0, 1, 5, 9, 13], [0, 2, 1, 2], 14, ["meancache", "meancache", "predict", "extrapolate"])
    calls = iter(sched.compute_steps)
    out = meancache.sample(lambda x, s: rec.velocities.double()[:, next(calls)], rec.latents.double()[:, 0],
                           rec.sigmas, sched)
    ref = rec.latents.double()[:, -1]
    assert replay_error(rec, sched) == pytest.approx(float((out - ref).norm() / ref.norm()), rel=1e-12)
    with pytest.raises(ValueError, match="schedule.num_steps=10 != the recording's 14 steps"):
        replay_error(rec, Schedule.full(10))


def test_calibrate_select_false_is_the_joint_search_on_every_input():
    rec = _mixture_recording(4, steps=16, inputs=6, dim=8)
    budgets = [4, 6, 9]
    joint = meancache.calibrate(rec, budget=budgets, max_len=6, select=False)
    assert joint == joint_solve(joint_costs(rec, max_len=6), budgets)
    assert joint == meancache.calibrate(rec, budget=budgets, max_len=6, estimators=meancache.estimators.ESTIMATORS,
                                        select=False)
    with pytest.raises(ValueError, match="select='yes': must be True or False"):
        meancache.calibrate(rec, budget=4, select="yes")


def test_a_restricted_graph_is_the_graph_built_for_those_estimators():
    """calibrate reuses the joint graph for the polynomial-only search: it must equal pricing them afresh."""
    rec = _mixture_recording(5, steps=12, inputs=4, dim=6)
    full = joint_costs(rec, max_len=5)
    for subset in (("extrapolate", "predict"), ("predict",), ("meancache", "extrapolate")):
        fresh, cut = joint_costs(rec, max_len=5, estimators=subset), full.restricted(subset)
        assert cut.estimators == fresh.estimators and cut.depth == fresh.depth
        for name in ("states", "src", "dst", "length", "cost", "estimator", "order"):
            assert torch.equal(getattr(cut, name), getattr(fresh, name)), (subset, name)
        assert joint_solve(cut, [4, 7]) == joint_solve(fresh, [4, 7])
    with pytest.raises(ValueError, match=r"estimators=\('meancache',\): restricted\(\) needs a polynomial"):
        full.restricted(("meancache",))


@pytest.mark.parametrize("estimator", ["predict", "extrapolate"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_batched_node_weights_are_the_run_time_weights_bit_for_bit(estimator, order):
    """The calibration prices every (path, skipped step) with one batched table; each entry must be the very
    float64 the engine's per-step call gives, the order guard included: a grid with a repeated sigma (nodes that
    coincide) and one dense at sigma -> 0 (weights that exceed MAX_GAIN, so lower orders are taken)."""
    from meancache.calibration.joint import _node_weights_batched
    from meancache.calibration.joint import _windows

    grids = [tuple(float(s) for s in shifted_sigmas(24, 3.0)),
             (1.0, 0.9, 0.9, 0.7, 0.55, 0.5, 0.3, 0.2, 0.12, 0.05, 0.01, 0.0),
             tuple(float(s) for s in torch.linspace(1, 0, 16) ** 3)]
    for sig in grids:
        n, max_len = len(sig) - 1, 6
        windows, _ = _windows(n, max_len, 3, n - 1)
        for a in range(n - 2):
            sub = windows[windows[:, -1] == a]
            reach = min(max_len, n - 1 - a)
            if reach < 2 or len(sub) == 0:
                continue
            got = _node_weights_batched(estimator, order, sig, sub, a, reach)
            for r, row in enumerate(sub.tolist()):
                present = [sig[c] for c in row if c >= 0]
                for t, i in enumerate(range(a + 1, a + reach)):
                    q, w = polynomial_weights(estimator, present, sig[i], sig[i + 1], order)
                    want = [0.0] * (len(row) - q - 1) + list(w)
                    assert got[r, t].tolist() == want, (sig, row, i)


@pytest.mark.parametrize("chunk_bytes", [1, 15 * (3 * 6) * 8])  # one row; 15 rows of 3 inputs x 6 float64
def test_extrapolation_costs_do_not_depend_on_the_chunking(chunk_bytes, monkeypatch):
    """The deviations are formed chunk by chunk in one reused buffer: chunks of one row (the buffer reused at once)
    and of a few rows (the last chunk of a start smaller, the buffer grown for a start with more skipped steps)
    give the costs and gains of the default single chunk, within float64 rounding."""
    import meancache.calibration.joint as joint

    rec = _mixture_recording(5, steps=14)
    nodes = [[-1] * (3 - m) + list(range(a - m, a + 1)) for a in range(0, 13) for m in range(0, 4) if a >= m]
    for order, estimator in ((1, "extrapolate"), (3, "predict")):
        want = extrapolation_costs(rec, nodes, order=order, max_len=8, estimator=estimator, with_gain=True)
        monkeypatch.setattr(joint, "_ROW_CHUNK_BYTES", chunk_bytes)
        got = extrapolation_costs(rec, nodes, order=order, max_len=8, estimator=estimator, with_gain=True)
        monkeypatch.undo()
        for g, w in zip(got, want):
            finite = torch.isfinite(w)
            assert torch.equal(finite, torch.isfinite(g))
            assert torch.allclose(g[finite], w[finite], rtol=1e-12, atol=0)
