"""Real sampled runs of the model, scored against the recording: what ``calibrate(validate="runs")`` chooses by and
what ``refine=`` scores its moves with, when the model is there (a ``velocity_fn`` or a diffusers pipeline).

Each scorer returns ``(errors, calls, groups)``: ``errors(schedule, which=None)`` runs the schedule from the scored
inputs (or only those at the positions ``which`` among them) and gives each input's relative final error against
the recorded uncached run (float64 ``(inputs,)``, on the recording's element subset when it keeps one); ``calls`` is
the model calls per step of one scoring (1 when every input runs in one batched call, else one call per input, so
a caller can stop a run after a few inputs); ``groups`` are the two halves of the scored inputs, which a kept
refinement move must not make worse.
"""

from __future__ import annotations

import math

import torch

from ..config import MeanCacheConfig
from ..pipeline import accelerate_pipeline
from ..pipeline import disable_pipeline
from ..sampler import sample
from ..schedule import Schedule
from .recording import Recording
from .recording import element_subset
from .selection import _relative
from .selection import validation_split

__all__ = ["generator_states", "model_runs", "pipeline_runs", "validation_draws"]


def _scored(rec: Recording, every: bool) -> list[int]:
    """The inputs a scorer runs: all of them, or the validation split's (every fourth)."""
    return list(range(rec.num_inputs)) if every else validation_split(rec.num_inputs)[1]


def _halves(count: int):
    half = count // 2
    return [list(range(half)), list(range(half, count))] if half else None


#: Bytes of latents and velocities that :func:`model_runs` keeps (all inputs together) to share model calls
#: between runs: a run whose call has the very same sigma and latents as an earlier run's gets that call's velocity
#: instead of a new call. Every schedule computes step 0 from the same latents, schedules with the same compute
#: steps whose first segment is plain reuse reach their second compute step with the same latents, and a schedule
#: with a corrector repeats the uncorrected one's calls up to its first correction. On the digits model (five
#: budgets, 4 inputs) keeping every call instead of each run's first two cut the model calls from 2,420 to 2,222
#: (bench/RESULTS.md). Once the cap is reached, calls are still looked up but no more are kept.
SHARED_BYTES = 256 * 2**20


class _SharedCalls:
    """The model calls of every run of one input, kept with their latents (see :data:`SHARED_BYTES`); ``kept``
    counts the bytes of every input's table together. Exact for a deterministic model."""

    def __init__(self, velocity_fn, kept: list[int]):
        self.velocity_fn = velocity_fn
        self.kept = kept
        self.table: dict[float, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def __call__(self, x, sigma):
        key = float(sigma)
        for kx, kv in self.table.get(key, ()):
            if kx.shape == x.shape and kx.dtype == x.dtype and kx.device == x.device and torch.equal(kx, x):
                return kv.clone()
        v = self.velocity_fn(x, sigma)
        size = (x.numel() * x.element_size() + v.numel() * v.element_size()) if isinstance(v, torch.Tensor) else None
        if size is not None and self.kept[0] + size <= SHARED_BYTES:
            self.kept[0] += size
            self.table.setdefault(key, []).append((x.detach().clone(), v.detach().clone()))
        return v


def model_runs(velocity_fn, inputs, rec: Recording, every: bool = False, draws: int = 0):
    """Runs of ``velocity_fn`` (:func:`meancache.sample`) from the recorded inputs (``inputs`` as given to
    :func:`~meancache.record`: one batched tensor or a list of tensors), the validation split or ``every`` input,
    then from ``draws`` new noise rows (:func:`validation_draws`; one batched tensor of inputs only), each scored
    against its own uncached run. The runs of each input share the model calls that repeat (:data:`SHARED_BYTES`).

    Example:
        >>> import torch
        >>> from meancache.calibration.recording import record
        >>> f = lambda x, s: torch.sin(3 * x) - s
        >>> x = torch.randn(4, 3)
        >>> rec = record(f, x, torch.linspace(1, 0, 9), progress=False)
        >>> errors, calls, _ = model_runs(f, x, rec, every=True)
        >>> float(errors(Schedule.full(8)).max()) < 1e-6, calls
        (True, 1)
        >>> errors, _, halves = model_runs(f, x, rec, every=True, draws=6)
        >>> tuple(errors(Schedule([0, 4, 7], [1, 1], 8)).shape), [len(h) for h in halves]
        ((10,), [5, 5])
    """
    idx = _scored(rec, every)
    subset = rec.meta.get("elements")
    elem = None if subset is None else element_subset(math.prod(subset["of_shape"]), subset["count"])
    ref = rec.latents[idx, -1].double().reshape(len(idx), -1)
    if isinstance(inputs, torch.Tensor):
        starts, per_run = [inputs[idx]], 1
        if draws:
            extra = validation_draws(inputs, draws)
            with torch.no_grad():
                full = sample(velocity_fn, extra, rec.sigmas, Schedule.full(rec.num_steps)).reshape(draws, -1)
            if elem is not None:
                full = full[:, elem.to(full.device)]
            starts = [torch.cat([starts[0], extra])]
            ref = torch.cat([ref, full.to("cpu", torch.float64)])
    elif draws:
        raise ValueError(f"draws={draws}: validation draws need one batched tensor of inputs, not a list")
    else:
        starts, per_run = [inputs[i] for i in idx], len(idx)

    kept = [0]
    shared = [_SharedCalls(velocity_fn, kept) for _ in starts]
    count = ref.shape[0]

    def errors(schedule: Schedule, which: list[int] | None = None) -> torch.Tensor:
        rows = list(range(count)) if which is None else list(which)
        if per_run == 1:
            runs = [(starts[0][rows], shared[0])]
        else:
            runs = [(starts[w], shared[w]) for w in rows]
        with torch.no_grad():
            outs = [sample(memo, x, rec.sigmas, schedule) for x, memo in runs]
        out = torch.cat([o.reshape(o.shape[0] if per_run == 1 else 1, -1) for o in outs])
        if elem is not None:  # the recording keeps a subset of each latent: compare on the same elements
            out = out[:, elem.to(out.device)]
        return _relative(out.to("cpu", torch.float64), ref[rows])

    return errors, per_run, _halves(count)


#: Seed of :func:`validation_draws`' generator (a CPU generator: the same rows on every machine).
DRAW_SEED = 20260119


def validation_draws(inputs: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` new standard-normal rows shaped like the rows of ``inputs`` ``(P, *shape)``, on its device and in
    its dtype, from a CPU generator seeded with :data:`DRAW_SEED`: the same rows on any machine, and (for a
    different seed than the user's) noise the calibration inputs do not hold.

    Example:
        >>> import torch
        >>> d = validation_draws(torch.zeros(3, 2, 5), 4)
        >>> tuple(d.shape), torch.equal(d, validation_draws(torch.ones(1, 2, 5), 4))
        ((4, 2, 5), True)
    """
    g = torch.Generator().manual_seed(DRAW_SEED)
    rows = torch.randn((count, *inputs.shape[1:]), generator=g, dtype=torch.float32)
    return rows.to(device=inputs.device, dtype=inputs.dtype)


def _generators(value) -> list[torch.Generator] | None:
    if isinstance(value, torch.Generator):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(g, torch.Generator) for g in value):
        return list(value)
    return None


def generator_states(inputs: list[dict], why: str) -> list[list[torch.Tensor]]:
    """Each pipeline input's generator states, taken before it is recorded, so that a later run of the input
    draws the recorded noise again. Every input must carry ``generator`` (a ``torch.Generator`` or a list of
    them), or its noise itself as a ``latents`` tensor (then it has no state to keep, and every run starts from
    those latents): ``why`` names the setting that needs the runs, for the error.

    Example:
        >>> import torch
        >>> states = generator_states([{"generator": torch.Generator().manual_seed(1)}], "refine=100")
        >>> len(states), len(states[0])
        (1, 1)
    """
    states = []
    for i, call in enumerate(inputs):
        gens = _generators(call.get("generator"))
        if gens is None:
            if isinstance(call.get("latents"), torch.Tensor):  # the noise is given: nothing to draw again
                states.append([])
                continue
            raise ValueError(
                f"inputs[{i}] has generator={call.get('generator')!r}: {why} runs the pipeline again from each "
                "input, so each needs a seeded torch.Generator (or a list of them) that repeats its recorded noise, "
                "or its noise as a latents tensor"
            )
        states.append([g.get_state() for g in gens])
    return states


def pipeline_runs(pipe, inputs: list[dict], states, rec: Recording, call_kwargs: dict, every: bool = False):
    """Runs of the pipeline accelerated with each scored schedule, from the recorded inputs (``inputs`` as given
    to :func:`~meancache.calibration.recording.record_pipeline`, their generators restored from ``states``, see
    :func:`generator_states`), the validation split or ``every`` input; the final latents (``output_type=
    "latent"``) compared with the recorded ones. The pipeline is left as it was (not accelerated) after each run.

    Example (tests/test_calibrate_pipeline.py runs it on tiny pipelines)::

        states = generator_states(inputs, "refine")
        rec = record_pipeline(pipe, inputs, num_inference_steps=28)
        errors, calls, halves = pipeline_runs(pipe, inputs, states, rec, {"num_inference_steps": 28})
    """
    idx = _scored(rec, every)
    ref = rec.latents[idx, -1].double()
    kept = rec.meta.get("elements") or {}
    count = kept.get("count")
    shape = tuple(kept.get("of_shape") or rec.shape)  # the scheduler's latents, as recorded
    # the recorded subset of each latent: every run is checked to have the recorded shape, so it is fixed
    elem = None if count is None else element_subset(math.prod(shape), count)

    def call_of(i: int) -> dict:
        call = dict(inputs[i])
        if not states[i]:  # given latents: every run starts from them, on its own copy (a pipeline may edit it)
            call["latents"] = call["latents"].clone()
            return call
        gens = _generators(call["generator"])
        fresh = []
        for g, state in zip(gens, states[i]):
            f = torch.Generator(device=g.device)
            f.set_state(state)
            fresh.append(f)
        call["generator"] = fresh[0] if isinstance(inputs[i]["generator"], torch.Generator) else fresh
        return call

    def errors(schedule: Schedule, which: list[int] | None = None) -> torch.Tensor:
        rows = list(range(len(idx))) if which is None else list(which)
        outs = []
        quiet = getattr(pipe, "_progress_bar_config", None)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        try:
            for i in (idx[w] for w in rows):
                accelerate_pipeline(pipe, MeanCacheConfig(schedule=schedule).validate(for_pipeline=True))
                try:
                    with torch.no_grad():
                        out = pipe(**{**call_kwargs, "output_type": "latent", **call_of(i)})
                finally:
                    disable_pipeline(pipe)
                latent = (out if isinstance(out, torch.Tensor) else out[0]).detach()
                if tuple(latent.shape) != shape:  # another layout would compare unrelated elements
                    raise ValueError(
                        f"{type(pipe).__name__}(output_type='latent') returned shape {tuple(latent.shape)}, but "
                        f"the scheduler's latents were {shape}: real runs cannot be scored against the recording; "
                        "use validate='replay' and no refine"
                    )
                latent = latent.reshape(-1)
                if elem is not None:  # only the recorded subset is compared
                    latent = latent[elem.to(latent.device)]
                outs.append(latent.to("cpu", torch.float64))
        finally:
            if quiet is not None:
                pipe._progress_bar_config = quiet
            elif hasattr(pipe, "_progress_bar_config"):
                del pipe._progress_bar_config
        return _relative(torch.stack(outs), ref[rows].reshape(len(rows), -1))

    return errors, len(idx), _halves(len(idx))
