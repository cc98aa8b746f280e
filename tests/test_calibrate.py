"""meancache.calibrate: recording, segment costs, the budgeted peak-suppressed path, and the calibrated schedules'
quality on two analytic flows (margins printed; run with ``-rA`` or ``-s`` to see them)."""

from __future__ import annotations

import itertools
import math
import os
import random

import pytest
import torch
from fields import SmoothField
from fields import rel_err

import meancache
from meancache import Recording
from meancache import Schedule
from meancache.calibrate import COST_RTOL
from meancache.calibrate import DEFAULT_GAMMA
from meancache.calibrate import RECORDING_FORMAT
from meancache.calibrate import RECORDING_FORMAT_VERSION
from meancache.calibrate import segment_costs
from meancache.calibrate import solve
from meancache.flows import GaussianMixtureFlow
from meancache.flows import shifted_sigmas

INF = math.inf


# -- solve: exact optimum -------------------------------------------------------------------------------------------


def _random_table(n: int, rng: random.Random, missing: float = 0.0) -> list[list[float]]:
    """Random costs; 1-step edges cost 0 as segment_costs makes them; a fraction of the others is missing (inf)."""
    table = [[INF] * n for _ in range(n)]
    for a in range(n):
        for b in range(a + 1, n):
            if b == a + 1:
                table[a][b] = 0.0
            elif rng.random() >= missing:
                table[a][b] = rng.choice([rng.random(), rng.random() * 3.0, 0.0 if rng.random() < 0.05 else 1.0])
    return table


def _path_value(table, steps, gamma):
    return sum(table[a][b] ** gamma for a, b in zip(steps, steps[1:]))


def _brute_force(table, budget, gamma, max_len):
    """Minimum over every choice of budget - 2 interior compute steps (None if no path has finite cost)."""
    n = len(table)
    best = None
    for inner in itertools.combinations(range(1, n - 1), budget - 2):
        steps = (0, *inner, n - 1)
        if any(b - a > max_len for a, b in zip(steps, steps[1:])):
            continue
        value = _path_value(table, steps, gamma)
        if value < INF and (best is None or value < best):
            best = value
    return best


def _tie_factor(gamma, budget):
    """How far above the optimum solve may end: each of the budget - 1 stages keeps a value within the tie
    tolerance max(1, gamma) * COST_RTOL of its least (solve's docstring)."""
    return (1 + max(1.0, gamma) * COST_RTOL) ** (budget - 1) * (1 + 1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_solve_is_the_exact_optimum(seed):
    rng = random.Random(seed)
    n = rng.randint(4, 12)
    table = _random_table(n, rng, missing=0.15 if seed % 3 == 0 else 0.0)
    checked = 0
    for gamma in (1.0, 2.0, 3.5, 0.7):
        for max_len in sorted({2, 3, 5, n - 1}):
            for budget in range(2, n + 1):
                if (budget - 1) * max_len < n - 1:
                    with pytest.raises(ValueError, match=f"budget={budget} cannot span num_steps={n}"):
                        solve(table, budget, gamma=gamma, max_len=max_len)
                    continue
                expected = _brute_force(table, budget, gamma, max_len)
                if expected is None:
                    with pytest.raises(ValueError, match="no path with finite cost"):
                        solve(table, budget, gamma=gamma, max_len=max_len)
                    continue
                steps = solve(table, budget, gamma=gamma, max_len=max_len)
                assert len(steps) == budget and steps[0] == 0 and steps[-1] == n - 1
                assert all(0 < b - a <= max_len for a, b in zip(steps, steps[1:]))
                # optimal up to the documented tie tolerance, compounded over the budget - 1 stages
                value = _path_value(table, steps, gamma)
                assert expected <= value <= expected * _tie_factor(gamma, budget) + 1e-15
                checked += 1
    assert checked > 10


def test_solve_tie_break_is_deterministic():
    # all-zero costs: every path is optimal; the smallest predecessor wins while backtracking from the last step
    zeros = [[0.0] * 6 for _ in range(6)]
    assert solve(zeros, 3) == [0, 1, 5]
    assert solve(zeros, 3) == solve(torch.zeros(6, 6), 3)
    assert solve(zeros, 6) == [0, 1, 2, 3, 4, 5]


def _length_table(n, weights, jitter=None):
    """Costs that depend on the segment length only, so paths with the same lengths in another order tie exactly;
    with ``jitter``, each cost is moved by at most one unit in the last place, as another machine may round it."""
    rng = random.Random(jitter)
    table = [[INF] * n for _ in range(n)]
    for a in range(n):
        for b in range(a + 1, n):
            if b - a in weights:
                c = weights[b - a]
                if jitter is not None:
                    c *= 1 + rng.choice([-1, 0, 1]) * 2.0**-52
                table[a][b] = c
    return table


@pytest.mark.parametrize("gamma", [1.0, DEFAULT_GAMMA])
def test_solve_ties_are_not_decided_by_rounding(gamma):
    """Paths equal in exact arithmetic (here: the same segment lengths in another order, and with gamma = 1 also
    other lengths of the same total) sum in another order, so they differ by rounding, which differs between
    machines. They are ties, and the smallest predecessor wins on every machine: one-ulp changes of the costs
    never change the path."""
    weights = {1: 0.0, 2: 0.1, 3: 0.2, 4: 0.3, 5: 0.7}
    paths = {tuple(solve(_length_table(14, weights, jitter), 5, gamma=gamma, max_len=5))
             for jitter in [None, *range(20)]}
    assert len(paths) == 1, paths
    assert paths.pop() == ((0, 1, 5, 9, 13) if gamma == 1.0 else (0, 3, 6, 9, 13))


def test_solve_accepts_tensors_and_ignores_entries_outside_the_band():
    table = torch.full((5, 5), 7.0)  # diagonal and b < a entries are never read
    table[0, 2] = table[2, 4] = 0.1
    assert solve(table, 3, max_len=2) == [0, 2, 4]


# -- gamma: peak suppression ----------------------------------------------------------------------------------------


def _max_edge(table, steps):
    return max(table[a][b] for a, b in zip(steps, steps[1:]))


def test_larger_gamma_suppresses_the_peak_segment():
    # hand-made, 5 steps, budget 3: 0-3-4 has one large segment (0.9, 0); 0-2-4 two medium ones (0.5, 0.62)
    inf = INF
    table = [
        [inf, 0.0, 0.5, 0.9, inf],
        [inf, inf, 0.0, 0.5, 0.5],
        [inf, inf, inf, 0.0, 0.62],
        [inf, inf, inf, inf, 0.0],
        [inf] * 5,
    ]
    table[1][4] = inf  # no third candidate
    low = solve(table, 3, gamma=1.0, max_len=4)
    high = solve(table, 3, gamma=4.0, max_len=4)
    assert low == [0, 3, 4]  # sum 0.9 < 1.12: gamma = 1 takes the single large deviation
    assert high == [0, 2, 4]  # 0.5^4 + 0.62^4 = 0.21 < 0.9^4 = 0.66: gamma = 4 spreads it out
    assert _max_edge(table, high) < _max_edge(table, low)


def _minimax(table, budget, max_len):
    n = len(table)
    best = INF
    for inner in itertools.combinations(range(1, n - 1), budget - 2):
        steps = (0, *inner, n - 1)
        if all(b - a <= max_len for a, b in zip(steps, steps[1:])):
            best = min(best, _max_edge(table, steps))
    return best


def test_gamma_direction_on_random_tables():
    """Larger gamma trades total cost for a smaller worst segment, on 20 random tables x 9 budgets.

    What holds for every table: gamma = 1 has the least total cost; the gamma-optimal path's worst segment is
    within a factor (B - 1) ** (1 / gamma) of the minimax path's (brute force), a bound that tightens as gamma
    grows. Pairwise monotonicity between two finite gammas is not a theorem, so it is checked on the average: the
    mean worst segment falls strictly from gamma 1 to 2 to 4 to 16, and gamma = 16 never has a worse peak than
    gamma = 1 on these tables (and is lower in at least a tenth of the cases)."""
    gammas = (1.0, 2.0, 4.0, 16.0)
    peaks_sum = [0.0] * len(gammas)
    strict = cases = 0
    for seed in range(20):
        rng = random.Random(100 + seed)
        n = 12
        table = [[INF] * n for _ in range(n)]
        for a in range(n):
            for b in range(a + 1, n):
                table[a][b] = 0.0 if b == a + 1 else rng.random() * (b - a)
        for budget in range(3, n):
            paths = [solve(table, budget, gamma=g, max_len=6) for g in gammas]
            peaks = [_max_edge(table, p) for p in paths]
            totals = [_path_value(table, p, 1.0) for p in paths]
            minimax = _minimax(table, budget, 6)
            for g, peak, total in zip(gammas, peaks, totals):
                # both bounds hold for exact optima; solve is optimal up to its tie tolerance (_tie_factor)
                assert peak <= minimax * ((budget - 1) * _tie_factor(g, budget)) ** (1.0 / g)
                assert total * _tie_factor(1.0, budget) >= totals[0]
            assert peaks[-1] <= peaks[0] + 1e-15, (seed, budget, peaks)
            strict += peaks[-1] < peaks[0]
            cases += 1
            peaks_sum = [s + p for s, p in zip(peaks_sum, peaks)]
    assert all(b < a for a, b in zip(peaks_sum, peaks_sum[1:])), peaks_sum
    assert strict >= cases // 10, (strict, cases)  # 30 of 180 here


# -- recording ------------------------------------------------------------------------------------------------------


def test_record_matches_the_uncached_sampler():
    field = SmoothField(8, seed=1)
    sigmas = shifted_sigmas(12, 3.0)
    x0 = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    rec = meancache.record(field, x0, sigmas, progress=False)
    assert rec.latents.shape == (5, 13, 8) and rec.velocities.shape == (5, 12, 8)
    assert rec.latents.dtype == rec.velocities.dtype == torch.float32
    assert rec.sigmas == sigmas.tolist() and rec.num_steps == 12 and rec.num_inputs == 5 and rec.shape == (8,)
    full = meancache.sample(field, x0, sigmas, Schedule.full(12))
    assert torch.equal(rec.latents[:, -1], full)
    assert torch.equal(rec.latents[:, 0], x0)
    for i in (0, 5, 11):
        assert torch.equal(rec.velocities[:, i], field(rec.latents[:, i], sigmas[i].item()))
    assert rec.meta["batched"] is True and rec.meta["model_evaluations"] == 12


def test_record_list_inputs_call_per_input_and_match_batched():
    field = SmoothField(4, seed=2)
    sigmas = torch.linspace(1, 0, 7)
    x0 = torch.randn(3, 1, 4, generator=torch.Generator().manual_seed(1))
    shapes = []

    def per_input(x, s):
        shapes.append(tuple(x.shape))
        return field(x, s)

    rec_list = meancache.record(per_input, list(x0), sigmas, progress=False)
    assert set(shapes) == {(1, 4)} and len(shapes) == 3 * 6
    rec_batch = meancache.record(field, x0, sigmas, progress=False)
    assert rec_list.latents.shape == (3, 7, 1, 4)
    assert torch.allclose(rec_list.latents, rec_batch.latents, atol=1e-6)
    assert rec_list.meta["batched"] is False


def test_record_keeps_low_precision_latents_and_records_float32():
    field = SmoothField(4, seed=3)
    x0 = torch.randn(2, 4, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    seen = []
    rec = meancache.record(lambda x, s: seen.append(x.dtype) or field(x, s), x0, [1.0, 0.6, 0.2, 0.0], progress=False)
    assert set(seen) == {torch.bfloat16}
    assert rec.latents.dtype == torch.float32 and rec.meta["input_dtype"] == "bfloat16"
    assert torch.equal(rec.latents[:, -1], meancache.sample(field, x0, [1.0, 0.6, 0.2, 0.0], Schedule.full(3)).float())


def test_record_progress_bar(capsys):
    meancache.record(lambda x, s: -x, torch.ones(2, 3), [1.0, 0.5, 0.0], progress=True)
    assert "meancache.record" in capsys.readouterr().err


# -- Recording files ------------------------------------------------------------------------------------------------


def _small_recording():
    field = SmoothField(6, seed=4)
    x0 = torch.randn(3, 2, 6, generator=torch.Generator().manual_seed(3))
    rec = meancache.record(field, x0, shifted_sigmas(10, 3.0), progress=False)
    rec.meta.update({"model": "smooth", "cfg": 4.0, "prompts": ["a", "b"], "extra": {"seed": 3, "none": None}})
    return rec


def test_recording_save_load_round_trip(tmp_path):
    rec = _small_recording()
    path = tmp_path / "rec.pt"
    rec.save(path)
    back = Recording.load(path)
    assert back.sigmas == rec.sigmas and back.meta == rec.meta
    assert torch.equal(back.latents, rec.latents) and torch.equal(back.velocities, rec.velocities)
    # plain torch content: readable with weights_only=True, tagged with format and version
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == RECORDING_FORMAT and raw["version"] == RECORDING_FORMAT_VERSION
    # the reloaded recording calibrates exactly like the original
    assert meancache.calibrate(back, budget=4) == meancache.calibrate(rec, budget=4)


def _rewrite(path, **changes):
    data = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if value is _DROP:
            del data[key]
        else:
            data[key] = value
    torch.save(data, path)


_DROP = object()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"version": 2}, "version=2"),
        ({"version": _DROP}, "version=None"),
        ({"format": "something.else"}, "not a meancache recording"),
        ({"latents": _DROP}, r"missing field\(s\) \['latents'\]"),
        ({"velocities": torch.zeros(3, 4, 2, 6)}, "must be \\(P >= 1, 10, \\*shape\\)"),
        ({"sigmas": [1.0, 0.5]}, "must be \\(P >= 1, 2, \\*shape\\)"),
    ],
    ids=["future-version", "no-version", "foreign-format", "no-latents", "bad-velocities", "bad-sigmas"],
)
def test_recording_load_rejects_wrong_content(tmp_path, change, message):
    path = tmp_path / "rec.pt"
    _small_recording().save(path)
    _rewrite(path, **change)
    with pytest.raises(ValueError, match=message) as info:
        Recording.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not-a-dict"])
def test_recording_load_rejects_corrupt_files(tmp_path, damage):
    path = tmp_path / "rec.pt"
    if damage == "garbage":
        path.write_bytes(os.urandom(1000))
    elif damage == "truncated":
        _small_recording().save(path)
        path.write_bytes(path.read_bytes()[:500])
    else:
        torch.save([1, 2, 3], path)
    with pytest.raises(ValueError) as info:
        Recording.load(path)
    assert str(path) in str(info.value)


def test_recording_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        Recording.load(tmp_path / "nope.pt")


@pytest.mark.parametrize(
    "args, message",
    [
        (([1.0, 0.0], torch.zeros(1, 2, 3, dtype=torch.float64), torch.zeros(1, 1, 3)), "float32 on the CPU"),
        (([1.0, 0.0], torch.zeros(1, 3, 3), torch.zeros(1, 1, 3)), r"latents has shape \(1, 3, 3\)"),
        (([1.0, 0.0], torch.zeros(2, 2, 3), torch.zeros(1, 1, 3)), "same P and shape"),
        (([1.0, 0.0], torch.zeros(1, 2, 3), torch.zeros(1, 1, 4)), "same P and shape"),
        (([1.0, 0.0], torch.full((1, 2, 3), math.nan), torch.zeros(1, 1, 3)), "NaN or inf"),
        (([1.0, 0.0], [[0.0]], torch.zeros(1, 1, 3)), "must be a torch.Tensor"),
        (([0.0, 1.0], torch.zeros(1, 2, 3), torch.zeros(1, 1, 3)), "sigmas must decrease"),
        (([1.0, 0.0], torch.zeros(1, 2, 3), torch.zeros(1, 1, 3), {"f": object()}), "meta="),
        (([1.0, 0.0], torch.zeros(1, 2, 3), torch.zeros(1, 1, 3), {1: 2}), "meta="),
    ],
    ids=["dtype", "steps", "inputs", "shape", "nan", "not-tensor", "sigmas", "meta-object", "meta-key"],
)
def test_recording_rejects_inconsistent_data(args, message):
    with pytest.raises(ValueError, match=message):
        Recording(*args)


# -- segment costs --------------------------------------------------------------------------------------------------


def test_segment_costs_replay_the_runtime_estimator():
    """Every (a, b, K) cost equals the deviation of meancache.sample itself on a schedule that computes 0..a,
    skips a+1..b-1 with window K and computes b: the velocity_fn sees x^_b at step b."""
    flow = GaussianMixtureFlow(dim=8, components=5, seed=2)
    n, max_len = 12, 5
    sigmas = shifted_sigmas(n, 3.0).tolist()
    x0 = torch.randn(3, 8, generator=torch.Generator().manual_seed(4))
    rec = meancache.record(flow, x0, sigmas, progress=False)
    cost, best_k = segment_costs(rec, max_len=max_len)
    assert cost.dtype == torch.float64 and best_k.dtype == torch.int64 and cost.shape == best_k.shape == (n, n)
    for a in range(n):
        for b in range(n):
            if b == a + 1:
                assert cost[a, b] == 0 and best_k[a, b] == 0
            elif not 0 < b - a <= max_len:
                assert cost[a, b] == INF and best_k[a, b] == 0
    for a in range(n - 2):
        for b in range(a + 2, min(n - 1, a + max_len) + 1):
            per_k = []
            for k in range(1, 7):
                seen = {}

                def velocity(x, s, b=b, seen=seen):
                    if s == sigmas[b]:
                        seen["x"] = x.clone()
                    return flow(x, s)

                meancache.sample(velocity, x0, sigmas[: b + 2], Schedule([*range(a + 1), b], [0] * a + [k], b + 1))
                per_k.append((seen["x"] - rec.latents[:, b]).abs().mean().item() / (sigmas[a] - sigmas[b]))
            want = min(per_k)
            assert cost[a, b].item() == pytest.approx(want, rel=1e-4, abs=1e-9), (a, b)
            # best K: the replay's argmin (smallest K on ties), up to float noise between near-equal windows
            assert per_k[int(best_k[a, b]) - 1] == pytest.approx(want, rel=1e-4, abs=1e-9)


def test_segment_costs_orders_and_max_len():
    rec = _small_recording()
    cost1, k1 = segment_costs(rec, orders=[1])
    cost_all, k_all = segment_costs(rec)
    assert set(k1[cost1.isfinite() & (cost1 > 0)].tolist()) == {1}
    # more candidate windows can only lower the best cost (the 1e-12 allows for a thread split between calls)
    assert bool((cost_all <= cost1 * (1 + 1e-12)).all())
    cost3, k3 = segment_costs(rec, max_len=3)
    band = torch.triu(torch.ones(10, 10, dtype=torch.bool), 1) & ~torch.triu(torch.ones(10, 10, dtype=torch.bool), 4)
    assert bool(cost3[band].isfinite().all()) and bool(cost3[~band].isinf().all())
    # max_len only masks: the same costs up to rounding (another chunking), far inside COST_RTOL, and the same K
    torch.testing.assert_close(cost3[band], cost_all[band], rtol=1e-12, atol=0)
    assert torch.equal(k3[band], k_all[band])
    cost_1, _ = segment_costs(rec, max_len=1)  # only chains
    assert bool((cost_1[cost_1.isfinite()] == 0).all()) and int(cost_1.isfinite().sum()) == 9


# -- the same schedule on every machine ------------------------------------------------------------------------------


def _mixture_recording(seed, steps=20, inputs=8, dim=16):
    flow = GaussianMixtureFlow(dim=dim, components=6, seed=seed, spread=3.0)
    noise = torch.randn(inputs, dim, generator=torch.Generator().manual_seed(seed + 100))
    return meancache.record(flow, noise, shifted_sigmas(steps, 3.0), progress=False)


def _reordered(rec, seed=0):
    """The same recording with its latent elements shuffled and its inputs reversed. Equal in exact arithmetic (the
    replay is element-wise and the cost a mean), but every sum runs in another order, as on a CPU with another SIMD
    width or another thread count."""
    p, n = rec.num_inputs, rec.num_steps
    perm = torch.randperm(rec.latents[0, 0].numel(), generator=torch.Generator().manual_seed(seed))
    latents = rec.latents.reshape(p, n + 1, -1)[..., perm].flip(0).contiguous()
    velocities = rec.velocities.reshape(p, n, -1)[..., perm].flip(0).contiguous()
    return Recording(rec.sigmas, latents, velocities)


@pytest.mark.parametrize("seed", [0, 6, 9])
def test_calibration_does_not_depend_on_summation_order(seed):
    """Rounding must not choose: the reordered recording gives the same K everywhere, costs equal far inside
    COST_RTOL, and the same schedules (these seeds are ones where float32 costs chose differently)."""
    rec = _mixture_recording(seed)
    other = _reordered(rec)
    cost, best_k = segment_costs(rec)
    cost2, best_k2 = segment_costs(other)
    assert torch.equal(best_k2, best_k)
    torch.testing.assert_close(cost2, cost, rtol=1e-12, atol=0)
    budgets = list(range(4, 12))
    assert meancache.calibrate(other, budget=budgets) == meancache.calibrate(rec, budget=budgets)


@pytest.mark.parametrize("orders", [range(1, 7), (3, 5, 6)], ids=["K1-6", "K3,5,6"])
def test_segments_from_step_0_take_the_smallest_window(orders):
    """From step 0 the replay has logged only steps that reuse v_0, so every K is the same estimate in exact
    arithmetic: the smallest K is reported, with its cost, whatever rounding would have preferred."""
    for seed in range(6):
        rec = _mixture_recording(seed)
        cost, best_k = segment_costs(rec, orders=orders)
        assert best_k[0, 2:9].tolist() == [min(orders)] * 7, seed
        smallest, _ = segment_costs(rec, orders=[min(orders)])
        assert torch.equal(cost[0], smallest[0])


def test_best_window_is_the_smallest_within_the_tie_tolerance():
    """The documented rule, checked against each window's own costs: the best K is the smallest K whose cost is
    within COST_RTOL of the least, and the cost reported is that K's."""
    rec = _mixture_recording(3, steps=30)
    cost, best_k = segment_costs(rec)
    per_k = torch.stack([segment_costs(rec, orders=[k])[0] for k in range(1, 7)])
    least = per_k.min(dim=0).values
    for a in range(1, 28):  # step 0 is collapsed to K = 1 (test above)
        for b in range(a + 2, min(30, a + 9)):
            tied = [k for k in range(1, 7) if per_k[k - 1, a, b] <= least[a, b] * (1 + COST_RTOL)]
            assert int(best_k[a, b]) == tied[0], (a, b)
            assert cost[a, b] == per_k[tied[0] - 1, a, b]


def test_a_straight_trajectory_costs_nothing():
    """A recording that is exactly straight (dyadic values: the float32 sampler is exact) is estimated exactly by
    every K; the replay's rounding is below COST_FLOOR, so every cost is 0, K is 1, and the path is the tie rule's."""
    v = torch.tensor([[0.5, -0.25, 1.0, 2.0], [0.0, 0.75, -1.5, 0.125]])
    x0 = torch.tensor([[1.0, 0.5, -2.0, 0.25], [3.0, -1.0, 0.0, 0.5]])
    rec = meancache.record(lambda x, s: v, x0, torch.linspace(1, 0, 17), progress=False)
    assert torch.equal(rec.latents[:, -1], x0 - v)  # exact
    cost, best_k = segment_costs(rec)
    multi = torch.triu(torch.ones(16, 16, dtype=torch.bool), 2) & cost.isfinite()
    assert bool((cost[multi] == 0).all()) and bool((best_k[multi] == 1).all())
    assert meancache.calibrate(rec, budget=4, select=False) == Schedule([0, 1, 7, 15], [0, 1, 1], 16)
    # with the validated choice every candidate is exact too: the tie goes to the first safe one
    report = []
    chosen = meancache.calibrate(rec, budget=4, report=report)
    assert report[0]["chosen"] == "default" and chosen.compute_steps == Schedule.default(4, 16).compute_steps


def test_segment_costs_do_not_depend_on_the_thread_count():
    rec = _mixture_recording(1, steps=12, inputs=2, dim=1 << 15)  # large enough for torch to split its loops
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = segment_costs(rec)
        torch.set_num_threads(2)
        two = segment_costs(rec)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[1], two[1])
    torch.testing.assert_close(one[0], two[0], rtol=1e-12, atol=0)


# -- calibrate ------------------------------------------------------------------------------------------------------


def test_calibrate_is_deterministic_and_consistent():
    # the published estimator's search (the joint search, the default, is checked in test_joint_search.py)
    mc = dict(estimators=("meancache",))
    flow = GaussianMixtureFlow(dim=16, components=6, seed=3, spread=3.0)
    sigmas = shifted_sigmas(50, 3.0)
    inputs = torch.randn(8, 16, generator=torch.Generator().manual_seed(11))
    first = meancache.calibrate(flow, inputs, budget=[10, 17, 25], sigmas=sigmas, progress=False, **mc)
    second = meancache.calibrate(flow, inputs.clone(), budget=[10, 17, 25], sigmas=sigmas, progress=False, **mc)
    assert first == second
    rec = meancache.record(flow, inputs, sigmas, progress=False)
    assert meancache.calibrate(rec, budget=[10, 17, 25], **mc) == first
    assert [meancache.calibrate(rec, budget=b, **mc) for b in (10, 17, 25)] == first
    assert meancache.calibrate(rec, budget=(17,), num_steps=50, **mc) == [first[1]]
    cost, best_k = segment_costs(rec)
    for sched, budget in zip(first, (10, 17, 25)):
        assert isinstance(sched, Schedule) and sched.budget == budget and sched.num_steps == 50
        assert list(sched.compute_steps) == solve(cost, budget, gamma=DEFAULT_GAMMA)
        for (a, b), k in zip(zip(sched.compute_steps, sched.compute_steps[1:]), sched.orders):
            assert k == (0 if b - a == 1 else int(best_k[a, b]))
    # a larger gamma reaches a path whose worst segment is no worse
    peak = lambda s: max(cost[a, b].item() for a, b in zip(s.compute_steps, s.compute_steps[1:]))  # noqa: E731
    peaked, flat = (meancache.calibrate(rec, budget=10, gamma=g, **mc) for g in (8.0, 1.0))
    assert peak(peaked) <= peak(flat)


# The two analytic flows of the quality comparison (also in bench/bench_quality.py): separated Gaussian mixtures,
# one on the FLUX/SD3 shift-3 grid the presets were made for, one on the unshifted grid.
FLOWS = {
    "mixture-shift3": (dict(dim=16, components=6, seed=3, spread=3.0), 3.0),
    "mixture-linear": (dict(dim=16, components=6, seed=5, spread=3.0), 1.0),
}


def _reuse(sched: Schedule) -> Schedule:
    return sched.with_order(1)


def _uniform(budget: int, num_steps: int, k: int) -> Schedule:
    steps = sorted({round(j * (num_steps - 1) / (budget - 1)) for j in range(budget)})
    return Schedule(steps, [k if b - a > 1 else 0 for a, b in zip(steps, steps[1:])], num_steps)


@pytest.mark.parametrize("flow_name", list(FLOWS))
def test_calibrated_schedule_beats_baselines_at_budget_10(flow_name, record_property):
    """Calibrated on 32 noise inputs, evaluated on 8192 other ones (held out), at 10 of 50 evaluations.

    Baselines: the published qwen-image B=10 table; plain reuse (the calibrated compute steps with K = 1 on every
    multi-step segment); uniform compute steps (evenly spaced), with the better of all-K=1 and all-K=2 as measured
    on the evaluation noise itself (which favours that baseline). Error: ||x - x_full|| / ||x_full||.
    """
    kwargs, shift = FLOWS[flow_name]
    flow = GaussianMixtureFlow(**kwargs)
    sigmas = shifted_sigmas(50, shift)
    calib = torch.randn(32, 16, generator=torch.Generator().manual_seed(101))
    evaluation = torch.randn(8192, 16, generator=torch.Generator().manual_seed(2))
    sched = meancache.calibrate(flow, calib, budget=10, sigmas=sigmas, progress=False)
    full = meancache.sample(flow, evaluation, sigmas, Schedule.full(50))

    def err(s):
        return rel_err(meancache.sample(flow, evaluation, sigmas, s), full)

    ours = err(sched)
    uniform = {k: err(_uniform(10, 50, k)) for k in (1, 2)}
    best_k = min(uniform, key=uniform.get)
    baselines = {
        "preset qwen-image B=10": err(Schedule.preset("qwen-image", 10)),
        "plain reuse (same steps, K=1)": err(_reuse(sched)),
        f"uniform steps (K={best_k})": uniform[best_k],
    }
    lines = [f"{flow_name}: calibrated B=10 {sched.pattern()[0]} error {ours:.4f}"]
    for name, value in baselines.items():
        margin = 1.0 - ours / value
        lines.append(f"  vs {name}: {value:.4f}  (calibrated is {100 * margin:.1f}% lower)")
        record_property(f"margin vs {name}", round(margin, 4))
    record_property("calibrated error", round(ours, 5))
    print("\n" + "\n".join(lines))
    for name, value in baselines.items():
        assert ours < value, f"{flow_name}: calibrated {ours:.4f} is not below {name} {value:.4f}"


# -- argument validation --------------------------------------------------------------------------------------------

_REC = None


def _rec():
    global _REC
    if _REC is None:
        _REC = _small_recording()
    return _REC


def _field(x, s):
    return -x


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: meancache.calibrate(_rec(), budget=1), r"budget=1: must be an int with 2 <= budget <= num_steps=10"),
        (lambda: meancache.calibrate(_rec(), budget=11), "budget=11"),
        (lambda: meancache.calibrate(_rec(), budget=2.0), "budget=2.0"),
        (lambda: meancache.calibrate(_rec(), budget=True), "budget=True"),
        (lambda: meancache.calibrate(_rec(), budget=[]), r"budget=\[\]"),
        (lambda: meancache.calibrate(_rec(), budget=[4, 1]), "budget=1"),
        (lambda: meancache.calibrate(_rec(), budget=2, max_len=8), "budget=2 cannot span num_steps=10 with max_len=8"),
        (lambda: meancache.calibrate(_rec(), budget=4, max_len=0), "max_len=0"),
        (lambda: meancache.calibrate(_rec(), budget=4, max_len=2.5), "max_len=2.5"),
        (lambda: meancache.calibrate(_rec(), budget=4, gamma=0), "gamma=0"),
        (lambda: meancache.calibrate(_rec(), budget=4, gamma=math.inf), "gamma=inf"),
        (lambda: meancache.calibrate(_rec(), budget=4, gamma="2"), "gamma='2'"),
        (lambda: meancache.calibrate(_rec(), budget=4, num_steps=12), "num_steps=12 disagrees"),
        (lambda: meancache.calibrate(_rec(), budget=4, num_steps=1), "num_steps=1"),
        (lambda: meancache.calibrate(_rec(), budget=4, progress=1), "progress=1"),
        (lambda: meancache.calibrate(_rec(), torch.zeros(2, 3), budget=4), "inputs given with a Recording"),
        (lambda: meancache.calibrate(_rec(), budget=4, sigmas=[1.0, 0.0]), "sigmas given with a Recording"),
        (lambda: meancache.calibrate(_field, budget=4, sigmas=[1.0, 0.5, 0.0]), "inputs=None"),
        (lambda: meancache.calibrate(_field, torch.zeros(2, 3), budget=2), "sigmas=None"),
        (lambda: meancache.calibrate(_field, torch.zeros(2, 3), budget=2, sigmas=[1.0, 0.0]), "num_steps=1"),
        (
            lambda: meancache.calibrate(_field, torch.zeros(2, 3), budget=2, sigmas=[1.0, 0.5, 0.0], num_steps=3),
            "num_steps=3 disagrees with len",
        ),
        (lambda: meancache.calibrate(_field, torch.zeros(2, 3), budget=5, sigmas=[1.0, 0.5, 0.0]), "budget=5"),
        (lambda: meancache.calibrate(_field, torch.zeros(2, 3), budget=2, sigmas=[0.0, 1.0, 0.5]), "must decrease"),
        (lambda: meancache.calibrate(_field, "noise", budget=2, sigmas=[1.0, 0.5, 0.0]), "inputs=str"),
        (lambda: meancache.calibrate(42, budget=4), "target=int"),
        (lambda: meancache.record(42, torch.zeros(2, 3), [1.0, 0.0]), "velocity_fn=42"),
        (lambda: meancache.record(_field, [], [1.0, 0.0]), "inputs=list"),
        (lambda: meancache.record(_field, torch.zeros(2, 3, dtype=torch.int32), [1.0, 0.0]), "inputs dtype"),
        (lambda: meancache.record(_field, torch.zeros(()), [1.0, 0.0]), "leading input dimension"),
        (lambda: meancache.record(_field, [torch.zeros(3), torch.zeros(4)], [1.0, 0.0]), r"inputs\[1\]"),
        (lambda: meancache.record(_field, [torch.zeros(3), "x"], [1.0, 0.0]), r"inputs\[1\]"),
        (lambda: meancache.record(_field, torch.zeros(2, 3), [1.0]), "at least 2"),
        (lambda: meancache.record(_field, torch.zeros(2, 3), [1.0, 0.0], progress=None), "progress=None"),
        (lambda: meancache.record(lambda x, s: x[:1], torch.zeros(2, 3), [1.0, 0.0], progress=False), "at step 0"),
        (lambda: meancache.record(lambda x, s: 1.0, torch.zeros(2, 3), [1.0, 0.0], progress=False), "at step 0"),
        (lambda: segment_costs("rec"), "recording is a str"),
        (lambda: segment_costs(_rec(), max_len=0), "max_len=0"),
        (lambda: segment_costs(_rec(), orders=[0, 1]), r"orders=\[0, 1\]"),
        (lambda: segment_costs(_rec(), orders=[7]), r"orders=\[7\]"),
        (lambda: segment_costs(_rec(), orders=[]), r"orders=\[\]"),
        (lambda: segment_costs(_rec(), orders="12"), "orders='12'"),
        (lambda: solve([[0.0, 1.0]], 2), r"cost has shape \(1, 2\)"),
        (lambda: solve("table", 2), "cost=str"),
        (lambda: solve([[0.0, math.nan], [0.0, 0.0]], 2), "NaN"),
        (lambda: solve([[0.0, -1.0], [0.0, 0.0]], 2), "negative"),
        (lambda: solve(torch.zeros(4, 4), 3, max_len=1), "budget=3 cannot span num_steps=4 with max_len=1"),
        (lambda: solve(torch.zeros(4, 4), 5), "budget=5"),
        (lambda: solve(torch.zeros(4, 4), 2, gamma=-1), "gamma=-1"),
        (lambda: solve(torch.full((4, 4), math.inf), 2, max_len=3), "no path with finite cost"),
    ],
)
def test_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_calibrate_validates_before_recording():
    calls = []

    def counting(x, s):
        calls.append(s)
        return -x

    with pytest.raises(ValueError, match="budget=60"):
        meancache.calibrate(counting, torch.zeros(2, 3), budget=[10, 60], sigmas=shifted_sigmas(50, 3.0))
    with pytest.raises(ValueError, match="gamma"):
        meancache.calibrate(counting, torch.zeros(2, 3), budget=10, sigmas=shifted_sigmas(50, 3.0), gamma=-2)
    assert calls == []


