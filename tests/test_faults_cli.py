"""Faults of `meancache calibrate` and of `meancache.calibrate` (issue 18, items 6-8): a zero reference in the
replay choice, numeric options out of range, and errors that must come before any recording work."""

from __future__ import annotations

import math

import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import meancache
from meancache import Recording
from meancache import cli
from meancache import record
from meancache.calibrate import calibrate
from meancache.flows import GaussianMixtureFlow
from meancache.flows import shifted_sigmas

PREFIX = "meancache calibrate: error: "


def _ends_at_zero(num_steps: int = 16) -> Recording:
    """A curved, self-consistent trajectory whose final latents are exactly 0 (dyadic values, ``dt = -1/16``)."""
    g = torch.Generator().manual_seed(3)
    t = torch.arange(num_steps, dtype=torch.float64)
    base = torch.randint(-8, 9, (3, 1, 6), generator=g).double()
    curve = torch.randint(-8, 9, (3, 1, 6), generator=g).double()
    vel = (base + curve * torch.round(8 * torch.sin(t / 3))[None, :, None] / 8).float()
    lat = torch.zeros(3, num_steps + 1, 6)
    for i in reversed(range(num_steps)):
        lat[:, i] = lat[:, i + 1] + vel[:, i] / num_steps
    return Recording(torch.linspace(1, 0, num_steps + 1).tolist(), lat, vel)


def _replayed_distance(rec: Recording, schedule) -> float:
    """||x^_N - x_N|| of the schedule driven by the recorded velocities (the oracle of the test, kept apart)."""
    computed = iter(schedule.compute_steps)
    vel = rec.velocities.double()
    out = meancache.sample(lambda x, s: vel[:, next(computed)], rec.latents.double()[:, 0], rec.sigmas, schedule)
    return float(torch.linalg.vector_norm(out - rec.latents.double()[:, -1]))


# -- item 6: select=True on a recording whose final latents are all zero --------------------------------------------


def test_calibrate_on_an_all_zero_recording_works():
    """Every candidate replays the zero reference exactly (0/0 relative error): every score is defined (the
    absolute distance, 0), the tie goes to the first candidate, and no bare StopIteration escapes."""
    rec = Recording(torch.linspace(1, 0, 9).tolist(), torch.zeros(2, 9, 4), torch.zeros(2, 8, 4))
    report = []
    picked = calibrate(rec, budget=[3, 4], max_len=4, report=report)
    assert [s.budget for s in picked] == [3, 4]
    for entry in report:
        assert all(v == 0.0 for v in entry["scores"].values())
        assert entry["chosen"] == next(iter(entry["scores"]))  # the tie rule: the earliest candidate


def test_calibrate_with_a_zero_reference_ranks_by_the_absolute_replay_distance():
    """Final latents exactly 0 but a curved path: the relative error is inf for every inexact candidate, so it
    cannot rank them; the scores are absolute distances, finite, and the choice is their least (ties within
    COST_RTOL to the earliest)."""
    rec = _ends_at_zero()
    assert not rec.latents[:, -1].any() and rec.latents[:, 0].abs().max() > 1
    report = []
    calibrate(rec, budget=[4, 6, 8], max_len=8, report=report)
    differing = 0
    for entry in report:
        scores = {k: v for k, v in entry["scores"].items() if v is not None}
        assert scores and all(math.isfinite(v) for v in scores.values())
        least = min(scores.values())
        assert scores[entry["chosen"]] <= least * (1 + 1e-6), entry
        differing += len({round(v, 9) for v in scores.values()}) > 1
    # the recording is built so that the candidates differ: the choice is really made
    assert differing >= 1


# -- item 7: every numeric option checked up front, one error line, status 2 ----------------------------------------


@pytest.fixture
def no_recording(monkeypatch):
    """Recording or loading the model is work the checks must come before: fail the test if it starts."""

    def forbidden(*args, **kwargs):
        raise AssertionError("recording started before the arguments were checked")

    monkeypatch.setattr(cli, "record", forbidden)
    monkeypatch.setattr(cli, "_flow_target", forbidden)
    monkeypatch.setattr(cli, "_digits_target", forbidden)
    monkeypatch.setattr(cli, "calibrate", forbidden)


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return lines[0][len(PREFIX):]


BAD_NUMBERS = [
    (["--inputs", "-3"], "--inputs -3: must be an int >= 1"),
    (["--inputs", "0"], "--inputs 0: must be an int >= 1"),
    (["--elements", "0"], "--elements 0: must be an int >= 1"),
    (["--draws", "-1"], "--draws -1: must be an int >= 0"),
    (["--refine", "-5"], "--refine -5: must be an int >= 0"),
    (["--steps", "1"], "--steps 1: must be >= 2"),
    (["--steps", "0"], "--steps 0: must be >= 2"),
    (["--steps", "20000", "--budget", "10"], "--steps 20000: must be <= MAX_STEPS=10000"),
    (["--dim", "0"], "--dim 0: must be an int >= 1"),
    (["--components", "-1"], "--components -1: must be an int >= 1"),
    (["--shift", "0"], "--shift 0.0: must be a finite number > 0"),
    (["--shift", "nan"], "--shift nan: must be a finite number > 0"),
    (["--shift=-inf"], "--shift -inf: must be a finite number > 0"),  # "-inf" alone reads as an option
    (["--shift", "1e-300"], "--shift 1e-300 (with --steps 8): the sigma grid breaks its rule: sigmas[0]=inf"),
    (["--gamma", "0"], "--gamma 0.0: must be a finite number > 0"),
    (["--gamma", "inf"], "--gamma inf: must be a finite number > 0"),
    (["--gamma", "nan"], "--gamma nan: must be a finite number > 0"),
    (["--max-len", "0"], "--max-len 0: must be an int >= 1"),
    (["--seed", "-1"], "--seed -1: must be an int in 0..18446744073709551614"),
    (["--seed", str(2**64 - 1)], f"--seed {2**64 - 1}: must be an int in 0..18446744073709551614"),
    (["--guidance", "0.5"], "--guidance 0.5: must be a finite number >= 1"),
    (["--guidance", "nan"], "--guidance nan: must be a finite number >= 1"),
    (["--budget", "1"], "--budget 1: must be an int >= 2"),
    (["--budget", "4", "0"], "--budget 0: must be an int >= 2"),
]


@pytest.mark.parametrize("source", [["--flow", "gaussian-mixture"], ["--model", "digits"]], ids=["flow", "model"])
@pytest.mark.parametrize("option, message", BAD_NUMBERS, ids=[" ".join(o) for o, _ in BAD_NUMBERS])
def test_numeric_option_out_of_range_is_one_error_line(tmp_path, capsys, no_recording, source, option, message):
    if source[0] == "--model" and option[0] == "--shift" and option[1] == "1e-300":
        pytest.skip("the digits model's scheduler sets its own grid: --shift does not reach it")
    # --budget first, so that a second --budget in `option` replaces it (argparse keeps the last)
    argv = ["calibrate", *source, "--budget", "4", "--steps", "8", *option, "--out", str(tmp_path / "o"), "--quiet"]
    assert cli.main(argv) == 2
    assert _one_error_line(capsys).startswith(message)
    assert not (tmp_path / "o").exists()


def test_console_script_negative_inputs_exits_2_without_a_traceback(tmp_path):
    """The issue's command line, through the installed entry point: status 2 and one `error:` line."""
    exe = shutil.which("meancache") or str(pathlib.Path(sys.executable).with_name("meancache"))
    done = subprocess.run(
        [exe, "calibrate", "--flow", "gaussian-mixture", "--steps", "8",
         "--budget", "4", "--inputs", "-3", "--out", str(tmp_path / "o"), "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        PREFIX + "--inputs -3: must be an int >= 1 (calibration inputs, or batches of the ten digits with --model)"
    ]


def test_non_numeric_values_are_argparse_errors(tmp_path, capsys, no_recording):
    """A value that is no number at all stops in argparse itself: its usage, one `error:` line, status 2."""
    for option, value in [("--steps", "2.5"), ("--inputs", "x"), ("--gamma", "high"), ("--budget", "1e3")]:
        with pytest.raises(SystemExit) as stop:
            cli.main(["calibrate", "--flow", "gaussian-mixture", "--budget", "4", option, value,
                      "--out", str(tmp_path)])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert errors == [f"{PREFIX}argument {option}: invalid {'float' if option == '--gamma' else 'int'} value: "
                          f"'{value}'"], err


# -- item 8: rules known before the recording are checked before it -------------------------------------------------


@pytest.mark.parametrize("source", [["--flow", "gaussian-mixture"], ["--model", "digits"]], ids=["flow", "model"])
@pytest.mark.parametrize("option, message", [
    (["--budget", "60", "--steps", "50"],
     "--budget 60 (with --steps 50): must be an int with 2 <= budget <= num_steps=50"),
    (["--budget", "10", "60", "--steps", "50"],
     "--budget 60 (with --steps 50): must be an int with 2 <= budget <= num_steps=50"),
    (["--budget", "2", "--steps", "50", "--max-len", "8"],
     "--budget 2 (with --steps 50, --max-len 8): budget=2 cannot span num_steps=50 with max_len=8"),
    (["--budget", "5", "--steps", "50", "--max-len", "4"],
     "--budget 5 (with --steps 50, --max-len 4): budget=5 cannot span num_steps=50 with max_len=4"),
], ids=["over-steps", "second-over-steps", "below-span", "below-span-max-len"])
def test_budget_rules_are_checked_before_any_recording(tmp_path, capsys, no_recording, source, option, message):
    argv = ["calibrate", *source, *option, "--out", str(tmp_path / "o"), "--quiet"]
    assert cli.main(argv) == 2
    assert _one_error_line(capsys).startswith(message)


def test_budget_rules_of_a_saved_recording_name_its_steps(tmp_path, capsys, monkeypatch):
    """With --recording the step count is the file's: checked once it is loaded, before any calibration work."""
    flow = GaussianMixtureFlow(dim=4, components=2, seed=1)
    rec = record(flow, torch.randn(2, 4), shifted_sigmas(16).tolist(), progress=False)
    rec.save(tmp_path / "rec.pt")
    monkeypatch.setattr(cli, "calibrate", lambda *a, **k: pytest.fail("calibrated before the budgets were checked"))
    for budgets, extra, message in [
        (["20"], [], "--budget 20 (with the recording's 16 steps): must be an int with 2 <= budget <= num_steps=16"),
        (["5", "2"], ["--max-len", "8"],
         "--budget 2 (with the recording's 16 steps, --max-len 8): budget=2 cannot span num_steps=16"),
    ]:
        assert cli.main(["calibrate", "--recording", str(tmp_path / "rec.pt"), "--budget", *budgets, *extra,
                         "--out", str(tmp_path / "o")]) == 2
        assert _one_error_line(capsys).startswith(message)


@pytest.mark.parametrize("option", [["--model", "digits"], ["--flow", "gaussian-mixture", "--validate", "replay"],
                                    ["--flow", "gaussian-mixture", "--fit"]], ids=["model", "replay", "fit"])
def test_draws_where_no_real_runs_of_a_flow_choose_are_one_error_line(tmp_path, capsys, no_recording, option):
    argv = ["calibrate", *option, "--budget", "4", "--steps", "8", "--draws", "4", "--out", str(tmp_path / "o"),
            "--quiet"]
    assert cli.main(argv) == 2
    assert _one_error_line(capsys).startswith("--draws 4: new noise rows join real runs of --flow only")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option", ["draws", "refine"])
def test_draws_and_refine_reach_calibrate(tmp_path, capsys, monkeypatch, option):
    """--draws and --refine go to calibrate's draws and refine; without them calibrate's defaults (None) stand."""
    seen = []
    real = cli.calibrate

    def spy(*args, **kwargs):
        seen.append(kwargs.get(option, "absent"))
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "calibrate", spy)
    common = ["calibrate", "--flow", "gaussian-mixture", "--steps", "8", "--dim", "4", "--components", "2",
              "--inputs", "4", "--budget", "4", "--no-plot", "--quiet"]
    for extra, expected in (([f"--{option}", "6"], 6), ([], "absent")):
        out = tmp_path / str(expected)
        assert cli.main([*common, *extra, "--out", str(out)]) == 0, capsys.readouterr().err
        assert seen[-1] == expected and (out / "schedule-B4.json").exists()


def test_valid_numbers_still_run(tmp_path, capsys):
    """The checks pass every value the search accepts, at its bounds (--max-len 1 with a full budget)."""
    code = cli.main(["calibrate", "--flow", "gaussian-mixture", "--steps", "6", "--dim", "1", "--components", "1",
                     "--inputs", "1", "--seed", str(2**64 - 2), "--shift", "1", "--gamma", "0.5", "--max-len", "1",
                     "--budget", "6", "--out", str(tmp_path), "--no-plot", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert meancache.Schedule.load(tmp_path / "schedule-B6.json").compute_steps == tuple(range(6))
