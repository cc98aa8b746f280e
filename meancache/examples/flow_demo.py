"""``python -m meancache.examples.flow_demo``: MeanCache on an analytic curved flow, against the full sampler and plain Euler.

The "model" is the exact velocity of the rectified flow to a Gaussian mixture (:class:`GaussianMixtureFlow`),
made costly enough (many components) that its evaluation dominates a step, as a transformer's does. Every row
starts from the same noise and is measured in the same run. Run ``python -m meancache.examples.flow_demo --help`` for options.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..flows import GaussianMixtureFlow
from ..flows import shifted_sigmas
from ..sampler import sample
from ..schedule import Schedule

__all__ = ["DemoRow", "run_demo", "format_table", "main"]


@dataclass
class DemoRow:
    """One line of the demo table."""

    method: str
    evaluations: int
    seconds: float
    speedup: float
    rel_error: float


def _timed(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[torch.Tensor, float]:
    """Best wall time of ``repeats`` runs (the least disturbed by other work on the machine)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def _counting(flow: GaussianMixtureFlow):
    calls = [0]

    def velocity(x, sigma):
        calls[0] += 1
        return flow(x, sigma)

    return velocity, calls


def run_demo(
    *,
    batch: int = 512,
    dim: int = 1024,
    components: int = 2048,
    num_steps: int = 50,
    shift: float = 3.0,
    budgets: tuple[int, ...] = (25, 17, 10),
    presets: tuple[str, ...] = ("qwen-image", "z-image"),
    repeats: int = 1,
    seed: int = 0,
) -> list[DemoRow]:
    """Sample the same noise with the full schedule, MeanCache schedules and uniform Euler; return the rows.

    Args:
        batch, dim: latent shape ``(batch, dim)``, float32.
        components: mixture components; the velocity's cost grows linearly with it.
        num_steps: sampler steps N of the full run (presets are resampled when N != 50).
        shift: time shift of the sigma grid (FLUX/SD3 style).
        budgets: model evaluations to compare at.
        presets: published tables tried at each budget they exist for (``Schedule.default`` otherwise).
        repeats: timing repeats per row (best is kept).
        seed: seed of the flow and the noise.

    Returns:
        Rows in display order; the first is the full run (speedup 1, error 0).

    Example:
        >>> rows = run_demo(batch=4, dim=8, components=4, num_steps=12, budgets=(6,), presets=())
        >>> [r.evaluations for r in rows]
        [12, 6, 6]
    """
    flow = GaussianMixtureFlow(dim=dim, components=components, seed=seed)
    sigmas = shifted_sigmas(num_steps, shift)
    noise = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed + 1))
    rows: list[DemoRow] = []

    def measure(method: str, schedule: Schedule, grid: torch.Tensor) -> None:
        velocity, calls = _counting(flow)
        out, seconds = _timed(lambda: sample(velocity, noise, grid, schedule), repeats)
        err = ((out - reference).norm() / reference.norm()).item() if rows else 0.0
        rows.append(DemoRow(method, calls[0] // repeats, seconds, base / seconds if rows else 1.0, err))
        return out

    base = 1.0
    velocity, _ = _counting(flow)
    sample(velocity, noise[:2], sigmas, Schedule.full(num_steps))  # warm-up: first-call allocations and threads
    reference, base = _timed(lambda: sample(velocity, noise, sigmas, Schedule.full(num_steps)), repeats)
    rows.append(DemoRow(f"full Euler, {num_steps} steps", num_steps, base, 1.0, 0.0))
    from ..schedule import preset_names

    available = preset_names()
    for budget in budgets:
        if budget >= num_steps:
            continue
        for name in presets:
            if budget in available.get(name, ()):
                measure(f"MeanCache {name} B={budget}", Schedule.preset(name, budget, num_steps), sigmas)
        measure(f"MeanCache default B={budget}", Schedule.default(budget, num_steps), sigmas)
        # the honest bar: the same number of evaluations spent on fewer, longer Euler steps
        measure(f"Euler, {budget} steps", Schedule.full(budget), shifted_sigmas(budget, shift))
    return rows


def format_table(rows: list[DemoRow]) -> str:
    """Render rows as a fixed-width text table.

    Example:
        >>> print(format_table([DemoRow("full", 50, 2.0, 1.0, 0.0)]).splitlines()[0].split())
        ['method', 'evals', 'wall', 's', 'speedup', 'rel.', 'error']
    """
    width = max(len(r.method) for r in rows)
    lines = [f"{'method':<{width}}  evals  wall s  speedup  rel. error"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        lines.append(f"{r.method:<{width}}  {r.evaluations:>5}  {r.seconds:6.2f}  {r.speedup:6.2f}x  {r.rel_error:10.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m meancache.examples.flow_demo [--batch B --dim D --components K --steps N --repeats R]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--components", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    print(
        f"MeanCache demo: rectified flow to a {args.components}-component Gaussian mixture, latents "
        f"({args.batch}, {args.dim}) float32, {args.steps} steps, shifted grid (shift 3), "
        f"{torch.get_num_threads()} CPU thread(s)\n"
    )
    with torch.inference_mode():  # scoped: main() is also called in-process (tests), where grad mode must survive
        rows = run_demo(
            batch=args.batch, dim=args.dim, components=args.components, num_steps=args.steps, repeats=args.repeats
        )
    print(format_table(rows))
    print(
        "\nevals: velocity evaluations; speedup: wall time of the full run / this run; rel. error: "
        "||x - x_full|| / ||x_full|| of the final samples."
    )


if __name__ == "__main__":
    main()
