"""The `meancache calibrate` command: schedule JSON and plot per budget, from a flow or a saved recording."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import torch

from meancache import Recording
from meancache import Schedule
from meancache import cli
from meancache import record
from meancache.flows import GaussianMixtureFlow
from meancache.flows import shifted_sigmas


def test_calibrate_an_analytic_flow_writes_schedules_and_plots(tmp_path, capsys):
    code = cli.main(["calibrate", "--flow", "gaussian-mixture", "--steps", "20", "--dim", "8", "--components", "4",
                     "--inputs", "4", "--budget", "6", "9", "--out", str(tmp_path), "--quiet"])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["budget"] for line in lines] == [6, 9]
    for line in lines:
        schedule = Schedule.load(line["json"])
        assert schedule.budget == line["budget"] and schedule.num_steps == 20
        assert schedule.pattern()[0] == line["pattern"]
        png = (tmp_path / f"schedule-B{line['budget']}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_calibrate_a_saved_recording_and_errors(tmp_path, capsys):
    flow = GaussianMixtureFlow(dim=8, components=4, seed=2)
    rec = record(flow, torch.randn(3, 8), shifted_sigmas(16).tolist(), progress=False)
    rec.save(tmp_path / "rec.pt")
    assert cli.main(["calibrate", "--recording", str(tmp_path / "rec.pt"), "--budget", "5", "--out",
                     str(tmp_path / "out"), "--no-plot"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plot"] is None and Schedule.load(out["json"]).num_steps == 16
    assert cli.main(["calibrate", "--recording", str(tmp_path / "missing.pt"), "--budget", "5", "--out",
                     str(tmp_path)]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert cli.main(["calibrate", "--recording", str(tmp_path / "rec.pt"), "--budget", "1", "--out",
                     str(tmp_path)]) == 2
    assert "budget=1" in capsys.readouterr().err
    assert isinstance(Recording.load(tmp_path / "rec.pt"), Recording)


def test_console_script_is_installed(tmp_path):
    exe = shutil.which("meancache") or str(__import__("pathlib").Path(sys.executable).with_name("meancache"))
    done = subprocess.run([exe, "calibrate", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--budget" in done.stdout
