"""diffusers' own caches, each tuned to a budget of full transformer evaluations, for side-by-side comparisons.

MeanCache's budget B is exact: B full evaluations out of N steps. The peers decide adaptively (first-block cache,
MagCache) or by an interval (TaylorSeer), so each is tuned on the very batch it is compared on until its measured
evaluation count is as close to B as its knobs allow; the table then reports its real count.

* **FirstBlockCache** (``FirstBlockCacheConfig``): the threshold is bisected (more threshold, fewer evaluations).
* **TaylorSeer** (``TaylorSeerCacheConfig``, lite mode: every block is skipped on a cached step and the output
  projection is extrapolated, so a cached step costs no block): ``disable_cache_before_step`` and
  ``cache_interval`` are the pair whose evaluation count is nearest B, with ``max_order=1`` (diffusers' default)
  and float32 factors (the model runs in float32).
* **MagCache** (``MagCacheConfig``): magnitude ratios are calibrated on one full run of the same batch (its own
  ``calibrate=True`` mode), ``retention_ratio`` is diffusers' 0.2 capped so the always-computed head holds at
  most a third of the budget (at 50 steps: 3, 5 and 8 head steps for B = 10, 17, 25), ``max_skip_steps`` is the
  smallest (at least diffusers' 3) that can reach B, and the threshold is bisected.

Tuning is most of the demo's set-up time (one full-batch run per probe), so a caller tuning several budgets on the
same batch passes one ``memo`` dict to every ``tune``: a setting already run (FirstBlockCache's bisection starts
from the same probes at every budget) and MagCache's calibration run are then measured once. The tuned settings
are the same with or without it.
"""

from __future__ import annotations

import ast
import contextlib
import io
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["PEERS", "Peer", "count_evaluations", "taylorseer_evaluations"]


@contextmanager
def count_evaluations(transformer):
    """Count full evaluations of a FLUX-style ``transformer``: calls that reach the last block's MLP.

    Every cache compared here skips the last block on a cached step and only a full evaluation runs it, so this
    counts the same thing for all of them. Yields a one-item list holding the count.

    Example::

        >>> from meancache.examples.digits import build_pipeline
        >>> pipe = build_pipeline(); pipe.set_progress_bar_config(disable=True)
        >>> with count_evaluations(pipe.transformer) as calls:
        ...     _ = pipe([3], num_inference_steps=5)
        >>> calls[0]
        5
    """
    blocks = getattr(transformer, "single_transformer_blocks", None) or transformer.transformer_blocks
    probe = blocks[-1].proj_mlp if hasattr(blocks[-1], "proj_mlp") else blocks[-1].ff
    calls = [0]
    handle = probe.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def _evaluations(pipe, config, labels, noise, steps: int, guidance: float) -> int:
    """Full evaluations of one run of ``pipe`` with the diffusers cache ``config`` enabled (disabled afterwards)."""
    pipe.transformer.enable_cache(config)
    try:
        with count_evaluations(pipe.transformer) as calls:
            pipe(labels, num_inference_steps=steps, guidance_scale=guidance, latents=noise, output_type="latent")
    finally:
        pipe.transformer.disable_cache()
    return calls[0]


def _memoized(memo: dict | None, key, compute: Callable):
    """``compute()``, stored in ``memo`` under ``key`` (``memo=None``: no storing).

    >>> memo, calls = {}, []
    >>> [_memoized(memo, ("x", 1), lambda: calls.append(1) or 7) for _ in range(3)], len(calls)
    ([7, 7, 7], 1)
    """
    if memo is None:
        return compute()
    if key not in memo:
        memo[key] = compute()
    return memo[key]


def _bisect_threshold(make, run: Callable, budget: int, lo: float, hi: float, iters: int = 10):
    """Geometric bisection of a threshold (evaluations fall as it grows) towards ``budget`` evaluations.

    Returns ``(threshold, evaluations)`` of the closest setting tried (ties: the one with fewer evaluations).
    """
    best = None
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        evals = run(make(mid))
        key = (abs(evals - budget), evals)
        if best is None or key < best[0]:
            best = (key, mid, evals)
        if evals == budget:
            break
        if evals > budget:
            lo = mid
        else:
            hi = mid
    return best[1], best[2]


def taylorseer_evaluations(num_steps: int, before: int, interval: int) -> int:
    """Full evaluations of diffusers' TaylorSeer schedule: steps ``< before`` and every ``interval``-th after.

    It computes step s when ``s < before`` or ``(s - before - 1) % interval == 0``.

    >>> taylorseer_evaluations(50, 3, 7)
    10
    """
    return sum(1 for s in range(num_steps) if s < before or (s - before - 1) % interval == 0)


@dataclass(frozen=True)
class Peer:
    """A diffusers cache: its table name and its tuner ``tune(pipe, labels, noise, steps, guidance, budget,
    memo=None)``, which returns the config and a note describing the chosen setting. ``memo``: a dict shared by
    the tunings of one batch (the same ``pipe``, ``labels``, ``noise``, ``steps`` and ``guidance``; see the module
    docstring); never share it across batches."""

    name: str
    tune: Callable


def _tune_first_block(pipe, labels, noise, steps, guidance, budget, memo=None):
    from diffusers import FirstBlockCacheConfig

    def run(config):
        return _memoized(
            memo, ("FirstBlockCache", config.threshold),
            lambda: _evaluations(pipe, config, labels, noise, steps, guidance),
        )

    th, _ = _bisect_threshold(lambda t: FirstBlockCacheConfig(threshold=t), run, budget, 1e-4, 4.0)
    return FirstBlockCacheConfig(threshold=th), f"threshold={th:.4g}"


def _tune_taylorseer(pipe, labels, noise, steps, guidance, budget, memo=None):
    from diffusers import TaylorSeerCacheConfig

    # diffusers' default warm-up is 3 steps; the order-1 Taylor factors need at least 2 computed steps
    candidates = [
        (abs(taylorseer_evaluations(steps, d, k) - budget), abs(d - 3), k, d)
        for d in range(2, max(3, min(8, budget)))
        for k in range(1, steps + 1)
    ]
    _, _, k, d = min(candidates)
    config = TaylorSeerCacheConfig(
        cache_interval=k,
        disable_cache_before_step=d,
        max_order=1,
        taylor_factors_dtype=torch.float32,
        use_lite_mode=True,
    )
    return config, f"lite, before={d}, interval={k}"


def _mag_ratios(pipe, labels, noise, steps, guidance) -> list[float]:
    """MagCache's own calibration run; diffusers prints the ratios (and resets its state), so read them there."""
    from diffusers import MagCacheConfig

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        _evaluations(pipe, MagCacheConfig(calibrate=True, num_inference_steps=steps), labels, noise, steps, guidance)
    lines = out.getvalue().splitlines()
    for i, line in enumerate(lines):
        if "Calibration Complete" in line:
            ratios = next((ast.literal_eval(x.strip()) for x in lines[i + 1:] if x.strip().startswith("[")), None)
            if ratios is not None and len(ratios) == steps:
                return [float(r) for r in ratios]
    raise RuntimeError(f"MagCache calibration printed no ratios for {steps} steps; diffusers output was: {lines[:5]}")


def _tune_magcache(pipe, labels, noise, steps, guidance, budget, memo=None):
    from diffusers import MagCacheConfig

    ratios = _memoized(memo, ("MagCache ratios",), lambda: _mag_ratios(pipe, labels, noise, steps, guidance))
    keep = min(int(0.2 * steps + 0.5), max(1, budget // 3))
    retention = keep / steps
    max_skip = max(3, math.ceil((steps - keep) / max(1, budget - keep)) - 1)

    def make(t):
        return MagCacheConfig(
            threshold=t,
            max_skip_steps=max_skip,
            retention_ratio=retention,
            num_inference_steps=steps,
            mag_ratios=ratios,
        )

    def run(config):
        return _memoized(
            memo, ("MagCache", config.threshold, max_skip, retention),
            lambda: _evaluations(pipe, config, labels, noise, steps, guidance),
        )

    th, _ = _bisect_threshold(make, run, budget, 1e-4, 10.0)
    return make(th), f"threshold={th:.4g}, max_skip={max_skip}, retention={retention:.2f}"


#: The compared caches, in table order.
PEERS = (
    Peer("FirstBlockCache", _tune_first_block),
    Peer("TaylorSeer", _tune_taylorseer),
    Peer("MagCache", _tune_magcache),
)
