"""meancache.sample against the independent restatement of the official full-history loop (tests/restatement.py)."""

from __future__ import annotations

import math
import re

import pytest
import restatement
import torch
from fields import SmoothField
from fields import make_field
from fields import rel_err

import meancache
from meancache import History
from meancache import Schedule
from meancache.flows import shifted_sigmas

# the presets of the published estimator, which the official loop runs (the others: tests/test_estimators.py)
PRESETS = [(name, b) for name, budgets in meancache.preset_names().items() for b in budgets
           if Schedule.preset(name, b).published]
PRESET_IDS = [f"{n}-B{b}" for n, b in PRESETS]
FIELDS = ["smooth", "mixture"]
SHAPE = (2, 3, 16)  # batch 2, three "tokens" of 16 channels
SIGMAS = shifted_sigmas(50, shift=3.0).tolist()


def _noise(shape=SHAPE, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _official(field, x0, sigmas, schedule):
    return restatement.official_loop(
        field, x0.double(), list(sigmas), list(schedule.compute_steps), list(schedule.orders)
    )


@pytest.mark.parametrize("kind", FIELDS)
@pytest.mark.parametrize("name,budget", PRESETS, ids=PRESET_IDS)
def test_matches_official_loop_float64_and_float32(name, budget, kind):
    schedule = Schedule.preset(name, budget)
    field = make_field(kind, SHAPE[-1], seed=budget)
    x0 = _noise(seed=budget)
    expected = _official(field, x0, SIGMAS, schedule)

    out64 = meancache.sample(field, x0, SIGMAS, schedule)
    assert out64.dtype == torch.float64
    assert rel_err(out64, expected) <= 1e-12

    out32 = meancache.sample(field, x0.float(), SIGMAS, schedule)
    assert out32.dtype == torch.float32
    assert rel_err(out32, expected) <= 1e-5

    # the run must actually differ from the uncached sampler, or the comparison above proves nothing
    full = _official(field, x0, SIGMAS, Schedule.full(50))
    assert rel_err(expected, full) > 1e-6


@pytest.mark.parametrize("name,budget", PRESETS, ids=PRESET_IDS)
def test_calls_velocity_exactly_budget_times(name, budget):
    schedule = Schedule.preset(name, budget)
    field = SmoothField(SHAPE[-1])
    seen = []

    def velocity(x, sigma):
        assert isinstance(sigma, float)
        seen.append(sigma)
        return field(x, sigma)

    meancache.sample(velocity, _noise(), SIGMAS, schedule)
    assert len(seen) == budget
    assert seen == [SIGMAS[i] for i in schedule.compute_steps]


@pytest.mark.parametrize(
    "dtype,tol",
    [(torch.bfloat16, 3e-2), (torch.float16, 3e-3)],
    ids=["bf16", "fp16"],
)
def test_low_precision_latents_keep_float32_history(dtype, tol):
    schedule = Schedule.preset("qwen-image", 10)
    field = make_field("mixture", SHAPE[-1])
    x0 = _noise(seed=3)
    expected = _official(field, x0, SIGMAS, schedule)
    history = History(schedule.window)
    out = meancache.sample(field, x0.to(dtype), SIGMAS, schedule, history=history)
    assert out.dtype == dtype and out.shape == x0.shape
    assert history.xs.dtype == torch.float32 and history.vs.dtype == torch.float32
    # reference error of the input rounding alone bounds what we can expect
    assert rel_err(out, expected) <= tol


@pytest.mark.parametrize("shape", [(16,), (1, 16), (4, 2, 3, 16), (1, 2, 3, 2, 16)], ids=str)
def test_any_latent_shape(shape):
    schedule = Schedule.preset("z-image", 13)
    field = SmoothField(shape[-1], seed=1)
    x0 = _noise(shape, seed=5)
    out = meancache.sample(field, x0, SIGMAS, schedule)
    assert out.shape == shape
    assert rel_err(out, _official(field, x0, SIGMAS, schedule)) <= 1e-12


def test_batch_samples_are_independent():
    schedule = Schedule.preset("qwen-image-2512", 10)
    field = make_field("mixture", SHAPE[-1], seed=2)
    x0 = _noise((5, 3, 16), seed=9)
    together = meancache.sample(field, x0, SIGMAS, schedule)
    for b in range(5):
        alone = meancache.sample(field, x0[b : b + 1], SIGMAS, schedule)
        torch.testing.assert_close(together[b : b + 1], alone, rtol=1e-12, atol=1e-12)


def test_history_is_bounded_after_100_steps():
    # segments of 7 skipped steps with K = 6: the window never shrinks below what the ring must hold
    steps = list(range(0, 99, 8)) + [99]
    schedule = Schedule(steps, [6] * (len(steps) - 1), 100)
    assert schedule.window == 6
    sigmas = shifted_sigmas(100).tolist()
    field = SmoothField(SHAPE[-1])
    x0 = _noise()
    history = History(6)
    out = meancache.sample(field, x0, sigmas, schedule, history=history)
    assert history.count == 100
    assert len(history) == 6
    assert history.xs.shape == (6, *SHAPE)
    bytes_100 = history.nbytes
    assert bytes_100 == 2 * 6 * x0.numel() * 8

    # same storage size for a 12-step run: memory does not grow with the number of steps
    short = History(6)
    meancache.sample(field, x0, shifted_sigmas(12).tolist(), Schedule([0, 4, 11], [6, 6], 12), history=short)
    assert short.nbytes == bytes_100
    assert rel_err(out, _official(field, x0, sigmas, schedule)) <= 1e-12

    # the official loop keeps one entry per step
    _, log = restatement.official_loop_with_log(
        field, x0, sigmas, list(schedule.compute_steps), list(schedule.orders)
    )
    assert len(log) == 100


def test_window_truncated_at_start_of_trajectory():
    # K = 6 from step 1 on: the window holds 1, 2, ... entries until the history fills
    schedule = Schedule([0, 9], [6], 10)
    sigmas = shifted_sigmas(10).tolist()
    field = SmoothField(SHAPE[-1], seed=4)
    x0 = _noise(seed=4)
    out = meancache.sample(field, x0, sigmas, schedule)
    assert rel_err(out, _official(field, x0, sigmas, schedule)) <= 1e-12


def test_zero_length_step_falls_back_to_reuse():
    # Z-Image's original grid ends sigma_{N-1} = sigma_N = 0; here a repeated sigma inside a skipped segment
    sigmas = [1.0, 0.8, 0.6, 0.6, 0.3, 0.0]
    schedule = Schedule([0, 1, 4], [0, 3], 5)
    field = SmoothField(SHAPE[-1], seed=6)
    x0 = _noise(seed=6)
    out = meancache.sample(field, x0, sigmas, schedule)
    assert torch.isfinite(out).all()
    assert rel_err(out, _official(field, x0, sigmas, schedule)) <= 1e-12


def test_latents_are_not_modified():
    x0 = _noise()
    before = x0.clone()
    meancache.sample(SmoothField(SHAPE[-1]), x0, SIGMAS, Schedule.preset("qwen-image", 10))
    assert torch.equal(x0, before)


def test_sigmas_as_tensor_and_list_agree():
    schedule = Schedule.preset("z-image", 15)
    field = SmoothField(SHAPE[-1])
    x0 = _noise()
    a = meancache.sample(field, x0, torch.tensor(SIGMAS, dtype=torch.float64), schedule)
    b = meancache.sample(field, x0, SIGMAS, schedule)
    assert torch.equal(a, b)


def test_history_reuse_across_runs_gives_same_result():
    schedule = Schedule.preset("qwen-image", 17)
    field = SmoothField(SHAPE[-1])
    history = History(6)
    first = meancache.sample(field, _noise(seed=1), SIGMAS, schedule, history=history)
    meancache.sample(field, _noise(seed=2), SIGMAS, schedule, history=history)
    again = meancache.sample(field, _noise(seed=1), SIGMAS, schedule, history=history)
    assert torch.equal(first, again)


# -- bad input ---------------------------------------------------------------------------------------------------


def _run(**overrides):
    args = dict(
        velocity_fn=SmoothField(SHAPE[-1]),
        latents=_noise(),
        sigmas=SIGMAS,
        schedule=Schedule.preset("qwen-image", 10),
    )
    args.update(overrides)
    return meancache.sample(**args)


def test_wrong_sigma_count_states_both_numbers():
    with pytest.raises(ValueError, match=r"sigmas has 50 values.*num_steps=50.*51"):
        _run(sigmas=SIGMAS[:-1])
    with pytest.raises(ValueError, match=r"sigmas has 52 values.*num_steps=50"):
        _run(sigmas=SIGMAS + [0.0])


def test_increasing_sigmas_rejected():
    bad = list(SIGMAS)
    bad[10], bad[11] = bad[11], bad[10]
    with pytest.raises(ValueError, match=re.escape(f"sigmas[11]={bad[11]} > sigmas[10]={bad[10]}")):
        _run(sigmas=bad)
    with pytest.raises(ValueError, match="must decrease"):
        _run(sigmas=[0.5] * 51)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_sigmas_rejected(value):
    bad = list(SIGMAS)
    bad[7] = value
    with pytest.raises(ValueError, match=re.escape(f"sigmas[7]={value}") + ".*finite"):
        _run(sigmas=bad)


def test_two_dimensional_sigma_tensor_rejected():
    with pytest.raises(ValueError, match=r"sigmas has shape \(51, 1\): must be 1-D"):
        _run(sigmas=torch.tensor(SIGMAS).unsqueeze(-1))


def test_bad_latents_schedule_and_velocity_rejected():
    with pytest.raises(ValueError, match="latents dtype=torch.int64"):
        _run(latents=torch.zeros(SHAPE, dtype=torch.int64))
    with pytest.raises(ValueError, match="latents is a list"):
        _run(latents=[0.0])
    with pytest.raises(ValueError, match="schedule is a dict: must be a meancache.Schedule"):
        _run(schedule={"budget": 10})
    with pytest.raises(ValueError, match=r"velocity of shape \(2, 3\) for latents of shape \(2, 3, 16\)"):
        _run(velocity_fn=lambda x, s: x[..., 0])
    with pytest.raises(ValueError, match="returned a float"):
        _run(velocity_fn=lambda x, s: 1.0)
    with pytest.raises(ValueError, match=r"history.capacity=2 < schedule.window=4"):
        _run(history=History(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_matches_cpu(dtype):
    schedule = Schedule.preset("qwen-image", 10)
    field = SmoothField(SHAPE[-1])
    x0 = _noise(seed=8).to(dtype)
    cpu = meancache.sample(field, x0, SIGMAS, schedule)
    gpu = meancache.sample(field, x0.cuda(), SIGMAS, schedule)
    assert gpu.device.type == "cuda" and gpu.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(gpu.cpu(), cpu) <= tol
