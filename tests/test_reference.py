"""The estimator and the history ring, against the closed form of algorithm.md §2.3 (restatement)."""

from __future__ import annotations

import pytest
import restatement
import torch

from meancache import History
from meancache import ops
from meancache.reference import average_velocity
from meancache.reference import step_scalars


def estimate_from_history(x, history, k, step, sigmas):
    """v_hat at ``step`` through the public op (which also logs it, so work on a copy of the ring)."""
    xs, vs = history.xs.clone(), history.vs.clone()
    k = min(k, len(history))
    return ops.estimate(x, xs, vs, step, k, sigmas[step - k], sigmas[step], sigmas[step + 1])


def _trajectory(steps, seed=0, shape=(4, 5)):
    """Exact Euler steps with random velocities: what the history of a real run looks like."""
    g = torch.Generator().manual_seed(seed)
    sigmas = sorted(torch.rand(steps + 1, generator=g, dtype=torch.float64).tolist(), reverse=True)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    xs, vs = [], []
    for i in range(steps):
        v = torch.randn(shape, generator=g, dtype=torch.float64)
        xs.append(x)
        vs.append(v)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return sigmas, xs, vs, x


@pytest.mark.parametrize("k", range(1, 7))
def test_estimate_equals_closed_form(k):
    steps = 8
    sigmas, xs, vs, x = _trajectory(steps, seed=k)
    history = History(6)
    for xj, vj in zip(xs, vs):
        history.push(xj, vj)
    got = estimate_from_history(x, history, k, steps, sigmas + [0.0])
    want = restatement.closed_form_estimate(vs, sigmas + [0.0], steps, k)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


def test_window_one_is_plain_reuse():
    sigmas, xs, vs, x = _trajectory(3)
    history = History(1)
    for xj, vj in zip(xs, vs):
        history.push(xj, vj)
    got = estimate_from_history(x, history, 1, 3, sigmas + [0.0])
    torch.testing.assert_close(got, vs[-1], rtol=1e-10, atol=1e-10)


def test_linear_trend_is_damped_extrapolation():
    # uniform steps, v_m = a + b m: v_hat = v_{i-1} + b (K - 1) / (2K)  (algorithm.md §2.3)
    n, h = 10, 0.05
    sigmas = [1.0 - h * i for i in range(n + 1)]
    a, b = torch.tensor([0.3], dtype=torch.float64), torch.tensor([0.2], dtype=torch.float64)
    history = History(6)
    x = torch.tensor([1.0], dtype=torch.float64)
    for m in range(8):
        v = (a + b * m).double()
        history.push(x, v)
        x = x - h * v
    for k in range(1, 7):
        got = estimate_from_history(x, history, k, 8, sigmas)
        want = (a + b * 7).double() + b.double() * (k - 1) / (2 * k)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_zero_length_window_reuses_last_velocity():
    v_last = torch.tensor([1.5, -2.0])
    z = torch.zeros(2)
    out = average_velocity(z, z, torch.ones(2), v_last, *step_scalars(0.5, 0.5, 0.25))
    assert torch.equal(out, v_last)


def test_history_ring_evicts_oldest_and_rejects_out_of_range():
    h = History(3)
    for j in range(7):
        h.push(torch.full((2,), float(j)), torch.full((2,), -float(j)))
    assert (h.count, len(h), h.oldest) == (7, 3, 4)
    assert h.x(6)[0].item() == 6.0 and h.v(4)[0].item() == -4.0
    with pytest.raises(IndexError, match=r"step 3 is not in the history \(holds steps 4..6\)"):
        h.x(3)
    with pytest.raises(ValueError, match="capacity=7"):
        History(7)
    with pytest.raises(ValueError, match="latent shape/device/dtype changed mid-trajectory"):
        h.push(torch.zeros(3), torch.zeros(3))


@pytest.mark.parametrize("slot", [-1, 3])
def test_reference_functions_refuse_slots_outside_the_ring(slot):
    # Python indexing took slot -1 as the last slot and wrote there without a word
    from meancache.reference import compute_step_ref
    from meancache.reference import estimate_ref
    from meancache.reference import skip_step_ref

    x = torch.zeros(4)
    xs, vs = torch.zeros(3, 4), torch.ones(3, 4)
    calls = {
        "skip_step_ref": lambda: skip_step_ref(x, xs, vs, 0, 1, slot, -2.0, -0.25),
        "compute_step_ref": lambda: compute_step_ref(x, x, xs, vs, slot, -0.25),
        "estimate_ref": lambda: estimate_ref(x, xs, vs, slot, 1, 2, -2.0, -0.25, 1.0, torch.float32),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf"{name}: slot_(write|start)={slot}: must be in 0..2 for a ring of C=3"):
            call()
    assert torch.equal(xs, torch.zeros(3, 4)) and torch.equal(vs, torch.ones(3, 4))


def test_reference_functions_refuse_ring_halves_of_different_shapes():
    from meancache.reference import compute_step_ref

    xs, vs = torch.zeros(3, 4), torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"compute_step_ref: xs has shape \(3, 4\) but vs has shape \(2, 4\)"):
        compute_step_ref(torch.ones(4), torch.ones(4), xs, vs, 2, -0.25)
    assert torch.equal(xs, torch.zeros(3, 4))  # before, xs[2] was written and then vs[2] raised IndexError
