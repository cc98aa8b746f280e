"""Recording reference trajectories for the schedule search: the :class:`Recording` file format, :func:`record`
(the package's own sampler with every step computed) and :func:`record_pipeline` (a diffusers pipeline, logged where
MeanCache caches, at ``scheduler.step``, algorithm.md §7).
"""

from __future__ import annotations

import math

import logging
import os
from typing import Callable
from typing import Sequence

import torch

from ..hooks import check_scheduler
from ..hooks import hooked_step
from ..hooks import is_pipeline
from ..hooks import sigma_grid
from ..pipeline import STATE
from ..plans import StaticPlan
from ..sampler import sample
from ..schedule import Schedule
from ..sigmas import as_sigma_list
from ..validation import check_latents
from ..validation import check_velocity

__all__ = ["RECORDING_FORMAT", "RECORDING_FORMAT_VERSION", "SUBSET_SEED", "Recording", "element_subset", "record",
           "record_pipeline"]

logger = logging.getLogger("meancache")

RECORDING_FORMAT = "meancache.recording"
#: Version written by :meth:`Recording.save`; :meth:`Recording.load` rejects every other version.
RECORDING_FORMAT_VERSION = 1
#: Seed of :func:`element_subset`: the same elements on every machine, for every recording of one shape.
SUBSET_SEED = 20260119


def element_subset(numel: int, count: int, seed: int = SUBSET_SEED) -> torch.Tensor | None:
    """The flat indices (sorted int64 ``(count,)``) of a fixed, seeded subset of ``count`` of an input's
    ``numel`` latent elements, or None when ``count >= numel`` (every element is kept).

    Every estimator and the Euler step act element by element, so a segment's cost (a mean over elements) and a
    replay's per-element deviation computed on a uniform random subset are unbiased estimates of the full ones:
    the search then costs the same for an 8x8 digit and a 720p video. The draw is ``torch.randperm`` of a CPU
    generator seeded with ``seed``, which gives the same subset on every machine.

    Example:
        >>> idx = element_subset(10, 4)
        >>> idx.tolist() == element_subset(10, 4).tolist(), len(idx), element_subset(10, 10) is None
        (True, 4, True)
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"elements={count!r}: must be None or an int >= 1 (latent elements kept per input)")
    if count >= numel:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(numel, generator=g)[:count].sort().values
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

    def elements(self, count: int) -> "Recording":
        """This recording on a fixed subset of ``count`` elements of each input's latent (:func:`element_subset`):
        latents ``(P, N + 1, count)``, velocities ``(P, N, count)``; itself when it has no more elements.
        ``meta["elements"]`` records the subset (its size, seed and the full shape).

        Example:
            >>> import torch
            >>> rec = Recording([1.0, 0.0], torch.ones(2, 2, 3, 4), torch.ones(2, 1, 3, 4))
            >>> rec.elements(5).shape, rec.elements(12) is rec
            ((5,), True)
        """
        idx = element_subset(math.prod(self.shape), count)
        if idx is None:
            return self
        p = self.num_inputs
        meta = dict(self.meta)
        meta["elements"] = {"count": count, "seed": SUBSET_SEED, "of_shape": list(self.shape)}
        return Recording(self.sigmas, self.latents.reshape(p, self.num_steps + 1, -1)[:, :, idx].contiguous(),
                         self.velocities.reshape(p, self.num_steps, -1)[:, :, idx].contiguous(), meta)

    def save(self, path: str | os.PathLike) -> None:
        """Write the recording with ``torch.save`` (tensors, lists and plain dicts only, readable with
        ``weights_only=True``), tagged with the format name and version. The file is written beside ``path`` and
        renamed onto it, so an existing file at ``path`` is never truncated while a recording loaded from it with
        ``mmap=True`` still reads it, and a failed write leaves the old file as it was.

        Example:
            >>> import os, tempfile, torch
            >>> rec = Recording([1.0, 0.0], torch.ones(1, 2, 3), torch.ones(1, 1, 3), meta={"seed": 0})
            >>> p = os.path.join(tempfile.mkdtemp(), "rec.pt")
            >>> rec.save(p); Recording.load(p).meta
            {'seed': 0}
        """
        path = os.fspath(path)
        partial = f"{path}.{os.getpid()}.tmp"
        try:
            torch.save(
                {
                    "format": RECORDING_FORMAT,
                    "version": RECORDING_FORMAT_VERSION,
                    "sigmas": list(self.sigmas),
                    "latents": self.latents,
                    "velocities": self.velocities,
                    "meta": self.meta,
                },
                partial,
            )
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.remove(partial)

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = False) -> "Recording":
        """Read a file written by :meth:`save`.

        Args:
            path: the file.
            mmap: map the latents and velocities from the file instead of reading them into memory
                (``torch.load(mmap=True)``): pages are read as the search touches them and the kernel may drop
                them again, so a recording larger than memory can be calibrated.

        Raises:
            ValueError: naming the path, for a corrupt file, another format, a missing or different version, or
                inconsistent content. A missing file raises the usual ``FileNotFoundError``.
        """
        if not isinstance(mmap, bool):
            raise ValueError(f"mmap={mmap!r}: must be True or False")
        where = os.fspath(path)
        try:
            data = torch.load(where, map_location="cpu", weights_only=True, mmap=mmap)
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
    elements: int | None = None,
    out: str | os.PathLike | None = None,
    **pipeline_kwargs,
) -> Recording:
    """Run the uncached Euler sampler on calibration inputs and record every latent and velocity.

    With a diffusers pipeline as ``velocity_fn``, ``inputs`` is a list of prompts (str) or of dicts of call
    arguments, ``sigmas`` must be None (the pipeline's scheduler sets the grid) and ``pipeline_kwargs`` are passed
    to every call; see :func:`record_pipeline`.

    It runs ``meancache.sample(velocity_fn, x, sigmas, Schedule.full(N))`` on each input (the package's own
    sampler, so ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v_i`` in float32, float64 for float64 inputs, stored
    back in the input's dtype) and keeps float32 CPU copies of every latent and velocity.

    Args:
        velocity_fn: ``velocity_fn(x, sigma) -> v`` as for :func:`meancache.sample` (guided, ``dx/dsigma``).
        inputs: either **one tensor** ``(P, *shape)``, whose rows are the P calibration inputs and which is passed
            to ``velocity_fn`` whole (one call per step), or **a list** of P tensors of one shape (for example
            ``(1, seq, channels)`` each), passed to ``velocity_fn`` one at a time (P calls per step), for models
            that want their own batch layout. float16, bfloat16, float32 or float64; any device.
        sigmas: ``N + 1`` decreasing floats (1-D tensor or sequence).
        progress: show a tqdm progress bar over the model evaluations.
        elements: keep only this many elements of each input's latent (:func:`element_subset`, the same on every
            machine): the latents and velocities stay where the model runs and only the subset is copied to the
            host, so the recording takes ``P * (2N + 1) * elements * 4`` bytes whatever the model (1.7 MB for 4
            inputs, 50 steps and 1024 elements). None (default): every element.
        out: stream the recording to this file as it is made (float32, :meth:`Recording.save`'s format): each
            step's rows go to memory-mapped part files beside it, which become ``out`` at the end, and the
            returned recording is mapped from ``out`` (:meth:`Recording.load` with ``mmap=True``), so memory
            stays bounded whatever the model and the number of inputs. The part files are removed even when the
            run fails. None (default): in memory.

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
        return record_pipeline(velocity_fn, _pipeline_inputs(inputs), progress=progress, elements=elements,
                               out=out, **pipeline_kwargs)
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
    sink = _Sink(_check_out(out))
    n = len(sig) - 1
    shape = tuple(tensors[0].shape[1:]) if batched else tuple(tensors[0].shape)
    p = tensors[0].shape[0] if batched else len(tensors)
    idx = None if elements is None else element_subset(math.prod(shape), elements)
    full_shape = shape
    if idx is not None:
        idx = idx.to(tensors[0].device)  # the subset is taken where the model runs; only it crosses to the host
        shape = (len(idx),)
    sink.allocate(p, n, shape)
    latents, velocities = sink.latents, sink.velocities

    def kept(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.reshape(-1, *shape) if idx is None else t.reshape(-1, math.prod(full_shape))[:, idx]
    # rows of `latents` that each tensor of `tensors` fills
    rows = [slice(0, p)] if batched else [slice(j, j + 1) for j in range(p)]
    bar = _progress_bar(n * len(tensors), progress)
    try:
        with torch.no_grad():
            for j, x0 in enumerate(tensors):
                step = [0]

                def logged(x, sigma, j=j, step=step):
                    v = velocity_fn(x, sigma)
                    i = step[0]
                    check_velocity(v, x, f"velocity_fn at step {i}")
                    # copied into the recording now: a velocity_fn may hand back a buffer it overwrites at the
                    # next call, and a kept reference would then hold the last step's values at every step
                    latents[rows[j], i] = kept(x)
                    velocities[rows[j], i] = kept(v)
                    step[0] += 1
                    bar.update(1)
                    return v

                # the package's own sampler, every step computed: the recording is exactly what a run sees
                final = sample(logged, x0, sig, StaticPlan(Schedule.full(n) if n >= 2 else None, n))
                latents[rows[j], n] = kept(final)
    except BaseException:
        sink.discard()
        raise
    finally:
        bar.close()
    meta = {
        "created_by": "meancache.record",
        "input_dtype": str(tensors[0].dtype).replace("torch.", ""),
        "batched": batched,
        "model_evaluations": n * len(tensors),
    }
    if idx is not None:
        meta["elements"] = {"count": len(idx), "seed": SUBSET_SEED, "of_shape": list(full_shape)}
    try:
        return sink.finish(sig, meta)
    finally:
        sink.discard()


def _check_out(out) -> str | None:
    """``out`` as a path string, checked before any model evaluation: None, or a file path whose folder exists."""
    if out is None:
        return None
    if not isinstance(out, (str, os.PathLike)):
        raise ValueError(f"out={out!r}: must be None or a file path (str or os.PathLike)")
    path = os.fspath(out)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder):
        raise ValueError(f"out={path!r}: must name a file in an existing folder (the recording is written there)")
    return path


class _Sink:
    """Where a recording's rows go as they are made: tensors in memory, or, with ``out``, float32 maps of two
    part files beside ``out`` (written as each row arrives, so the recording never has to fit in memory), saved
    as one :meth:`Recording.save` file at the end and read back mapped. Part files never outlive the call."""

    def __init__(self, out: str | None):
        self.out = out
        self.parts = [] if out is None else [f"{out}.latents.part", f"{out}.velocities.part"]
        self.latents = self.velocities = None

    def allocate(self, inputs: int, steps: int, shape: tuple) -> None:
        dims = ((inputs, steps + 1, *shape), (inputs, steps, *shape))
        if self.out is None:
            self.latents, self.velocities = (torch.empty(d, dtype=torch.float32) for d in dims)
            return
        self.discard()  # a stale part file of an earlier, failed call must not be mapped with its data
        self.latents, self.velocities = (
            torch.from_file(part, shared=True, size=math.prod(d), dtype=torch.float32).view(d)
            for part, d in zip(self.parts, dims)
        )

    def finish(self, sigmas, meta: dict) -> "Recording":
        rec = Recording(sigmas, self.latents, self.velocities, meta)
        if self.out is None:
            return rec
        rec.save(self.out)
        self.discard()
        return Recording.load(self.out, mmap=True)

    def discard(self) -> None:
        self.latents = self.velocities = None
        for part in self.parts:
            if os.path.exists(part):
                os.remove(part)


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


def record_pipeline(pipe, inputs, *, progress: bool = True, elements: int | None = None,
                    out: str | os.PathLike | None = None, **call_kwargs) -> Recording:
    """Run the uncached ``pipe`` once per input and record ``x_i`` and the guided velocity at every step.

    Args:
        pipe: a diffusers pipeline whose scheduler is ``FlowMatchEulerDiscreteScheduler``, not accelerated.
        inputs: a non-empty list of dicts, one per calibration input, merged over ``call_kwargs`` (for example
            ``{"prompt": "...", "generator": torch.Generator().manual_seed(i)}`` or precomputed prompt embeddings).
            Every input must give latents of one shape and the same sigma grid.
        progress: tqdm progress bar over the inputs.
        elements: keep only this many elements of each input's latent (as :func:`record`): taken on the
            pipeline's device, so only the subset is copied to the host at each step.
        out: stream the recording to this file (as :func:`record`): each input's rows are written to mapped part
            files once its run ends, so memory holds one input's run at a time.
        call_kwargs: keyword arguments shared by every call (``num_inference_steps``, ``guidance_scale``, sizes).
            ``output_type`` defaults to ``"latent"`` so nothing is decoded.

    Returns:
        A :class:`~meancache.Recording`: ``latents`` ``(P, N + 1, *latent_shape)`` and ``velocities``
        ``(P, N, *latent_shape)``, float32 on the CPU, where ``latent_shape`` is the shape the pipeline hands the
        scheduler (batch dimension included).

    Raises:
        ValueError: for an accelerated pipeline, another scheduler, empty or non-dict inputs, or inputs whose
            latents or sigma grids differ.

    Example (with a loaded pipeline ``pipe``; tests/test_calibrate_pipeline.py runs it on tiny pipelines)::

        rec = meancache.record(pipe, [{"prompt": "a cat"}, {"prompt": "a dog"}], num_inference_steps=28)
        rec.save("flux-28.pt")
        schedules = meancache.calibrate(meancache.Recording.load("flux-28.pt"), budget=[10, 14])
    """
    if STATE in getattr(pipe, "__dict__", {}):
        raise ValueError(
            f"{type(pipe).__name__} is accelerated by meancache: record the uncached pipeline (meancache.disable)"
        )
    check_scheduler(pipe.scheduler)
    if not isinstance(inputs, (list, tuple)) or not inputs or not all(isinstance(i, dict) for i in inputs):
        raise ValueError(
            f"inputs={type(inputs).__name__}: must be a non-empty list of dicts of call arguments, one per input"
        )
    sink = _Sink(_check_out(out))
    call_kwargs.setdefault("output_type", "latent")
    scheduler = pipe.scheduler
    full: list = []  # the shape of the scheduler's latents, when only a subset of them is kept
    try:
        grids = _record_runs(pipe, scheduler, inputs, progress, elements, call_kwargs, sink, full)
    except BaseException:
        sink.discard()
        raise
    first = sink.latents[0, 0]
    meta = {"pipeline": type(pipe).__name__, "scheduler": type(scheduler).__name__, "inputs": len(inputs)}
    if elements is not None and first.dim() == 1 and full and math.prod(full) > first.numel():
        meta["elements"] = {"count": int(first.numel()), "seed": SUBSET_SEED, "of_shape": list(full)}
    try:
        return sink.finish(grids[0], meta)
    finally:
        sink.discard()


def _record_runs(pipe, scheduler, inputs, progress, elements, call_kwargs, sink: _Sink, full: list
                 ) -> list[list[float]]:
    """One uncached call per input, its rows written to ``sink`` as soon as the call ends; the grids. ``full``
    receives the shape of the scheduler's latents."""
    grids: list = []
    shape = None
    iterator = inputs
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(inputs, desc="meancache: recording", unit="input")
    for n, extra in enumerate(iterator):
        xs, vs, final = [], [], []

        subset: list = []

        def host(t: torch.Tensor) -> torch.Tensor:
            t = t.detach()
            if not full:
                full.extend(t.shape)
            if elements is not None:
                if not subset:
                    found = element_subset(t.numel(), elements)
                    subset.append(None if found is None else found.to(t.device))
                if subset[0] is not None:
                    t = t.reshape(-1)[subset[0]]  # on the pipeline's device: only the subset crosses to the host
            return t.to("cpu", torch.float32, copy=True)

        def make_hook(original):
            def step(model_output, timestep, sample, *args, **kwargs):
                xs.append(host(sample))
                vs.append(host(model_output))
                out = original(model_output, timestep, sample, *args, **kwargs)
                prev = out[0] if isinstance(out, tuple) else out.prev_sample
                final[:] = [host(prev)]
                return out

            return step

        with hooked_step(scheduler, make_hook):
            pipe(**{**call_kwargs, **extra})
        if not xs:
            raise ValueError(f"input {n}: the pipeline never called scheduler.step")
        start = scheduler.step_index - len(xs) if scheduler.step_index is not None else 0
        grid = sigma_grid(scheduler, start)
        grid = grid[: len(xs) + 1]
        if grids and (grid != grids[0] or tuple(xs[0].shape) != shape):
            raise ValueError(
                f"input {n}: latents of shape {tuple(xs[0].shape)} on a {len(grid) - 1}-step grid differ from input "
                f"0 ({shape}, {len(grids[0]) - 1} steps): one recording needs one shape and one grid"
            )
        if not grids:
            shape = tuple(xs[0].shape)
            sink.allocate(len(inputs), len(vs), shape)
        sink.latents[n] = torch.stack(xs + final)
        sink.velocities[n] = torch.stack(vs)
        grids.append(grid)
    return grids
