"""Calibration at real model size: wall time and peak memory of ``meancache.calibrate`` (issue 20).

Cases (analytic Gaussian-mixture velocities standing in for a model: the search never calls the model, so its cost
depends only on the recording's shape):

* ``flux-1024``: 4 inputs of 4,096 tokens x 64 channels (262,144 elements, a FLUX.1 latent at 1024x1024), N = 50,
  budgets 6, 8, 10, 17 and 25;
* ``wan-480p``: 4 inputs of 32,768 x 64 (2.1 M elements, a Wan 480p video latent), the same budgets;
* ``steps-250``: 4 inputs of 4,096 x 64, N = 250, budget 25.

Each case runs in a fresh process (``python bench/bench_calibration.py CASE``) so that its peak resident memory
(``ru_maxrss``) is its own: the recording is made with ``record(..., elements=SEARCH_ELEMENTS)`` (only the search's
subset leaves the model's device; timed apart), then ``calibrate`` with every default is timed. ``make bench``
runs a reduced case (small latents) under pytest as a smoke test.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import pytest
import torch

import meancache
from meancache.calibrate import SEARCH_ELEMENTS
from meancache.flows import GaussianMixtureFlow
from meancache.flows import shifted_sigmas

CASES = {
    "flux-1024": dict(tokens=4096, steps=50, budgets=[6, 8, 10, 17, 25]),
    "wan-480p": dict(tokens=32768, steps=50, budgets=[6, 8, 10, 17, 25]),
    "steps-250": dict(tokens=4096, steps=250, budgets=[25]),
    "smoke": dict(tokens=16, steps=16, budgets=[5, 8]),
}
INPUTS = 4
CHANNELS = 64


def run_case(name: str) -> dict:
    """Record and calibrate one case; returns its timings (s), peak memory (MB) and the schedules' patterns."""
    case = CASES[name]
    torch.manual_seed(0)
    flow = GaussianMixtureFlow(dim=CHANNELS, components=16, seed=7, spread=2.5)
    sigmas = shifted_sigmas(case["steps"], 3.0)
    x = torch.randn(INPUTS, case["tokens"], CHANNELS, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    rec = meancache.record(flow, x, sigmas, progress=False, elements=SEARCH_ELEMENTS)
    recorded = time.perf_counter() - t0
    t0 = time.perf_counter()
    schedules = meancache.calibrate(rec, budget=case["budgets"])
    calibrated = time.perf_counter() - t0
    return {
        "case": name,
        "elements_per_input": case["tokens"] * CHANNELS,
        "steps": case["steps"],
        "budgets": case["budgets"],
        "record_s": round(recorded, 2),
        "calibrate_s": round(calibrated, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": torch.get_num_threads(),
        "patterns": [s.pattern()[0] for s in schedules],
    }


def run_in_process(name: str) -> dict:
    """:func:`run_case` in a fresh interpreter, so that the peak memory is the case's alone."""
    done = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"case {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_calibration_smoke(benchmark):
    """The reduced case: calibrate's defaults on a small recording (the full cases: run this file)."""
    result = benchmark.pedantic(run_case, args=("smoke",), rounds=1, iterations=1)
    assert result["patterns"] and len(result["patterns"]) == 2


if __name__ == "__main__":
    names = sys.argv[1:] or ["flux-1024", "wan-480p", "steps-250"]
    if len(names) == 1 and names[0] in CASES:
        print(json.dumps(run_case(names[0])))
    else:
        for n in names:
            print(json.dumps(run_in_process(n)), flush=True)
