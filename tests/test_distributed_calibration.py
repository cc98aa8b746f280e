"""Calibration over several processes (issue 20, item 5): :func:`record_sharded` and ``meancache calibrate
--pipeline`` under ``torchrun`` with 2 gloo ranks on the CPU give the single-process recording and schedules.

One torchrun launch (tests/dist_calibration_worker.py) runs every multi-rank case; each test below checks one of its
outputs against a single-process run made here.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest
import torch

from meancache import Recording
from meancache import Schedule
from meancache import calibrate
from meancache import cli
from meancache import record
from meancache.calibration.distributed import record_sharded
from meancache.calibration.distributed import shard_indices

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import dist_calibration_worker as worker  # noqa: E402

WORKER = pathlib.Path(worker.__file__)
#: Seconds the torchrun launch may take (about 25 s on the loaded 2-core machine) before it is killed.
TIMEOUT_S = 180


def _same_recording(got: Recording, want: Recording) -> None:
    assert got.sigmas == want.sigmas
    # bitwise: each input is recorded alone, in the same process layout, with the same weights and seeds
    torch.testing.assert_close(got.latents, want.latents, rtol=0, atol=0)
    torch.testing.assert_close(got.velocities, want.velocities, rtol=0, atol=0)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The worker's outputs (one torchrun launch, 2 gloo ranks), and the folder and file it calibrated."""
    from meancache.examples import tiny_pipelines

    root = tmp_path_factory.mktemp("dist")
    pipe, _, _ = tiny_pipelines.build("flux")
    pipe.save_pretrained(root / "flux")
    g = torch.Generator().manual_seed(5)
    torch.save([{"prompt_embeds": torch.randn(1, 8, 32, generator=g), "pooled_prompt_embeds": torch.randn(1, 16,
                                                                                                           generator=g)}
                for _ in range(3)], root / "args.pt")
    out = root / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    # --standalone: a free port of its own, so a concurrent run elsewhere on the machine does not collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(out), str(root / "flux"), str(root / "args.pt")]
    # a session of its own: on a timeout the ranks are killed with torchrun, not left waiting in a collective
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=WORKER.parent.parent, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s:\n{log[-6000:]}")
    assert proc.returncode == 0, log[-6000:]
    return {"out": out, "flux": root / "flux", "args": root / "args.pt"}


def test_shard_indices_are_round_robin():
    assert [shard_indices(7, r, 3) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum((shard_indices(10, r, 4) for r in range(4)), [])) == list(range(10))
    with pytest.raises(ValueError, match=r"rank=2: must be an int in 0\.\.1 \(world_size=2\)"):
        shard_indices(4, 2, 2)
    with pytest.raises(ValueError, match="num_inputs=0: must be an int >= 1"):
        shard_indices(0, 0, 2)


def test_without_a_process_group_it_is_record():
    flow, inputs, sigmas = worker.flow_case()
    got = record_sharded(flow, inputs, sigmas, progress=False)
    want = record(flow, inputs, sigmas, progress=False)
    _same_recording(got, want)
    assert got.meta == want.meta  # no world_size: nothing was sharded
    with pytest.raises(ValueError, match="dst=1: must be None or this process's rank 0"):
        record_sharded(flow, inputs, sigmas, progress=False, dst=1)


def test_two_ranks_gather_the_single_process_recording_on_every_rank(two_ranks):
    flow, inputs, sigmas = worker.flow_case()
    want = record(flow, inputs, sigmas, progress=False)
    for rank in (0, 1):
        got = Recording.load(two_ranks["out"] / f"flow-rank{rank}.pt")
        _same_recording(got, want)
        assert got.meta["world_size"] == 2
        assert got.meta["model_evaluations"] == want.meta["model_evaluations"]  # counted over both ranks


def test_a_failing_rank_stops_every_rank(two_ranks):
    """Input 3 (rank 1's) raises: rank 1 re-raises its own error, rank 0 gets RankFailed naming rank 1, and both
    go on to the next collective (the launch finished, so nobody hung)."""
    own = json.loads((two_ranks["out"] / "failure-rank1.json").read_text())
    other = json.loads((two_ranks["out"] / "failure-rank0.json").read_text())
    assert own == {"raised": "ValueError", "message": "input 3 broke the model"}
    assert other == {"raised": "RankFailed",
                     "message": "rank 1 of 2 could not record its inputs: ValueError: input 3 broke the model"}


def test_a_pipeline_gathered_on_rank_0_gives_the_single_process_schedules(two_ranks):
    pipe, inputs, common = worker.pipeline_case()
    want = record(pipe, inputs, progress=False, **common)
    got = Recording.load(two_ranks["out"] / "flux.pt")
    _same_recording(got, want)
    assert got.meta["inputs"] == worker.PIPELINE_INPUTS and got.meta["pipeline"] == "FluxPipeline"
    single = calibrate(want, budget=worker.BUDGETS, progress=False)
    gathered = [Schedule.from_dict(d) for d in json.loads((two_ranks["out"] / "flux-schedules.json").read_text())]
    assert gathered == single
    # dst=0: rank 1 keeps no copy
    assert json.loads((two_ranks["out"] / "flux-rank1.json").read_text()) == {"returned": "None"}


def test_the_command_under_torchrun_writes_the_single_process_results(two_ranks, tmp_path, capsys):
    single = tmp_path / "single"
    code = cli.main(["calibrate", "--pipeline", str(two_ranks["flux"]), "--call-args", str(two_ranks["args"]),
                     "--out", str(single), *worker.CLI_ARGS])
    assert code == 0, capsys.readouterr().err
    sharded = two_ranks["out"] / "cli"
    _same_recording(Recording.load(sharded / "recording.pt"), Recording.load(single / "recording.pt"))
    for budget in worker.BUDGETS:
        name = f"schedule-B{budget}.json"
        assert Schedule.load(sharded / name) == Schedule.load(single / name)
    two, one = (json.loads((d / "report.json").read_text()) for d in (sharded, single))
    assert two["budgets"] == one["budgets"]  # the same candidates, scores and choices
    assert (two["settings"]["world_size"], one["settings"]["world_size"]) == (2, 1)
    assert two["settings"]["inputs"] == one["settings"]["inputs"] == 3
    # only rank 0 wrote: the files of one run, no more
    assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in single.iterdir())
