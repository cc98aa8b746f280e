"""Which steps run the model, and how far back each skipped step looks.

A :class:`Schedule` is the static plan of a MeanCache run (algorithm.md §6.1): the sorted indices of the steps
that evaluate the model (``compute_steps``; their count is the budget B, the first step always included) and one
window ``K`` per segment between two consecutive compute steps (``orders``):

* ``K = 0`` ("chain") only on 1-step segments, where nothing is skipped;
* ``K = 1`` plain reuse of the last velocity;
* ``K = 2 .. 6`` the finite-difference JVP estimate over the last K logged steps.

Each segment also names its estimator (``estimators``): ``"meancache"`` (the published estimator above, the
default), ``"extrapolate"`` or ``"predict"``, where the segment's order is the polynomial order p = 1..3 of
:mod:`meancache.estimators` (the polynomial through the last p + 1 computed velocities, averaged over each step or
evaluated at its start).

The published schedules compute the last step too. A schedule may instead end with an **open tail**: its last
compute step ``c < N - 1`` starts one more segment, ``c -> N``, whose steps are all estimated (one more entry in
``orders`` and ``estimators``). At small budgets that gives the evaluation the last step would spend, near
sigma = 0 where the velocity changes least, to the rest of the run.

A schedule may carry a **corrector** (``corrector=1`` or ``2``, :func:`meancache.estimators.correction_weights`):
at each compute step that ends a segment of a node estimator (``extrapolate``, ``predict``, ``fitted``), the
segment's skipped velocities are re-estimated by interpolation through the new velocity, and the difference is
added to the latent there, with no extra model evaluation. ``corrector=0`` (the default) is the plain run.

Published tables ship as JSON files in ``meancache/presets`` and load with :meth:`Schedule.preset`.
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
import math
import os
from importlib import resources
from typing import Iterable
from typing import NamedTuple
from typing import Sequence

import torch

from ._limits import MAX_ORDER
from .estimators import ESTIMATORS
from .estimators import FITTED
from .estimators import NODE_ESTIMATORS
from .estimators import SCHEDULE_ESTIMATORS
from .estimators import MAX_CORRECTOR
from .estimators import MAX_EXTRAPOLATION_ORDER
from .estimators import estimator_label
from .validation import is_int
from .validation import is_real

__all__ = ["MAX_ORDER", "MAX_STEPS", "SCHEDULE_FORMAT_VERSION", "Schedule", "StepPlan", "preset_names"]

logger = logging.getLogger("meancache")

#: Largest ``num_steps`` a schedule may have. Flow-matching samplers run tens of steps, and diffusers'
#: schedulers are trained on a grid of 1000 timesteps, so no real run needs more than about 1000; ten times that
#: leaves room for experiments while keeping every per-step structure (``expand``, ``window``, a schedule file's
#: lists) small, and the worst case of the placement behind :meth:`Schedule.resample` and :meth:`Schedule.default`
#: (about ``budget * (num_steps - budget)`` vectorised operations, largest at ``budget = num_steps / 2``) at a
#: second or two. Without a bound, a file with ``"num_steps": 1000000000`` loads and then hangs in ``window``.
MAX_STEPS = 10_000
#: Newest version of schedule files. Version 2 adds each segment's estimator, version 3 the open tail, version 4
#: fitted segments (their weights and grid), version 5 the corrector; :meth:`Schedule.to_dict` writes the oldest
#: version that holds the schedule (2 without a tail, 3 with one, 4 with fitted weights, 5 with a corrector), so
#: older releases read what they can run. :meth:`Schedule.from_json` reads versions 1 (every segment the published
#: estimator) to 5.
SCHEDULE_FORMAT_VERSION = 5
_READ_VERSIONS = (1, 2, 3, 4, 5)
#: Largest difference between a run's sigmas and the grid a fitted schedule was fitted on for which the fitted
#: weights are used; beyond it the run uses ``predict`` of the same order (:meth:`Schedule.unfitted`).
GRID_ATOL = 1e-6
_WARNED: set = set()
SCHEDULE_FORMAT = "meancache.schedule"
PRESET_FORMAT = "meancache.preset"
# Segments whose K is 0 ("chain") but that become longer than one step when a table is stretched to more steps
# get this window: a damped first-order extrapolation (algorithm.md §2.3), better than plain reuse on the dense,
# fast-changing part of the trajectory where chains sit.
STRETCHED_CHAIN_ORDER = 2
# No published table has a segment longer than 8 steps (algorithm.md §6.4); the default schedule keeps that cap.
DEFAULT_MAX_SEGMENT = 8


class StepPlan(NamedTuple):
    """What happens at one sampler step.

    ``computed`` is True when the model runs; ``order`` is the window K (meancache) or the polynomial order p
    (extrapolate) of a skipped step, 0 on computed steps; ``estimator`` names the skipped step's estimator;
    ``weights``, for a fitted step only, its weights on the last ``len(weights)`` computed velocities, oldest first.
    """

    computed: bool
    order: int
    estimator: str = "meancache"
    weights: tuple[float, ...] | None = None

    def __repr__(self):
        extra = "" if self.weights is None else f", weights={self.weights}"
        return f"StepPlan(computed={self.computed}, order={self.order}, estimator={self.estimator!r}{extra})"


#: One letter per polynomial order in :meth:`Schedule.pattern` (linear, quadratic, cubic), lower case for
#: extrapolate (the mean over the step) and upper case for predict (the value at its start), so that the string
#: keeps one character per step next to the K digits of the published estimator.
_ORDER_LETTERS = {"extrapolate": {1: "l", 2: "q", 3: "c"}, "predict": {1: "L", 2: "Q", 3: "C"},
                  FITTED: {1: "f", 2: "g", 3: "h"}}


class Schedule:
    """A validated MeanCache schedule.

    Args:
        compute_steps: strictly increasing step indices that evaluate the model; ``0`` must be included. Their
            count is the budget (2 <= budget <= num_steps). Without ``num_steps - 1`` the schedule has an open tail
            (see the module docstring).
        orders: one int per segment: ``budget - 1`` for the segments between consecutive compute steps, plus one
            for the tail segment ``compute_steps[-1] -> num_steps`` when the last step is not computed. The window
            K in ``0..6`` of a meancache segment (``K = 0`` only on 1-step segments, so never on a tail), the order
            p in ``1..3`` of an extrapolate or predict segment.
        num_steps: number of sampler steps N, 2 <= N <= :data:`MAX_STEPS`.
        estimators: one name per segment (as many as ``orders``), ``"meancache"``, ``"extrapolate"``,
            ``"predict"`` or ``"fitted"``; None (the default) makes every segment ``"meancache"``.
        weights: with fitted segments: one entry per segment, None for a segment that is not fitted, and for a
            fitted segment of order p that starts at compute step j (0-based) a sequence with one tuple per skipped
            step, each of ``min(p, j) + 1`` finite floats: the weights on the last computed velocities, oldest
            first. None (the default) when no segment is fitted.
        grid: with fitted segments: the ``num_steps + 1`` sigmas the weights were fitted on (a run on another grid
            uses ``predict`` instead, :meth:`unfitted`); None otherwise.
        corrector: 0 (the default: none), 1 or 2: the order of the corrector applied at each compute step that
            ends an ``extrapolate``, ``predict`` or ``fitted`` segment (see the module docstring); at least one
            segment must use one of these estimators.

    Raises:
        ValueError: naming the field, the bad value and the rule, for every violated invariant.

    Example:
        >>> from meancache import Schedule
        >>> s = Schedule([0, 1, 4, 5], [0, 2, 0], num_steps=6)
        >>> s.budget, s.pattern()
        (4, ('CC..CC', '--22--'))
        >>> Schedule([0, 3, 4], [1, 0], 5, estimators=["extrapolate", "meancache"]).labels
        ('e1', 'K0')
        >>> t = Schedule([0, 2, 4], [1, 1, 1], 6, estimators=["meancache", "extrapolate", "extrapolate"])
        >>> t.open_tail, t.pattern()
        (True, ('C.C.C.', '-1-l-l'))
    """

    __slots__ = ("_compute_steps", "_orders", "_num_steps", "_estimators", "_weights", "_grid", "_corrector",
                 "_plan")

    def __init__(
        self,
        compute_steps: Iterable[int],
        orders: Iterable[int],
        num_steps: int,
        estimators: Iterable[str] | None = None,
        *,
        weights=None,
        grid=None,
        corrector: int = 0,
    ):
        _check_num_steps(num_steps)
        steps = _as_tuple(compute_steps, "compute_steps", "a sequence of ints (the computed step indices)")
        ks = _as_tuple(orders, "orders", "a sequence of ints (one order per segment)")
        bad = [s for s in steps if not is_int(s)]
        if bad:
            raise ValueError(f"compute_steps={list(steps)}: every entry must be an int, got {bad[0]!r}")
        bad = [k for k in ks if not is_int(k)]
        if bad:
            raise ValueError(f"orders={list(ks)}: every entry must be an int, got {bad[0]!r}")
        budget = len(steps)
        if budget < 2:
            raise ValueError(
                f"compute_steps={list(steps)}: budget {budget} < 2; a schedule computes step 0 and at least one more"
            )
        if budget > num_steps:
            raise ValueError(f"compute_steps={list(steps)}: budget {budget} > num_steps={num_steps}")
        for a, b in zip(steps, steps[1:]):
            if b <= a:
                kind = "repeated" if a == b else "unsorted"
                raise ValueError(
                    f"compute_steps={list(steps)}: {kind} step {b} after {a}; steps must be strictly increasing"
                )
        if steps[0] != 0:
            raise ValueError(f"compute_steps={list(steps)}: first step {steps[0]} is not 0; step 0 must be computed")
        tail = steps[-1] != num_steps - 1
        if steps[-1] > num_steps - 1:
            raise ValueError(
                f"compute_steps={list(steps)}: last step {steps[-1]} is past num_steps - 1 = {num_steps - 1}"
            )
        segments = budget if tail else budget - 1
        if len(ks) != segments:
            if tail and len(ks) == budget - 1:
                raise ValueError(
                    f"compute_steps={list(steps)}: last step {steps[-1]} is not num_steps - 1 = {num_steps - 1}, "
                    f"so the schedule has an open tail {steps[-1]}->{num_steps}, which needs its own order and "
                    f"estimator: orders={list(ks)} must have budget = {budget} entries, not {len(ks)}; or compute "
                    f"step {num_steps - 1}"
                )
            rule = (f"budget = {budget} (one per segment, the open tail {steps[-1]}->{num_steps} included)" if tail
                    else f"budget - 1 = {budget - 1} (one K per segment between consecutive compute steps)")
            raise ValueError(f"orders={list(ks)}: length {len(ks)} != {rule}")
        if estimators is None:
            names = ("meancache",) * len(ks)
        else:
            names = _as_tuple(estimators, "estimators", "a sequence of estimator names "
                              f"({', '.join(SCHEDULE_ESTIMATORS)}), one per segment, or None")
            if len(names) != len(ks):
                count = (f"budget = {budget} (one estimator per segment, the open tail included)" if tail
                         else f"budget - 1 = {budget - 1} (one estimator per segment)")
                raise ValueError(f"estimators={list(names)}: length {len(names)} != {count}")
        ends = steps[1:] + ((num_steps,) if tail else ())
        for j, (name, k) in enumerate(zip(names, ks)):
            if not isinstance(name, str) or name not in SCHEDULE_ESTIMATORS:
                raise ValueError(f"estimators[{j}]={name!r}: must be one of {', '.join(SCHEDULE_ESTIMATORS)}")
            if name in NODE_ESTIMATORS:
                if not 1 <= k <= MAX_EXTRAPOLATION_ORDER:
                    raise ValueError(
                        f"orders[{j}]={k}: the polynomial order p of the {name} segment {steps[j]}->{ends[j]} "
                        f"must be in 1..{MAX_EXTRAPOLATION_ORDER}"
                    )
                continue
            if not 0 <= k <= MAX_ORDER:
                raise ValueError(f"orders[{j}]={k}: K must be in 0..{MAX_ORDER}")
            if k == 0 and ends[j] - steps[j] > 1:
                raise ValueError(
                    f"orders[{j}]=0 on segment {steps[j]}->{ends[j]}: K=0 (chain) is allowed only on 1-step "
                    "segments; a skipped step needs K >= 1"
                )
        self._weights, self._grid = _check_fit(weights, grid, steps, ends, names, ks, num_steps)
        if not is_int(corrector) or not 0 <= corrector <= MAX_CORRECTOR:
            raise ValueError(f"corrector={corrector!r}: must be an int in 0..{MAX_CORRECTOR} (0: no corrector)")
        if corrector and not any(e in NODE_ESTIMATORS for e in names):
            raise ValueError(
                f"corrector={corrector}: corrects extrapolate, predict and fitted segments only, and estimators="
                f"{list(names)} has none"
            )
        self._corrector = int(corrector)
        self._compute_steps = tuple(int(c) for c in steps)
        self._orders = tuple(int(k) for k in ks)
        self._num_steps = int(num_steps)
        self._estimators = tuple(names)
        self._plan = None

    # -- read-only views ------------------------------------------------------------------------------------------
    @property
    def compute_steps(self) -> tuple[int, ...]:
        """Sorted step indices that evaluate the model (tuple of int)."""
        return self._compute_steps

    @property
    def orders(self) -> tuple[int, ...]:
        """One window K (or order p) per segment (tuple of int, length budget - 1, or budget with an open tail)."""
        return self._orders

    @property
    def open_tail(self) -> bool:
        """Whether the last step is estimated: the last compute step ``c < num_steps - 1`` starts a tail segment
        ``c -> num_steps``.

        Example:
            >>> Schedule([0, 3], [1, 1], 5, ["meancache", "extrapolate"]).open_tail, Schedule.full(3).open_tail
            (True, False)
        """
        return self._compute_steps[-1] != self._num_steps - 1

    @property
    def segments(self) -> tuple[tuple[int, int, str, int], ...]:
        """``(start, end, estimator, order)`` per segment: steps ``start + 1 .. end - 1`` are estimated with that
        estimator; ``end`` is the next compute step, or ``num_steps`` for an open tail.

        Example:
            >>> Schedule([0, 2, 3], [1, 0, 2], 5, ["meancache", "meancache", "predict"]).segments
            ((0, 2, 'meancache', 1), (2, 3, 'meancache', 0), (3, 5, 'predict', 2))
        """
        ends = self._compute_steps[1:] + ((self._num_steps,) if self.open_tail else ())
        return tuple(zip(self._compute_steps, ends, self._estimators, self._orders))

    @property
    def estimators(self) -> tuple[str, ...]:
        """One estimator name per segment, ``"meancache"``, ``"extrapolate"``, ``"predict"`` or ``"fitted"``
        (tuple of str, as long as :attr:`orders`)."""
        return self._estimators

    @property
    def corrector(self) -> int:
        """The corrector order: 0 (none), 1 or 2 (see the module docstring).

        Example:
            >>> Schedule([0, 3, 5], [1, 1], 6, ["predict"] * 2, corrector=1).corrector
            1
        """
        return self._corrector

    @property
    def fitted(self) -> bool:
        """Whether a segment carries fitted weights (then :attr:`weights` and :attr:`grid` are set)."""
        return self._grid is not None

    @property
    def weights(self) -> tuple | None:
        """Per segment: None, or for a fitted segment one tuple of weights per skipped step (oldest computed
        velocity first); None when no segment is fitted."""
        return self._weights

    @property
    def grid(self) -> tuple[float, ...] | None:
        """The ``num_steps + 1`` sigmas the fitted weights were fitted on (None when no segment is fitted)."""
        return self._grid

    def unfitted(self) -> "Schedule":
        """The same schedule with every fitted segment turned into ``predict`` of the same order (the polynomial
        the fitted weights replace): what a run on another grid, or on another step count, uses.

        Example:
            >>> s = Schedule([0, 2, 3], [1, 0], 4, ["fitted", "meancache"], weights=[[(0.9,)], None],
            ...              grid=[1.0, 0.75, 0.5, 0.25, 0.0])
            >>> s.unfitted().labels, s.unfitted().fitted
            (('p1', 'K0'), False)
        """
        if not self.fitted:
            return self
        names = ["predict" if e == FITTED else e for e in self._estimators]
        return Schedule(self._compute_steps, self._orders, self._num_steps, names, corrector=self._corrector)

    def for_grid(self, sigmas) -> "Schedule":
        """The schedule a run on ``sigmas`` (``num_steps + 1`` values) uses: itself, or :meth:`unfitted` with a log
        line (logger ``meancache``, WARNING) when it is fitted to a grid more than :data:`GRID_ATOL` away.

        Example:
            >>> s = Schedule([0, 2, 3], [1, 0], 4, ["fitted", "meancache"], weights=[[(0.9,)], None],
            ...              grid=[1.0, 0.75, 0.5, 0.25, 0.0])
            >>> s.for_grid([1.0, 0.75, 0.5, 0.25, 0.0]) is s, s.for_grid([1.0, 0.8, 0.5, 0.2, 0.0]).fitted
            (True, False)
        """
        if not self.fitted:
            return self
        run = tuple(float(x) for x in sigmas)
        if len(run) == len(self._grid) and max(abs(a - b) for a, b in zip(run, self._grid)) <= GRID_ATOL:
            return self
        if (self, run) in _WARNED:  # once per schedule and grid, not once per call
            return self.unfitted()
        if len(_WARNED) < 64:
            _WARNED.add((self, run))
        logger.warning(
            "meancache: the schedule's fitted weights were fitted on another sigma grid (largest difference %s); "
            "this run uses predict of the same orders instead",
            f"{max(abs(a - b) for a, b in zip(run, self._grid)):.3g}" if len(run) == len(self._grid)
            else f"{len(run) - 1} steps, not {len(self._grid) - 1}",
        )
        return self.unfitted()

    @property
    def labels(self) -> tuple[str, ...]:
        """One short label per segment: ``K<K>`` for meancache, ``e<p>`` for extrapolate, ``p<p>`` for predict,
        ``f<p>`` for fitted.

        Example:
            >>> Schedule([0, 2, 3], [2, 0], num_steps=4).labels
            ('K2', 'K0')
        """
        return tuple(estimator_label(e, k) for e, k in zip(self._estimators, self._orders))

    @property
    def num_steps(self) -> int:
        """Number of sampler steps N."""
        return self._num_steps

    @property
    def budget(self) -> int:
        """Number of model evaluations B (``len(compute_steps)``)."""
        return len(self._compute_steps)

    @property
    def window(self) -> int:
        """Largest K any meancache skipped step uses (1 when there is none): the history entries a run needs."""
        ks = [p.order for p in self.expand() if not p.computed and p.estimator == "meancache"]
        return max(ks, default=1)

    @property
    def depth(self) -> int:
        """Computed velocities a run keeps for the polynomial estimators: the largest ``p + 1`` over extrapolate and
        predict segments that skip a step, 0 when there is none.

        Example:
            >>> Schedule([0, 3, 4], [2, 0], 5, estimators=["extrapolate", "meancache"]).depth
            3
        """
        ps = [p.order for p in self.expand() if not p.computed and p.estimator in NODE_ESTIMATORS]
        return max(ps) + 1 if ps else 0

    def expand(self) -> tuple[StepPlan, ...]:
        """Per-step view: one :class:`StepPlan` ``(computed, order, estimator)`` for each of the ``num_steps`` steps.

        Example:
            >>> Schedule([0, 3], [4], num_steps=4).expand()[1]
            StepPlan(computed=False, order=4, estimator='meancache')
        """
        if self._plan is None:
            plan = [StepPlan(True, 0)] * self._num_steps
            weights = self._weights or (None,) * len(self._orders)
            for (a, b, e, k), w in zip(self.segments, weights):
                for i in range(a + 1, b):
                    plan[i] = StepPlan(False, k, e, None if w is None else w[i - a - 1])
            self._plan = tuple(plan)
        return self._plan

    def with_order(self, order: int) -> "Schedule":
        """The same compute steps with the published estimator and K = ``order`` on every multi-step segment
        (1-step segments get K = 0).

        ``with_order(1)`` is plain reuse of the last computed velocity, the baseline MeanCache improves on.

        Example:
            >>> Schedule([0, 3, 4, 6], [4, 0, 2], num_steps=7).with_order(1).orders
            (1, 0, 1)
        """
        # any integer type the constructor accepts, numpy integer scalars included
        if not is_int(order) or not 1 <= order <= MAX_ORDER:
            raise ValueError(f"order={order!r}: must be an int in 1..{MAX_ORDER}")
        order = int(order)
        return Schedule(self._compute_steps, [order if b - a > 1 else 0 for a, b, _, _ in self.segments],
                        self._num_steps)

    def pattern(self) -> tuple[str, str]:
        """The two strings of algorithm.md §6.3: ``C``/``.`` per step, and the estimator per skipped step (``-`` if
        computed): the digit K for meancache, ``l``/``q``/``c`` (linear, quadratic, cubic: ``e1``/``e2``/``e3`` of
        :attr:`labels`) for extrapolate, ``L``/``Q``/``C`` (``p1``/``p2``/``p3``) for predict and ``f``/``g``/``h``
        (``f1``/``f2``/``f3``) for fitted, one character per step so the two strings line up.

        Example:
            >>> Schedule([0, 2, 3], [1, 0], num_steps=4).pattern()
            ('C.CC', '-1--')
            >>> Schedule([0, 3, 5], [1, 2], 6, estimators=["extrapolate", "meancache"]).pattern()
            ('C..C.C', '-ll-2-')
        """
        plan = self.expand()

        def mark(p: StepPlan) -> str:
            if p.computed:
                return "-"
            return _ORDER_LETTERS[p.estimator][p.order] if p.estimator in _ORDER_LETTERS else str(p.order)

        return "".join("C" if p.computed else "." for p in plan), "".join(mark(p) for p in plan)

    # -- equality and display -------------------------------------------------------------------------------------
    def _key(self):
        return (self._compute_steps, self._orders, self._num_steps, self._estimators, self._weights, self._grid,
                self._corrector)

    def __eq__(self, other):
        if not isinstance(other, Schedule):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        extra = "" if self.published else f", estimators={list(self._estimators)}"
        if self.fitted:
            extra += f", weights={_listed(self._weights)}, grid={list(self._grid)}"
        if self._corrector:
            extra += f", corrector={self._corrector}"
        return (
            f"Schedule(compute_steps={list(self._compute_steps)}, orders={list(self._orders)}, "
            f"num_steps={self._num_steps}{extra})"
        )

    @property
    def published(self) -> bool:
        """Whether every segment uses the published MeanCache estimator."""
        return all(e == "meancache" for e in self._estimators)

    # -- serialisation --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-ready dict with the format name and version (2; 3 for a schedule with an open tail; 4 with fitted
        segments, which adds ``weights`` and ``grid``; 5 with a corrector, which adds ``corrector``)."""
        out = {
            "format": SCHEDULE_FORMAT,
            "version": 5 if self._corrector else 4 if self.fitted else 3 if self.open_tail else 2,
            "num_steps": self._num_steps,
            "compute_steps": list(self._compute_steps),
            "orders": list(self._orders),
            "estimators": list(self._estimators),
        }
        if self.fitted:
            out["weights"] = _listed(self._weights)
            out["grid"] = list(self._grid)
        if self._corrector:
            out["corrector"] = self._corrector
        return out

    def to_json(self) -> str:
        """Serialise to a JSON string that :meth:`from_json` reads back into an equal schedule.

        Example:
            >>> s = Schedule.preset("qwen-image", 10)
            >>> Schedule.from_json(s.to_json()) == s
            True
        """
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data) -> "Schedule":
        """Build from :meth:`to_dict` output, checking the format name and version (1 to 5; a version 1 file has
        no ``estimators`` and loads as the published estimator on every segment; only versions 3 and later may leave
        the last step to an open tail, only 4 and later hold fitted segments, only 5 a corrector)."""
        if not isinstance(data, dict):
            raise ValueError(f"schedule data={type(data).__name__}: must be a JSON object")
        fmt = data.get("format")
        if fmt != SCHEDULE_FORMAT:
            raise ValueError(f"format={fmt!r}: not a meancache schedule (expected {SCHEDULE_FORMAT!r})")
        version = data.get("version")
        # `true == 1` and `2.0 == 2` in Python, so the type is checked too: the package's integer rule (is_int), as
        # for every other integer field of the file
        if not is_int(version) or version not in _READ_VERSIONS:
            raise ValueError(
                f"version={version!r}: this meancache reads schedule format versions "
                f"{', '.join(map(str, _READ_VERSIONS))} (an integer)"
            )
        fields = ("num_steps", "compute_steps", "orders") + (("estimators",) if version >= 2 else ())
        missing = [k for k in fields if k not in data]
        if missing:
            raise ValueError(f"schedule data is missing field(s) {missing}")
        if version == 1 and "estimators" in data:
            raise ValueError("estimators in a version 1 schedule: per-segment estimators need version 2")
        if version >= 2 and not isinstance(data["estimators"], list):
            raise ValueError(f"estimators={data['estimators']!r}: must be a list of estimator names in version 2")
        fit = {k: data[k] for k in ("weights", "grid") if k in data}
        if fit and version < 4:
            raise ValueError(f"{sorted(fit)} in a version {version} schedule: fitted weights need version 4")
        if version < 4 and FITTED in (data.get("estimators") or ()):
            raise ValueError(f"a fitted segment in a version {version} schedule: fitted segments need version 4")
        if "corrector" in data and version < 5:
            raise ValueError(f"corrector in a version {version} schedule: a corrector needs version 5")
        if version == 5 and "corrector" not in data:
            raise ValueError("a version 5 schedule must give its corrector (version 5 is written only with one)")
        out = cls(data["compute_steps"], data["orders"], data["num_steps"], data.get("estimators"), **fit,
                  corrector=data.get("corrector", 0))
        if out.open_tail and version < 3:
            raise ValueError(
                f"compute_steps={list(out.compute_steps)} leaves the last step {out.num_steps - 1} to an open tail, "
                f"which needs schedule format version 3 (the file says {version})"
            )
        return out

    @classmethod
    def from_json(cls, text: str) -> "Schedule":
        """Parse a string written by :meth:`to_json`. Raises ValueError on malformed or foreign data."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"schedule JSON is malformed: {exc}") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> None:
        """Write the schedule as a JSON file.

        Example:
            >>> import tempfile, os
            >>> p = os.path.join(tempfile.mkdtemp(), "s.json")
            >>> Schedule.default(10, 50).save(p); Schedule.load(p) == Schedule.default(10, 50)
            True
        """
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Schedule":
        """Read a file written by :meth:`save`.

        Raises:
            ValueError: naming the path, for a file that is not UTF-8 text (a binary file), malformed JSON or an
                invalid schedule. A missing file raises the usual ``FileNotFoundError`` (an ``OSError``).
        """
        where = os.fspath(path)
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{where}: not a schedule file: byte {exc.start} is not UTF-8 text ({exc.reason}); schedule files "
                "are UTF-8 JSON written by Schedule.save"
            ) from None
        try:
            return cls.from_json(text)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    # -- constructors ---------------------------------------------------------------------------------------------
    @classmethod
    def full(cls, num_steps: int) -> "Schedule":
        """Every step computed: the uncached sampler.

        Example:
            >>> Schedule.full(4).pattern()
            ('CCCC', '----')
        """
        _check_num_steps(num_steps)  # before building lists of that length
        return cls(range(num_steps), [0] * (num_steps - 1), num_steps)

    @classmethod
    def preset(cls, name: str, budget: int, num_steps: int = 50) -> "Schedule":
        """A published MeanCache table (algorithm.md §6.2), resampled to ``num_steps`` when that is not 50.

        Presets: ``qwen-image`` (budgets 25/17/10), ``qwen-image-2512`` (25/17/10), ``z-image`` (25/20/17/15/13).
        See :meth:`resample` for the rule used at other step counts.

        Raises:
            ValueError: for an unknown name or budget, listing what exists.

        Example:
            >>> Schedule.preset("qwen-image", 10).compute_steps
            (0, 1, 3, 7, 14, 21, 28, 35, 42, 49)
            >>> Schedule.preset("qwen-image", 10, num_steps=20).budget
            10
        """
        tables = _preset_tables()
        if not isinstance(name, str) or name not in tables:
            raise ValueError(f"preset name={name!r} is unknown; available presets: {sorted(tables)}")
        n_ref, by_budget = tables[name]
        if not is_int(budget) or budget not in by_budget:
            raise ValueError(
                f"budget={budget!r} has no {name!r} preset; available budgets: {sorted(by_budget, reverse=True)}"
            )
        return by_budget[budget].resample(num_steps) if num_steps != n_ref else by_budget[budget]

    @classmethod
    def default(
        cls, budget: int, num_steps: int, estimator: str = "predict", order: int | None = None
    ) -> "Schedule":
        """A schedule for models without a preset, shaped like the published ones (algorithm.md §6.4).

        Shape (steps placed by a piecewise compute density over the normalised position u = i / (N - 1)):

        * head, u < 0.2: density 4, so the start is dense (consecutive or every-other-step computes);
        * middle, 0.2 <= u < 0.85: density 1, long segments (at most 8 steps where the budget allows);
        * tail, u >= 0.85: density 2, short segments;
        * the first and last step are always computed; 1-step segments are chains (K = 0).

        Compute steps are the density's quantiles, made distinct (and at most 8 apart where the budget allows) by
        :func:`_place`; budget = num_steps computes every step. The densities were chosen on analytic
        Gaussian-mixture flows (unshifted and shift-3 grids, budgets 10-25 of 50).

        Estimator of the multi-step segments: by default ``predict`` of order 1 (the line through the last two
        computed velocities, at each step's start; ``order`` sets another). Measured on held-out cases at budgets
        10/17/25 of 50 against the same steps with the published estimator (K = 2 at the head and in the middle,
        K = 4 in the tail: ``estimator="meancache"``, which ``order`` then replaces by one K everywhere):
        three Gaussian-mixture flows not used anywhere else (24-32 dimensions, grids of shift 1, 2, 3; geometric
        mean of rel L2 0.039 against 0.082, lower in all 9 cases) and the embedded digits model (35.3/44.2/50.3 dB
        against 34.2/39.2/43.7 dB). Orders 2 and 3 were better on some mixtures but fell 1.6 and 4.6 dB behind
        order 1 at B = 10 on the digits model; ``extrapolate`` (the mean over the step) was behind ``predict`` at
        every budget. A calibrated schedule for the actual model is better still.

        Example:
            >>> Schedule.default(10, 50).compute_steps
            (0, 2, 5, 7, 11, 19, 27, 35, 43, 49)
            >>> Schedule.default(10, 50).labels[:4], Schedule.default(10, 50, "meancache").labels[:4]
            (('p1', 'p1', 'p1', 'p1'), ('K2', 'K2', 'K2', 'K2'))
        """
        if not isinstance(estimator, str) or estimator not in ESTIMATORS:
            raise ValueError(f"estimator={estimator!r}: must be one of {', '.join(ESTIMATORS)}")
        top = MAX_ORDER if estimator == "meancache" else MAX_EXTRAPOLATION_ORDER
        if order is not None and (not is_int(order) or not 1 <= order <= top):
            raise ValueError(f"order={order!r}: the {estimator} estimator takes an int in 1..{top}")
        _check_budget(budget, num_steps)
        if budget == num_steps:
            return cls.full(num_steps)
        marks = [(0.0, 4.0), (0.2, 1.0), (0.85, 2.0), (1.0, None)]
        mass = [w * (marks[j + 1][0] - u) for j, (u, w) in enumerate(marks[:-1])]
        total = sum(mass)
        targets = []
        for j in range(budget):
            q = total * j / (budget - 1)
            u = 1.0
            for (u0, w), m in zip(marks, mass):
                if q <= m + 1e-12:
                    u = u0 + q / w
                    break
                q -= m
            targets.append(u * (num_steps - 1))
        steps = _place(targets, num_steps, max_gap=DEFAULT_MAX_SEGMENT)
        orders, names = [], []
        for a, b in zip(steps, steps[1:]):
            if b - a == 1:
                orders.append(0)
                names.append("meancache")
                continue
            names.append(estimator)
            if order is not None:
                orders.append(int(order))
            elif estimator == "meancache":
                orders.append(2 if a / (num_steps - 1) < 0.85 else 4)
            else:
                orders.append(1)
        return cls(steps, orders, num_steps, names)

    def resample(self, num_steps: int) -> "Schedule":
        """The same plan on another number of steps.

        Rule: compute step ``c`` of an N-step schedule maps to the real position ``c * (M - 1) / (N - 1)`` on the
        M-step grid (first to first, last to last). The B positions are rounded to B distinct integers by an exact
        least-squares assignment (:func:`_place`), so the budget, the first and the last step are kept and the
        order is preserved. Each new segment keeps the estimator and K (or order) of the segment it came from (a
        fitted segment becomes ``predict``: its weights belong to the grid they were fitted on); a
        K = 0 segment stretched beyond one step gets K = 2 (:data:`STRETCHED_CHAIN_ORDER`). When the budget exceeds M, every one of the M
        steps is computed (nothing is left to skip) and a warning is logged. A schedule with an open tail maps
        ``c`` to ``c * M / N`` instead (the fraction of the run, the end N to M), placed with the end as a fixed
        last node, so the tail keeps its share of the run; were it to shrink to nothing, the last step is computed.

        Example:
            >>> Schedule.preset("qwen-image", 10).resample(20).compute_steps
            (0, 1, 2, 3, 5, 8, 11, 14, 16, 19)
            >>> Schedule([0, 10, 20, 30], [1, 1, 1, 1], 40, ["extrapolate"] * 4).resample(20).segments[-1]
            (15, 20, 'extrapolate', 1)
        """
        _check_num_steps(num_steps)
        if num_steps == self._num_steps:
            return self
        if self.fitted:  # the weights belong to the steps they were fitted on
            if (self, num_steps) not in _WARNED:
                if len(_WARNED) < 64:
                    _WARNED.add((self, num_steps))
                logger.warning("meancache: a schedule with fitted weights (fitted on %d steps) resampled to %d steps "
                               "uses predict of the same orders instead", self._num_steps, num_steps)
            return self.unfitted().resample(num_steps)
        if self.budget >= num_steps:
            if self.budget > num_steps:
                logger.warning(
                    "meancache: budget %d exceeds num_steps=%d; every step is computed", self.budget, num_steps
                )
            return Schedule.full(num_steps)
        if self.open_tail:
            # positions as fractions of the whole run, the end N fixed at M as a virtual last node
            scale = num_steps / self._num_steps
            steps = _place([c * scale for c in self._compute_steps] + [num_steps], num_steps + 1)[:-1]
        else:
            scale = (num_steps - 1) / (self._num_steps - 1)
            steps = _place([c * scale for c in self._compute_steps], num_steps)
        ends = steps[1:] + [num_steps]
        orders = [STRETCHED_CHAIN_ORDER if k == 0 and b - a > 1 else k for a, b, k in zip(steps, ends, self._orders)]
        names = list(self._estimators)
        if self.open_tail and steps[-1] == num_steps - 1:  # the tail shrank to the computed last step
            orders, names = orders[:-1], names[:-1]
        keep = self._corrector if any(e in NODE_ESTIMATORS for e in names) else 0
        return Schedule(steps, orders, num_steps, names, corrector=keep)


def fit_steps(schedule: Schedule, num_steps: int) -> Schedule:
    """``schedule`` for a run of ``num_steps`` steps: itself, or resampled with a log line (logger ``meancache``,
    INFO) when its step count differs.

    >>> fit_steps(Schedule.default(5, 20), 30).num_steps
    30
    """
    if schedule.num_steps == num_steps:
        return schedule
    logging.getLogger("meancache").info(
        "meancache: schedule has %d steps but the run has %d; resampling the schedule (budget %d)",
        schedule.num_steps,
        num_steps,
        schedule.budget,
    )
    return schedule.resample(num_steps)


def _listed(weights) -> list:
    """Fitted weights as JSON-ready nested lists (None kept for the segments that are not fitted)."""
    return [None if w is None else [list(step) for step in w] for w in weights]


def _check_fit(weights, grid, steps, ends, names, orders, num_steps):
    """``(weights, grid)`` as nested tuples of floats, checked against the segments (see :class:`Schedule`)."""
    fitted = [j for j, e in enumerate(names) if e == FITTED]
    if not fitted:
        if weights is not None or grid is not None:
            raise ValueError("weights/grid given but no segment is 'fitted': they belong to fitted segments only")
        return None, None
    if weights is None or grid is None:
        raise ValueError(f"estimators[{fitted[0]}]='fitted': a fitted schedule needs weights= and grid=")
    g = _as_tuple(grid, "grid", f"a sequence of num_steps + 1 = {num_steps + 1} sigmas")
    if len(g) != num_steps + 1 or not all(is_real(x) and math.isfinite(x) for x in g):
        raise ValueError(f"grid: must be num_steps + 1 = {num_steps + 1} finite numbers, got {len(g)} values")
    ws = _as_tuple(weights, "weights", "a sequence with one entry per segment")
    if len(ws) != len(names):
        raise ValueError(f"weights: length {len(ws)} != {len(names)} segments (None for a segment not fitted)")
    out = []
    for j, (w, e) in enumerate(zip(ws, names)):
        if e != FITTED:
            if w is not None:
                raise ValueError(f"weights[{j}]: must be None, segment {j} is {e!r}, not fitted")
            out.append(None)
            continue
        span, nodes = ends[j] - steps[j] - 1, min(orders[j], j) + 1
        rows = _as_tuple(w, f"weights[{j}]", f"one tuple per skipped step ({span})")
        if len(rows) != span:
            raise ValueError(f"weights[{j}]: {len(rows)} rows != {span} skipped steps of segment "
                             f"{steps[j]}->{ends[j]}")
        kept = []
        for i, row in enumerate(rows):
            r = _as_tuple(row, f"weights[{j}][{i}]", f"{nodes} floats")
            if len(r) != nodes or not all(is_real(x) and math.isfinite(x) for x in r):
                raise ValueError(f"weights[{j}][{i}]={list(r)}: must be {nodes} finite numbers (min(order "
                                 f"{orders[j]}, segment index {j}) + 1 computed velocities)")
            kept.append(tuple(float(x) for x in r))
        out.append(tuple(kept))
    return tuple(out), tuple(float(x) for x in g)


def _as_tuple(values, name: str, rule: str) -> tuple:
    # a string is iterable, but as one name (or digits) it is never the sequence meant, so it gets the rule too
    if isinstance(values, (str, bytes)):
        raise ValueError(f"{name}={values!r}: must be {rule} (got {type(values).__name__})")
    try:
        return tuple(values)
    except TypeError:
        raise ValueError(f"{name}={values!r}: must be {rule} (got {type(values).__name__})") from None


def _check_num_steps(num_steps) -> None:
    if not is_int(num_steps):
        raise ValueError(f"num_steps={num_steps!r}: must be an int >= 2")
    if num_steps < 2:
        raise ValueError(f"num_steps={num_steps}: must be >= 2 (a schedule needs a first and a last step)")
    if num_steps > MAX_STEPS:
        raise ValueError(
            f"num_steps={num_steps}: must be <= MAX_STEPS={MAX_STEPS} (meancache.schedule.MAX_STEPS, the largest "
            "supported step count)"
        )


def _check_budget(budget, num_steps):
    _check_num_steps(num_steps)
    if not is_int(budget) or not 2 <= budget <= num_steps:
        raise ValueError(f"budget={budget!r}: must be an int with 2 <= budget <= num_steps={num_steps}")


def _place(targets: Sequence[float], num_steps: int, max_gap: int | None = None) -> list[int]:
    """Round sorted real positions to distinct integers 0 = n_0 < ... < n_{B-1} = num_steps - 1.

    Exact dynamic programme minimising ``sum (n_j - targets[j])**2`` under the strict-order constraint, so close
    targets are pushed apart as little as possible. Writing ``n_j = j + o_j``, strict order becomes
    ``o_{j-1} <= o_j`` with ``0 <= o_j <= num_steps - B``. With ``max_gap`` (ignored when the budget cannot span
    the steps with such gaps) consecutive steps are also at most ``max_gap`` apart: ``o_j - o_{j-1} < max_gap``.

    Each stage is a handful of vectorised torch passes over the ``W = num_steps - B + 1`` offsets (a running minimum, or the
    minimum over the last ``max_gap`` offsets), so the time is O(B * W) in C rather than the O(B * W**2) of a
    Python loop over every (offset, predecessor) pair: linear in ``num_steps`` for a given budget, and at most
    ``num_steps**2 / 4`` element operations (a second or two at :data:`MAX_STEPS`). The back pointers are kept
    run-length encoded, O(B) memory in practice. The arithmetic and the tie rule (the smallest predecessor offset
    among equal costs) are exactly those of the plain loop, so the result is identical, bit for bit.
    """
    b = len(targets)
    width = num_steps - b + 1
    if max_gap is None or max_gap * (b - 1) < num_steps - 1:
        max_gap = num_steps
    offsets = torch.arange(width)
    cost = torch.full((width,), math.inf, dtype=torch.float64)
    cost[0] = 0.0  # n_0 = 0 is fixed
    back = []
    for j in range(1, b):
        if max_gap >= width:  # every smaller offset is a candidate predecessor: running minimum
            best = torch.cummin(cost, 0).values
            # a new strict minimum starts at o; the predecessor is the last such o, i.e. the leftmost minimiser
            new = torch.ones(width, dtype=torch.bool)
            new[1:] = cost[1:] < best[:-1]
            arg = torch.cummax(torch.where(new, offsets, 0), 0).values
        else:  # predecessors max(0, o - max_gap + 1) .. o: a sliding window, padded on the left with inf
            # (cost[0] is finite at every stage, so a padded slot never wins); argmin returns the first minimiser
            padded = torch.cat((torch.full((max_gap - 1,), math.inf, dtype=torch.float64), cost))
            window = padded.unfold(0, max_gap, 1)
            pick = window.argmin(dim=1)
            best = window.gather(1, pick[:, None]).squeeze(1)
            arg = offsets - (max_gap - 1) + pick
        dev = (j + offsets).to(torch.float64) - targets[j]
        cur = best + dev * dev
        if j == b - 1:  # n_{B-1} = num_steps - 1 is fixed
            cur[:-1] = math.inf
        back.append(_Runs(arg))
        cost = cur
    o = width - 1
    path = [o]
    for runs in reversed(back):
        o = runs[o]
        path.append(o)
    return [j + o for j, o in enumerate(reversed(path))]


class _Runs:
    """An integer array stored as runs of constant difference: ``a[o] = a[s] + d * (o - s)`` inside a run.

    The back pointers of :func:`_place` are a few such runs (follow ``o``, then stay at the minimiser), so this
    holds a stage in a few integers instead of ``W``.
    """

    __slots__ = ("starts", "values", "steps")

    def __init__(self, a: torch.Tensor):
        if len(a) < 2:
            self.starts, self.values, self.steps = [0], [int(a[0])], [0]
            return
        d = torch.diff(a)
        starts = torch.cat((torch.zeros(1, dtype=torch.int64), torch.nonzero(torch.diff(d)).flatten() + 1))
        self.starts = starts.tolist()
        self.values = a[starts].tolist()
        self.steps = d[starts].tolist()

    def __getitem__(self, o: int) -> int:
        k = bisect.bisect_right(self.starts, o) - 1
        return self.values[k] + self.steps[k] * (o - self.starts[k])


@functools.lru_cache(maxsize=None)
def _preset_tables() -> dict:
    """Load every preset JSON shipped in ``meancache/presets`` once: name -> (num_steps, {budget: Schedule})."""
    tables = {}
    root = resources.files("meancache") / "presets"
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        data = json.loads(entry.read_text(encoding="utf-8"))
        version = data.get("version")
        if data.get("format") != PRESET_FORMAT or not is_int(version) or version not in _READ_VERSIONS:
            raise ValueError(
                f"{entry.name}: format={data.get('format')!r}, version={version!r}: not a meancache preset file of "
                "version 1, 2 or 3 (an integer)"
            )
        n = data["num_steps"]
        by_budget = {}
        for key, table in data["schedules"].items():
            try:
                # version 2 tables may name each segment's estimator, as schedule files do
                by_budget[int(key)] = Schedule(table["compute_steps"], table["orders"], n, table.get("estimators"))
            except ValueError as exc:
                raise ValueError(f"preset {entry.name}, budget {key}: {exc}") from None
        tables[data["name"]] = (n, by_budget)
    return tables


def preset_names() -> dict[str, list[int]]:
    """The shipped presets and their budgets, e.g. ``{"qwen-image": [25, 17, 10], ...}``.

    Example:
        >>> preset_names()["z-image"]
        [25, 20, 17, 15, 13]
    """
    return {name: sorted(t[1], reverse=True) for name, t in _preset_tables().items()}
