"""The `meancache calibrate` command: schedule JSON and plot per budget, from a flow or a saved recording."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import torch

import meancache
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
    assert "--budget 1: must be an int >= 2" in capsys.readouterr().err
    assert isinstance(Recording.load(tmp_path / "rec.pt"), Recording)


def test_console_script_is_installed(tmp_path):
    exe = shutil.which("meancache") or str(__import__("pathlib").Path(sys.executable).with_name("meancache"))
    done = subprocess.run([exe, "calibrate", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--budget" in done.stdout


def test_calibrate_the_digits_model_plots_multi_dimensional_latents(tmp_path, capsys):
    """Pipeline latents are (batch, tokens, channels): the plot's velocity change must reduce over all of them."""
    import pytest

    pytest.importorskip("diffusers")
    pytest.importorskip("sklearn")
    torch.set_num_threads(1)
    code = cli.main(["calibrate", "--model", "digits", "--steps", "12", "--inputs", "1", "--budget", "5",
                     "--out", str(tmp_path), "--quiet"])
    assert code == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Schedule.load(line["json"]).budget == 5
    assert (tmp_path / "schedule-B5.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["calibrate", "--model", "digits", "--inputs", "0", "--budget", "5", "--out",
                     str(tmp_path)]) == 2
    assert "--inputs 0" in capsys.readouterr().err


def test_velocity_change_of_three_dimensional_latents():
    rec = Recording([1.0, 0.5, 0.0], torch.zeros(2, 3, 4, 2, 2), torch.stack([torch.ones(2, 4, 2, 2),
                                                                             2 * torch.ones(2, 4, 2, 2)], 1))
    inst, _ = cli.velocity_change(rec)
    assert inst == [1.0]  # ||2 - 1|| / ||1|| over every latent dimension


def test_unusable_paths_are_errors_not_tracebacks(tmp_path, capsys):
    """A folder given as --recording, or a file given as --out: the usual `error:` line and rc 2, before any
    calibration work."""
    flow = GaussianMixtureFlow(dim=4, components=2, seed=1)
    rec = record(flow, torch.randn(2, 4), shifted_sigmas(8).tolist(), progress=False)
    rec.save(tmp_path / "rec.pt")
    occupied = tmp_path / "taken.txt"
    occupied.write_text("not a folder")
    cases = [
        (["--recording", str(tmp_path), "--out", str(tmp_path / "out")], f"--recording {tmp_path}: is a folder"),
        (["--recording", str(tmp_path / "rec.pt"), "--out", str(occupied)], f"--out {occupied}: exists and is not"),
        (["--flow", "gaussian-mixture", "--steps", "8", "--out", str(occupied)], f"--out {occupied}: exists"),
        (["--recording", str(tmp_path / "rec.pt"), "--out", str(occupied / "below")], f"--out {occupied / 'below'}"),
    ]
    for args, message in cases:
        assert cli.main(["calibrate", *args, "--budget", "3", "--no-plot", "--quiet"]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("meancache calibrate: error: ") and message in err, err
        assert "Traceback" not in err
    assert occupied.read_text() == "not a folder"


def test_binary_recording_is_an_error_line(tmp_path, capsys):
    path = tmp_path / "rec.pt"
    path.write_bytes(bytes(range(256)) * 4)
    assert cli.main(["calibrate", "--recording", str(path), "--budget", "3", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meancache calibrate: error: ") and str(path) in err


def test_calibrate_estimators_option(tmp_path, capsys):
    """--estimators: every family by default (the joint search), or some; a bad name is an error line."""
    flow = GaussianMixtureFlow(dim=8, components=4, seed=2)
    rec = record(flow, torch.randn(4, 8, generator=torch.Generator().manual_seed(1)), shifted_sigmas(16).tolist(),
                 progress=False)
    rec.save(tmp_path / "rec.pt")
    import meancache

    for option, estimators in ([], ("meancache", "extrapolate", "predict")), (["--estimators", "meancache"], ("meancache",)), (
        ["--estimators", "extrapolate, meancache"], ("meancache", "extrapolate")
    ):
        out = tmp_path / f"out{len(option)}{len(estimators)}"
        assert cli.main(["calibrate", "--recording", str(tmp_path / "rec.pt"), "--budget", "5", "--out", str(out),
                         *option]) == 0
        line = json.loads(capsys.readouterr().out)
        assert Schedule.load(line["json"]) == meancache.calibrate(rec, budget=5, estimators=estimators)
        assert (out / "schedule-B5.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "extrapolate" in Schedule.load(tmp_path / "out22" / "schedule-B5.json").estimators
    assert Schedule.load(tmp_path / "out21" / "schedule-B5.json").published
    assert cli.main(["calibrate", "--recording", str(tmp_path / "rec.pt"), "--budget", "5", "--out", str(tmp_path),
                     "--estimators", "meancache,jvp"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meancache calibrate: error: --estimators meancache,jvp: must be") and "Traceback" not in err


def test_validate_option_runs_the_flow_and_keeps_its_recording(tmp_path, capsys):
    """--flow scores the candidates by real runs by default (auto), keeps its recording beside the schedules, and
    --recording OUT/recording.pt with --validate replay searches it again; runs with a recording is an error line."""
    common = ["--flow", "gaussian-mixture", "--steps", "16", "--dim", "6", "--components", "3", "--inputs", "4",
              "--budget", "5", "--no-plot", "--quiet"]
    flow = GaussianMixtureFlow(dim=6, components=3, seed=0)
    noise = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    sigmas = shifted_sigmas(16, 3.0).tolist()
    for mode in ("auto", "runs", "replay"):
        out = tmp_path / mode
        assert cli.main(["calibrate", *common, "--validate", mode, "--out", str(out)]) == 0
        line = json.loads(capsys.readouterr().out)
        library = meancache.calibrate(flow, noise, sigmas=sigmas, budget=5, validate=mode, progress=False)
        assert Schedule.load(line["json"]) == library
        rec = Recording.load(out / "recording.pt")
        assert rec.num_inputs == 4 and rec.num_steps == 16
        torch.testing.assert_close(rec.latents[:, 0], noise, rtol=0, atol=0)
    again = tmp_path / "again"
    assert cli.main(["calibrate", "--recording", str(tmp_path / "auto" / "recording.pt"), "--budget", "5",
                     "--validate", "replay", "--out", str(again), "--no-plot"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert Schedule.load(line["json"]) == Schedule.load(tmp_path / "replay" / "schedule-B5.json")
    assert cli.main(["calibrate", "--recording", str(tmp_path / "auto" / "recording.pt"), "--budget", "5",
                     "--validate", "runs", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--validate runs with --recording" in err[0] and "need the model" in err[0]
    assert not (tmp_path / "x").exists()
