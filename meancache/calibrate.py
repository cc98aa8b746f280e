"""Schedule search for MeanCache: record reference trajectories, cost every cached segment, solve the budgeted path.

The published schedules were found offline by a search the authors did not release ("Peak-Suppressed Shortest
Path", PSSP). This module is our reconstruction of it (algorithm.md §8), in three stages:

1. :func:`record` runs the *uncached* Euler sampler on a few calibration inputs and keeps every latent ``x_i`` and
   velocity ``v_i`` (a :class:`Recording`; it can be saved and reused, since this is the only expensive stage).
2. :func:`segment_costs` prices every candidate segment ``a -> b`` (compute at ``a`` and ``b``, estimate the
   steps between with window K) by replaying the run-time estimator from the reference state at ``a`` (§8
   "Option B"), and keeps the best K of each segment (the smallest among those within :data:`COST_RTOL`, so that
   the same recording gives the same schedule on every machine).
3. :func:`solve` finds the exact minimum of ``sum cost[a][b] ** gamma`` over paths from step 0 to step N-1 with
   exactly ``budget`` nodes, by dynamic programming over (step, evaluations used).

:func:`calibrate` chains the three and returns :class:`~meancache.Schedule` objects, one per requested budget.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from typing import Callable
from typing import Iterable
from typing import Sequence

import torch

from .pipeline import is_pipeline
from .reference import average_velocity
from .sampler import check_latents
from .sampler import check_velocity
from .schedule import DEFAULT_MAX_SEGMENT
from .schedule import MAX_ORDER
from .schedule import Schedule
from .schedule import _check_num_steps
from .sigmas import as_sigma_list

__all__ = [
    "COST_FLOOR",
    "COST_RTOL",
    "DEFAULT_GAMMA",
    "RECORDING_FORMAT",
    "RECORDING_FORMAT_VERSION",
    "Recording",
    "calibrate",
    "record",
    "segment_costs",
    "solve",
]

logger = logging.getLogger("meancache")

RECORDING_FORMAT = "meancache.recording"
#: Version written by :meth:`Recording.save`; :meth:`Recording.load` rejects every other version.
RECORDING_FORMAT_VERSION = 1
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


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_meta(meta, where: str) -> dict:
    """Meta must survive ``torch.load(weights_only=True)``: nested dicts/lists of str, int, float, bool, None."""

    def ok(value) -> bool:
        if value is None or isinstance(value, (str, bool, int, float)):
            return True
        if isinstance(value, (list, tuple)):
            return all(ok(v) for v in value)
        if isinstance(value, dict):
            return all(isinstance(k, str) and ok(v) for k, v in value.items())
        return False

    if not isinstance(meta, dict) or not ok(meta):
        raise ValueError(
            f"{where}meta={meta!r}: must be a dict with str keys and str/int/float/bool/None values (or lists "
            "and dicts of them)"
        )
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in meta.items()}


class Recording:
    """Reference trajectories of the uncached Euler sampler: the input of :func:`segment_costs`.

    Attributes:
        sigmas: list of ``N + 1`` Python floats, the grid the run stepped through.
        latents: float32 CPU tensor ``(P, N + 1, *shape)``: ``latents[p, i]`` is ``x_i`` of input ``p``
            (``x_0`` the input itself, ``x_N`` the final sample).
        velocities: float32 CPU tensor ``(P, N, *shape)``: ``velocities[p, i]`` is the velocity the sampler used
            at step ``i`` (``dx/dsigma``, post-guidance).
        meta: dict of str to str/int/float/bool/None (or lists/dicts of them): provenance, free for the caller.

    Raises:
        ValueError: on inconsistent shapes, a non-float32 or non-CPU tensor, non-finite values, a bad sigma grid or
            unsavable meta.

    Example:
        >>> import torch
        >>> rec = Recording([1.0, 0.5, 0.0], torch.zeros(2, 3, 4), torch.zeros(2, 2, 4))
        >>> rec.num_inputs, rec.num_steps, rec.shape
        (2, 2, (4,))
    """

    __slots__ = ("sigmas", "latents", "velocities", "meta")

    def __init__(self, sigmas, latents: torch.Tensor, velocities: torch.Tensor, meta: dict | None = None):
        sig = as_sigma_list(sigmas)
        n = len(sig) - 1
        for name, t, steps in (("latents", latents, n + 1), ("velocities", velocities, n)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"Recording {name} is a {type(t).__name__}: must be a torch.Tensor")
            if t.dtype != torch.float32 or t.device.type != "cpu":
                raise ValueError(f"Recording {name}: dtype={t.dtype} on {t.device}; must be float32 on the CPU")
            if t.dim() < 2 or t.shape[1] != steps or t.shape[0] < 1:
                raise ValueError(
                    f"Recording {name} has shape {tuple(t.shape)}: must be (P >= 1, {steps}, *shape) for "
                    f"{len(sig)} sigmas"
                )
        if latents.shape[0] != velocities.shape[0] or latents.shape[2:] != velocities.shape[2:]:
            raise ValueError(
                f"Recording latents {tuple(latents.shape)} and velocities {tuple(velocities.shape)}: must be "
                "(P, N + 1, *shape) and (P, N, *shape) with the same P and shape"
            )
        for name, t in (("latents", latents), ("velocities", velocities)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"Recording {name} contain NaN or inf: the reference run diverged")
        self.sigmas = sig
        self.latents = latents
        self.velocities = velocities
        self.meta = _check_meta({} if meta is None else meta, "Recording ")

    @property
    def num_steps(self) -> int:
        """Sampler steps N of the recorded run."""
        return len(self.sigmas) - 1

    @property
    def num_inputs(self) -> int:
        """Number P of calibration inputs."""
        return self.latents.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one input's latent."""
        return tuple(self.latents.shape[2:])

    def __repr__(self):
        return f"Recording(num_inputs={self.num_inputs}, num_steps={self.num_steps}, shape={self.shape})"

    def save(self, path: str | os.PathLike) -> None:
        """Write the recording with ``torch.save`` (tensors, lists and plain dicts only, readable with
        ``weights_only=True``), tagged with the format name and version.

        Example:
            >>> import os, tempfile, torch
            >>> rec = Recording([1.0, 0.0], torch.ones(1, 2, 3), torch.ones(1, 1, 3), meta={"seed": 0})
            >>> p = os.path.join(tempfile.mkdtemp(), "rec.pt")
            >>> rec.save(p); Recording.load(p).meta
            {'seed': 0}
        """
        torch.save(
            {
                "format": RECORDING_FORMAT,
                "version": RECORDING_FORMAT_VERSION,
                "sigmas": list(self.sigmas),
                "latents": self.latents,
                "velocities": self.velocities,
                "meta": self.meta,
            },
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Recording":
        """Read a file written by :meth:`save`.

        Raises:
            ValueError: naming the path, for a corrupt file, another format, a missing or different version, or
                inconsistent content. A missing file raises the usual ``FileNotFoundError``.
        """
        where = os.fspath(path)
        try:
            data = torch.load(where, map_location="cpu", weights_only=True)
        except OSError:
            raise
        except Exception as exc:  # torch raises several unrelated types for a damaged file; all mean "corrupt"
            raise ValueError(f"{where}: not a readable meancache recording ({type(exc).__name__}: {exc})") from None
        if not isinstance(data, dict) or data.get("format") != RECORDING_FORMAT:
            raise ValueError(f"{where}: not a meancache recording (expected format {RECORDING_FORMAT!r})")
        version = data.get("version")
        if version != RECORDING_FORMAT_VERSION:
            raise ValueError(
                f"{where}: recording format version={version!r}; this meancache reads version "
                f"{RECORDING_FORMAT_VERSION}"
            )
        missing = [k for k in ("sigmas", "latents", "velocities", "meta") if k not in data]
        if missing:
            raise ValueError(f"{where}: recording is missing field(s) {missing}")
        try:
            return cls(data["sigmas"], data["latents"], data["velocities"], data["meta"])
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None


def _check_inputs(inputs) -> tuple[list[torch.Tensor], bool]:
    """``(tensors, batched)``: one batched tensor (rows are inputs) or a list of same-shaped tensors."""
    if isinstance(inputs, torch.Tensor):
        check_latents(inputs, "inputs")
        if inputs.dim() < 1 or inputs.shape[0] < 1:
            raise ValueError(
                f"inputs has shape {tuple(inputs.shape)}: a batched tensor needs a leading input dimension P >= 1"
            )
        return [inputs], True
    if not isinstance(inputs, (list, tuple)) or len(inputs) == 0:
        raise ValueError(
            f"inputs={type(inputs).__name__}: must be a non-empty list of latent tensors or one batched tensor "
            "(P, *shape)"
        )
    for j, t in enumerate(inputs):
        check_latents(t, f"inputs[{j}]")
        if t.shape != inputs[0].shape or t.dtype != inputs[0].dtype or t.device != inputs[0].device:
            raise ValueError(
                f"inputs[{j}] is {tuple(t.shape)} {t.dtype} on {t.device} but inputs[0] is "
                f"{tuple(inputs[0].shape)} {inputs[0].dtype} on {inputs[0].device}: all inputs must match"
            )
    return list(inputs), False


def _progress_bar(total: int, enabled: bool):
    """A tqdm bar, or a stand-in with ``update``/``close`` when disabled or tqdm is not installed."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc="meancache.record", unit="eval")
        except ImportError:  # tqdm is optional: recording works without a bar
            logger.info("meancache.record: tqdm is not installed, no progress bar")

    class _Quiet:
        def update(self, n=1):
            pass

        def close(self):
            pass

    return _Quiet()


def record(
    velocity_fn: Callable[[torch.Tensor, float], torch.Tensor],
    inputs: torch.Tensor | Sequence[torch.Tensor],
    sigmas: Sequence[float] | torch.Tensor | None = None,
    *,
    progress: bool = True,
    **pipeline_kwargs,
) -> Recording:
    """Run the uncached Euler sampler on calibration inputs and record every latent and velocity.

    With a diffusers pipeline as ``velocity_fn``, ``inputs`` is a list of prompts (str) or of dicts of call
    arguments, ``sigmas`` must be None (the pipeline's scheduler sets the grid) and ``pipeline_kwargs`` are passed
    to every call; see :func:`meancache.pipeline_recording.record_pipeline`.

    The math is that of ``meancache.sample(velocity_fn, x, sigmas, Schedule.full(N))``: ``x_{i+1} = x_i +
    (sigma_{i+1} - sigma_i) * v_i`` computed in float32 (float64 for float64 inputs), stored back in the input's
    dtype; the recording keeps float32 CPU copies.

    Args:
        velocity_fn: ``velocity_fn(x, sigma) -> v`` as for :func:`meancache.sample` (guided, ``dx/dsigma``).
        inputs: either **one tensor** ``(P, *shape)``, whose rows are the P calibration inputs and which is passed
            to ``velocity_fn`` whole (one call per step), or **a list** of P tensors of one shape (for example
            ``(1, seq, channels)`` each), passed to ``velocity_fn`` one at a time (P calls per step), for models
            that want their own batch layout. float16, bfloat16, float32 or float64; any device.
        sigmas: ``N + 1`` decreasing floats (1-D tensor or sequence).
        progress: show a tqdm progress bar over the model evaluations.

    Returns:
        A :class:`Recording` with ``latents (P, N + 1, *shape)`` and ``velocities (P, N, *shape)``.

    Raises:
        ValueError: on a non-callable ``velocity_fn``, bad inputs, a bad grid, or a velocity of the wrong shape.

    Example:
        >>> import torch
        >>> rec = record(lambda x, s: x - 1.0, torch.zeros(3, 2), [1.0, 0.5, 0.0], progress=False)
        >>> rec.latents.shape, rec.latents[0, -1].tolist()
        (torch.Size([3, 3, 2]), [0.75, 0.75])
    """
    if is_pipeline(velocity_fn):
        if sigmas is not None:
            raise ValueError("sigmas given with a pipeline: its scheduler sets the grid; pass num_inference_steps")
        from .pipeline_recording import record_pipeline

        return record_pipeline(velocity_fn, _pipeline_inputs(inputs), progress=progress, **pipeline_kwargs)
    if pipeline_kwargs:
        raise ValueError(f"{sorted(pipeline_kwargs)}: extra keyword arguments apply to pipeline targets only")
    if not callable(velocity_fn):
        raise ValueError(f"velocity_fn={velocity_fn!r}: must be callable as velocity_fn(x, sigma)")
    if sigmas is None:
        raise ValueError("sigmas=None: a velocity_fn target needs the sigma grid (num_steps + 1 values)")
    tensors, batched = _check_inputs(inputs)
    sig = as_sigma_list(sigmas)
    if not isinstance(progress, bool):
        raise ValueError(f"progress={progress!r}: must be True or False")
    n = len(sig) - 1
    shape = tuple(tensors[0].shape[1:]) if batched else tuple(tensors[0].shape)
    p = tensors[0].shape[0] if batched else len(tensors)
    latents = torch.empty((p, n + 1, *shape), dtype=torch.float32)
    velocities = torch.empty((p, n, *shape), dtype=torch.float32)
    # rows of `latents` that each tensor of `tensors` fills
    rows = [slice(0, p)] if batched else [slice(j, j + 1) for j in range(p)]
    xs = list(tensors)
    bar = _progress_bar(n * len(xs), progress)
    try:
        with torch.no_grad():
            for i in range(n):
                dt = sig[i + 1] - sig[i]
                for j, x in enumerate(xs):
                    v = velocity_fn(x, sig[i])
                    check_velocity(v, x, f"velocity_fn at step {i}")
                    work = torch.float64 if x.dtype == torch.float64 else torch.float32
                    latents[rows[j], i] = x.detach().to("cpu", torch.float32).reshape(-1, *shape)
                    velocities[rows[j], i] = v.detach().to("cpu", torch.float32).reshape(-1, *shape)
                    xs[j] = (x.to(work) + dt * v.to(work)).to(x.dtype)
                    bar.update(1)
            for j, x in enumerate(xs):
                latents[rows[j], n] = x.to("cpu", torch.float32).reshape(-1, *shape)
    finally:
        bar.close()
    meta = {
        "created_by": "meancache.record",
        "input_dtype": str(tensors[0].dtype).replace("torch.", ""),
        "batched": batched,
        "model_evaluations": n * len(xs),
    }
    return Recording(sig, latents, velocities, meta)


def _check_max_len(max_len) -> int:
    if not _is_int(max_len) or max_len < 1:
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
    if not ks or not all(_is_int(k) and 1 <= k <= MAX_ORDER for k in ks):
        raise ValueError(f"orders={list(orders)!r}: must be a non-empty collection of ints in 1..{MAX_ORDER}")

    n = recording.num_steps
    sig = recording.sigmas
    cost = torch.full((n, n), math.inf, dtype=torch.float64)
    best_k = torch.zeros((n, n), dtype=torch.int64)
    for a in range(n - 1):
        cost[a, a + 1] = 0.0
    length = min(max_len, n - 1)
    starts = n - 2  # segments of >= 2 steps start at a = 0 .. n-3 (they end at b <= n-1)
    if length < 2 or starts < 1:
        return cost, best_k

    p = recording.num_inputs
    lat = recording.latents.reshape(p, n + 1, -1)
    vel = recording.velocities.reshape(p, n, -1)
    d = lat.shape[-1]
    # per-K costs of every segment, banded: per_k[j, a, L] is the cost of a -> a + L with window ks[j]
    per_k = torch.full((len(ks), n, length + 1), math.inf, dtype=torch.float64)
    # mean |x_i| over inputs and elements: the scale of the noise floor (COST_FLOOR)
    floor = torch.tensor([COST_FLOOR * lat[:, i].double().abs().mean().item() for i in range(n + 1)])
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
                    ok = b <= n - 1
                    if not bool(ok.any()):
                        break
                    everywhere = bool(ok.all())
                    av, bv = (a, b) if everywhere else (a[ok], b[ok])
                    x_hat = xr[t + 1] if everywhere else xr[t + 1][:, ok]
                    err = (x_hat - lat64[:, bv - lo]).abs().mean(dim=-1).mean(dim=0)
                    err = torch.where(err <= floor[bv], 0.0, err)
                    h = sigma_a[ok] - sigp[bv]
                    per_k[kj, av, t + 1] = torch.where(h > 0, err / torch.where(h > 0, h, 1.0), err)
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


def _check_gamma(gamma) -> float:
    if not _is_real(gamma) or not math.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"gamma={gamma!r}: must be a finite number > 0 (gamma > 1 suppresses peak segment costs)")
    return float(gamma)


def _check_budget(budget, num_steps: int, max_len: int) -> int:
    if not _is_int(budget) or not 2 <= budget <= num_steps:
        raise ValueError(f"budget={budget!r}: must be an int with 2 <= budget <= num_steps={num_steps}")
    if (budget - 1) * max_len < num_steps - 1:
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


def _pipeline_inputs(inputs) -> list[dict]:
    """Prompts (str) or dicts of call arguments -> a list of dicts, one per calibration input."""
    if isinstance(inputs, (str, dict)):
        inputs = [inputs]
    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise ValueError(f"inputs={inputs!r}: a pipeline target needs a non-empty list of prompts or dicts")
    out = []
    for item in inputs:
        if isinstance(item, str):
            out.append({"prompt": item})
        elif isinstance(item, dict):
            out.append(dict(item))
        else:
            raise ValueError(f"inputs item {item!r}: must be a prompt (str) or a dict of call arguments")
    return out


def calibrate(
    target,
    inputs=None,
    *,
    budget: int | Sequence[int],
    sigmas=None,
    num_steps: int | None = None,
    gamma: float = DEFAULT_GAMMA,
    max_len: int = DEFAULT_MAX_SEGMENT,
    progress: bool = True,
    **pipeline_kwargs,
) -> Schedule | list[Schedule]:
    """Search MeanCache schedules for a model: record (or reuse a recording), cost the segments, solve the path.

    Args:
        target: a :class:`Recording` (from :func:`record` or :meth:`Recording.load`), a
            ``velocity_fn(x, sigma) -> v`` (then ``inputs`` and ``sigmas`` are required and :func:`record` runs
            first), or a diffusers pipeline (then ``inputs`` is a list of prompts or dicts of call arguments, and
            ``pipeline_kwargs`` such as ``num_inference_steps`` and ``guidance_scale`` go to every call).
        inputs: calibration latents for a ``velocity_fn``: one tensor ``(P, *shape)`` or a list of tensors, as for
            :func:`record`. Must be None with a Recording. Use different noise from the one you evaluate on.
        budget: model evaluations B (an int), or a list of them: one recording serves every budget, and a list
            returns a list of schedules in the same order.
        sigmas: the grid (``N + 1`` values) for a ``velocity_fn``; must be None with a Recording.
        num_steps: optional check: must equal N of the grid or recording.
        gamma: peak-suppression exponent of :func:`solve` (default :data:`DEFAULT_GAMMA`).
        max_len: longest segment, in steps (default 8, the longest in the published tables).
        progress: tqdm progress bar while recording.

    Returns:
        A :class:`~meancache.Schedule` (int budget) or a list of them (list budget), with the best K of each
        multi-step segment and K = 0 ("chain") on 1-step segments.

    Raises:
        ValueError: naming the argument, its value and the rule, before any model evaluation.

    Example:
        >>> import torch
        >>> sched = calibrate(lambda x, s: torch.sin(3 * x) - 1, torch.randn(4, 8), budget=[4, 6],
        ...                   sigmas=torch.linspace(1, 0, 11), max_len=4, progress=False)
        >>> [s.budget for s in sched], sched[0].num_steps
        ([4, 6], 10)
    """
    max_len = _check_max_len(max_len)
    gamma = _check_gamma(gamma)
    if not isinstance(progress, bool):
        raise ValueError(f"progress={progress!r}: must be True or False")
    if num_steps is not None and (not _is_int(num_steps) or num_steps < 2):
        raise ValueError(f"num_steps={num_steps!r}: must be None or an int >= 2")
    if isinstance(target, Recording):
        if inputs is not None:
            raise ValueError("inputs given with a Recording: the recording already holds its inputs; pass inputs=None")
        if sigmas is not None:
            raise ValueError("sigmas given with a Recording: the recording already holds its grid; pass sigmas=None")
        n = target.num_steps
        where = f"the recording's {n} steps"
    elif is_pipeline(target):
        if sigmas is not None:
            raise ValueError("sigmas given with a pipeline: its scheduler sets the grid; pass num_inference_steps")
        inputs = _pipeline_inputs(inputs)
        n = num_steps = None  # known once recorded
        where = "the pipeline's steps"
    elif callable(target):
        if inputs is None:
            raise ValueError("inputs=None: a velocity_fn target needs calibration inputs (tensor or list of tensors)")
        if sigmas is None:
            raise ValueError("sigmas=None: a velocity_fn target needs the sigma grid (num_steps + 1 values)")
        _check_inputs(inputs)
        n = len(as_sigma_list(sigmas)) - 1
        where = f"len(sigmas) - 1 = {n}"
    else:
        raise ValueError(
            f"target={type(target).__name__}: must be a meancache.Recording or a velocity_fn(x, sigma) callable"
        )
    if pipeline_kwargs and not is_pipeline(target):
        raise ValueError(f"{sorted(pipeline_kwargs)}: extra keyword arguments apply to pipeline targets only")
    if n is not None:
        if num_steps is not None and num_steps != n:
            raise ValueError(f"num_steps={num_steps} disagrees with {where}")
        if n < 2:
            raise ValueError(f"num_steps={n}: a schedule needs at least 2 steps")
        _check_num_steps(n)  # the schedules could not hold more steps: say so before recording
        budgets, many = _check_budgets(budget, n, max_len)
    else:
        # types and lower bounds now, before the expensive recording; the rest once the step count is known
        for b in budget if isinstance(budget, (list, tuple)) else [budget]:
            if not _is_int(b) or b < 2:
                raise ValueError(f"budget={b!r}: must be an int >= 2")

    if isinstance(target, Recording):
        rec = target
    elif is_pipeline(target):
        rec = record(target, inputs, progress=progress, **pipeline_kwargs)
        n = rec.num_steps
        _check_num_steps(n)
        budgets, many = _check_budgets(budget, n, max_len)
    else:
        rec = record(target, inputs, sigmas, progress=progress)
    cost, best_k = segment_costs(rec, max_len=max_len)
    schedules = []
    for b in budgets:
        steps = solve(cost, b, gamma=gamma, max_len=max_len)
        orders = [int(best_k[s, e]) if e - s > 1 else 0 for s, e in zip(steps, steps[1:])]
        schedules.append(Schedule(steps, orders, n))
    return schedules if many else schedules[0]
