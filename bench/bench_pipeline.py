"""End-to-end latency of a diffusers pipeline with and without meancache, at budgets 10, 17 and 25 of 50 steps.

On a GPU machine without pretrained weights, and on the CPU, the pipelines are the tiny ones of
meancache/examples/tiny_pipelines.py: their transformer is so small that fixed per-step costs (scheduler, guidance arithmetic,
Python) are a large share of a step, so the measured speedup stays well below the ideal 50/B that a real
transformer approaches. Each case records the measured speedup next to the ideal in ``extra_info``.
"""

from __future__ import annotations

import time

import pytest
import torch

import meancache
from meancache.examples import tiny_pipelines

STEPS = 50
BUDGETS = [None, 25, 17, 10]  # None: the pipeline without meancache
PIPELINES = ["flux", "qwen-image", "z-image"]


def _run(pipe, kw, info):
    out = getattr(pipe(**tiny_pipelines.fresh_kwargs(kw)), info["output_attr"])
    if out.is_cuda:
        torch.cuda.synchronize()
    return out


def _best_seconds(pipe, kw, info, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        _run(pipe, kw, info)
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.mark.parametrize("budget", BUDGETS, ids=["baseline" if b is None else f"B{b}" for b in BUDGETS])
@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline(benchmark, name, budget, machine_info):
    pipe, kw, info = tiny_pipelines.build(name)
    kw = dict(kw, num_inference_steps=STEPS)
    baseline = _best_seconds(pipe, kw, info)
    if budget is not None:
        meancache.accelerate(pipe, budget=budget)
    out = _run(pipe, kw, info)
    assert torch.isfinite(out).all()
    if budget is not None:
        s = meancache.summary(pipe)
        assert s.computed_steps == budget and s.num_steps == STEPS
    benchmark.pedantic(lambda: _run(pipe, kw, info), rounds=3, iterations=1, warmup_rounds=1)
    seconds = _best_seconds(pipe, kw, info)
    benchmark.extra_info.update(machine_info)
    benchmark.extra_info.update(
        pipeline=name,
        budget=budget or STEPS,
        seconds=seconds,
        baseline_seconds=baseline,
        speedup=baseline / seconds,
        ideal_speedup=STEPS / (budget or STEPS),
    )
