"""``meancache`` command line: calibrate schedules and plot them.

    meancache calibrate --recording rec.pt --budget 10 17 25 --out schedules/
    meancache calibrate --flow gaussian-mixture --steps 50 --shift 3 --budget 10 --out schedules/
    meancache calibrate --model digits --steps 30 --budget 8 12 --out schedules/
    meancache calibrate --recording rec.pt --budget 10 --estimators meancache --out schedules/

Writes one schedule JSON per budget (``schedule-B<budget>.json``, readable with ``Schedule.load``) and one PNG
plot per budget (``schedule-B<budget>.png``): the per-step velocity change of the recorded trajectories
(instantaneous and average), the chosen compute steps with each segment's estimator (``K<window>`` published,
``e<order>`` extrapolate, ``p<order>`` predict), and the predicted deviation of each chosen segment.
``--estimators`` picks the estimator families searched (default all three: the joint search; ``meancache`` alone is
the search of the shipped presets).
``--model digits`` records the embedded digits pipeline (its packaged weights, no download) on its calibration
noise. Other pipelines are recorded from Python (``meancache.record(pipe, prompts, ...)``, then
``Recording.save``), since loading one needs its weights and text encoders.

A bad argument (a number out of its range, a budget the steps and ``--max-len`` cannot hold, an unusable path) is
one ``meancache calibrate: error: ...`` line on stderr naming the option, the value and the rule, and exit status
2, before anything is recorded.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import sys

import torch

from .calibrate import DEFAULT_GAMMA
from .calibrate import Recording
from .calibrate import calibrate
from .calibrate import record
from .calibration.joint import DEFAULT_ESTIMATORS
from .calibration.joint import _check_estimators
from .calibration.joint import schedule_costs
from .calibration.search import _check_budgets
from .calibration.search import _check_gamma
from .calibration.search import _check_max_len
from .estimators import ESTIMATORS
from .schedule import DEFAULT_MAX_SEGMENT
from .schedule import Schedule
from .schedule import _check_num_steps
from .sigmas import as_sigma_list
from .validation import is_int
from .validation import is_real

__all__ = ["main", "plot_schedule", "velocity_change"]


def velocity_change(rec: Recording, window: int = 4) -> tuple[list[float], list[float]]:
    """Per-step relative change of the instantaneous and of the window-average velocity, averaged over inputs.

    Instantaneous: ``||v_{i+1} - v_i|| / ||v_i||``. Average: the same ratio for the average velocity over the last
    ``window`` steps, ``u_i = (x_{i+1} - x_{i+1-w}) / (sigma_{i+1} - sigma_{i+1-w})`` with ``w = min(window, i+1)``
    (on an Euler trajectory the one-step average is the instantaneous velocity itself, so a window is needed to
    tell them apart). Zero-length windows count as no change.

    Example:
        >>> import torch
        >>> rec = Recording([1.0, 0.5, 0.0], torch.zeros(1, 3, 2), torch.ones(1, 2, 2))
        >>> velocity_change(rec)
        ([0.0], [0.0])
    """
    v = rec.velocities.double()
    x = rec.latents.double()
    dims = tuple(range(2, v.dim()))
    norm = torch.linalg.vector_norm  # over every latent dimension (Tensor.norm rejects more than two)
    inst = (norm(v[:, 1:] - v[:, :-1], dim=dims) / norm(v[:, :-1], dim=dims).clamp_min(1e-12)).mean(0)
    averages = []
    for i in range(rec.num_steps):
        j = max(0, i + 1 - window)
        span = rec.sigmas[i + 1] - rec.sigmas[j]
        averages.append((x[:, i + 1] - x[:, j]) / (span if span != 0 else 1.0))
    u = torch.stack(averages, 1)
    avg = (norm(u[:, 1:] - u[:, :-1], dim=dims) / norm(u[:, :-1], dim=dims).clamp_min(1e-12)).mean(0)
    return inst.tolist(), avg.tolist()


def plot_schedule(rec: Recording, schedule: Schedule, cost, path: str | pathlib.Path) -> None:
    """Write a PNG: velocity change per step, compute steps and each segment's estimator, predicted deviation per
    chosen segment.

    Args:
        rec: the recording the schedule was calibrated on.
        schedule: the chosen schedule (same number of steps as ``rec``).
        cost: the ``(N, N)`` segment cost table of :func:`meancache.calibrate.segment_costs` (read at each
            segment: right for a schedule of the published estimator with the table's best K), or None to price
            each segment at its own estimator and order (:func:`meancache.calibration.schedule_costs`).
        path: output file.

    Example:
        >>> import torch, tempfile, os
        >>> from meancache.calibrate import segment_costs
        >>> rec = record(lambda x, s: torch.sin(3 * x) - 1, torch.randn(2, 4), torch.linspace(1, 0, 9).tolist(),
        ...              progress=False)
        >>> out = os.path.join(tempfile.mkdtemp(), "s.png")
        >>> plot_schedule(rec, calibrate(rec, budget=4, max_len=4), None, out); os.path.getsize(out) > 1000
        True
        >>> published = calibrate(rec, budget=4, max_len=4, estimators=("meancache",))
        >>> plot_schedule(rec, published, segment_costs(rec, max_len=4)[0], out); os.path.getsize(out) > 1000
        True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inst, avg = velocity_change(rec)
    n = rec.num_steps
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    top.plot(range(1, n), inst, label="instantaneous velocity change", marker=".")
    top.plot(range(1, len(avg) + 1), avg, label="average velocity change (4-step window)", marker=".")
    top.set_ylabel("relative change per step")
    top.set_yscale("log")
    top.legend(loc="upper right")
    top.set_title(f"MeanCache schedule: budget {schedule.budget} of {n} steps")
    steps = schedule.compute_steps
    for c in steps:
        top.axvline(c, color="0.85", lw=0.8, zorder=0)
    own = schedule_costs(rec, schedule) if cost is None else None
    mids, devs = [], []
    for j, (a, b, label) in enumerate(zip(steps, steps[1:], schedule.labels)):
        mids.append((a + b) / 2)
        devs.append(0.0 if b - a == 1 else own[j] if own is not None else float(cost[a][b]))
        if b - a > 1:
            bottom.annotate(label, ((a + b) / 2, 0), textcoords="offset points", xytext=(0, 4), ha="center",
                            fontsize=7)
    bottom.bar(mids, devs, width=[b - a for a, b in zip(steps, steps[1:])], alpha=0.4, edgecolor="k",
               label="predicted deviation of the segment")
    bottom.scatter(steps, [0] * len(steps), marker="|", s=200, color="C3", label="compute steps", zorder=3)
    bottom.set_xlabel("step")
    bottom.set_ylabel("segment cost")
    bottom.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _flow_recording(args) -> Recording:
    from .flows import GaussianMixtureFlow
    from .flows import shifted_sigmas

    flow = GaussianMixtureFlow(dim=args.dim, components=args.components, seed=args.seed)
    noise = torch.randn(args.inputs, args.dim, generator=torch.Generator().manual_seed(args.seed + 1))
    return record(flow, noise, shifted_sigmas(args.steps, args.shift).tolist(), progress=not args.quiet)


def _digits_recording(args) -> Recording:
    # the embedded model is an example: imported only for this option
    from .examples.digits import load_pipeline
    from .examples.digits.calibration import calibration_inputs

    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=args.steps, progress=not args.quiet)
    if args.guidance is not None:
        kwargs["guidance_scale"] = args.guidance
    return record(pipe, calibration_inputs(args.inputs), **kwargs)


class _OptionError(ValueError):
    """A command-line value that breaks its rule: the message names the option, the value and the rule."""


# The seed of the noise is --seed + 1, and torch.Generator.manual_seed takes 0 .. 2**64 - 1.
_MAX_SEED = 2**64 - 2


def _library_rule(option: str, value, check, *args, given: str = ""):
    """``check(value, *args)``, a validator of the library, with its ValueError restated for ``option``: the
    library's ``name=value: rule`` lead becomes ``option value (given): rule``; the rule is the library's."""
    try:
        return check(value, *args)
    except ValueError as exc:
        rule = re.sub(r"^\w+=\S+: ", "", str(exc))
        raise _OptionError(f"{option} {value}{f' ({given})' if given else ''}: {rule}") from None


def _own_rule(option: str, value, holds: bool, rule: str) -> None:
    if not holds:
        raise _OptionError(f"{option} {value}: {rule}")


def _check_numbers(args) -> None:
    """Every numeric option against its rule, before any file is read or anything recorded.

    The rules the library states (max_len, gamma, the step count, budgets against steps and max_len) are checked
    by the library's own validators, so the command cannot drift from :func:`meancache.calibrate`. The budgets of
    a --recording are checked against its steps once it is loaded (:func:`_check_budget_options`).
    """
    _library_rule("--max-len", args.max_len, _check_max_len)
    _library_rule("--gamma", args.gamma, _check_gamma)
    _library_rule("--steps", args.steps, _check_num_steps)
    for b in args.budget:  # the lower bound now, whatever the source; the upper bound needs the step count
        _own_rule("--budget", b, is_int(b) and b >= 2, "must be an int >= 2 (the first and the last step)")
    # the options below feed the flow, the noise or the digits pipeline, whose checks come after minutes of work
    # or not at all (a negative --inputs ends in a torch traceback)
    _own_rule("--shift", args.shift, is_real(args.shift) and math.isfinite(args.shift) and args.shift > 0,
              "must be a finite number > 0 (the time shift of the sigma grid)")
    if args.flow is not None:
        from .flows import shifted_sigmas

        try:  # an extreme shift breaks the grid itself (1e-300: sigma_0 = 1e-300 / 0); the sampler's grid rule
            as_sigma_list(shifted_sigmas(args.steps, args.shift))
        except ValueError as exc:
            raise _OptionError(f"--shift {args.shift} (with --steps {args.steps}): the sigma grid breaks its rule: "
                               f"{exc}") from None
    _own_rule("--dim", args.dim, is_int(args.dim) and args.dim >= 1, "must be an int >= 1 (the latent size)")
    _own_rule("--components", args.components, is_int(args.components) and args.components >= 1,
              "must be an int >= 1 (the mixture components)")
    if args.inputs is not None:
        _own_rule("--inputs", args.inputs, is_int(args.inputs) and args.inputs >= 1,
                  "must be an int >= 1 (calibration inputs, or batches of the ten digits with --model)")
    _own_rule("--seed", args.seed, is_int(args.seed) and 0 <= args.seed <= _MAX_SEED,
              f"must be an int in 0..{_MAX_SEED} (the noise is seeded with --seed + 1, torch takes seeds below 2**64)")
    if args.guidance is not None:
        # the digits pipeline's own rule (DigitsPipeline.__call__), which it applies only after loading the model
        _own_rule("--guidance", args.guidance,
                  is_real(args.guidance) and math.isfinite(args.guidance) and args.guidance >= 1,
                  "must be a finite number >= 1 (1 = no guidance)")
    if args.recording is None:  # --flow and --model record exactly --steps steps: the budgets are checked now
        _check_budget_options(args.budget, args.steps, args.max_len, f"with --steps {args.steps}")


def _check_budget_options(budgets: list[int], num_steps: int, max_len: int, steps: str) -> None:
    """Each budget against the step count and --max-len, by the search's own rule (``_check_budgets``).

    ``steps`` says where ``num_steps`` came from, for the message."""
    for b in budgets:
        _library_rule("--budget", b, _check_budgets, num_steps, max_len, given=f"{steps}, --max-len {max_len}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``meancache`` console script."""
    parser = argparse.ArgumentParser(prog="meancache", description="MeanCache schedule tools")
    sub = parser.add_subparsers(dest="command", required=True)
    cal = sub.add_parser(
        "calibrate", help="search schedules (PSSP) from a recording, an analytic flow or the digits model"
    )
    src = cal.add_mutually_exclusive_group(required=True)
    src.add_argument("--recording", type=pathlib.Path, help="file written by Recording.save")
    src.add_argument("--flow", choices=["gaussian-mixture"], help="record an analytic flow instead")
    src.add_argument("--model", choices=["digits"], help="record the embedded digits model (meancache.examples.digits)")
    cal.add_argument("--budget", type=int, nargs="+", required=True, help="model evaluations, one or more")
    cal.add_argument("--out", type=pathlib.Path, required=True, help="output folder")
    cal.add_argument("--gamma", type=float, default=DEFAULT_GAMMA, help="peak-suppression exponent")
    cal.add_argument("--max-len", type=int, default=DEFAULT_MAX_SEGMENT, help="longest segment in steps")
    cal.add_argument("--estimators", default=",".join(DEFAULT_ESTIMATORS),
                     help="estimator families searched, comma-separated: meancache, extrapolate, predict (default all)")
    cal.add_argument("--steps", type=int, default=50, help="--flow, --model: sampler steps")
    cal.add_argument("--shift", type=float, default=3.0, help="--flow: time shift of the sigma grid")
    cal.add_argument("--dim", type=int, default=64, help="--flow: latent size")
    cal.add_argument("--components", type=int, default=16, help="--flow: mixture components")
    cal.add_argument("--inputs", type=int, default=None,
                     help="--flow: calibration inputs (default 16); --model: batches of the ten digits (default 4)")
    cal.add_argument("--guidance", type=float, default=None, help="--model: guidance scale (default: the model's)")
    cal.add_argument("--seed", type=int, default=0, help="--flow: seed of the flow and the noise")
    cal.add_argument("--no-plot", action="store_true", help="write the JSON schedules only")
    cal.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"meancache calibrate: error: {message}", file=sys.stderr)
        return 2

    # argument errors first, before minutes of recording or calibrating
    if args.out.exists() and not args.out.is_dir():
        return fail(f"--out {args.out}: exists and is not a folder; give a folder (it is created if missing)")
    if args.recording is not None and args.recording.is_dir():
        return fail(f"--recording {args.recording}: is a folder; give the file written by Recording.save")
    estimators = tuple(name.strip() for name in args.estimators.split(","))
    try:  # the names now, not after minutes of recording
        _check_estimators(estimators)
    except ValueError:
        return fail(f"--estimators {args.estimators}: must be a comma-separated list of {', '.join(ESTIMATORS)}")
    try:
        _check_numbers(args)
    except _OptionError as exc:
        return fail(str(exc))
    try:
        if args.recording is not None:
            rec = Recording.load(args.recording)
            _check_budget_options(args.budget, rec.num_steps, args.max_len,
                                  f"with the recording's {rec.num_steps} steps")
        elif args.model is not None:
            args.inputs = 4 if args.inputs is None else args.inputs
            rec = _digits_recording(args)
        else:
            args.inputs = 16 if args.inputs is None else args.inputs
            rec = _flow_recording(args)
        schedules = calibrate(rec, budget=list(args.budget), gamma=args.gamma, max_len=args.max_len,
                              estimators=estimators)
    except ValueError as exc:
        return fail(str(exc))
    except OSError as exc:  # missing or unreadable file: the OS reason and the path, not a traceback
        return fail(_os_message(exc))
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        for schedule in schedules:
            stem = args.out / f"schedule-B{schedule.budget}"
            schedule.save(stem.with_suffix(".json"))
            if not args.no_plot:  # each segment priced at its own estimator
                plot_schedule(rec, schedule, None, stem.with_suffix(".png"))
            print(json.dumps({"budget": schedule.budget, "json": str(stem.with_suffix(".json")),
                              "plot": None if args.no_plot else str(stem.with_suffix(".png")),
                              "pattern": schedule.pattern()[0]}))
    except OSError as exc:  # e.g. --out below a file, or not writable
        return fail(f"--out {args.out}: cannot write the results: {_os_message(exc)}")
    return 0


def _os_message(exc: OSError) -> str:
    """``path: reason`` of an OSError (``str(exc)`` adds an errno prefix and quotes)."""
    if exc.filename is None or exc.strerror is None:
        return str(exc)
    return f"{exc.filename}: {exc.strerror}"


if __name__ == "__main__":
    sys.exit(main())
