"""Rank side of tests/test_distributed_calibration.py, run as ``torchrun --standalone --nproc_per_node 2
tests/dist_calibration_worker.py OUT PIPELINE_DIR CALL_ARGS`` on the CPU (gloo).

Each rank, in one launch (a torchrun start costs each rank the import of torch and diffusers):

1. ``meancache calibrate --pipeline PIPELINE_DIR --call-args CALL_ARGS ...`` through ``cli.main`` with no process
   group yet, so the command starts (and ends) its own gloo group as it does under torchrun; rank 0 writes
   ``OUT/cli``.
2. Then, in a gloo group of its own, :func:`record_sharded`: an analytic flow gathered on every rank
   (``OUT/flow-rank{r}.pt``), a velocity_fn that fails on an input of rank 1 (each rank's outcome in
   ``OUT/failure-rank{r}.json``), and a tiny FLUX pipeline gathered on rank 0 only (``OUT/flux.pt``, and the
   schedules calibrated there in ``OUT/flux-schedules.json``; ``OUT/flux-rank1.json`` says what rank 1 got).

The parent compares all of it with single-process runs.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import torch

#: Shared with the test: the inputs and settings both sides use.
FLOW_INPUTS = 5  # odd: rank 0 records 3 inputs, rank 1 records 2
FLOW_STEPS = 12
FAILING_INPUT = 3  # recorded by rank 1
PIPELINE_INPUTS = 3
STEPS = 8
BUDGETS = [4, 5]
CLI_ARGS = ["--steps", str(STEPS), "--height", "32", "--width", "32", "--budget", *map(str, BUDGETS), "--seed", "3",
            "--device", "cpu", "--dtype", "float32", "--no-plot", "--quiet"]


def flow_case():
    """``(velocity_fn, inputs, sigmas)`` of the analytic-flow case."""
    from meancache.flows import GaussianMixtureFlow
    from meancache.flows import shifted_sigmas

    flow = GaussianMixtureFlow(dim=8, components=4, seed=2)
    inputs = [torch.randn(1, 8, generator=torch.Generator().manual_seed(100 + i)) for i in range(FLOW_INPUTS)]
    return flow, inputs, shifted_sigmas(FLOW_STEPS).tolist()


def pipeline_case():
    """``(pipe, inputs, call_kwargs)`` of the tiny-FLUX case: input i seeded with i, on every rank alike."""
    from meancache.examples import tiny_pipelines

    pipe, kw, _ = tiny_pipelines.build("flux")
    common = {k: v for k, v in kw.items() if k != "generator"}
    common["num_inference_steps"] = STEPS
    inputs = [{"generator": torch.Generator().manual_seed(i)} for i in range(PIPELINE_INPUTS)]
    return pipe, inputs, common


def main(out: pathlib.Path, pipeline_dir: str, call_args: str) -> None:
    torch.set_num_threads(1)  # two ranks share the 2-core machine (tiny_pipelines says why one thread)
    import torch.distributed as dist

    from meancache import calibrate
    from meancache import cli
    from meancache.calibration.distributed import RankFailed
    from meancache.calibration.distributed import record_sharded

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # 1. the command, with no process group yet: it starts (and ends) its own from torchrun's environment
    code = cli.main(["calibrate", "--pipeline", pipeline_dir, "--call-args", call_args, "--out", str(out / "cli"),
                     *CLI_ARGS])
    assert code == 0, f"rank {rank}: meancache calibrate exited with {code}"
    assert not dist.is_initialized(), "the command left its process group behind"

    # 2. the library function, in a group of the script's own. Its rendezvous is a fresh file store, not torchrun's
    # store again: rank 1 leaves the command while rank 0 still searches, and a second group on the same store
    # can then meet the first group's stale addresses (torch 2.14 hangs in init_process_group on one rank)
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=world_size)
    flow, inputs, sigmas = flow_case()
    record_sharded(flow, inputs, sigmas, progress=False).save(out / f"flow-rank{rank}.pt")

    def failing(x, sigma):
        if torch.equal(x, inputs[FAILING_INPUT]):
            raise ValueError("input 3 broke the model")
        return flow(x, sigma)

    try:
        record_sharded(failing, inputs, sigmas, progress=False)
        outcome = {"raised": None}
    except RankFailed as exc:
        outcome = {"raised": "RankFailed", "message": str(exc)}
    except ValueError as exc:
        outcome = {"raised": "ValueError", "message": str(exc)}
    (out / f"failure-rank{rank}.json").write_text(json.dumps(outcome))

    pipe, pipe_inputs, common = pipeline_case()
    rec = record_sharded(pipe, pipe_inputs, progress=False, dst=0, **common)
    if rank == 0:
        rec.save(out / "flux.pt")
        schedules = calibrate(rec, budget=BUDGETS, progress=False)
        (out / "flux-schedules.json").write_text(json.dumps([s.to_dict() for s in schedules]))
    else:
        (out / "flux-rank1.json").write_text(json.dumps({"returned": repr(rec)}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3])
