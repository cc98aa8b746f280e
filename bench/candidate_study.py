"""Which candidates :func:`meancache.calibrate` should weigh, and by which score, measured on flows the quality bench
(``bench_quality.py``) does not use.

For each of eight Gaussian-mixture flows (:data:`FLOWS`; 16 to 64 dimensions, 4 to 16 components, component std
free or fixed at 0.4 to 0.6, grid shifts 1 to 3) and each budget B of 6, 8, 10, 17 and 25 out of 50 steps, one
``calibrate(flow, calibration_noise, report=...)`` gives every candidate's schedule and its per-input errors on the
32 calibration inputs (seed 55; the report's ``candidates`` and ``errors``). Every candidate is then sampled from
4,096 held-out inputs (seed 7) and compared with the full 50-step Euler run. A *rule* (a pool of candidates and a
score of their calibration errors) picks one candidate per cell; its row gives the held-out rel L2 and median of
the pick over the best candidate's in that cell (geometric mean over the 40 cells, worst cell in brackets), and the
cells where the pick has a lower rel L2 and median than AB2 with B steps, TaylorSeer-lite on uniform steps and
``Schedule.default``. The first pool's mean pick is the reference for the last columns. The last row is a bound:
the cells where any candidate of the last pool would meet that test, were it picked on the held-out inputs. The
pool with the four corrected safe candidates is also scored by the robust and relative scores of
:data:`MORE_SCORES`; the next pool adds the best search with a corrector, as :func:`meancache.calibrate` weighs it
with real runs, and the last two add ``early p1 c2``, then ``early p2 c2`` too (compute steps a little denser at
the start, ``predict`` p = 1 or 2, with a corrector): the last is the default's pool.

Run: ``python bench/candidate_study.py`` (one torch thread; a minute or two here); ``--inputs P`` calibrates on the
first P of the 32 inputs, ``--draws N`` passes ``calibrate(draws=N)`` (without it, ``calibrate``'s default: runs
of 1,024 rows on these flows; ``--draws 0``: the inputs only). The candidates are the report's, before the
refinement that follows the choice by default (``calibrate(refine=None)``), so this measures the choice alone; the
refinement is measured in bench/RESULTS.md. Not a pytest module.
"""

from __future__ import annotations

import math
import sys

import torch

import meancache
from meancache import Schedule
from meancache.calibration.selection import CORRECTED
from meancache.calibration.selection import EARLY
from meancache.calibration.selection import EARLY_CANDIDATES
from meancache.flows import GaussianMixtureFlow
from meancache.flows import shifted_sigmas

sys.path.insert(0, __import__("os").path.dirname(__file__))
from bench_quality import BUDGETS  # noqa: E402
from bench_quality import STEPS  # noqa: E402
from bench_quality import adams_bashforth2  # noqa: E402
from bench_quality import below_all  # noqa: E402
from bench_quality import errors  # noqa: E402
from bench_quality import taylorseer_lite  # noqa: E402
from bench_quality import uniform_steps  # noqa: E402

#: seed -> (flow arguments, grid shift); none of them is a flow of bench_quality.py
FLOWS = {
    41: (dict(dim=16, components=4, seed=41), 1.0),
    42: (dict(dim=24, components=8, seed=42, spread=2.5, scale=0.4), 3.0),
    43: (dict(dim=32, components=12, seed=43), 2.0),
    44: (dict(dim=48, components=6, seed=44, spread=2.5, scale=0.45), 2.0),
    45: (dict(dim=64, components=16, seed=45, scale=0.5), 3.0),
    46: (dict(dim=16, components=10, seed=46, spread=3.0, scale=0.6), 1.0),
    47: (dict(dim=32, components=5, seed=47, spread=2.5, scale=0.4), 2.0),
    48: (dict(dim=24, components=8, seed=48), 3.0),
}
#: scores of the candidates' per-input calibration errors ``E`` (float64, candidates x inputs), one per candidate
SCORES = {
    "mean": lambda E: E.mean(1),
    "root mean square": lambda E: E.pow(2).mean(1).sqrt(),
    "geometric mean": lambda E: E.clamp_min(1e-12).log().mean(1).exp(),
}
#: more scores, tried on the pool of the four corrected safe candidates only; the ratios ``E / E.min(0)`` compare each input with the best
#: candidate on that input, so an input every candidate gets wrong weighs little and one that only this candidate
#: gets wrong weighs much
MORE_SCORES = {
    "mean without the worst input": lambda E: E.sort(1).values[:, :-1].mean(1),
    "mean without the two worst inputs": lambda E: E.sort(1).values[:, :-2].mean(1),
    "90th percentile": lambda E: E.quantile(0.9, dim=1),
    "mean ratio to the input's best": lambda E: (E / E.min(0).values.clamp_min(1e-12)).mean(1),
    "mean / least mean + median / least median": lambda E: (
        E.mean(1) / E.mean(1).min() + E.median(1).values / E.median(1).values.min()),
}
_EARLY = [name for name, _ in EARLY_CANDIDATES]
_NAMES = [name for name, _ in CORRECTED] + _EARLY


def _search_corrected(name: str) -> bool:
    """Whether ``name`` is the best search with a corrector (``"joint g8 c2"``), not a safe corrected candidate."""
    return name not in _NAMES and name.rsplit(" ", 1)[-1] in ("c1", "c2")


FOUR = "+ all four"
DEFAULT_POOL = f"+ {_EARLY[1]} (the default)"
#: pool name -> which candidates it keeps (the early candidates only in the last two pools)
POOLS = {
    "without corrected candidates": lambda n: n not in _NAMES and not _search_corrected(n),
    "+ order 1 only (uniform p1 c1, tail p1 c1)": lambda n: n not in ("uniform p1 c2", "tail p1 c2", *_EARLY)
    and not _search_corrected(n),
    "+ order 2 only (uniform p1 c2, tail p1 c2)": lambda n: n not in ("uniform p1 c1", "tail p1 c1", *_EARLY)
    and not _search_corrected(n),
    FOUR: lambda n: n not in _EARLY and not _search_corrected(n),
    "+ the best search corrected": lambda n: n not in _EARLY,
    f"+ {EARLY}": lambda n: n != _EARLY[1],
    DEFAULT_POOL: lambda n: True,
}


def cells(flows=FLOWS, budgets=BUDGETS, held_out: int = 4096, inputs: int = 32, draws: int | None = None) -> dict:
    """``{"seed/B": {"calibration": {name: [errors]}, "held": {name: (rel L2, median)}, "comparators": {...}}}``;
    ``inputs``: the first rows of the 32 calibration inputs, ``draws``: ``calibrate(draws=)`` (None: its default,
    which brings these flows' runs to 1,024 rows)."""
    out = {}
    for seed, (kwargs, shift) in flows.items():
        flow = GaussianMixtureFlow(**kwargs)
        grid = shifted_sigmas(STEPS, shift)
        cal = torch.randn(32, flow.dim, generator=torch.Generator().manual_seed(55))[:inputs]
        held = torch.randn(held_out, flow.dim, generator=torch.Generator().manual_seed(7))
        report: list = []
        meancache.calibrate(flow, cal, sigmas=grid, budget=list(budgets), report=report, progress=False, draws=draws)
        full = meancache.sample(flow, held, grid, Schedule.full(STEPS))
        for entry in report:
            b = entry["budget"]
            runs: dict = {}
            held_errors = {}
            for name in entry["errors"]:
                s = entry["candidates"][name]
                if s not in runs:
                    runs[s] = errors(meancache.sample(flow, held, grid, s), full)
                held_errors[name] = runs[s]
            comparators = {
                "AB2": errors(adams_bashforth2(flow, held, shifted_sigmas(b, shift)), full),
                "TaylorSeer-lite uniform": errors(taylorseer_lite(flow, held, grid, uniform_steps(b)), full),
                "default": held_errors["default"],
            }
            out[f"{seed}/{b}"] = {"calibration": entry["errors"], "held": held_errors, "comparators": comparators}
            print(f"    flow {seed} B={b}: chose {entry['chosen']}", flush=True)
    return out


def pick(cell: dict, keep, score) -> str:
    """The candidate of ``cell`` that ``score`` ranks first among those ``keep`` keeps (the earliest on a tie,
    within 1e-9 relative, as :func:`meancache.calibrate` breaks ties)."""
    names = [n for n in cell["calibration"] if keep(n)]
    scored = score(torch.tensor([cell["calibration"][n] for n in names], dtype=torch.float64)).tolist()
    least = min(scored)
    return next(n for n, v in zip(names, scored) if v <= least * (1 + 1e-9) + 1e-15)


def markdown(data: dict) -> str:
    """The table of every pool and score (see the module docstring)."""
    lines = ["| pool | score | rel L2 / best candidate | median / best candidate | cells below AB2, "
             "TaylorSeer-lite and default in both | rel L2 / median against the first pool's mean pick | "
             "lower / higher in both |", "|---|---|---|---|---|---|---|"]
    reference = {k: pick(c, POOLS["without corrected candidates"], SCORES["mean"]) for k, c in data.items()}
    for pool, keep in POOLS.items():
        scores = {**SCORES, **MORE_SCORES} if pool == FOUR else SCORES
        for label, score in scores.items():
            logs = [[], [], [], []]
            worst = [0.0, 0.0]
            met = lower = higher = 0
            for key, cell in data.items():
                held = cell["held"]
                mine, ref = held[pick(cell, keep, score)], held[reference[key]]
                for i in (0, 1):
                    best = min(v[i] for v in held.values())
                    logs[i].append(math.log(mine[i] / best))
                    logs[2 + i].append(math.log(mine[i] / ref[i]))
                    worst[i] = max(worst[i], mine[i] / best)
                met += _meets(cell, mine)
                lower += mine[0] < ref[0] and mine[1] < ref[1]
                higher += mine[0] > ref[0] and mine[1] > ref[1]
            geo = [math.exp(sum(x) / len(x)) for x in logs]
            lines.append(f"| {pool} | {label} | {geo[0]:.2f}x ({worst[0]:.1f}x) | {geo[1]:.2f}x ({worst[1]:.1f}x) "
                         f"| {met} of {len(data)} | {geo[2]:.2f}x / {geo[3]:.2f}x | {lower} / {higher} |")
    bound = sum(any(_meets(c, e) for e in c["held"].values()) for c in data.values())
    lines.append(f"| any candidate of the last pool, picked on the held-out inputs (a bound on the choice) | - | - | - "
                 f"| {bound} of {len(data)} | - | - |")
    return "\n".join(lines)


def _meets(cell: dict, held: tuple[float, float]) -> bool:
    """Whether held-out ``(rel L2, median)`` are below every comparator's of ``cell`` in both."""
    return below_all(held, cell["comparators"].values())


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    args = sys.argv[1:]  # optional: --inputs P (first P of the 32 calibration inputs), --draws N (calibrate's draws)
    options = {name: int(args[args.index(f"--{name}") + 1]) for name in ("inputs", "draws") if f"--{name}" in args}
    print(markdown(cells(**options)))
