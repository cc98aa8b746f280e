"""``make demo``: MeanCache on the embedded digits model, side by side with diffusers' own caches.

One fixed batch of digits (sample j asks for digit ``j % 10`` and starts from noise seed j) goes through every
method in the same run, on the same inputs:

* the full 50-step sampler (the reference of PSNR and SSIM);
* at each budget B (10, 17, 25 evaluations): MeanCache with the calibrated ``digits`` preset (a live calibration on
  separate seeds when the step count or budget has no preset), plain reuse (the same compute steps, K = 1), B
  uniform Euler steps, and diffusers' ``FirstBlockCacheConfig``, ``TaylorSeerCacheConfig`` and ``MagCacheConfig``
  tuned to about B full evaluations (:mod:`meancache.peer_caches`).

It prints one table (full evaluations, wall time, speedup, PSNR and SSIM against the full run, class accuracy by an
independent classifier) and writes ``demo.png``: one row per method, the same seeds in every column. Run
``python -m meancache.demo --help`` for options.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

import torch

from .api import accelerate
from .api import disable
from .image_metrics import mean_psnr
from .image_metrics import psnr
from .image_metrics import ssim
from .peer_caches import count_evaluations
from .schedule import Schedule
from .schedule import preset_names

__all__ = ["DemoRow", "format_table", "main", "run_demo", "save_grid"]

DEFAULT_BUDGETS = (10, 17, 25)


@dataclass
class DemoRow:
    """One method of the demo: its measurements and its images ``(B, 8, 8)`` float32 in [0, 1]."""

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


def _run(pipe, labels, noise, steps: int, guidance: float, repeats: int) -> tuple[torch.Tensor, float, int]:
    """Best-of-``repeats`` wall time of one batch; returns the images, the seconds and the evaluations of a run."""
    best, images, evals = math.inf, None, 0
    for _ in range(repeats):
        with count_evaluations(pipe.transformer) as calls:
            t0 = time.perf_counter()
            out = pipe(labels, num_inference_steps=steps, guidance_scale=guidance, latents=noise, output_type="pt")
            best = min(best, time.perf_counter() - t0)
        images, evals = out.images.float(), calls[0]
    return images, best, evals


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
    repeats: int = 1,
    peers: bool = True,
    log=print,
) -> list[DemoRow]:
    """Measure every method on one batch of ``10 * samples_per_class`` digits; returns the rows in table order.

    Args:
        samples_per_class: samples of each digit (the batch is ``10 * samples_per_class``; CFG doubles it).
        num_steps: steps of the full run (50 in ``make demo``).
        budgets: full evaluations to compare at; each must be in ``2..num_steps - 1``.
        guidance: classifier-free guidance scale (default: the model's, 3.0).
        repeats: each timed run is repeated this many times and the fastest kept.
        peers: include diffusers' caches (needs diffusers >= 0.36).
        log: progress messages (``print`` by default).

    Example::

        >>> rows = run_demo(samples_per_class=1, num_steps=8, budgets=[4], peers=False, log=lambda *a: None)
        >>> [r.method for r in rows]
        ['full', 'MeanCache', 'plain reuse', 'Euler']
        >>> rows[1].evaluations
        4
    """
    from .digits import load_pipeline
    from .digits.classifier import DigitClassifier
    from .digits.model import DEFAULT_GUIDANCE
    from .digits.model import sample_noise

    if isinstance(samples_per_class, bool) or not isinstance(samples_per_class, int) or samples_per_class < 1:
        raise ValueError(f"samples_per_class={samples_per_class!r}: must be an int >= 1")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 3:
        raise ValueError(f"num_steps={num_steps!r}: must be an int >= 3")
    budgets = list(budgets)
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b < num_steps:
            raise ValueError(f"budget {b!r}: every budget must be an int in 2..{num_steps - 1} (num_steps={num_steps})")
    guidance = DEFAULT_GUIDANCE if guidance is None else guidance

    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    classifier = DigitClassifier()
    n = 10 * samples_per_class
    labels = [j % 10 for j in range(n)]
    noise = sample_noise(range(n))
    log(f"digits model: {n} samples, {num_steps} steps, guidance {guidance}; classifier holdout accuracy "
        f"{classifier.holdout_accuracy:.3f}")

    rows: list[DemoRow] = []

    def add(method, budget, images, seconds, evals, note=""):
        rows.append(DemoRow(method, budget, evals, seconds, note=note, images=images))
        log(f"  {method:<14} B={budget if budget else num_steps:<3} evaluations {evals:3d}  {seconds:6.2f} s  {note}")

    images, seconds, evals = _run(pipe, labels, noise, num_steps, guidance, repeats)
    add("full", None, images, seconds, evals)
    schedules, origin = _schedules(pipe, budgets, num_steps, guidance)
    log(f"MeanCache schedules: {origin}")
    for b in budgets:
        sched = schedules[b]
        for method, s in (("MeanCache", sched), ("plain reuse", sched.with_order(1))):
            accelerate(pipe, schedule=s)
            try:
                images, seconds, evals = _run(pipe, labels, noise, num_steps, guidance, repeats)
            finally:
                disable(pipe)
            add(method, b, images, seconds, evals, s.pattern()[0] if method == "MeanCache" else "")
        images, seconds, evals = _run(pipe, labels, noise, b, guidance, repeats)
        add("Euler", b, images, seconds, evals, f"{b} uniform steps")
        if peers:
            from .peer_caches import PEERS

            for peer in PEERS:
                config, note = peer.tune(pipe, labels, noise, num_steps, guidance, b)
                pipe.transformer.enable_cache(config)
                try:
                    images, seconds, evals = _run(pipe, labels, noise, num_steps, guidance, repeats)
                finally:
                    pipe.transformer.disable_cache()
                add(peer.name, b, images, seconds, evals, note)

    full = rows[0]
    for row in rows:
        row.speedup = full.seconds / row.seconds
        row.psnr = mean_psnr(psnr(row.images, full.images))
        row.ssim = float(ssim(row.images, full.images).mean())
        row.accuracy = classifier.accuracy(row.images, labels)
    return rows


def format_table(rows: list[DemoRow]) -> str:
    """The demo table as GitHub markdown (one line per row).

    >>> print(format_table([DemoRow("full", None, 50, 2.0, accuracy=0.99)]).splitlines()[2])
    | full | - | 50 | 2.00 | 1.00x | inf | 1.000 | 0.990 |
    """
    lines = [
        "| method | budget | full evaluations | wall s | speedup | PSNR dB | SSIM | class accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.budget if r.budget else '-'} | {r.evaluations} | {r.seconds:.2f} | {r.speedup:.2f}x "
            f"| {r.psnr:.2f} | {r.ssim:.3f} | {r.accuracy:.3f} |"
        )
    return "\n".join(lines)


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


def main(argv=None) -> list[DemoRow]:
    """Command line of ``make demo``."""
    parser = argparse.ArgumentParser(prog="python -m meancache.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples-per-class", type=int, default=10, help="samples of each digit (default 10)")
    parser.add_argument("--steps", type=int, default=50, help="steps of the full run (default 50)")
    parser.add_argument("--budgets", type=int, nargs="+", default=list(DEFAULT_BUDGETS))
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's, 3.0)")
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats per row, fastest kept (default 1)")
    parser.add_argument("--no-peers", action="store_true", help="leave out diffusers' caches")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--out", default="demo.png", help="image grid to write (default demo.png)")
    parser.add_argument("--columns", type=int, default=20, help="samples shown per row of the grid (default 20)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: must be >= 1")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = run_demo(
        samples_per_class=args.samples_per_class,
        num_steps=args.steps,
        budgets=args.budgets,
        guidance=args.guidance,
        repeats=args.repeats,
        peers=not args.no_peers,
    )
    print()
    print(format_table(rows))
    path = save_grid(rows, args.out, columns=args.columns)
    print(f"\nimage grid: {path.resolve()}  (demo took {time.perf_counter() - t0:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
