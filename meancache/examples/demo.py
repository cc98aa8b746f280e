"""``make demo``: MeanCache on the embedded digits model, side by side with diffusers' own caches.

One fixed batch of digits (sample j asks for digit ``j % 10`` and starts from noise seed j) goes through every
method in the same run, on the same inputs:

* the full 50-step sampler (the reference of PSNR and SSIM);
* at each budget B (10, 17, 25 evaluations): MeanCache with the calibrated ``digits`` preset (a live calibration on
  separate seeds when the step count or budget has no preset), plain reuse (the same compute steps, K = 1), B
  uniform Euler steps, and diffusers' ``FirstBlockCacheConfig``, ``TaylorSeerCacheConfig`` and ``MagCacheConfig``
  tuned to about B full evaluations (:mod:`meancache.examples.peer_caches`).

It prints one table (full evaluations, wall time, speedup, PSNR and SSIM against the full run, class accuracy by an
independent classifier) and writes ``demo.png``: one row per method, the same seeds in every column. Run
``python -m meancache.examples.demo --help`` for options.

**Wall times.** Every method is set up first (schedules, the peers' tuning runs), then one untimed warm-up run, then
``--repeats`` rounds (3 by default), each running every row once in table order (:func:`time_interleaved`), so a
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
from .image_metrics import mean_psnr
from .image_metrics import psnr
from .image_metrics import ssim
from .peer_caches import count_evaluations
from ..schedule import Schedule
from ..schedule import preset_names

__all__ = [
    "DemoRow", "format_table", "main", "pick_threads", "run_demo", "save_grid", "time_interleaved", "timing_note",
]

DEFAULT_BUDGETS = (10, 17, 25)
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
    """One row to time: ``steps`` sampler steps with ``setup`` (a cache switched on around the run) in effect."""

    name: str
    budget: int | None
    steps: int
    note: str = ""
    setup: Callable = nullcontext


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


def _schedules(pipe, budgets, steps: int, guidance: float) -> tuple[dict, str]:
    """Calibrated schedules per budget: the shipped ``digits`` preset, or a live calibration on other seeds."""
    from .digits.calibration import PRESET_NAME
    from .digits.calibration import PRESET_STEPS
    from .digits.calibration import calibrate_digits

    shipped = preset_names().get(PRESET_NAME, [])
    if steps == PRESET_STEPS and all(b in shipped for b in budgets):
        return {b: Schedule.preset(PRESET_NAME, b, num_steps=steps) for b in budgets}, "shipped digits preset"
    # run_demo has checked every budget is below the step count
    found = calibrate_digits(pipe, budgets, num_steps=steps, guidance_scale=guidance)
    return dict(zip(budgets, found)), "calibrated now on seeds 10000+"


def run_demo(
    *,
    samples_per_class: int = 10,
    num_steps: int = 50,
    budgets=DEFAULT_BUDGETS,
    guidance: float | None = None,
    repeats: int = 3,
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

    Example::

        >>> rows = run_demo(samples_per_class=1, num_steps=8, budgets=[4], peers=False, repeats=2,
        ...                 log=lambda *a: None)
        >>> [r.method for r in rows]
        ['full', 'MeanCache', 'plain reuse', 'Euler']
        >>> rows[1].evaluations, len(rows[1].times)
        (4, 2)
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
    schedules, origin = _schedules(pipe, budgets, num_steps, guidance)
    log(f"MeanCache schedules: {origin}")
    memo: dict = {}  # the peers' tuning runs on this one batch, shared across budgets
    for b in budgets:
        sched = schedules[b]
        methods.append(_Method("MeanCache", b, num_steps, sched.pattern()[0], lambda s=sched: _meancache(pipe, s)))
        plain = sched.with_order(1)
        methods.append(_Method("plain reuse", b, num_steps, "", lambda s=plain: _meancache(pipe, s)))
        methods.append(_Method("Euler", b, b, f"{b} uniform steps"))
        if peers:
            from .peer_caches import PEERS

            for peer in PEERS:
                config, note = peer.tune(pipe, labels, noise, num_steps, guidance, b, memo=memo)
                log(f"  {peer.name:<15} B={b:<3} tuned: {note}")
                methods.append(_Method(peer.name, b, num_steps, note, lambda c=config: _diffusers_cache(pipe, c)))

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


def save_grid(rows: list[DemoRow], path: str | Path, columns: int = 20) -> Path:
    """Write a labelled PNG grid: one row per method, the first ``columns`` samples (same seeds in every column).

    Each row's images are ``(B, 8, 8)`` in [0, 1]. Returns ``path`` as a ``Path``.

    >>> import tempfile, os
    >>> row = DemoRow("full", None, 50, 1.0, images=torch.rand(4, 8, 8))
    >>> out = save_grid([row], os.path.join(tempfile.mkdtemp(), "g.png"))
    >>> out.read_bytes()[1:4]
    b'PNG'
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(columns, rows[0].images.shape[0])
    fig, axes = plt.subplots(
        len(rows), 1, figsize=(0.42 * columns + 3.2, 0.5 * len(rows) + 0.3), squeeze=False, layout="constrained"
    )
    for ax, row in zip(axes[:, 0], rows):
        strip = torch.cat(list(row.images[:columns]), dim=1)  # (8, 8 * columns)
        ax.imshow(strip.numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        budget = f"B={row.budget} " if row.budget else ""
        ax.set_ylabel(
            f"{row.method} {budget}\n{row.evaluations} ev, {row.psnr:.1f} dB",
            rotation=0, ha="right", va="center", fontsize=7,
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
        "--budgets", type=int, nargs="+", default=list(DEFAULT_BUDGETS), help="full evaluations (default 10 17 25)"
    )
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's, 3.0)")
    parser.add_argument(
        "--repeats", type=int, default=3,
        help="timed rounds, each running every row once in table order; the table shows each row's best, median "
             "and worst round, speedups from the best (default 3; the first round also gives the images)",
    )
    parser.add_argument("--no-peers", action="store_true", help="leave out diffusers' caches")
    parser.add_argument(
        "--threads", type=_threads_arg, default="auto",
        help="torch CPU threads, or auto: the faster of 2 and 1 in a short probe, 1 when another process holds a "
             "core (default auto)",
    )
    parser.add_argument("--out", default="demo.png", help="image grid to write (default demo.png)")
    parser.add_argument("--columns", type=int, default=20, help="samples shown per row of the grid (default 20)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be >= 1")
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
    path = save_grid(rows, args.out, columns=args.columns)
    print(f"\nimage grid: {path.resolve()}  (demo took {time.perf_counter() - t0:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
