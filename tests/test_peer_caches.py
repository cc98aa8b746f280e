"""Tuning diffusers' caches to a budget of full evaluations, and the evaluation counter."""

import pytest
import torch

pytest.importorskip("diffusers")

from meancache.examples import peer_caches  # noqa: E402
from meancache.examples.digits import build_pipeline  # noqa: E402
from meancache.examples.digits.model import sample_noise  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    pipe = build_pipeline(seed=1)
    pipe.set_progress_bar_config(disable=True)
    return pipe, [0, 1], sample_noise([0, 1])


@pytest.mark.parametrize("before, interval", [(3, 7), (2, 1), (6, 4), (2, 49)])
def test_taylorseer_count_matches_diffusers(setup, before, interval):
    from diffusers import TaylorSeerCacheConfig

    pipe, labels, noise = setup
    config = TaylorSeerCacheConfig(
        cache_interval=interval, disable_cache_before_step=before, taylor_factors_dtype=torch.float32,
        use_lite_mode=True,
    )
    measured = peer_caches._evaluations(pipe, config, labels, noise, 20, 3.0)
    assert measured == peer_caches.taylorseer_evaluations(20, before, interval)


def test_counter_counts_full_evaluations_only(setup):
    import meancache

    pipe, labels, noise = setup
    meancache.accelerate(pipe, schedule=meancache.Schedule.default(5, 20))
    try:
        with peer_caches.count_evaluations(pipe.transformer) as calls:
            pipe(labels, num_inference_steps=20, latents=noise)
    finally:
        meancache.disable(pipe)
    assert calls[0] == 5


def test_bisection_reaches_the_budget_on_a_monotone_count():
    seen = []

    def run(threshold):
        seen.append(threshold)
        return max(1, round(50 / (1 + 40 * threshold)))

    th, evals = peer_caches._bisect_threshold(lambda t: t, run, 10, 1e-4, 10.0)
    assert evals == 10 and run(th) == 10
    assert len(seen) <= 11


def test_bisection_reports_closest_when_exact_is_impossible():
    th, evals = peer_caches._bisect_threshold(lambda t: t, lambda t: 20 if t < 1 else 5, 10, 1e-3, 10.0, iters=12)
    assert evals == 5  # |5 - 10| = 5 < |20 - 10|


@pytest.mark.parametrize("peer", peer_caches.PEERS, ids=lambda p: p.name)
def test_each_peer_tunes_near_the_budget(setup, peer):
    """The tuned setting itself is not compared: the adaptive caches decide on measured changes of the model's
    output, so the threshold the bisection ends on moves with the CPU's rounding. What is checked is what the tuning
    is for, the evaluation count of a run with it, within 2 of the budget (each peer reaches 7 exactly here; the
    margin is for a machine where rounding moves the count the bisection can reach)."""
    pipe, labels, noise = setup
    config, note = peer.tune(pipe, labels, noise, 20, 3.0, 7)
    evals = peer_caches._evaluations(pipe, config, labels, noise, 20, 3.0)
    assert abs(evals - 7) <= 2, (peer.name, evals, note)
    assert note
