"""meancache under diffusers' context parallelism and in data-parallel serving, with real processes.

Two spawned CPU processes join one gloo group (tests/cp_workers.py: the harness, the shim diffusers needs without an
accelerator, and what each rank runs). In one spawn they split tiny FLUX and Qwen-Image (true CFG) transformers with
Ulysses attention (``ContextParallelConfig(ulysses_degree=2)``) and run them plain, in schedule mode, after
``meancache.disable`` and in online mode, then serve their own prompts data-parallel. This process makes the same
runs without any process group; they are the references.

Why the ranks agree: diffusers gathers the transformer's output over the ranks (``proj_out`` in the CP plan) before
it returns, so every rank holds the same full velocity, and everything after it (guidance, scheduler, meancache) runs
the same float operations on the same values. The tests check that bit for bit instead of assuming it.

Ring attention is not tested here: it needs an attention backend that returns the log-sum-exp, and none of
diffusers' context-parallel backends runs on CPU. tools/ring_cp_check.py does it on a machine with 2+ GPUs.
"""

from __future__ import annotations

import cp_workers
import numpy as np
import pytest
import torch.distributed as dist
from cp_workers import BUDGET
from cp_workers import DP_ONLINE_SEEDS
from cp_workers import DP_SEEDS
from cp_workers import ONLINE_BUDGET
from cp_workers import STEPS

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD = 2
MODELS = ["flux", "qwen-image"]
CALLS_PER_STEP = {"flux": 1, "qwen-image": 2}  # Qwen-Image's true CFG: separate cond and uncond calls
TOL = 1e-5


def rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def ranks():
    """What every rank returned from one spawn (the slow part: each child imports torch and diffusers)."""
    return cp_workers.run_ranks(cp_workers.context_parallel_session, WORLD)


@pytest.fixture(scope="module")
def single():
    """The same runs in this process, without a process group."""
    assert not dist.is_initialized()
    return {name: cp_workers.single_process_records(name) for name in MODELS}


@pytest.fixture(scope="module")
def single_dp():
    assert not dist.is_initialized()
    seeds = {"schedule": sorted(s for v in DP_SEEDS.values() for s in v),
             "online": sorted(s for v in DP_ONLINE_SEEDS.values() for s in v)}
    return {mode: {s: cp_workers.single_process_dp(s, mode) for s in ss} for mode, ss in seeds.items()}


def test_a_failing_rank_fails_the_test_with_its_traceback_instead_of_hanging():
    # rank 0 waits in a barrier that rank 1 never reaches: only the harness can end this. The message is rank 1's
    # traceback, not the timeout's "did not finish", so the failure was reported as soon as it happened.
    with pytest.raises(cp_workers.ChildFailed) as err:
        cp_workers.run_ranks(cp_workers.fail_on_rank_1, WORLD, timeout_s=60)
    message = str(err.value)
    assert message.startswith("rank 1 of 2 raised:")
    assert "in fail_on_rank_1" in message and "ValueError: deliberate failure on rank 1" in message


@pytest.mark.parametrize("name", MODELS)
def test_the_ranks_really_split_the_sequence(ranks, single, name):
    # otherwise every comparison below would be between single-process runs
    whole = single[name]["plain"]["tokens"]
    assert len(whole) == 1 and whole[0] % WORLD == 0
    for r in ranks:
        for mode in ("before", "schedule", "plain", "online"):
            assert r[name][mode]["tokens"] == [whole[0] // WORLD], f"rank {r['rank']}, {mode}"


@pytest.mark.parametrize("name", MODELS)
def test_schedule_mode_under_ulysses_matches_the_single_process_run(ranks, single, name):
    ref = single[name]["schedule"]
    assert ref["calls"] == BUDGET * CALLS_PER_STEP[name]
    for r in ranks:
        got = r[name]["schedule"]
        assert got["calls"] == BUDGET * CALLS_PER_STEP[name], f"rank {r['rank']}"
        assert got["summary_calls"] == got["calls"]
        assert got["compute_steps"] == ref["compute_steps"] and len(got["compute_steps"]) == BUDGET
        assert rel(got["latents"], ref["latents"]) <= TOL, f"rank {r['rank']}"
    assert np.array_equal(ranks[0][name]["schedule"]["latents"], ranks[1][name]["schedule"]["latents"])
    # the cache changed the result (so the comparison above is not between two plain runs)
    assert rel(ranks[0][name]["schedule"]["latents"], single[name]["plain"]["latents"]) > 1e-3


@pytest.mark.parametrize("name", MODELS)
def test_disable_restores_plain_context_parallel_runs(ranks, single, name):
    for r in ranks:
        before, after = r[name]["before"], r[name]["plain"]
        assert before["calls"] == after["calls"] == STEPS * CALLS_PER_STEP[name]
        assert np.array_equal(after["latents"], before["latents"]), f"rank {r['rank']}: not bit for bit"
        # and a plain CP run is the single-process run up to the order of float sums in the split attention
        assert rel(after["latents"], single[name]["plain"]["latents"]) <= TOL


@pytest.mark.parametrize("name", MODELS)
def test_the_velocity_the_scheduler_sees_is_identical_on_every_rank(ranks, name):
    # so the measure online mode all-reduces is already the same number on every rank: the MAX changes nothing
    for mode in ("before", "schedule", "online"):
        v0, v1 = ranks[0][name][mode]["velocities"], ranks[1][name][mode]["velocities"]
        expected = STEPS if mode == "before" else len(ranks[0][name][mode]["compute_steps"])
        assert len(v0) == len(v1) == expected
        for i, (a, b) in enumerate(zip(v0, v1)):
            assert np.array_equal(a, b), f"{mode}: velocity {i} differs between the ranks"


@pytest.mark.parametrize("name", MODELS)
def test_online_mode_under_ulysses_takes_the_same_decisions_on_every_rank(ranks, single, name):
    ref = single[name]["online"]
    steps = [r[name]["online"]["compute_steps"] for r in ranks]
    assert steps[0] == steps[1] == ref["compute_steps"]
    assert len(steps[0]) <= ONLINE_BUDGET
    for r in ranks:
        got = r[name]["online"]
        assert got["calls"] == got["summary_calls"] == len(steps[0]) * CALLS_PER_STEP[name]
        assert rel(got["latents"], ref["latents"]) <= TOL
    assert np.array_equal(ranks[0][name]["online"]["latents"], ranks[1][name]["online"]["latents"])


def test_data_parallel_schedule_mode_has_no_cross_talk(ranks, single_dp):
    # rank 0 served two requests and rank 1 one: had schedule mode made any collective call, the spawn would have
    # hung until the harness timeout instead of returning
    seen = []
    for r in ranks:
        assert sorted(r["dp_schedule"]) == DP_SEEDS[r["rank"]]
        for seed, got in r["dp_schedule"].items():
            ref = single_dp["schedule"][seed]
            assert got["calls"] == ref["calls"] == BUDGET
            assert rel(got["latents"], ref["latents"]) <= TOL, f"rank {r['rank']}, seed {seed}"
            seen.append(got["latents"])
    # the requests really were different
    assert all(rel(a, b) > 1e-2 for i, a in enumerate(seen) for b in seen[i + 1:])


def test_data_parallel_online_requests_take_different_plans_alone(single_dp):
    # the premise of the next test: alone, the two ranks' requests decide differently
    plans = [single_dp["online"][s[0]]["compute_steps"] for s in DP_ONLINE_SEEDS.values()]
    assert plans[0] != plans[1]


# Fixed: the online measure is all-reduced only over the transformer's context-parallel group (or an explicit
# group=), so independent data-parallel requests no longer couple or wait on each other.
def test_data_parallel_online_mode_decides_per_request(ranks, single_dp):
    for r in ranks:
        for seed, got in r["dp_online"].items():
            ref = single_dp["online"][seed]
            assert got["compute_steps"] == ref["compute_steps"], f"rank {r['rank']}, seed {seed}"
            assert rel(got["latents"], ref["latents"]) <= TOL
