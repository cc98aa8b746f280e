"""The joint schedule search: which steps to compute *and* which estimator each segment uses (meancache window K,
or the polynomial estimators ``extrapolate`` / ``predict`` of order p), found together by an exact dynamic
programme.

Why a new search. An ``extrapolate`` or ``predict`` segment ``a -> b`` of order p estimates its skipped steps from
the velocities of the last ``p + 1`` *computed* steps of the path (:func:`meancache.estimators.polynomial_weights`),
so its cost
depends on the compute steps before ``a``, not on ``(a, b)`` alone as a meancache segment's does. The plain
budgeted path of :func:`~meancache.calibration.search.solve` cannot price it.

The stages, all deterministic on every machine for the same recording (same tolerance rules as
:mod:`~meancache.calibration.search`):

1. :func:`extrapolation_costs` prices extrapolate (or predict) segments given their nodes, batched.
2. :func:`joint_costs` enumerates the states of the exact DP (the last ``depth + 1`` compute steps of a path,
   ``depth`` = the highest extrapolation order searched) and every segment leaving them, and gives each segment
   its best estimator: the least cost over the meancache windows (:func:`segment_costs`' replay) and the
   polynomial orders, ties (within :data:`COST_RTOL`) going to meancache before extrapolate before predict,
   smaller K and lower p first.
3. :func:`joint_solve` is the budgeted shortest path over those states: exact, because a state holds every compute
   step a later segment's cost can read.

:func:`schedule_costs` prices the segments of a given schedule (each with its own estimator): the objective the
search minimises, for checks, plots and brute force.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable
from typing import Sequence

import torch

from ..estimators import ESTIMATORS
from ..estimators import MAX_EXTRAPOLATION_ORDER
from ..estimators import FITTED
from ..estimators import POLYNOMIAL_ESTIMATORS
from ..estimators import MAX_GAIN
from ..estimators import _GAUSS
from ..schedule import DEFAULT_MAX_SEGMENT
from ..schedule import MAX_ORDER
from ..schedule import Schedule
from ..validation import is_int
from ..validation import is_real
from .recording import Recording
from .recording import record  # noqa: F401  (the doctests build recordings with it)
from .search import COST_RTOL
from .search import DEFAULT_GAMMA
from .search import _check_budget
from .search import _check_gamma
from .search import _check_max_len
from .search import _noise_floor
from .search import _per_order_costs

__all__ = ["JointCosts", "extrapolation_costs", "joint_costs", "joint_solve", "schedule_costs", "shared_weights"]

#: Estimators :func:`joint_costs` searches by default: all of them.
DEFAULT_ESTIMATORS = ESTIMATORS
# Working-set cap of extrapolation_costs: the deviation rows (segments x lengths, P * D float64 each: 20 kB on the
# digits model) formed by one matrix product. Large chunks keep the number of tensor calls low: each parallel call
# pays a thread synchronisation, which dominates on a busy machine.
_ROW_CHUNK_BYTES = 64 * 2**20


def _check_estimators(estimators) -> tuple[str, ...]:
    """The estimator names as a tuple in the preference order of the ties (meancache, extrapolate, predict)."""
    rule = f"must be a non-empty tuple or list of names from {ESTIMATORS}"
    if isinstance(estimators, (str, bytes)) or not isinstance(estimators, (tuple, list)):
        raise ValueError(f"estimators={estimators!r}: {rule}, e.g. ('meancache',)")
    bad = [e for e in estimators if not isinstance(e, str) or e not in ESTIMATORS]
    if not estimators or bad:
        raise ValueError(f"estimators={estimators!r}: {rule}" + (f"; {bad[0]!r} is not one" if bad else ""))
    return tuple(e for e in ESTIMATORS if e in estimators)


def _check_orders(orders, name: str, largest: int) -> list[int]:
    rule = f"must be a non-empty collection of ints in 1..{largest}"
    if isinstance(orders, (str, bytes)):
        raise ValueError(f"{name}={orders!r}: {rule}")
    try:
        values = list(orders)
    except TypeError:
        raise ValueError(f"{name}={orders!r}: {rule}") from None
    if not values or not all(is_int(k) and 1 <= k <= largest for k in values):
        raise ValueError(f"{name}={values!r}: {rule}")
    return sorted({int(k) for k in values})


def _check_recording(recording) -> Recording:
    if not isinstance(recording, Recording):
        raise ValueError(f"recording is a {type(recording).__name__}: must be a meancache.Recording")
    return recording


# -- extrapolate segment costs ---------------------------------------------------------------------------------------


def _as_nodes(nodes, n: int) -> torch.Tensor:
    """``nodes`` as an int64 ``(S, m)`` tensor, checked: each row ``-1`` padding, then strictly increasing steps."""
    try:
        t = torch.as_tensor(nodes)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"nodes={type(nodes).__name__}: must be an (S, m) table of ints (step indices)") from None
    if t.dim() != 2 or t.shape[1] < 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(
            f"nodes has shape {tuple(t.shape)} and dtype {t.dtype}: must be an (S, m >= 1) table of ints, one row "
            "per segment: its compute steps up to the segment start, oldest first, -1 on the left where absent"
        )
    t = t.to(torch.int64)
    if t.shape[0] == 0:
        return t
    a = t[:, -1]
    if bool(((a < 0) | (a > n - 1)).any()):
        raise ValueError(f"nodes: the last column (the segment start a) must be in 0..{n - 1} for a recording of "
                         f"{n} steps")
    prev, cur = t[:, :-1], t[:, 1:]
    present = prev >= 0
    if bool((t < -1).any()) or bool((present & (cur <= prev)).any()):
        raise ValueError("nodes: each row must be -1 entries (absent) followed by strictly increasing step indices")
    return t


def extrapolation_costs(
    recording: Recording, nodes, *, order: int, max_len: int = DEFAULT_MAX_SEGMENT, estimator: str = "extrapolate",
    with_gain: bool = False, to_end: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Deviation cost of ``extrapolate`` (or ``predict``: ``estimator=``) segments of order ``order``, given their
    nodes: one row per segment start.

    Row ``s`` of ``nodes`` holds the compute steps of a path up to and including the segment start ``a`` (the
    last column), oldest first, ``-1`` on the left where the path has fewer (only the last ``order + 1`` are
    read, as at run time). Each skipped step ``i`` (``sigma_i -> sigma_{i+1}``) estimates
    ``v_hat_i = sum_j w_j(i) v_{c_j}`` with exactly the run-time call
    ``polynomial_weights(estimator, [sigma_c for c in row], sigma_i, sigma_{i+1}, order)``; the velocities at the nodes
    are the recording's (the replay from the reference, as :func:`segment_costs`). So

        ``x^_b = x_{a+1} + sum_{i=a+1}^{b-1} (sigma_{i+1} - sigma_i) v_hat_i = x_{a+1} + sum_j W_j v_{c_j}``

    with host float64 coefficients ``W_j = sum_i dt_i w_j(i)``: no latent is replayed. ``x_{a+1}`` is the
    recording's (``x_a + dt_a v_a`` up to its float32 rounding), the start :func:`segment_costs` uses too, so that
    an extrapolation lowered to reuse and meancache K = 1 price the same estimate the same. The cost is the one of
    :func:`segment_costs`: ``mean|x^_b - x_b| / (sigma_a - sigma_b)`` (mean over elements, then inputs; undivided
    if the sigmas are equal), in float64, 0 below :data:`COST_FLOOR` times the mean ``|x_b|``.

    Batched: the rows sharing a start ``a`` are priced by one matrix product of their coefficients with the
    recording's velocity rows (float64), all lengths at once. The cost is O(S * L * P * D) arithmetic; the S * L
    weight vectors are formed in one batch per start (:func:`_node_weights_batched`), bit-equal to the calls.

    Args:
        recording: a :class:`Recording` with N steps.
        nodes: ``(S, m)`` int table (tensor or nested lists), ``m >= 1``; each row ``-1`` padding, then strictly
            increasing steps; its last entry ``a`` in ``0..N-1``.
        order: the requested order p, 1..3 (the estimators' conditioning guard may lower it per step).
        max_len: longest segment priced, in steps.
        estimator: ``"extrapolate"`` (the polynomial's mean over each step) or ``"predict"`` (its value at the
            step's start).

        with_gain: also return each segment's *gain*: the largest ``sum_j |w_j(i)|`` over its skipped steps, the
            factor by which the estimate can amplify an error in the velocities it reads (at run time those are
            the model's velocities on the cached trajectory, not the reference's).
        to_end: also price the segments that end at ``N`` (an open tail: steps ``a + 1 .. N - 1`` estimated,
            compared with the recording's final sample ``x_N``).

    Returns:
        float64 ``(S, min(max_len, N - 1) + 1)``: ``[s, L]`` is the cost of ``a_s -> a_s + L``; ``0`` for
        ``L = 1`` (nothing is estimated), ``inf`` for ``L = 0`` and where ``a_s + L > N - 1`` (``> N`` with
        ``to_end``). With ``with_gain``, a pair ``(cost, gain)`` of that shape (gain 1 where nothing is
        estimated).

    Example:
        >>> import torch
        >>> rec = record(lambda x, s: 1 + 2 * s * x, torch.ones(2, 3), [1.0, 0.8, 0.6, 0.4, 0.2, 0.0],
        ...              progress=False)
        >>> c = extrapolation_costs(rec, [[-1, 0], [0, 1]], order=1, max_len=3)
        >>> c.shape, c[0, :2].tolist(), bool(c[1, 3] > 0), c[1, 3].item() == float("inf")
        (torch.Size([2, 4]), [inf, 0.0], True, False)
    """
    recording = _check_recording(recording)
    max_len = _check_max_len(max_len)
    if not is_int(order) or not 1 <= order <= MAX_EXTRAPOLATION_ORDER:
        raise ValueError(f"order={order!r}: must be an int in 1..{MAX_EXTRAPOLATION_ORDER}")
    if estimator not in POLYNOMIAL_ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}: must be one of {', '.join(POLYNOMIAL_ESTIMATORS)}")
    n = recording.num_steps
    table = _as_nodes(nodes, n)
    length = min(max_len, n - 1)
    end = n if to_end else n - 1  # the last step a segment may end on
    out = torch.full((table.shape[0], length + 1), math.inf, dtype=torch.float64)
    if table.shape[0] == 0:
        return out
    gain = torch.ones_like(out)
    out[table[:, -1] <= end - 1, 1] = 0.0
    if length < 2:
        return (out, gain) if with_gain else out
    sig = recording.sigmas
    p = recording.num_inputs
    lat = recording.latents.reshape(p, n + 1, -1)
    d = lat.shape[-1]
    floor = _noise_floor(lat)
    # rows by step, (steps, P * D) float64: a segment reads its nodes' velocity rows and two latent rows
    lat64 = lat.double().transpose(0, 1).reshape(n + 1, p * d)
    vel64 = recording.velocities.reshape(p, n, -1).double().transpose(0, 1).reshape(n, p * d)
    m = table.shape[1]
    rows_per_chunk = max(1, _ROW_CHUNK_BYTES // (p * d * 8))
    starts = table[:, -1]
    buffer = None
    with torch.no_grad():
        for a in sorted(set(starts.tolist())):
            reach = min(length, end - a)  # longest segment from a
            if reach < 2:
                continue
            which = (starts == a).nonzero().flatten()
            sub = table[which]
            steps = range(a + 1, a + reach)  # the skipped steps of the longest segment, I = reach - 1 of them
            weights = _node_weights(estimator, order, tuple(sig), sub, a, reach)
            dt = torch.tensor([sig[i + 1] - sig[i] for i in steps], dtype=torch.float64)
            # the gain of a -> a + t + 2: the largest sum |w| over its skipped steps a + 1 .. a + t + 1
            gain[which, 2 : reach + 1] = weights.abs().sum(dim=2).cummax(dim=1).values
            weights = weights * dt[None, :, None]
            cum = weights.cumsum(dim=1)  # [:, t] is W_j of the segment a -> a + t + 2
            ends = torch.arange(a + 2, a + reach + 1)
            base = lat64[a + 1][None, :] - lat64[ends]  # x_{a+1} - x_b, (I, P * D)
            # coefficients on the velocity rows lo..a, so that one matrix product forms every deviation; absent
            # columns carry weight 0 exactly and add it to row lo
            lo = int(sub[sub >= 0].min())
            span = a - lo + 1
            coef = torch.zeros(len(sub), len(steps), span, dtype=torch.float64)
            coef.scatter_add_(2, (sub - lo).clamp(min=0)[:, None, :].expand(-1, len(steps), -1), cum)
            rows = vel64[lo : a + 1]
            err = torch.empty(len(sub), len(steps), dtype=torch.float64)
            chunk = max(1, rows_per_chunk // len(steps))
            for c0 in range(0, len(sub), chunk):
                c1 = min(len(sub), c0 + chunk)
                # x^_b - x_b = (x_{a+1} - x_b) + sum_j W_j v_{c_j}, into one reused buffer: a fresh chunk each
                # time costs more in page faults than in arithmetic
                size = (c1 - c0) * len(steps) * p * d
                if buffer is None or buffer.numel() < size:
                    buffer = torch.empty(max(size, min(rows_per_chunk, len(table) * length) * p * d),
                                         dtype=torch.float64)
                dev = buffer[:size].view((c1 - c0) * len(steps), p * d)
                torch.mm(coef[c0:c1].reshape(-1, span), rows, out=dev)
                dev = dev.view(c1 - c0, len(steps), p * d)
                dev += base[None]
                err[c0:c1] = dev.abs_().view(c1 - c0, len(steps), p, d).mean(dim=-1).mean(dim=-1)
            err = torch.where(err <= floor[ends][None, :], 0.0, err)
            h = torch.tensor([sig[a] - sig[b] for b in ends.tolist()], dtype=torch.float64)[None, :]
            out[which, 2 : reach + 1] = torch.where(h > 0, err / torch.where(h > 0, h, 1.0), err)
    return (out, gain) if with_gain else out


#: Node-weight tables kept between calls inside :func:`shared_weights` (see :func:`_node_weights`), so the folds
#: and the full recording of one calibration compute them once; None outside it (nothing is kept).
_WEIGHT_CACHE: dict | None = None


@contextlib.contextmanager
def shared_weights():
    """Within the ``with`` block, :func:`extrapolation_costs` computes each node-weight table once and reuses it
    (the tables depend on the grid and the nodes, not on the recording); they are dropped when the block ends.

    Example:
        >>> with shared_weights():
        ...     pass
    """
    global _WEIGHT_CACHE
    outer = _WEIGHT_CACHE
    _WEIGHT_CACHE = {} if outer is None else outer
    try:
        yield
    finally:
        _WEIGHT_CACHE = outer


def _node_weights(estimator: str, order: int, sig: tuple, sub: torch.Tensor, a: int, reach: int) -> torch.Tensor:
    """float64 ``(rows, reach - 1, m)``: the weights of ``polynomial_weights`` for each row of node steps ``sub``
    (``-1`` padded, ending at ``a``) and each skipped step ``a + 1 .. a + reach - 1``, right-aligned on the row's
    last ``q + 1`` nodes. They depend on the grid and the nodes only, never on the recording's values, so a
    calibration that prices several recordings on one grid (its validation folds) computes each table once."""
    key = (estimator, order, sig, a, reach, sub.shape, sub.numpy().tobytes())
    found = None if _WEIGHT_CACHE is None else _WEIGHT_CACHE.get(key)
    if found is not None:
        return found
    table = _node_weights_batched(estimator, order, sig, sub, a, reach)
    if _WEIGHT_CACHE is not None:
        _WEIGHT_CACHE[key] = table
    return table


def _node_weights_batched(estimator: str, order: int, sig: tuple, sub: torch.Tensor, a: int, reach: int):
    """:func:`_node_weights`' table, every row and step at once: the same float64 operations, in the same order,
    as :func:`~meancache.estimators.polynomial_weights` (so the same bits, which tests/test_joint_search.py
    checks against the per-step calls), with its order guard applied per entry: the highest ``q <= order`` whose
    nodes are present and distinct and whose weights are finite with ``sum |w| <= MAX_GAIN``; else reuse."""
    rows, m = sub.shape
    steps = torch.arange(a + 1, a + reach)
    grid = torch.tensor(sig, dtype=torch.float64)
    now = grid[steps][None, :]  # (1, I)
    nxt = now if estimator == "predict" else grid[steps + 1][None, :]
    mid = 0.5 * (now + nxt)
    half = _GAUSS * (nxt - now)
    points = (mid - half, mid + half)
    node_sig = grid[sub.clamp(min=0)]  # (rows, m); padded columns are never read
    count = (sub >= 0).sum(dim=1)  # nodes present per row
    table = torch.zeros(rows, reach - 1, m, dtype=torch.float64)
    table[:, :, m - 1] = 1.0  # q = 0: reuse of the newest node
    done = torch.zeros(rows, reach - 1, dtype=torch.bool)
    for q in range(min(order, m - 1), 0, -1):
        nodes = node_sig[:, m - q - 1 :]  # (rows, q + 1), oldest first
        ok = (count >= q + 1)[:, None].expand(rows, reach - 1).clone()
        weights = []
        for j in range(q + 1):
            total = torch.zeros(rows, reach - 1, dtype=torch.float64)
            for g in points:
                term = torch.ones(rows, reach - 1, dtype=torch.float64)
                for k in range(q + 1):
                    if k != j:
                        gap = (nodes[:, j] - nodes[:, k])[:, None]
                        ok &= gap != 0.0
                        term = term * ((g - nodes[:, k][:, None]) / gap)
                total = total + term
            weights.append(0.5 * total)
        gain = torch.zeros(rows, reach - 1, dtype=torch.float64)
        for w in weights:  # left to right, as Python's sum
            ok &= torch.isfinite(w)
            gain = gain + w.abs()
        take = ok & (gain <= MAX_GAIN) & ~done
        if take.any():
            new = torch.zeros(rows, reach - 1, m, dtype=torch.float64)
            new[:, :, m - q - 1 :] = torch.stack(weights, dim=2)
            table = torch.where(take[:, :, None], new, table)
            done |= take
    return table


# -- the states of the exact DP --------------------------------------------------------------------------------------


def _keys(windows: torch.Tensor, n: int) -> torch.Tensor:
    """One int64 per window, increasing with the window read oldest node first (``-1`` smallest; entries up to
    ``n``, the end of an open tail)."""
    key = torch.zeros(windows.shape[0], dtype=torch.int64)
    for col in range(windows.shape[1]):
        key = key * (n + 2) + (windows[:, col] + 1)
    return key


def _windows(n: int, max_len: int, depth: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``(c_{-depth}, .., c_{-1}, a)`` a path from step 0 can end with, ``a <= last``: gaps of at most
    ``max_len``, and ``-1`` (absent) entries only before step 0. Sorted by :func:`_keys`; returns (windows, keys)."""
    w = torch.arange(0, last + 1, dtype=torch.int64)[:, None]
    for _ in range(depth):
        oldest = w[:, 0]
        start = oldest <= 0  # the path begins at step 0: nothing before it
        parts = [torch.cat([torch.full((int(start.sum()), 1), -1, dtype=torch.int64), w[start]], dim=1)]
        for g in range(1, max_len + 1):
            ok = oldest >= g
            parts.append(torch.cat([(oldest[ok] - g)[:, None], w[ok]], dim=1))
        w = torch.cat(parts)
    keys = _keys(w, n)
    order = torch.argsort(keys)
    return w[order], keys[order]


class JointCosts:
    """The graph of the joint search, from :func:`joint_costs`: states, and segments priced with their best
    estimator. Read by :func:`joint_solve`; independent of gamma and of the budget, so one serves every budget.

    Attributes:
        num_steps: N of the recording.
        max_len: longest segment, in steps.
        depth: compute steps before the current one that a state holds (the highest extrapolation order searched;
            0 when only meancache is searched).
        estimators: the estimator families searched, in tie-preference order.
        states: int64 ``(S, depth + 1)``: ``(c_{-depth}, .., c_{-1}, a)``, oldest first, ``-1`` where the path has
            fewer compute steps; sorted.
        src, dst, length: int64 ``(E,)``: the segment ``a -> a + length`` from state ``src`` to state ``dst``,
            sorted by ``dst``, then by the oldest step of ``src`` (the tie order of :func:`joint_solve`).
        cost: float64 ``(E,)``: the segment's cost with its best estimator (0 on 1-step segments, ``inf`` for a
            missing segment).
        estimator: int64 ``(E,)``: index into :data:`meancache.estimators.ESTIMATORS` of that estimator.
        order: int64 ``(E,)``: its K (meancache; 0 on 1-step segments) or p (extrapolate, predict).
        open_end: the graph also holds the segments that end at step ``N`` (open tails; the states whose last
            step is ``N`` are the ends of paths), so :func:`joint_solve` can answer with ``tail=True``.
    """

    __slots__ = ("num_steps", "max_len", "depth", "estimators", "states", "src", "dst", "length", "cost",
                 "estimator", "order", "max_gain", "open_end", "_candidates", "_labels", "_gains")

    def __init__(self, num_steps, max_len, depth, estimators, states, src, dst, length, candidates, labels,
                 gains=None, max_gain=None, open_end=False):
        self.num_steps = num_steps
        self.open_end = open_end
        self.max_len = max_len
        self.depth = depth
        self.estimators = estimators
        self.states = states
        self.src = src
        self.dst = dst
        self.length = length
        # every candidate's cost per segment, kept so that restricted() prices nothing twice
        self._candidates = candidates
        self._labels = labels
        # each candidate's gain per segment (1 for the published estimator, whose weights are positive and sum
        # to one); a polynomial candidate above max_gain is not offered
        self._gains = torch.ones_like(candidates) if gains is None else gains
        self.max_gain = max_gain
        offered = candidates if max_gain is None else torch.where(self._gains <= max_gain, candidates, math.inf)
        self.cost, self.estimator, self.order = _choose(offered, labels, length)

    def restricted(self, estimators: Sequence[str] | None = None, *, max_gain: float | None = None) -> "JointCosts":
        """The same graph with only ``estimators`` among the candidates (None: this graph's), and with only the
        polynomial candidates whose gain (see :func:`extrapolation_costs`) is at most ``max_gain`` (None: any):
        what :func:`joint_costs` would build for them, without pricing any segment again. The estimators must
        include a polynomial one (the states keep this graph's depth; the published estimator alone is
        :func:`solve`'s search).

        Example:
            >>> import torch
            >>> rec = record(lambda x, s: torch.sin(3 * x) - s, torch.randn(3, 4), torch.linspace(1, 0, 9),
            ...              progress=False)
            >>> g = joint_costs(rec, max_len=4).restricted(["predict"])
            >>> g.estimators, set(g.estimator[g.length > 1].tolist()) == {2}
            (('predict',), True)
        """
        if max_gain is not None and not (is_real(max_gain) and max_gain >= 1):
            raise ValueError(f"max_gain={max_gain!r}: must be None or a number >= 1 (sum |w| is at least 1)")
        if estimators is None:
            estimators = self.estimators
        families = tuple(e for e in _check_estimators(estimators) if e in self.estimators)
        if not any(f in POLYNOMIAL_ESTIMATORS for f in families):
            raise ValueError(
                f"estimators={estimators!r}: restricted() needs a polynomial estimator this graph searched "
                f"({', '.join(f for f in self.estimators if f in POLYNOMIAL_ESTIMATORS)})"
            )
        keep = [j for j, (e, _) in enumerate(self._labels) if ESTIMATORS[e] in families]
        return JointCosts(self.num_steps, self.max_len, self.depth, families, self.states, self.src, self.dst,
                          self.length, self._candidates[:, keep], [self._labels[j] for j in keep],
                          self._gains[:, keep], max_gain, self.open_end)

    @classmethod
    def mean(cls, graphs: Sequence["JointCosts"], weights: Sequence[float]) -> "JointCosts":
        """The graph of the union of disjoint input sets from the graphs of each (built with the same steps,
        ``max_len``, estimators and orders): every candidate's cost is a mean over inputs, so the union's is the
        ``weights``-weighted mean (weights: the sets' input counts). Costs below the noise floor were zeroed per
        set, so near the floor this differs from pricing the union directly by at most that floor.

        Example:
            >>> import torch
            >>> rec = record(lambda x, s: torch.sin(3 * x) - s, torch.randn(4, 4), torch.linspace(1, 0, 9),
            ...              progress=False)
            >>> from meancache.calibration.selection import subset
            >>> a, b = joint_costs(subset(rec, [0, 1]), max_len=4), joint_costs(subset(rec, [2, 3]), max_len=4)
            >>> whole, both = joint_costs(rec, max_len=4), JointCosts.mean([a, b], [2, 2])
            >>> bool(torch.allclose(whole._candidates, both._candidates, rtol=1e-9, atol=1e-12))
            True
        """
        first = graphs[0]
        for g in graphs[1:]:
            if (g.num_steps, g.max_len, g.depth, g.estimators, g._labels, g.open_end) != (
                first.num_steps, first.max_len, first.depth, first.estimators, first._labels, first.open_end
            ) or not torch.equal(g.src, first.src):
                raise ValueError("JointCosts.mean: the graphs must share steps, max_len, estimators and orders")
        total = float(sum(weights))
        cand = sum(g._candidates * (w / total) for g, w in zip(graphs, weights))
        return cls(first.num_steps, first.max_len, first.depth, first.estimators, first.states, first.src, first.dst,
                   first.length, cand, list(first._labels), first._gains, first.max_gain, first.open_end)

    def __repr__(self):
        return (f"JointCosts(num_steps={self.num_steps}, max_len={self.max_len}, depth={self.depth}, "
                f"estimators={self.estimators}, states={self.states.shape[0]}, segments={self.src.shape[0]}"
                + (", open_end=True)" if self.open_end else ")"))


def joint_costs(
    recording: Recording,
    *,
    estimators: Sequence[str] = DEFAULT_ESTIMATORS,
    max_len: int = DEFAULT_MAX_SEGMENT,
    orders: Iterable[int] = range(1, MAX_ORDER + 1),
    extrapolation_orders: Iterable[int] = range(1, MAX_EXTRAPOLATION_ORDER + 1),
    open_end: bool = False,
) -> JointCosts:
    """States and priced segments of the joint search over compute steps and per-segment estimators.

    A state is the last ``depth + 1`` compute steps of a path, ``depth`` the highest extrapolation order searched
    (an order-p segment ``a -> b`` reads the p compute steps before ``a``): every segment leaving a state then has
    one cost, so the DP of :func:`joint_solve` is exact. Each segment of at least 2 steps takes the least cost over
    the candidates: every meancache window K in ``orders`` (cost from the replay of :func:`segment_costs`, which
    depends on ``(a, b)`` only; from step 0 only the smallest K, as there) and, for extrapolate and predict, every
    order p in ``extrapolation_orders`` (:func:`extrapolation_costs`, with the state's nodes). **Ties:** the first
    candidate, in the order meancache K ascending, extrapolate p ascending, predict p ascending, whose cost is
    within :data:`COST_RTOL` of the
    least (so a lowered or coinciding extrapolation never displaces the published estimator, and rounding never
    decides). 1-step segments are chains: cost 0, ``("meancache", 0)``.

    Size: about ``N * max_len ** depth`` states and ``max_len`` times as many segments; the extrapolation costs
    take ``O(N * max_len ** (p + 1))`` weight calls and passes over the recording's ``P * D`` elements per order p
    (the digits model, N = 50, P * D = 2560, max_len = 10, p <= 3: about 7 s of CPU time, nearly all of it order
    3; N = 100: 8 s with max_len = 8, 18 s with max_len = 10). Restrict ``extrapolation_orders`` for large
    latents.

    Args:
        recording: a :class:`Recording` with N steps.
        estimators: families searched, a non-empty tuple from ``("meancache", "extrapolate", "predict")``.
        max_len: longest segment, in steps.
        orders: meancache windows K searched (ints in 1..6).
        extrapolation_orders: polynomial orders p searched for extrapolate and predict (ints in 1..3).
        open_end: also the segments that end at step ``N``, the open tails of a schedule whose last step is
            estimated (each priced against the recording's final sample, with every candidate estimator but the
            chain), so that :func:`joint_solve` can place them (``tail=True``). The segments that end before ``N``
            are priced as without it.

    Returns:
        A :class:`JointCosts`.

    Example:
        >>> import torch
        >>> rec = record(lambda x, s: torch.sin(3 * x) - s, torch.randn(3, 4), torch.linspace(1, 0, 9),
        ...              progress=False)
        >>> g = joint_costs(rec, max_len=4)
        >>> g.depth, g.states.shape[1], bool((g.cost[g.length == 1] == 0).all())
        (3, 4, True)
    """
    recording = _check_recording(recording)
    families = _check_estimators(estimators)
    max_len = _check_max_len(max_len)
    ks = _check_orders(orders, "orders", MAX_ORDER)
    ps = _check_orders(extrapolation_orders, "extrapolation_orders", MAX_EXTRAPOLATION_ORDER)
    if not isinstance(open_end, bool):
        raise ValueError(f"open_end={open_end!r}: must be True or False")
    n = recording.num_steps
    if n > 1 and (n + 2) ** (MAX_EXTRAPOLATION_ORDER + 1) >= 2**62:
        raise ValueError(f"num_steps={n}: too many steps for the joint search's state keys")
    polynomial = [f for f in POLYNOMIAL_ESTIMATORS if f in families]
    depth = max(ps) if polynomial else 0
    length = min(max_len, n - 1)
    end = n if open_end else n - 1  # the last step a path reaches: N is the end of an open tail
    states, keys = _windows(n, max_len, depth, end)
    # segments: every state with a <= end - 1, every length that stays inside the trajectory
    src_parts, len_parts = [], []
    a_of = states[:, -1]
    for seg in range(1, length + 1):
        ok = (a_of + seg <= end).nonzero().flatten()
        src_parts.append(ok)
        len_parts.append(torch.full_like(ok, seg))
    src = torch.cat(src_parts)
    seg_len = torch.cat(len_parts)
    a_e = a_of[src]
    dst_windows = torch.cat([states[src, 1:], (a_e + seg_len)[:, None]], dim=1)
    dst = torch.searchsorted(keys, _keys(dst_windows, n))
    # tie order: by destination, then by the predecessor's oldest step (the only one the destination lacks)
    rank = torch.argsort(dst * (n + 2) + (states[src, 0] + 1))
    src, seg_len, dst, a_e = src[rank], seg_len[rank], dst[rank], a_e[rank]

    # candidate costs, one column each, in tie-preference order
    columns, labels, gains = [], [], []
    if "meancache" in families:
        if length >= 2 and n >= 3:
            per_k = _per_order_costs(recording, max_len, ks)
            for j, k in enumerate(ks):
                columns.append(per_k[j, a_e, seg_len])
                labels.append((ESTIMATORS.index("meancache"), k))
                gains.append(torch.ones(seg_len.shape, dtype=torch.float64))
    for family in polynomial:
        for p in ps:
            windows, wkeys = _windows(n, max_len, p, n - 2)
            table, gain = extrapolation_costs(recording, windows, order=p, max_len=max_len, estimator=family,
                                              with_gain=True, to_end=open_end)
            multi = seg_len >= 2
            column = torch.full(seg_len.shape, math.inf, dtype=torch.float64)
            column_gain = torch.ones(seg_len.shape, dtype=torch.float64)
            suffix = states[src[multi], -(p + 1) :]  # the last p + 1 compute steps: what order p reads
            wanted = _keys(suffix, n)
            row = torch.searchsorted(wkeys, wanted).clamp(max=len(wkeys) - 1)
            if not torch.equal(wkeys[row], wanted):  # every suffix of a state is a window: a bug if not
                raise RuntimeError("joint_costs: a state's last compute steps are missing from the priced windows")
            column[multi] = table[row, seg_len[multi]]
            column_gain[multi] = gain[row, seg_len[multi]]
            columns.append(column)
            gains.append(column_gain)
            labels.append((ESTIMATORS.index(family), p))
    empty = torch.empty(seg_len.shape[0], 0, dtype=torch.float64)
    cand = torch.stack(columns, dim=1) if columns else empty
    return JointCosts(n, max_len, depth, families, states, src, dst, seg_len, cand, labels,
                      torch.stack(gains, dim=1) if gains else empty, open_end=open_end)


def _choose(cand: torch.Tensor, labels: list[tuple[int, int]], length: torch.Tensor):
    """Each segment's ``(cost, estimator, order)`` from its candidate columns (``(E, C)``, in tie-preference
    order): the first candidate within :data:`COST_RTOL` of the least; 1-step and missing segments are chains."""
    cost = torch.full(length.shape, math.inf, dtype=torch.float64)
    est = torch.zeros_like(length)
    ords = torch.zeros_like(length)
    if labels:
        least = cand.min(dim=1, keepdim=True).values
        tied = cand <= least + COST_RTOL * least
        pick = tied.to(torch.int8).argmax(dim=1)  # the first candidate within the tolerance of the least
        cost = cand.gather(1, pick[:, None]).squeeze(1)
        est = torch.tensor([e for e, _ in labels], dtype=torch.int64)[pick]
        ords = torch.tensor([k for _, k in labels], dtype=torch.int64)[pick]
    chain = length == 1
    cost[chain] = 0.0
    est[chain] = ESTIMATORS.index("meancache")
    ords[chain] = 0
    missing = ~torch.isfinite(cost)
    est[missing] = ESTIMATORS.index("meancache")
    ords[missing] = 0
    return cost, est, ords


def joint_solve(
    costs: JointCosts, budget, *, gamma: float = DEFAULT_GAMMA, tail: bool = False
) -> Schedule | list[Schedule]:
    """The cheapest schedule with exactly ``budget`` compute steps over the graph of :func:`joint_costs`.

    Minimises ``sum cost ** gamma`` over the path's segments, each at its best estimator given the compute steps
    before it, by dynamic programming over (state, evaluations used): ``D[m+1][s'] = min D[m][s] + w(s -> s')``.
    A state holds the last ``depth + 1`` compute steps, all a segment's cost reads, so the DP is **exact**: no
    approximation of the history. **Ties**, as in :func:`solve` (values within ``max(1, gamma) *``
    :data:`COST_RTOL` of the least are tied, so that rounding never decides): at each state the predecessor with the
    smallest oldest step wins; at the last step, among the final states within the tolerance of the least, the one
    whose compute steps, read backwards from the end, are smallest (smallest predecessor of ``N - 1`` first). The
    value returned is within a factor ``(1 + max(1, gamma) * COST_RTOL) ** budget`` of the exact optimum. With
    ``depth = 0`` (meancache only) this is :func:`solve`'s recursion and tie rule.

    Args:
        costs: the graph, from :func:`joint_costs`.
        budget: compute steps B (the first and last included), an int, or a list of them: one forward pass serves
            every budget.
        gamma: peak-suppression exponent, > 0.
        tail: also the schedules that leave the last steps to an open tail (``costs`` built with ``open_end``):
            the path then runs to the end ``N`` as a last node that costs no evaluation, and one whose last
            compute step is ``N - 1`` (then a 1-step chain to ``N``, cost 0) is an ordinary schedule. So the answer
            is the cheapest over both kinds, and never costs more than the one of ``tail=False``.

    Returns:
        A :class:`~meancache.Schedule` with ``estimators`` and ``orders`` per segment (1-step segments
        ``("meancache", 0)``), or a list of them for a list of budgets.

    Raises:
        ValueError: on a bad budget or gamma, or when no path has a finite cost.

    Example:
        >>> import torch
        >>> line = lambda x, sigma: 0.5 + 2.0 * sigma + 0 * x  # a velocity linear in sigma: a line predicts it
        >>> rec = record(line, torch.zeros(2, 3), torch.linspace(1, 0, 9), progress=False)
        >>> s = joint_solve(joint_costs(rec, max_len=4), 4)
        >>> s.compute_steps, s.estimators, s.orders
        ((0, 1, 3, 7), ('meancache', 'predict', 'predict'), (0, 1, 1))
        >>> [s.budget for s in joint_solve(joint_costs(rec, max_len=4), [3, 5])]
        [3, 5]
        >>> t = joint_solve(joint_costs(rec, max_len=4, open_end=True), 3, tail=True)
        >>> t.open_tail, t.segments[-1][1:]
        (True, (8, 'predict', 1))
    """
    if not isinstance(costs, JointCosts):
        raise ValueError(f"costs is a {type(costs).__name__}: must be the JointCosts of joint_costs()")
    gamma = _check_gamma(gamma)
    if not isinstance(tail, bool):
        raise ValueError(f"tail={tail!r}: must be True or False")
    if tail and not costs.open_end:
        raise ValueError("tail=True needs the segments that end at step N: build costs with joint_costs(..., "
                         "open_end=True)")
    n = costs.num_steps
    many = isinstance(budget, (list, tuple))
    if many and not budget:
        raise ValueError("budget=[]: give an int or a non-empty list of ints")
    budgets = [_check_budget(b, n, costs.max_len, tail) for b in (budget if many else [budget])]
    tol = COST_RTOL * max(1.0, gamma)
    inf = math.inf
    weight = torch.where(torch.isfinite(costs.cost), costs.cost.pow(gamma), inf)
    num_states = costs.states.shape[0]
    num_edges = costs.src.shape[0]
    # Dense predecessor table: row s lists the segments into state s, in tie order (they are sorted by destination,
    # then by the predecessor's oldest step, the only step the destination does not hold); padding points at a
    # dummy segment from a dummy state, both of value inf.
    rank = torch.arange(num_edges) - torch.searchsorted(costs.dst, costs.dst)
    width = int(rank.max()) + 1 if num_edges else 1
    pred = torch.full((num_states, width), num_edges, dtype=torch.int64)
    pred[costs.dst, rank] = torch.arange(num_edges)
    pred_src = torch.cat([costs.src, torch.tensor([num_states])])[pred]
    pred_weight = torch.cat([weight, torch.tensor([inf], dtype=torch.float64)])[pred]
    start = int(torch.nonzero((costs.states[:, -1] == 0) & (costs.states[:, :-1] < 0).all(dim=1))[0])
    value = torch.full((num_states + 1,), inf, dtype=torch.float64)  # the last entry is the dummy state
    value[start] = 0.0
    # an open tail's path has one more node, the end N, which is not evaluated
    extra = 1 if tail else 0
    finals = (costs.states[:, -1] == (n if tail else n - 1)).nonzero().flatten()
    back: list[torch.Tensor] = []  # back[m - 2][s]: the column of pred[s] on the path with m nodes
    at_end = {1: value[finals].clone()}
    for m in range(2, max(budgets) + extra + 1):
        cand = value[pred_src] + pred_weight  # (states, width)
        least = cand.amin(dim=1, keepdim=True)
        # the first predecessor within the tolerance of the least (an unreachable state keeps inf)
        pick = (cand <= least + tol * least).to(torch.int8).argmax(dim=1, keepdim=True)
        value[:num_states] = cand.gather(1, pick).squeeze(1)
        back.append(pick.squeeze(1))
        at_end[m] = value[finals].clone()

    schedules = []
    for b in budgets:
        vals = at_end[b + extra]
        best = float(vals.min()) if vals.numel() else inf
        if best == inf:
            raise ValueError(
                f"budget={b}, num_steps={n}, max_len={costs.max_len}: no path with finite cost (every way to place "
                "the compute steps uses a missing segment)"
            )
        tied = finals[vals <= best + tol * best].tolist()
        # smallest compute steps read backwards from the end: c_{-1} first, then c_{-2}, ...
        state = min(tied, key=lambda s: costs.states[s].flip(0).tolist())
        steps, ests, ords = [int(costs.states[state, -1])], [], []
        for m in range(b + extra, 1, -1):
            e = int(pred[state, int(back[m - 2][state])])
            state = int(costs.src[e])
            steps.append(int(costs.states[state, -1]))
            ests.append(ESTIMATORS[int(costs.estimator[e])])
            ords.append(int(costs.order[e]))
        steps, ests, ords = steps[::-1], ests[::-1], ords[::-1]
        if tail:  # drop the end N; a last compute step N - 1 reaches it by a chain, which is no tail
            steps.pop()
            if steps[-1] == n - 1:
                ests.pop()
                ords.pop()
        schedules.append(Schedule(steps, ords, n, estimators=ests))
    return schedules if many else schedules[0]


def _fitted_cost(recording: Recording, computed: Sequence[int], rows, a: int, b: int, floor: torch.Tensor) -> float:
    """:func:`extrapolation_costs`' cost of the fitted segment ``a -> b`` whose skipped steps carry the weight
    ``rows`` on the last computed steps of ``computed`` (oldest first): ``mean|x^_b - x_b| / (sigma_a - sigma_b)``
    with ``x^_b = x_{a+1} + sum_i dt_i sum_j w_j(i) v_{c_j}`` from the recorded rows, 0 below ``floor[b]`` (the
    recording's :func:`_noise_floor`)."""
    sig = recording.sigmas
    p, n = recording.num_inputs, recording.num_steps
    lat = recording.latents.reshape(p, n + 1, -1)
    vel = recording.velocities.reshape(p, n, -1)
    nodes = list(computed[-len(rows[0]):])
    dev = lat[:, a + 1].double() - lat[:, b].double()
    for i, w in zip(range(a + 1, b), rows):
        for c, x in zip(nodes, w):
            dev += (sig[i + 1] - sig[i]) * x * vel[:, c].double()
    err = float(dev.abs().mean(dim=-1).mean())
    if err <= float(floor[b]):
        return 0.0
    h = sig[a] - sig[b]
    return err / h if h > 0 else err


def schedule_costs(recording: Recording, schedule: Schedule) -> list[float]:
    """The cost of each segment of ``schedule``, at its own estimator and order: what the searches minimise
    (``sum cost ** gamma``), for checks, plots and brute force.

    A meancache segment is priced by :func:`segment_costs`' replay with its K (from step 0 too), an extrapolate or
    predict segment by :func:`extrapolation_costs` with the schedule's compute steps up to its start, a fitted one
    by the same deviation with its stored weights; 1-step segments cost 0.

    Args:
        recording: a :class:`Recording` with the schedule's N steps.
        schedule: a :class:`~meancache.Schedule`.

    Returns:
        One float per segment (``budget - 1``, or ``budget`` with an open tail, priced against the final sample).

    Example:
        >>> import torch
        >>> from meancache import Schedule
        >>> rec = record(lambda x, s: torch.sin(3 * x) - s, torch.randn(3, 4), torch.linspace(1, 0, 9),
        ...              progress=False)
        >>> c = schedule_costs(rec, Schedule([0, 1, 4, 7], [0, 2, 1], 8, estimators=["meancache", "meancache",
        ...                                                                       "extrapolate"]))
        >>> len(c), c[0], c[1] > 0, c[2] > 0
        (3, 0.0, True, True)
    """
    recording = _check_recording(recording)
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule is a {type(schedule).__name__}: must be a meancache.Schedule")
    n = recording.num_steps
    if schedule.num_steps != n:
        raise ValueError(f"schedule.num_steps={schedule.num_steps} != the recording's {n} steps")
    steps = schedule.compute_steps
    longest = max(b - a for a, b, _, _ in schedule.segments)
    out: list[float] = []
    per_k: dict[int, torch.Tensor] = {}
    floor = None
    for j, (a, b, e, k) in enumerate(schedule.segments):
        if b - a == 1:
            out.append(0.0)
        elif e == "meancache":
            if k not in per_k:
                per_k[k] = _per_order_costs(recording, longest, [k])[0]
            out.append(float(per_k[k][a, b - a]))
        elif e == FITTED:
            if floor is None:  # one pass over the recording, for every fitted segment
                floor = _noise_floor(recording.latents.reshape(recording.num_inputs, n + 1, -1))
            out.append(_fitted_cost(recording, steps[: j + 1], schedule.weights[j], a, b, floor))
        else:
            nodes = [-1] * max(0, k + 1 - (j + 1)) + list(steps[max(0, j - k) : j + 1])
            out.append(float(extrapolation_costs(recording, [nodes], order=k, max_len=b - a, estimator=e,
                                                 to_end=b == n)[0, b - a]))
    return out
