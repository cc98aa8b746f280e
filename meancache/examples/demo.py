"""``make demo``: MeanCache on the embedded digits model, side by side with fewer-step solvers and diffusers' caches.

One fixed batch of digits (sample j asks for digit ``j % 10`` and starts from noise seed j) goes through every
method in the same run, on the same inputs:

* the full 50-step sampler (the reference of PSNR and SSIM);
* at each budget B (6, 10, 17, 25 full evaluations):

  - ``MeanCache (calibrated)``: the joint calibration, where each segment uses the published estimator (window K),
    ``extrapolate`` (the polynomial through the last p + 1 computed velocities, averaged over the step) or
    ``predict`` (the same polynomial at the step's start), p = 1..3: the ``digits-joint`` preset where it is
    shipped, else :func:`meancache.calibrate` with its default estimators now, on the calibration seeds 10000+;
  - ``MeanCache (published)``: the published estimator alone on calibrated steps (the shipped ``digits`` preset;
    B = 6, which it lacks, calibrated now with ``estimators=("meancache",)``), so the gain of the joint search
    shows;
  - ``plain reuse``: the published row's compute steps with K = 1 (reuse of the last computed velocity);
  - ``Euler`` and ``AB2``: B uniform steps of the pipeline's own grid, Euler or variable-step Adams-Bashforth 2
    (:func:`ab2_scheduler`);
  - diffusers' ``FirstBlockCacheConfig``, ``TaylorSeerCacheConfig`` and ``MagCacheConfig`` tuned to about B full
    evaluations (:mod:`meancache.examples.peer_caches`; a row's note says when a peer's settings cannot reach B).

It prints one table (full evaluations, wall time, speedup, PSNR and SSIM against the full run, class accuracy by an
independent classifier), each row's schedule or setting, and writes ``demo.png`` (:func:`save_figure`): PSNR
against full evaluations, one line per method, above the samples of the most aggressive budget, each method's row
followed by its amplified difference from the full run. Run ``python -m meancache.examples.demo --help`` for options.

**Wall times.** Every method is set up first (schedules, the peers' tuning runs), then one untimed warm-up run, then
``--repeats`` rounds (2 by default), each running every row once in table order (:func:`time_interleaved`), so a
burst of load from another process hits all rows alike instead of one. A row's wall time is its best (fastest)
round: other processes only ever slow a run down, so the best round is the nearest to the time on a quiet machine.
The median and the worst round are printed beside it as the spread. Speedups are the full run's best over the
row's. The images (and so PSNR, SSIM, accuracy) come from the first round; the later rounds must reproduce them
exactly.

**Threads.** ``--threads auto`` (the default) runs a short probe, 2 threads against 1, and keeps the faster. On a
quiet two-core machine that is 2 (about 1.7x faster than 1). When another process holds a core, two torch threads
are the slower by far: OpenMP's threads busy-wait for each other after every small op, and the one waiting for a
descheduled partner burns the only free core, so this model's steps ran 10-30x slower than with one thread. That
made one earlier run report a 61 s full run and a 118x speedup for 10 Euler steps that happened to run while the
other process paused. The probe catches a busy machine at the start; load that starts later shows in the spread.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import time
from contextlib import contextmanager
from contextlib import nullcontext
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Callable
from typing import Sequence

import torch

from ..api import accelerate
from ..api import disable
from ..calibrate import calibrate
from ..schedule import DEFAULT_MAX_SEGMENT
from ..schedule import Schedule
from ..schedule import preset_names
from .image_metrics import mean_psnr
from .image_metrics import psnr
from .image_metrics import ssim
from .peer_caches import count_evaluations

__all__ = [
    "DemoRow", "ab2_scheduler", "format_notes", "format_table", "main", "pick_threads", "run_demo", "save_figure",
    "time_interleaved", "timing_note",
]

#: Full evaluations compared in ``make demo``; 6 of 50 is where the methods separate most.
DEFAULT_BUDGETS = (6, 10, 17, 25)
#: Timed rounds of ``make demo`` (``--repeats``); 2 keeps the 33 rows under two minutes on two cores.
DEFAULT_REPEATS = 2
#: The preset of the joint calibration (both estimators), shipped by the lead when measured.
JOINT_PRESET = "digits-joint"
CALIBRATED = "MeanCache (calibrated)"
PUBLISHED = "MeanCache (published)"
#: Row names per budget, in table order (the last three only with the peers).
METHODS = (CALIBRATED, PUBLISHED, "plain reuse", "Euler", "AB2", "FirstBlockCache", "TaylorSeer", "MagCache")
#: Samples per row of the picture: one of each digit.
DEFAULT_COLUMNS = 10
#: Factor on |method - full| in the picture's difference maps (pixel values in [0, 1], clipped at 1).
DIFF_GAIN = 8.0
PROBE_STEPS = 4  # sampler steps of one run of the ``--threads auto`` probe


@dataclass
class DemoRow:
    """One method of the demo: its measurements and its images ``(B, 8, 8)`` float32 in [0, 1].

    ``seconds`` is the best (smallest) of ``times``, the wall time of each timed round (empty: ``seconds`` alone).
    """

    method: str
    budget: int | None
    evaluations: int
    seconds: float
    speedup: float = 1.0
    psnr: float = math.inf
    ssim: float = 1.0
    accuracy: float = 0.0
    note: str = ""
    images: torch.Tensor = field(default=None, repr=False)
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        """Median round in seconds (``seconds`` when there are no rounds).

        >>> DemoRow("full", None, 50, 2.0, times=[2.6, 2.0, 2.1]).median
        2.1
        """
        return statistics.median(self.times) if self.times else self.seconds

    @property
    def worst(self) -> float:
        """Slowest round in seconds (``seconds`` when there are no rounds)."""
        return max(self.times) if self.times else self.seconds


def time_interleaved(
    runs: Sequence[tuple[Callable, Callable]],
    repeats: int,
    *,
    timer: Callable[[], float] = time.perf_counter,
    same: Callable | None = None,
    on_round: Callable[[int, float], None] | None = None,
) -> tuple[list, list[list[float]], set[int]]:
    """Time every run over ``repeats`` rounds, round-robin: each round runs ``runs[0]``, ``runs[1]``, ... in order.

    Interleaving spreads the machine's noise (another process's burst of work) over all runs alike, where timing
    one run ``repeats`` times before the next would charge it to whichever run it fell on.

    Args:
        runs: pairs ``(setup, call)``. ``setup()`` returns a context manager entered around the call and not timed
            (switching a cache on and off); ``call()`` is the timed work and returns its output.
        repeats: rounds (>= 1).
        timer: the clock (``time.perf_counter``); read just before and just after each call.
        same: ``same(first, later)`` checks a later round's output against the first round's.
        on_round: called after each round with its index and the seconds its calls took.

    Returns:
        ``(outputs, times, differing)``: the first round's outputs, ``times[i]`` the seconds of run ``i`` in each
        round, and the indices whose later output was not ``same`` as the first (empty when ``same`` is None).

    >>> ticks, order = iter([0, 1, 1, 3, 3, 4, 4, 7]), []
    >>> runs = [(nullcontext, lambda n=n: order.append(n) or n.upper()) for n in "ab"]
    >>> time_interleaved(runs, 2, timer=lambda: next(ticks))
    (['A', 'B'], [[1, 1], [2, 3]], set())
    >>> order
    ['a', 'b', 'a', 'b']
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r}: must be an int >= 1")
    outputs: list = [None] * len(runs)
    times: list[list[float]] = [[] for _ in runs]
    differing: set[int] = set()
    for r in range(repeats):
        spent = 0.0
        for i, (setup, call) in enumerate(runs):
            with setup():
                t0 = timer()
                out = call()
                t1 = timer()
            times[i].append(t1 - t0)
            spent += t1 - t0
            if r == 0:
                outputs[i] = out
            elif same is not None and not same(outputs[i], out):
                differing.add(i)
        if on_round is not None:
            on_round(r, spent)
    return outputs, times, differing


def pick_threads(
    run: Callable[[], object],
    candidates: Sequence[int] = (2, 1),
    rounds: int = 2,
    *,
    timer: Callable[[], float] = time.perf_counter,
    set_threads: Callable[[int], None] = torch.set_num_threads,
) -> tuple[int, dict[int, float]]:
    """Set the faster torch thread count of ``candidates`` for ``run`` and return it with each one's best time.

    The candidates take turns (2, 1, 2, 1, ... for up to ``rounds`` rounds), so a burst of load hits them alike;
    the best of each is compared, ties going to the earlier candidate. Once one is more than twice as fast as
    another the rounds stop: the answer is clear, and a crawling candidate would only cost time.

    >>> ticks, seen = iter([0, 3, 3, 5, 5, 7, 7, 8]), []  # 2 threads: 3 s then 2 s; 1 thread: 2 s then 1 s
    >>> pick_threads(lambda: None, (2, 1), timer=lambda: next(ticks), set_threads=seen.append)
    (1, {2: 2, 1: 1})
    >>> seen
    [2, 1, 2, 1, 1]
    """
    best = {n: math.inf for n in candidates}
    for _ in range(rounds):
        for n in candidates:
            set_threads(n)
            t0 = timer()
            run()
            best[n] = min(best[n], timer() - t0)
        if max(best.values()) > 2 * min(best.values()):
            break
    chosen = min(candidates, key=lambda n: best[n])
    set_threads(chosen)
    return chosen, best


@dataclass
class _Method:
    """One row to time: ``steps`` sampler steps with ``setup`` (a cache switched on around the run) in effect.

    ``peer`` marks a diffusers cache, whose evaluation count is only as close to ``budget`` as its knobs allow.
    """

    name: str
    budget: int | None
    steps: int
    note: str = ""
    setup: Callable = nullcontext
    peer: bool = False


@contextmanager
def _meancache(pipe, schedule):
    accelerate(pipe, schedule=schedule)
    try:
        yield
    finally:
        disable(pipe)


@contextmanager
def _diffusers_cache(pipe, config):
    pipe.transformer.enable_cache(config)
    try:
        yield
    finally:
        pipe.transformer.disable_cache()


@contextmanager
def _scheduler(pipe, scheduler):
    """``pipe.scheduler`` replaced by ``scheduler`` for the duration (the AB2 rows), the original put back after."""
    original = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield
    finally:
        pipe.scheduler = original


@functools.lru_cache(maxsize=None)
def _ab2_class():
    # built on first use: diffusers is optional for ``import meancache`` and for this module's import
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

    class AB2FlowMatchScheduler(FlowMatchEulerDiscreteScheduler):
        """``FlowMatchEulerDiscreteScheduler`` whose ``step`` is variable-step Adams-Bashforth 2 (first step Euler)."""

        _ab2_last = None  # (velocity, step size) of the previous step of this run, float32

        def set_timesteps(self, *args, **kwargs):
            super().set_timesteps(*args, **kwargs)
            self._ab2_last = None  # every pipeline call sets its timesteps: a new run starts with an Euler step

        def step(self, model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
            if self.step_index is None:
                self._init_step_index(timestep)
            i = self.step_index
            h = self.sigmas[i + 1] - self.sigmas[i]
            # the same float32 arithmetic as the Euler step it replaces, so the first step is bit-identical to it
            v = model_output.to(torch.float32)
            slope = v
            if self._ab2_last is not None:
                v_last, h_last = self._ab2_last
                # the velocity's linear trend through the last two steps, extrapolated to this step's midpoint
                slope = v + (h / (2 * h_last)) * (v - v_last)
            prev = (sample.to(torch.float32) + h * slope).to(model_output.dtype)
            self._ab2_last = (v, h)
            self._step_index += 1
            return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    return AB2FlowMatchScheduler


def ab2_scheduler(scheduler):
    """An Adams-Bashforth 2 twin of a diffusers ``FlowMatchEulerDiscreteScheduler`` (same config, same grid).

    Its ``step`` takes ``x_{i+1} = x_i + h_i (v_i + (h_i / (2 h_{i-1})) (v_i - v_{i-1}))`` with ``h_i = sigma_{i+1}
    - sigma_i`` (variable steps; the first step of each run is Euler), one model evaluation per step, in float32
    like the Euler step it replaces; latents keep the model's dtype. Put it in ``pipe.scheduler`` and call the
    pipeline with ``num_inference_steps=B``: B evaluations on the pipeline's own B-step grid.

    Args:
        scheduler: the pipeline's ``FlowMatchEulerDiscreteScheduler`` (only its config is read; it is not changed).
            The deterministic Euler path only: ``stochastic_sampling`` and ``per_token_timesteps`` are not supported.

    Returns:
        A new scheduler (a ``FlowMatchEulerDiscreteScheduler`` subclass) with the same config; ``step`` takes and
        returns latents of any shape, e.g. ``(B, 16, 4)`` on the digits model.

    Example::

        >>> from meancache.examples.digits import load_pipeline
        >>> from meancache.examples.digits.model import sample_noise
        >>> pipe = load_pipeline(); pipe.set_progress_bar_config(disable=True)
        >>> euler = pipe([1, 2], num_inference_steps=1, latents=sample_noise([0, 1]), output_type="latent").images
        >>> pipe.scheduler = ab2_scheduler(pipe.scheduler)
        >>> ab2 = pipe([1, 2], num_inference_steps=1, latents=sample_noise([0, 1]), output_type="latent").images
        >>> torch.equal(ab2, euler)  # one step: AB2's first step is Euler's
        True
    """
    return _ab2_class().from_config(scheduler.config)


def _max_segment(budget: int, steps: int) -> int:
    """Longest segment :func:`meancache.calibrate` must allow for ``budget`` computes to span ``steps`` steps: the
    default 8, more where fewer segments cannot reach the last step otherwise (6 of 50 needs 10).

    >>> _max_segment(10, 50), _max_segment(6, 50)
    (8, 10)
    """
    return max(DEFAULT_MAX_SEGMENT, math.ceil((steps - 1) / (budget - 1)))


def _calibrated(recording, budgets, **kwargs) -> dict:
    """``{budget: Schedule}`` from :func:`meancache.calibrate` on ``recording``, one search per longest segment."""
    groups: dict[int, list[int]] = {}
    for b in budgets:
        groups.setdefault(_max_segment(b, recording.num_steps), []).append(b)
    found = {}
    for max_len, group in groups.items():
        found.update(zip(group, calibrate(recording, budget=group, max_len=max_len, **kwargs)))
    return found


def _schedules(pipe, budgets, steps: int, guidance: float) -> tuple[dict, str, dict, str]:
    """``(joint, joint origin, published, published origin)``: the two calibrated MeanCache schedules per budget.

    Each comes from its shipped preset where that has the budget (at the preset's 50 steps): ``digits-joint`` for
    the joint search, ``digits`` for the published estimator. A budget without one is calibrated now, on the
    calibration seeds (10000+, never the demo's), from one recording shared by both.
    """
    from .digits.calibration import PRESET_NAME
    from .digits.calibration import PRESET_STEPS
    from .digits.calibration import calibration_recording

    shipped = preset_names()
    recording = []  # recorded on first need, at most once

    def rec():
        if not recording:
            recording.append(calibration_recording(pipe, num_steps=steps, guidance_scale=guidance))
        return recording[0]

    def pick(preset: str, **search) -> tuple[dict, str]:
        have = shipped.get(preset, []) if steps == PRESET_STEPS else []
        found = {b: Schedule.preset(preset, b, num_steps=steps) for b in budgets if b in have}
        missing = [b for b in budgets if b not in found]
        if missing:
            found.update(_calibrated(rec(), missing, **search))
        parts = []
        if len(missing) < len(budgets):
            parts.append(f"{preset} preset" + (f" (B={', '.join(str(b) for b in budgets if b in have)})"
                                                 if missing else ""))
        if missing:
            parts.append(f"calibrated now on seeds 10000+ (B={', '.join(map(str, missing))})")
        return found, "; ".join(parts)

    joint, joint_origin = pick(JOINT_PRESET)  # calibrate's default: both estimators
    published, published_origin = pick(PRESET_NAME, estimators=("meancache",))
    return joint, joint_origin, published, published_origin


def _schedule_note(schedule: Schedule) -> str:
    """A schedule as the note of its row: the two pattern strings of :meth:`Schedule.pattern`."""
    steps, estimators = schedule.pattern()
    return f"{steps} / {estimators}"


def run_demo(
    *,
    samples_per_class: int = 10,
    num_steps: int = 50,
    budgets=DEFAULT_BUDGETS,
    guidance: float | None = None,
    repeats: int = DEFAULT_REPEATS,
    peers: bool = True,
    threads: int | str | None = None,
    log=print,
    timer: Callable[[], float] = time.perf_counter,
) -> list[DemoRow]:
    """Measure every method on one batch of ``10 * samples_per_class`` digits; returns the rows in table order.

    Args:
        samples_per_class: samples of each digit (the batch is ``10 * samples_per_class``; CFG doubles it).
        num_steps: steps of the full run (50 in ``make demo``).
        budgets: full evaluations to compare at; each must be in ``2..num_steps - 1``.
        guidance: classifier-free guidance scale (default: the model's, 3.0).
        repeats: timed rounds, each running every row once in table order (:func:`time_interleaved`); a row's
            ``seconds`` is its best round, its ``times`` every round. The images come from the first.
        peers: include diffusers' caches (needs diffusers >= 0.36).
        threads: torch CPU threads: a count, ``"auto"`` (the faster of 2 and 1 in a short probe on the batch,
            :func:`pick_threads`), or None (torch's current setting).
        log: progress messages (``print`` by default).
        timer: the clock of the timed runs (``time.perf_counter``).

    Returns:
        :class:`DemoRow` s: the full run, then per budget (in the order given) the rows of :data:`METHODS`
        (the peers only with ``peers=True``). Images ``(10 * samples_per_class, 8, 8)`` float32 in [0, 1].

    Example::

        >>> rows = run_demo(samples_per_class=1, num_steps=8, budgets=[4], peers=False, repeats=2,
        ...                 log=lambda *a: None)
        >>> [r.method for r in rows]
        ['full', 'MeanCache (calibrated)', 'MeanCache (published)', 'plain reuse', 'Euler', 'AB2']
        >>> [r.evaluations for r in rows], len(rows[1].times)
        ([8, 4, 4, 4, 4, 4], 2)
    """
    from .digits import load_pipeline
    from .digits.classifier import DigitClassifier
    from .digits.model import DEFAULT_GUIDANCE
    from .digits.model import sample_noise

    if isinstance(samples_per_class, bool) or not isinstance(samples_per_class, int) or samples_per_class < 1:
        raise ValueError(f"samples_per_class={samples_per_class!r}: must be an int >= 1")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 3:
        raise ValueError(f"num_steps={num_steps!r}: must be an int >= 3")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r}: must be an int >= 1")
    if threads not in (None, "auto") and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads={threads!r}: must be an int >= 1, 'auto' or None")
    budgets = list(budgets)
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b < num_steps:
            raise ValueError(f"budget {b!r}: every budget must be an int in 2..{num_steps - 1} (num_steps={num_steps})")
    guidance = DEFAULT_GUIDANCE if guidance is None else guidance

    t_start = time.perf_counter()
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    classifier = DigitClassifier()
    n = 10 * samples_per_class
    labels = [j % 10 for j in range(n)]
    noise = sample_noise(range(n))
    log(f"digits model: {n} samples, {num_steps} steps, guidance {guidance}; classifier holdout accuracy "
        f"{classifier.holdout_accuracy:.3f}")

    def call(steps):
        with count_evaluations(pipe.transformer) as calls:
            out = pipe(labels, num_inference_steps=steps, guidance_scale=guidance, latents=noise, output_type="pt")
        return out.images.float(), calls[0]

    if threads == "auto":
        torch.set_num_threads(1)
        call(2)  # untimed: the first call's one-off costs stay out of the probe
        candidates = (2, 1) if (os.cpu_count() or 1) >= 2 else (1,)
        chosen, best = pick_threads(lambda: call(PROBE_STEPS), candidates)
        log(f"threads: {chosen} (auto; {PROBE_STEPS}-step probe: "
            + ", ".join(f"{k} thread(s) {t:.2f} s" for k, t in best.items()) + ")")
    elif threads is not None:
        torch.set_num_threads(threads)

    # every method set up (and every peer tuned) before any timing
    methods = [_Method("full", None, num_steps)]
    joint, joint_origin, published, published_origin = _schedules(pipe, budgets, num_steps, guidance)
    log(f"MeanCache (calibrated) schedules: {joint_origin}")
    log(f"MeanCache (published) schedules: {published_origin}")
    ab2 = ab2_scheduler(pipe.scheduler)
    memo: dict = {}  # the peers' tuning runs on this one batch, shared across budgets
    for b in budgets:
        for name, sched in ((CALIBRATED, joint[b]), (PUBLISHED, published[b])):
            methods.append(_Method(name, b, num_steps, _schedule_note(sched), lambda s=sched: _meancache(pipe, s)))
        plain = published[b].with_order(1)
        methods.append(_Method("plain reuse", b, num_steps, _schedule_note(plain), lambda s=plain: _meancache(pipe, s)))
        methods.append(_Method("Euler", b, b, f"{b} uniform steps of the pipeline's grid"))
        methods.append(_Method("AB2", b, b, f"{b} uniform steps, Adams-Bashforth 2 (first step Euler)",
                               lambda: _scheduler(pipe, ab2)))
        if peers:
            from .peer_caches import PEERS

            for peer in PEERS:
                config, note = peer.tune(pipe, labels, noise, num_steps, guidance, b, memo=memo)
                log(f"  {peer.name:<15} B={b:<3} tuned: {note}")
                methods.append(
                    _Method(peer.name, b, num_steps, note, lambda c=config: _diffusers_cache(pipe, c), peer=True)
                )

    def same(first, later):
        return first[1] == later[1] and torch.equal(first[0], later[0])

    def on_round(r, spent):
        log(f"round {r + 1}/{repeats}: {len(methods)} rows in {spent:.1f} s{_load_text()}")

    call(2)  # untimed warm-up: one-off costs (allocator, thread pool) stay out of the rows
    t_timed = time.perf_counter()
    log(f"set-up {t_timed - t_start:.1f} s; timing {repeats} interleaved round(s) of {len(methods)} rows")
    outputs, times, differing = time_interleaved(
        [(m.setup, lambda m=m: call(m.steps)) for m in methods], repeats, timer=timer, same=same, on_round=on_round
    )

    rows = []
    for i, (m, (images, evals), ts) in enumerate(zip(methods, outputs, times)):
        note = m.note
        if m.peer and evals != m.budget:
            # the tuner picked the setting nearest B; the table reports the count it really gave
            note += f"; {evals} full evaluations: the nearest to B={m.budget} its settings reach on this batch"
        if i in differing:
            note += " (a later round gave other images)"
            log(f"  warning: {m.name} B={m.budget}: a later round did not reproduce the first round's images; "
                f"the table uses the first")
        rows.append(DemoRow(m.name, m.budget, evals, min(ts), note=note, images=images, times=ts))

    full = rows[0]
    for row in rows:
        row.speedup = full.seconds / row.seconds
        row.psnr = mean_psnr(psnr(row.images, full.images))
        row.ssim = float(ssim(row.images, full.images).mean())
        row.accuracy = classifier.accuracy(row.images, labels)
    return rows


def _load_average() -> float | None:
    """The one-minute load average, or None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _load_text() -> str:
    """``", load average 1.93"``, or nothing where the platform has none."""
    load = _load_average()
    return "" if load is None else f", load average {load:.2f}"


def format_table(rows: list[DemoRow]) -> str:
    """The demo table as GitHub markdown (one line per row): best, median and worst round of each row.

    >>> print(format_table([DemoRow("full", None, 50, 1.9, accuracy=0.99, times=[2.0, 1.9, 2.3])]).splitlines()[2])
    | full | - | 50 | 1.90 | 2.00 | 2.30 | 1.00x | inf | 1.000 | 0.990 |
    """
    lines = [
        "| method | budget | full evaluations | wall s (best) | wall s (median) | wall s (worst) | speedup | PSNR dB "
        "| SSIM | class accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.budget if r.budget else '-'} | {r.evaluations} | {r.seconds:.2f} | {r.median:.2f} "
            f"| {r.worst:.2f} | {r.speedup:.2f}x | {r.psnr:.2f} | {r.ssim:.3f} | {r.accuracy:.3f} |"
        )
    return "\n".join(lines)


def timing_note(
    rows: list[DemoRow], *, threads: int | None = None, auto: bool = False, loads: tuple | None = None
) -> str:
    """What the wall-time columns mean, the widest spread, and how busy the machine was (printed under the table).

    >>> rows = [DemoRow("full", None, 50, 1.9, times=[2.0, 1.9, 2.3]), DemoRow("Euler", 10, 10, 0.4, times=[0.4] * 3)]
    >>> print(timing_note(rows))  # doctest: +NORMALIZE_WHITESPACE
    wall s: 3 rounds, each running every row once in table order after an untimed warm-up; best: the fastest
    round, the nearest to a quiet machine (other processes only slow a run down); speedup: the full run's best over
    the row's. Widest spread: full, best 1.90 s, worst 2.30 s (+21 %).
    """
    k = max((len(r.times) for r in rows), default=0)
    if k <= 1:
        text = ("wall s: one timed round (--repeats 1) after an untimed warm-up, so no spread was measured; "
                "speedup: the full run's time over the row's.")
    else:
        widest = max(rows, key=lambda r: r.worst / r.seconds)
        budget = f" B={widest.budget}" if widest.budget else ""
        text = (
            f"wall s: {k} rounds, each running every row once in table order after an untimed warm-up; best: the "
            f"fastest round, the nearest to a quiet machine (other processes only slow a run down); speedup: the "
            f"full run's best over the row's. Widest spread: {widest.method}{budget}, best {widest.seconds:.2f} s, "
            f"worst {widest.worst:.2f} s (+{100 * (widest.worst / widest.seconds - 1):.0f} %)."
        )
        if widest.worst > 1.5 * widest.seconds:
            text += (" Rounds that far apart mean another process took CPU time during the run: compare the best "
                     "column, or rerun on a quiet machine for a tighter spread.")
    if threads is not None:
        text += f" {threads} torch thread(s){' (--threads auto)' if auto else ''} on {os.cpu_count()} CPUs"
        if loads is not None and None not in loads:
            text += f"; load average {loads[0]:.2f} before the demo, {loads[1]:.2f} after"
        text += "."
    return text


def format_notes(rows: list[DemoRow]) -> str:
    """Each row's schedule or setting (its note), one line per row that has one: what the table's rows ran.

    >>> print(format_notes([DemoRow("full", None, 50, 1.0), DemoRow("Euler", 6, 6, 0.1, note="6 uniform steps")]))
    Euler B=6: 6 uniform steps
    """
    return "\n".join(f"{r.method} B={r.budget}: {r.note}" for r in rows if r.note)


def _grid_rows(rows: list[DemoRow], budget: int, columns: int, gain: float):
    """``(label, strip, is_difference)`` per line of the picture's grid: the full run, then each row at ``budget``
    and its amplified difference from the full run. Strips are ``(8, 8 * columns)`` in [0, 1]."""
    full = rows[0]

    def strip(images):
        return torch.cat(list(images[:columns]), dim=1)

    lines = [(f"full ({full.evaluations} ev)", strip(full.images), False)]
    for row in rows[1:]:
        if row.budget != budget:
            continue
        lines.append((f"{row.method}\n{row.evaluations} ev, {row.psnr:.1f} dB", strip(row.images), False))
        diff = ((row.images - full.images).abs() * gain).clamp(0, 1)
        lines.append((f"|above - full| x{gain:g}", strip(diff), True))
    return lines


def save_figure(
    rows: list[DemoRow], path: str | Path, columns: int = DEFAULT_COLUMNS, gain: float = DIFF_GAIN
) -> Path:
    """Write the demo's picture as one PNG: (a) PSNR against full evaluations, one line per method across the
    budgets; (b) the samples of the most aggressive (smallest) budget: the full run's row, then each method's row
    followed by ``|method - full| x gain`` (clipped at 1) so small differences show.

    ``rows`` as :func:`run_demo` returns them: ``rows[0]`` the full run, images ``(B, 8, 8)`` float32 in [0, 1];
    the first ``columns`` samples are shown (same seeds in every column). Returns ``path`` as a ``Path``.

    >>> import tempfile, os
    >>> full = DemoRow("full", None, 50, 1.0, images=torch.rand(4, 8, 8))
    >>> rows = [full] + [DemoRow("Euler", b, b, 0.1, psnr=20.0 + b, images=torch.rand(4, 8, 8)) for b in (6, 10)]
    >>> out = save_figure(rows, os.path.join(tempfile.mkdtemp(), "demo.png"))
    >>> out.read_bytes()[1:4]
    b'PNG'
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(columns, rows[0].images.shape[0])
    budgets = sorted({r.budget for r in rows if r.budget})
    lines = _grid_rows(rows, budgets[0], columns, gain) if budgets else []
    plot_h, line_h = 3.4, 0.42
    fig = plt.figure(figsize=(0.45 * columns + 3.6, plot_h + line_h * len(lines) + 0.6), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[plot_h, line_h * len(lines) + 0.6])

    # (a) PSNR against evaluations: the x position is each row's measured count (a peer may miss B by one or two)
    ax = top.subplots()
    markers = "os^vDPX*<>hp"
    names = list(dict.fromkeys(r.method for r in rows[1:]))
    for j, name in enumerate(names):
        pts = sorted((r.evaluations, r.psnr) for r in rows[1:] if r.method == name and math.isfinite(r.psnr))
        if pts:
            ax.plot(*zip(*pts), marker=markers[j % len(markers)], label=name, linewidth=1.2, markersize=5)
    ax.set_xlabel(f"full evaluations (full run: {rows[0].evaluations})")
    ax.set_ylabel("PSNR vs the full run (dB)")
    ax.set_xticks(budgets)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    ax.set_title(f"{rows[0].images.shape[0]} digits: quality against model evaluations", fontsize=9)

    # (b) the grid at the smallest budget: image rows in gray, difference maps in a heat map (0 = black)
    if lines:
        axes = bottom.subplots(len(lines), 1, squeeze=False)[:, 0]
        for ax, (label, strip, is_diff) in zip(axes, lines):
            ax.imshow(strip.numpy(), cmap="magma" if is_diff else "gray_r", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=6.5 if is_diff else 7)
        bottom.suptitle(
            f"B={budgets[0]}: samples 0-{columns - 1}, each method followed by |method - full| x{gain:g}", fontsize=9
        )
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _threads_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an int >= 1 or auto")
    return value


def main(argv=None) -> list[DemoRow]:
    """Command line of ``make demo``."""
    parser = argparse.ArgumentParser(
        prog="python -m meancache.examples.demo",
        description=__doc__.split("\n\n")[0],
        epilog="Wall times: every method is set up first, then --repeats rounds each run every row once in table "
               "order; the table shows each row's best, median and worst round, and speedups from the best rounds.",
    )
    parser.add_argument("--samples-per-class", type=int, default=10, help="samples of each digit (default 10)")
    parser.add_argument("--steps", type=int, default=50, help="steps of the full run (default 50)")
    parser.add_argument(
        "--budgets", type=int, nargs="+", default=list(DEFAULT_BUDGETS),
        help="full evaluations (default " + " ".join(map(str, DEFAULT_BUDGETS)) + ")",
    )
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's, 3.0)")
    parser.add_argument(
        "--repeats", type=int, default=DEFAULT_REPEATS,
        help="timed rounds, each running every row once in table order; the table shows each row's best, median "
             f"and worst round, speedups from the best (default {DEFAULT_REPEATS}; the first round also gives the "
             "images)",
    )
    parser.add_argument("--no-peers", action="store_true", help="leave out diffusers' caches")
    parser.add_argument(
        "--threads", type=_threads_arg, default="auto",
        help="torch CPU threads, or auto: the faster of 2 and 1 in a short probe, 1 when another process holds a "
             "core (default auto)",
    )
    parser.add_argument(
        "--out", default="demo.png",
        help="picture to write: PSNR against evaluations, and the samples of the smallest budget with difference "
             "maps (default demo.png)",
    )
    parser.add_argument(
        "--columns", type=int, default=DEFAULT_COLUMNS,
        help=f"samples shown per row of the picture's grid (default {DEFAULT_COLUMNS})",
    )
    parser.add_argument(
        "--gain", type=float, default=DIFF_GAIN,
        help=f"factor on |method - full| in the difference maps (default {DIFF_GAIN:g})",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be >= 1")
    if args.columns < 1:
        parser.error(f"--columns {args.columns}: must be >= 1")
    if not math.isfinite(args.gain) or args.gain <= 0:
        parser.error(f"--gain {args.gain}: must be a finite number > 0")
    t0 = time.perf_counter()
    load_before = _load_average()
    rows = run_demo(
        samples_per_class=args.samples_per_class,
        num_steps=args.steps,
        budgets=args.budgets,
        guidance=args.guidance,
        repeats=args.repeats,
        peers=not args.no_peers,
        threads=args.threads,
    )
    print()
    print(format_table(rows))
    print()
    auto = args.threads == "auto"
    print(timing_note(rows, threads=torch.get_num_threads(), auto=auto, loads=(load_before, _load_average())))
    print("\nschedules and settings (MeanCache: compute steps / estimator per skipped step: a digit = window K, "
          "l/q/c = extrapolate and L/Q/C = predict of order 1/2/3):")
    print(format_notes(rows))
    path = save_figure(rows, args.out, columns=args.columns, gain=args.gain)
    print(f"\npicture: {path.resolve()}  (demo took {time.perf_counter() - t0:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
