"""The schedule search (PSSP, our reconstruction of algorithm.md §8): price every cached segment by replaying the
run-time estimator from the reference state (:func:`segment_costs`), then find the exact budgeted path
(:func:`solve`)."""

from __future__ import annotations

import contextlib
import math
from typing import Iterable

import torch

from ..reference import average_velocity
from ..schedule import DEFAULT_MAX_SEGMENT
from ..schedule import MAX_ORDER
from ..validation import is_int
from ..validation import is_real
from .recording import Recording
from .recording import record  # noqa: F401  (the doctests build recordings with it)

__all__ = ["COST_FLOOR", "COST_RTOL", "DEFAULT_GAMMA", "costs_from_orders", "segment_costs", "shared_costs", "solve"]

#: Default peak-suppression exponent of :func:`solve` and :func:`calibrate`. Measured on analytic Gaussian-mixture
#: flows (``python bench/bench_quality.py --gamma``: 12 flows x 2 calibration seeds x budgets 10/17/25 of 50,
#: geometric-mean error against the full run): gamma = 1, the plain shortest path, is clearly worst (rel L2 +13 %,
#: median per-sample error +50 % against gamma = 3), because it accepts one long, badly estimated segment when the
#: others are cheap; gamma from 1.5 to 12 is a plateau (within 10 % on either measure). 3 is in it and has the best
#: product of the two error measures.
DEFAULT_GAMMA = 3.0
#: Relative tolerance of the calibration's comparisons. Two segment costs within ``COST_RTOL`` of the smaller are a
#: tie, won by the smallest K; in :func:`solve`, two path values within ``max(1, gamma) * COST_RTOL`` are a tie, won
#: by the smallest predecessor step (``c ** gamma`` turns a relative change of ``c`` into ``gamma`` times that).
#: Why 1e-6: costs are replayed in float64 from the float32 recording, so the rounding that differs between machines
#: (SIMD width, fused multiply-add, summation order, thread count) is ~1e-16 of the latents' size; measured on the
#: digits model and two Gaussian-mixture flows, summing in another order or reassociating the estimator moves a
#: cost by at most 3e-14 of itself, and costs below the floor below are 0. Genuine differences between windows are
#: 1e-5 and more (the closest pair on the digits model: 1.4e-5; on the mixtures: 5.5e-5), and a difference of 1e-6
#: is far below what a handful of calibration inputs can resolve. So rounding never decides a choice, and a real
#: difference always does.
COST_RTOL = 1e-6
#: Segment deviations below ``COST_FLOOR`` times the mean ``|x_b|`` count as 0 (then ties, settled as above). The
#: recording stores float32 latents (rounding 2**-24 = 6e-8 relative, the sampler's own float32 steps add as much),
#: so a smaller deviation is below the resolution of the reference itself, and relative comparisons of such costs
#: would compare rounding.
COST_FLOOR = 2.0**-24
# Working-set cap of segment_costs: the replay of all start steps of a chunk is held at once.
_COST_CHUNK_BYTES = 256 * 2**20


def _check_max_len(max_len) -> int:
    if not is_int(max_len) or max_len < 1:
        raise ValueError(f"max_len={max_len!r}: must be an int >= 1 (the longest segment, in steps)")
    return int(max_len)


def segment_costs(
    recording: Recording, *, max_len: int = DEFAULT_MAX_SEGMENT, orders: Iterable[int] = range(1, MAX_ORDER + 1)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deviation cost and best window K of every candidate segment ``a -> b`` (``0 < b - a <= max_len``).

    A segment computes at ``a`` and ``b`` and estimates the steps between. Its cost replays the run-time rule on
    the reference (algorithm.md §8, "Option B"): from the reference state and history at ``a``, take step ``a``
    with the reference velocity ``v_a``, then roll steps ``a+1 .. b-1`` with the §2.2 estimator (window truncated
    at the trajectory start; window entries before ``a`` come from the reference, later ones are the replay's own
    estimates, logged as velocities, as at run time), giving ``x^_b``. The cost is the velocity-level L1 deviation
    ``mean|x^_b - x_b| / (sigma_a - sigma_b)`` (mean over elements and inputs; undivided if the two sigmas are
    equal). A replay started at ``a`` passes through every ``b`` of that start, so each (start, K) is rolled once,
    for all start steps of a memory-capped chunk at a time.

    The result is meant to be the same on every machine for the same recording. The replay runs in float64 (the
    estimator is exactly the run-time one, in higher precision), a deviation below :data:`COST_FLOOR` times the
    mean ``|x_b|`` counts as 0, and the best K of a segment is the **smallest K whose cost is within**
    :data:`COST_RTOL` **of the least**: costs that differ only by rounding are ties. From step 0 every K is the same
    estimate by construction (the window holds only steps that reused ``v_0``), so only the smallest K is replayed
    there and it is the one reported.

    Args:
        recording: a :class:`Recording` with N steps.
        max_len: longest segment considered, in steps.
        orders: candidate windows K (ints in 1..6).

    Returns:
        ``(cost, best_k)``, two ``(N, N)`` tensors indexed ``[a, b]``: ``cost`` float64, ``inf`` where there is no
        edge (``b <= a``, ``b - a > max_len``), ``0`` on 1-step segments (nothing is estimated); ``best_k`` int64,
        the K with the least cost (ties, within :data:`COST_RTOL`, go to the smallest K), ``0`` ("chain") on 1-step
        segments and non-edges; ``cost`` holds the cost of that K.

    Example:
        >>> import torch
        >>> rec = record(lambda x, s: x * s, torch.ones(2, 3), [1.0, 0.75, 0.5, 0.25, 0.0], progress=False)
        >>> cost, best_k = segment_costs(rec, max_len=3)
        >>> cost.shape, cost[0].isinf().tolist(), cost[0, 1].item(), int(best_k[0, 1])
        (torch.Size([4, 4]), [True, False, False, False], 0.0, 0)
        >>> bool(cost[0, 3] > 0), 1 <= int(best_k[0, 3]) <= 6
        (True, True)
    """
    if not isinstance(recording, Recording):
        raise ValueError(f"recording is a {type(recording).__name__}: must be a meancache.Recording")
    max_len = _check_max_len(max_len)
    if isinstance(orders, (str, bytes)):
        raise ValueError(f"orders={orders!r}: must be a collection of ints in 1..{MAX_ORDER}")
    try:
        ks = sorted(set(orders))
    except TypeError:
        raise ValueError(f"orders={orders!r}: must be a collection of ints in 1..{MAX_ORDER}") from None
    if not ks or not all(is_int(k) and 1 <= k <= MAX_ORDER for k in ks):
        raise ValueError(f"orders={list(orders)!r}: must be a non-empty collection of ints in 1..{MAX_ORDER}")

    n = recording.num_steps
    if min(max_len, n - 1) < 2:  # nothing to replay: chains only (an empty per-K table gives just those)
        return costs_from_orders(torch.empty(len(ks), n, 0, dtype=torch.float64), ks, max_len)
    return costs_from_orders(_per_order_costs(recording, max_len, ks), ks, max_len)


def costs_from_orders(per_k: torch.Tensor, ks: list[int], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`segment_costs`' ``(cost, best_k)`` from its per-K banded costs ``per_k[j, a, L]`` (K = ``ks[j]``):
    the choice of K per segment, the smallest within :data:`COST_RTOL` of the least. Segment costs are means over
    inputs, so per-K costs of disjoint input sets average (weighted by their input counts) into those of their
    union before this choice.

    Example:
        >>> import torch
        >>> per_k = torch.full((2, 3, 3), float("inf"), dtype=torch.float64); per_k[:, 0, 2] = torch.tensor([1.0, 0.5])
        >>> cost, best_k = costs_from_orders(per_k, [1, 2], 2)
        >>> cost[0, 2].item(), int(best_k[0, 2])
        (0.5, 2)
    """
    n = per_k.shape[1]
    cost = torch.full((n, n), math.inf, dtype=torch.float64)
    best_k = torch.zeros((n, n), dtype=torch.int64)
    for a in range(n - 1):
        cost[a, a + 1] = 0.0
    length = min(max_len, n - 1)
    if length < 2 or n - 2 < 1:
        return cost, best_k
    # the smallest K whose cost is within COST_RTOL of the least: differences below it are rounding, not signal
    least = per_k.min(dim=0).values
    tied = per_k <= least + COST_RTOL * least
    pick = tied.to(torch.int8).argmax(dim=0)  # first True: the smallest K among the tied ones
    chosen = per_k.gather(0, pick[None]).squeeze(0)
    k_of = torch.tensor(ks, dtype=torch.int64)[pick]
    for seg in range(2, length + 1):
        a = torch.arange(0, n - seg)
        found = torch.isfinite(least[a, seg])
        a = a[found]
        cost[a, a + seg] = chosen[a, seg]
        best_k[a, a + seg] = k_of[a, seg]
    return cost, best_k


def _noise_floor(lat: torch.Tensor) -> torch.Tensor:
    """``COST_FLOOR`` times the mean ``|x_i|`` over inputs and elements, per step ``i`` (float64, ``(N + 1,)``).

    ``lat`` is the recording's latents as ``(P, N + 1, D)``."""
    return torch.tensor([COST_FLOOR * lat[:, i].double().abs().mean().item() for i in range(lat.shape[1])])


#: ``_per_order_costs`` results kept inside :func:`shared_costs` (recording kept alive beside them, so an id is
#: never reused while it is held); None outside it.
_ORDER_CACHE: dict | None = None


@contextlib.contextmanager
def shared_costs():
    """Within the ``with`` block, the per-K replay costs of one recording (:func:`segment_costs`, and the
    published columns of :func:`~meancache.calibration.joint.joint_costs`) are computed once; dropped after.

    Example:
        >>> with shared_costs():
        ...     pass
    """
    global _ORDER_CACHE
    outer = _ORDER_CACHE
    _ORDER_CACHE = {} if outer is None else outer
    try:
        yield
    finally:
        _ORDER_CACHE = outer


def _per_order_costs(recording: Recording, max_len: int, ks: list[int]) -> torch.Tensor:
    key = (id(recording), max_len, tuple(ks))
    if _ORDER_CACHE is not None and key in _ORDER_CACHE:
        return _ORDER_CACHE[key][1]
    out = _replayed_order_costs(recording, max_len, ks)
    if _ORDER_CACHE is not None:
        _ORDER_CACHE[key] = (recording, out)
    return out


def _replayed_order_costs(recording: Recording, max_len: int, ks: list[int]) -> torch.Tensor:
    """Banded per-K costs of :func:`segment_costs` before the choice of K: ``per_k[j, a, L]`` is the cost of
    ``a -> a + L`` with window ``ks[j]`` (float64 ``(len(ks), N, min(max_len, N - 1) + 1)``; ``inf`` where there
    is no such segment, for ``L < 2``, and for every K but the smallest at ``a = 0``). Segments may end at
    ``b = N``, the open tails of :func:`~meancache.calibration.joint.joint_costs` (``open_end``), priced against
    the recording's final sample; :func:`costs_from_orders` reads only ``b <= N - 1``."""
    n = recording.num_steps
    sig = recording.sigmas
    length = min(max_len, n - 1)
    starts = n - 1  # segments of >= 2 steps start at a = 0 .. n-2 (they end at b <= n, the tails at n)

    p = recording.num_inputs
    lat = recording.latents.reshape(p, n + 1, -1)
    vel = recording.velocities.reshape(p, n, -1)
    d = lat.shape[-1]
    # per-K costs of every segment, banded: per_k[j, a, L] is the cost of a -> a + L with window ks[j]
    per_k = torch.full((len(ks), n, length + 1), math.inf, dtype=torch.float64)
    # mean |x_i| over inputs and elements: the scale of the noise floor (COST_FLOOR)
    floor = _noise_floor(lat)
    # sigmas padded past the end: replays of late starts run past step n-1 (results discarded); dt = 0 there
    sigp = torch.tensor(sig + [sig[-1]] * (length + 1), dtype=torch.float64)
    # held per chunk of A start steps, as (P, A, D) float64: 2 * length replay entries, a few temporaries, and the
    # float64 copy of the recording rows the chunk reads (about 2 * (A + length + MAX_ORDER) rows of (P, D))
    chunk = max(1, _COST_CHUNK_BYTES // ((2 * length + 12) * p * d * 8))
    with torch.no_grad():
        for a0 in range(0, starts, chunk):
            chunk_a = torch.arange(a0, min(a0 + chunk, starts))
            # The replay runs in float64 on the float32 recording: its rounding is then ~1e-16 of the latents
            # instead of ~1e-7, so costs agree across CPUs, SIMD widths and thread counts far inside COST_RTOL.
            # Rows first - MAX_ORDER .. last + length of the recording, converted once for every K.
            lo = max(0, a0 - MAX_ORDER)
            hi = min(n + 1, int(chunk_a[-1]) + length + 1)
            lat64 = lat[:, lo:hi].double()
            vel64 = vel[:, lo : min(n, hi)].double()
            for kj, k in enumerate(ks):
                # From step 0 every K is the same estimate in exact arithmetic: the window is truncated to the
                # steps logged so far, all of which reuse v_0 (a straight line, zero JVP). With the recording's
                # float32 rounding in the finite differences they still differ by up to 1e-7 of the cost, which a
                # tolerance cannot tell from a real difference; so only the smallest K is replayed there.
                a = chunk_a[1:] if kj > 0 and a0 == 0 else chunk_a
                if a.numel() == 0:
                    continue
                sigma_a = sigp[a]  # for the velocity-level normalisation below
                xr = [lat64[:, a - lo], lat64[:, a + 1 - lo]]  # replayed x_{a+t}; offset 1 is step a with v_a
                vr = [vel64[:, a - lo]]  # velocities logged at a+t
                for t in range(1, length):
                    i = a + t
                    if t >= k:  # window start inside the replay: its own (estimated) entries
                        j0 = a + (t - k)
                        x0, v0 = xr[t - k], vr[t - k]
                    else:  # window start at or before a: reference history, truncated at step 0
                        j0 = torch.clamp(i - k, min=0)
                        x0, v0 = lat64[:, j0 - lo], vel64[:, j0 - lo]
                    span = sigp[i] - sigp[j0]
                    inv_d = torch.where(span == 0, 0.0, 1.0 / torch.where(span == 0, 1.0, span))[None, :, None]
                    dt = (sigp[i + 1] - sigp[i])[None, :, None]
                    v_hat = average_velocity(xr[t], x0, v0, vr[t - 1], inv_d, dt)
                    vr.append(v_hat)
                    xr.append(xr[t] + dt * v_hat)
                    b = i + 1
                    ok = b <= n
                    if not bool(ok.any()):
                        break
                    everywhere = bool(ok.all())
                    av, bv = (a, b) if everywhere else (a[ok], b[ok])
                    x_hat = xr[t + 1] if everywhere else xr[t + 1][:, ok]
                    err = (x_hat - lat64[:, bv - lo]).abs().mean(dim=-1).mean(dim=0)
                    err = torch.where(err <= floor[bv], 0.0, err)
                    h = sigma_a[ok] - sigp[bv]
                    per_k[kj, av, t + 1] = torch.where(h > 0, err / torch.where(h > 0, h, 1.0), err)
    return per_k


def _check_gamma(gamma) -> float:
    if not is_real(gamma) or not math.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"gamma={gamma!r}: must be a finite number > 0 (gamma > 1 suppresses peak segment costs)")
    return float(gamma)


def _check_budget(budget, num_steps: int, max_len: int, tail: bool = False) -> int:
    if not is_int(budget) or not 2 <= budget <= num_steps:
        raise ValueError(f"budget={budget!r}: must be an int with 2 <= budget <= num_steps={num_steps}")
    if tail:  # B segments, the open tail included, reach the end N
        if budget * max_len < num_steps:
            raise ValueError(
                f"budget={budget} cannot span num_steps={num_steps} with max_len={max_len}, even with an open tail: "
                f"{budget} segments of at most {max_len} steps reach {budget * max_len}, short of the end {num_steps}"
            )
    elif (budget - 1) * max_len < num_steps - 1:
        raise ValueError(
            f"budget={budget} cannot span num_steps={num_steps} with max_len={max_len}: {budget - 1} segments of "
            f"at most {max_len} steps reach step {(budget - 1) * max_len}, short of the last step {num_steps - 1}"
        )
    return int(budget)


def _cost_table(cost) -> list[list[float]]:
    try:
        table = torch.as_tensor(cost, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"cost={type(cost).__name__}: must be an (N, N) table of floats") from None
    if table.dim() != 2 or table.shape[0] != table.shape[1] or table.shape[0] < 2:
        raise ValueError(f"cost has shape {tuple(table.shape)}: must be square (N, N) with N >= 2")
    if bool(torch.isnan(table).any()):
        raise ValueError("cost contains NaN: every edge cost must be a number (inf marks a missing edge)")
    if bool((table < 0).any()):
        raise ValueError("cost contains a negative entry: segment costs must be >= 0")
    return table.tolist()


def solve(cost, budget: int, *, gamma: float = DEFAULT_GAMMA, max_len: int = DEFAULT_MAX_SEGMENT) -> list[int]:
    """Compute steps of the cheapest path: exactly ``budget`` nodes from step 0 to step N-1.

    Minimises ``sum cost[a][b] ** gamma`` over the path's segments ``a -> b`` (``0 < b - a <= max_len``; ``inf``
    entries are missing edges) by dynamic programming over (step, nodes used): ``D[m][b] = min_a D[m-1][a] +
    cost[a][b] ** gamma``, exact, O(budget * N * max_len). ``gamma > 1`` is the peak suppression of PSSP: one
    large-deviation segment costs more than several small ones adding up to the same sum, and ``gamma -> inf``
    approaches the minimax path. Ties go to the predecessor with the smallest step index while backtracking from
    the last step, so the result is deterministic; two path values within ``max(1, gamma) *`` :data:`COST_RTOL` of
    the smaller count as tied, so that rounding (which differs between machines) cannot decide between paths that
    are equal in exact arithmetic. Each of the ``budget - 1`` stages may thus keep a value up to that fraction
    above the least: the path returned is within a factor ``(1 + max(1, gamma) * COST_RTOL) ** (budget - 1)`` of
    the exact optimum.

    Args:
        cost: ``(N, N)`` table (tensor, nested list or array) of segment costs >= 0, e.g. from
            :func:`segment_costs`; only entries with ``0 < b - a <= max_len`` are read.
        budget: number of compute steps B, the first and last step included.
        gamma: peak-suppression exponent, > 0 (default :data:`DEFAULT_GAMMA`).
        max_len: longest segment allowed, in steps.

    Returns:
        The B sorted compute steps (list of int), ``0`` first and ``N - 1`` last.

    Raises:
        ValueError: on a malformed table, a bad gamma, or a budget that cannot span the N steps with segments of at
            most ``max_len`` steps (or only through missing edges).

    Example:
        >>> inf = float("inf")
        >>> cost = [[inf, 0, 1, 5], [inf, inf, 0, 2], [inf, inf, inf, 0], [inf] * 4]
        >>> solve(cost, 3), solve(cost, 2, max_len=3)
        ([0, 2, 3], [0, 3])
    """
    table = _cost_table(cost)
    gamma = _check_gamma(gamma)
    max_len = _check_max_len(max_len)
    n = len(table)
    budget = _check_budget(budget, n, max_len)
    inf = math.inf
    weight = [[inf] * n for _ in range(n)]
    for a in range(n):
        for b in range(a + 1, min(n, a + max_len + 1)):
            c = table[a][b]
            weight[a][b] = c**gamma if c != inf else inf
    tol = COST_RTOL * max(1.0, gamma)
    best = [0.0] + [inf] * (n - 1)  # D[1][.]: only step 0 is reachable with one node
    back: list[list[int]] = []
    for m in range(2, budget + 1):
        cur, arg = [inf] * n, [-1] * n
        # with m nodes used the path is at step >= m-1, and must still reach n-1 with budget-m more nodes
        lo = m - 1
        hi = n - 1 - (budget - m)
        for b in range(lo, hi + 1):
            preds = range(max(0, b - max_len), b)
            vals = [best[a] + weight[a][b] for a in preds]
            least = min(vals)
            if least == inf:
                continue
            # the smallest a within the tie tolerance of the least: rounding never decides between equal paths
            limit = least + tol * least
            j = next(j for j, v in enumerate(vals) if v <= limit)
            cur[b], arg[b] = vals[j], preds[j]
        back.append(arg)
        best = cur
    if best[n - 1] == inf:
        raise ValueError(
            f"budget={budget}, num_steps={n}, max_len={max_len}: no path with finite cost (every way to place "
            "the compute steps uses a missing edge)"
        )
    steps = [n - 1]
    for arg in reversed(back):
        steps.append(arg[steps[-1]])
    return steps[::-1]


def _check_budgets(budget, num_steps: int, max_len: int) -> tuple[list[int], bool]:
    if isinstance(budget, (list, tuple)):
        if not budget:
            raise ValueError("budget=[]: give an int or a non-empty list of ints")
        return [_check_budget(b, num_steps, max_len) for b in budget], True
    return [_check_budget(budget, num_steps, max_len)], False


