"""``meancache`` command line: calibrate schedules and plot them.

    meancache calibrate --recording rec.pt --budget 10 17 25 --out schedules/
    meancache calibrate --flow gaussian-mixture --steps 50 --shift 3 --budget 10 --out schedules/
    meancache calibrate --model digits --steps 30 --budget 8 12 --out schedules/
    meancache calibrate --recording rec.pt --budget 10 --estimators meancache --out schedules/
    meancache calibrate --pipeline black-forest-labs/FLUX.1-dev --prompts prompts.txt --steps 28 --guidance 3.5 \
        --height 1024 --width 1024 --budget 10 14 --device cuda --dtype bfloat16 --out flux-schedules/
    meancache calibrate --pipeline ./my-wan --call-args embeddings.pt --frames 81 --budget 17 --out wan-schedules/
    torchrun --nproc_per_node 8 -m meancache.cli calibrate --pipeline ./my-flux --prompts prompts.txt --budget 10 \
        --out flux-schedules/

Writes one schedule JSON per budget (``schedule-B<budget>.json``, readable with ``Schedule.load``) and one PNG
plot per budget (``schedule-B<budget>.png``): the per-step velocity change of the recorded trajectories
(instantaneous and average), the chosen compute steps with each segment's estimator (``K<window>`` published,
``e<order>`` extrapolate, ``p<order>`` predict), and the predicted deviation of each chosen segment.
``--estimators`` picks the estimator families searched (default all three: the joint search; ``meancache`` alone is
the search of the shipped presets).
``--model digits`` records the embedded digits pipeline (its packaged weights, no download) on its calibration
noise. ``--flow`` and ``--model`` write the recording they make too, as ``recording.pt`` beside the schedules.

``--validate`` says how each budget's candidates are scored (``calibrate``'s ``validate``): ``runs``, real
sampled runs of the model from every calibration input (B evaluations per input and candidate); ``replay``, folds
of the recording; ``auto`` (the default), ``runs`` for ``--flow`` and ``replay`` for the others, as the library
does. ``runs`` needs the model, so not with ``--recording``, and is not sharded, so not under ``torchrun``.
``--draws N`` sets the new noise rows in the real runs of ``--flow`` (``calibrate``'s ``draws``; without it
``calibrate`` picks them: up to 1,024 rows in all for a cheap flow, none for a large latent).
``--refine N`` sets the model evaluations per budget spent on local moves after the choice (``calibrate``'s
``refine``; without it ``calibrate`` picks: 3,000 where the runs hold 64 rows or more, none otherwise; 0: none).
``--fit`` also weighs the fitted candidates (``calibrate``'s ``fit=True``: per-step weights fitted to the
recording, the ``f`` labels).

``--pipeline ID_OR_PATH`` records any diffusers pipeline whose scheduler is ``FlowMatchEulerDiscreteScheduler``
(FLUX, Qwen-Image, Z-Image, SD3, HunyuanVideo, ...): ``DiffusionPipeline.from_pretrained`` of a saved folder
(offline: ``local_files_only``; components saved as null, such as a missing VAE, are passed as None) or of a Hub
id, in ``--dtype`` on ``--device``. One calibration input per line of ``--prompts`` (blank lines skipped), or per
dict of call arguments in ``--call-args`` (a list of dicts saved with ``torch.save``, for example precomputed
prompt embeddings; its tensors are moved to ``--device`` and its floating ones cast to ``--dtype``). Input ``i`` is
seeded with ``torch.Generator(device).manual_seed(--seed + i)``; ``--steps``, ``--guidance`` (``guidance_scale``),
``--height``, ``--width`` and ``--frames`` (``num_frames``) go to every call, each only when given and only to a
pipeline whose ``__call__`` takes it. Besides the schedules and plots it writes ``recording.pt`` (before the
search, so ``--recording OUT/recording.pt`` resumes from it) and ``report.json`` (the settings, and how each
budget's schedule was chosen: the ``report`` of :func:`meancache.calibrate`, schedules as ``Schedule.to_dict``).

Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank loads the pipeline on its own device (``--device cuda`` means
``cuda:LOCAL_RANK``), records inputs ``RANK, RANK + WORLD_SIZE, ...``
(:func:`meancache.calibration.distributed.record_sharded`) and sends them to rank 0 over a gloo group; rank 0
alone searches and writes ``--out``, giving the single-process schedules.

A bad argument (a number out of its range, a budget the steps and ``--max-len`` cannot hold, an unusable path, a
pipeline option the pipeline does not take, an unavailable device) is one ``meancache calibrate: error: ...`` line
on stderr naming the option, the value and the rule, and exit status 2, before anything is recorded (and, for
``--pipeline``, before any weight is loaded: only ``model_index.json`` and the scheduler's config are read).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import pathlib
import re
import sys

import torch

from .calibrate import DEFAULT_GAMMA
from .calibrate import SEARCH_ELEMENTS
from .calibrate import VALIDATE_MODES
from .calibrate import Recording
from .calibrate import calibrate
from .calibrate import record
from .calibration.joint import DEFAULT_ESTIMATORS
from .calibration.joint import _check_estimators
from .calibration.distributed import RankFailed
from .calibration.distributed import record_sharded
from .calibration.joint import schedule_costs
from .calibration.search import _check_budgets
from .calibration.search import _check_gamma
from .calibration.search import _check_max_len
from .estimators import ESTIMATORS
from .hooks import check_scheduler
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
    spans = [(a, b) for a, b, _, _ in schedule.segments]  # an open tail's segment ends at n
    for j, ((a, b), label) in enumerate(zip(spans, schedule.labels)):
        mids.append((a + b) / 2)
        devs.append(0.0 if b - a == 1 else own[j] if own is not None else float(cost[a][b]))
        if b - a > 1:
            bottom.annotate(label, ((a + b) / 2, 0), textcoords="offset points", xytext=(0, 4), ha="center",
                            fontsize=7)
    bottom.bar(mids, devs, width=[b - a for a, b in spans], alpha=0.4, edgecolor="k",
               label="predicted deviation of the segment")
    bottom.scatter(steps, [0] * len(steps), marker="|", s=200, color="C3", label="compute steps", zorder=3)
    bottom.set_xlabel("step")
    bottom.set_ylabel("segment cost")
    bottom.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _flow_target(args) -> tuple:
    """``(velocity_fn, inputs, calibrate keyword arguments)`` of --flow."""
    from .flows import GaussianMixtureFlow
    from .flows import shifted_sigmas

    flow = GaussianMixtureFlow(dim=args.dim, components=args.components, seed=args.seed)
    noise = torch.randn(args.inputs, args.dim, generator=torch.Generator().manual_seed(args.seed + 1))
    return flow, noise, {"sigmas": shifted_sigmas(args.steps, args.shift).tolist()}


def _digits_target(args) -> tuple:
    """``(pipeline, inputs, calibrate keyword arguments)`` of --model digits (each input carries its noise as
    ``latents``, so real runs start from the recorded noise again)."""
    # the embedded model is an example: imported only for this option
    from .examples.digits import load_pipeline
    from .examples.digits.calibration import calibration_inputs

    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=args.steps)
    if args.guidance is not None:
        kwargs["guidance_scale"] = args.guidance
    return pipe, calibration_inputs(args.inputs), kwargs


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
    if args.max_len is not None:  # None: as long as the budgets need (calibrate's default)
        _library_rule("--max-len", args.max_len, _check_max_len)
    if args.elements is not None:
        _own_rule("--elements", args.elements, is_int(args.elements) and args.elements >= 1,
                  "must be an int >= 1 (latent elements per input the search reads and the recording keeps)")
    if args.draws is not None:
        _own_rule("--draws", args.draws, is_int(args.draws) and args.draws >= 0,
                  "must be an int >= 0 (new noise rows for the real runs that choose)")
        _own_rule("--draws", args.draws, args.draws == 0 or (args.flow is not None and args.validate != "replay"
                                                              and not args.fit),
                  "new noise rows join real runs of --flow only (not with --validate replay or --fit)")
    if args.refine is not None:
        _own_rule("--refine", args.refine, is_int(args.refine) and args.refine >= 0,
                  "must be an int >= 0 (model evaluations per budget for local moves after the choice)")
    _library_rule("--gamma", args.gamma, _check_gamma)
    if args.steps is not None:  # None: --pipeline without --steps, the pipeline's default (_pipeline_plan)
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
    if args.guidance is not None and args.pipeline is not None:
        # pipelines differ in what a scale means (Z-Image: 0 is no guidance, SD3 and Wan: 1), none takes a negative
        _own_rule("--guidance", args.guidance,
                  is_real(args.guidance) and math.isfinite(args.guidance) and args.guidance >= 0,
                  "must be a finite number >= 0 (the pipeline's guidance_scale)")
    elif args.guidance is not None:
        # the digits pipeline's own rule (DigitsPipeline.__call__), which it applies only after loading the model
        _own_rule("--guidance", args.guidance,
                  is_real(args.guidance) and math.isfinite(args.guidance) and args.guidance >= 1,
                  "must be a finite number >= 1 (1 = no guidance)")
    for option, value, what in (("--height", args.height, "pixels"), ("--width", args.width, "pixels"),
                                ("--frames", args.frames, "video frames")):
        if value is not None:
            _own_rule(option, value, is_int(value) and value >= 1, f"must be an int >= 1 ({what})")
    if args.recording is None and args.pipeline is None:
        # --flow and --model record exactly --steps steps: the budgets are checked now (--pipeline: _pipeline_plan,
        # which knows the pipeline's default step count)
        _check_budget_options(args.budget, args.steps, args.max_len, f"with --steps {args.steps}")


def _check_budget_options(budgets: list[int], num_steps: int, max_len: int | None, steps: str) -> None:
    """Each budget against the step count and --max-len, by the search's own rule (``_check_budgets``).

    ``steps`` says where ``num_steps`` came from, for the message."""
    for b in budgets:
        if max_len is None:  # the search lengthens its segments as the budget needs: any budget 2..N
            _library_rule("--budget", b, _check_budgets, num_steps, num_steps - 1, given=steps)
        else:
            _library_rule("--budget", b, _check_budgets, num_steps, max_len, given=f"{steps}, --max-len {max_len}")


# -- --pipeline: a diffusers pipeline of the user's -------------------------------------------------------------------

#: ``--dtype`` names and the torch dtypes the pipeline is loaded in.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Options that only --pipeline reads (argparse dest names).
_PIPELINE_ONLY = ("prompts", "call_args", "height", "width", "frames", "dtype", "device")
#: The call argument each option sets on every input.
_OPTION_ARGUMENT = {"--steps": "num_inference_steps", "--guidance": "guidance_scale", "--height": "height",
                    "--width": "width", "--frames": "num_frames"}
#: Call arguments a --call-args dict may not set, and why: the command sets them on every input.
_COMMAND_SETS = {
    "generator": "the command seeds input i with --seed + i",
    "num_inference_steps": "give --steps (one recording needs one grid for every input)",
    "output_type": "the recording needs the latents (output_type='latent')",
}
#: A Hugging Face Hub model id (``owner/name``): what --pipeline may be when it is not an existing folder.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclasses.dataclass
class _PipelinePlan:
    """Everything --pipeline needs, checked before any weight is loaded."""

    source: str  # the id or folder as given
    local: bool  # an existing folder: loaded with local_files_only
    pipeline_class: type | None  # model_index.json's class; None for one diffusers does not export (checked on load)
    null_components: dict  # components saved as null (a pipeline saved without its VAE): passed as None
    device: torch.device  # this rank's device
    dtype: torch.dtype
    inputs: list  # per input, its own call arguments (CPU tensors, no generator)
    common: dict  # call arguments of every input
    needs: dict  # call argument -> "option value" that makes the command pass it (for the signature check)
    num_steps: int
    seed: int
    rank: int
    world_size: int


def _world() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` of this process: torch.distributed's when initialised, else torchrun's
    environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``), else ``(0, 0, 1)``."""
    import torch.distributed as dist

    values = {}
    for name, default in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)):
        text = os.environ.get(name)
        try:
            values[name] = default if text is None else int(text)
        except ValueError:
            raise _OptionError(f"environment {name}={text!r}: must be an int (set by torchrun)") from None
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), values["LOCAL_RANK"], dist.get_world_size()
    return values["RANK"], values["LOCAL_RANK"], values["WORLD_SIZE"]


def _check_device(text: str | None, local_rank: int, world_size: int) -> torch.device:
    """The device of this rank: ``--device`` parsed by torch and available here (default: cuda when available,
    else cpu); under torchrun a CUDA device without an index is ``cuda:LOCAL_RANK``."""
    if text is None:
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise _OptionError(f"--device {text}: not a torch device ({exc}); e.g. cpu, cuda, cuda:1, mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise _OptionError(f"--device {text}: CUDA is not available here (torch {torch.__version__}, CUDA build "
                               f"{torch.version.cuda}); use --device cpu")
        count = torch.cuda.device_count()
        if world_size > 1:
            # one process per GPU, as torchrun launches them: two ranks on one GPU would record the same model twice
            if device.index is not None:
                raise _OptionError(f"--device {text}: under torchrun each rank takes cuda:LOCAL_RANK; give --device "
                                   "cuda without an index")
            device = torch.device("cuda", local_rank)
        if device.index is not None and device.index >= count:
            raise _OptionError(f"--device {text}{f' (LOCAL_RANK {local_rank})' if world_size > 1 else ''}: this "
                               f"machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
        return device
    if world_size > 1:
        raise _OptionError(f"--device {text}: under torchrun meancache records on cpu or cuda")
    backend = getattr(torch.backends, device.type, None) if device.type == "mps" else getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise _OptionError(f"--device {text}: no {device.type} device is available here; use cpu or cuda")
    return device


def _readable_file(option: str, path: pathlib.Path, what: str) -> None:
    if not path.exists():
        raise _OptionError(f"--{option} {path}: no such file; give {what}")
    if not path.is_file():
        raise _OptionError(f"--{option} {path}: is not a file; give {what}")
    if not os.access(path, os.R_OK):
        raise _OptionError(f"--{option} {path}: is not readable")


def _read_prompts(path: pathlib.Path) -> list[str]:
    """The prompts of a --prompts file: one per line, surrounding white space and blank lines dropped."""
    what = "a UTF-8 text file with one prompt per line"
    _readable_file("prompts", path, what)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # -sig: a byte-order mark some editors write is not part of the first prompt
    except UnicodeDecodeError as exc:
        raise _OptionError(f"--prompts {path}: byte {exc.start} is not UTF-8 text ({exc.reason}); give {what}") \
            from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise _OptionError(f"--prompts {path}: holds no prompt (every line is blank); give {what}")
    return prompts


def _read_call_args(path: pathlib.Path) -> list[dict]:
    """The dicts of a --call-args file: a non-empty list of dicts with str keys, readable with weights_only."""
    what = "a list of dicts of call arguments saved with torch.save"
    _readable_file("call-args", path, what)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several unrelated types for an unreadable file
        raise _OptionError(f"--call-args {path}: not readable with torch.load(weights_only=True) "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); give {what}") \
            from None
    if not isinstance(data, (list, tuple)) or not data:
        raise _OptionError(f"--call-args {path}: holds a {type(data).__name__}{' (empty)' if not data else ''}; "
                           f"give {what} (one dict per calibration input)")
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not all(isinstance(k, str) for k in item):
            raise _OptionError(f"--call-args {path}: input {i} is a {type(item).__name__}; give {what} (str keys)")
    return [dict(item) for item in data]


def _call_parameters(cls) -> tuple[dict, bool]:
    """``(parameters, takes **kwargs)`` of ``cls.__call__`` (diffusers keeps the signature under its decorators)."""
    params = inspect.signature(cls.__call__).parameters
    return dict(params), any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _check_call(cls, needs: dict) -> None:
    """Every call argument the command would pass is one ``cls.__call__`` takes: ``needs`` maps each to the
    ``option value`` that makes the command pass it."""
    params, var_kw = _call_parameters(cls)
    if var_kw:
        return
    for argument, (option, value, hint) in needs.items():
        if argument not in params:
            raise _OptionError(f"{option} {value}: {cls.__name__}.__call__ takes no {argument} argument"
                               f"{f' ({hint})' if hint else ''}")


def _pipeline_plan(args) -> _PipelinePlan:
    """Check every --pipeline argument, reading only the pipeline's model_index.json and scheduler config."""
    rank, local_rank, world_size = _world()
    device = _check_device(args.device, local_rank, world_size)
    if args.dtype is not None and args.dtype not in DTYPES:
        raise _OptionError(f"--dtype {args.dtype}: must be one of {', '.join(DTYPES)} (the dtype the pipeline's "
                           "weights are loaded in)")
    # bfloat16 on a GPU (what FLUX, Qwen-Image and Wan ship in and need to fit), float32 elsewhere (half precision
    # on a CPU is slow and some ops lack it)
    dtype = DTYPES[args.dtype] if args.dtype is not None else (torch.bfloat16 if device.type == "cuda"
                                                               else torch.float32)
    source = args.pipeline
    path = pathlib.Path(source).expanduser()
    local = path.exists()
    if local and not path.is_dir():
        raise _OptionError(f"--pipeline {source}: is a file; give a folder written by save_pretrained or a Hub id "
                           "(owner/name)")
    if local and not (path / "model_index.json").is_file():
        raise _OptionError(f"--pipeline {source}: the folder has no model_index.json: not a pipeline written by "
                           "save_pretrained")
    if not local and not _HUB_ID.fullmatch(source):
        raise _OptionError(f"--pipeline {source}: no such folder, and not a Hub model id (owner/name)")
    import diffusers
    from diffusers import DiffusionPipeline
    from diffusers import FlowMatchEulerDiscreteScheduler

    where = str(path) if local else source
    try:
        config = DiffusionPipeline.load_config(where, local_files_only=local)
    except Exception as exc:  # noqa: BLE001 - hub and file errors come in many types; each is "cannot read it"
        raise _OptionError(f"--pipeline {source}: cannot read its model_index.json ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    name = config.get("_class_name")
    pipeline_class = getattr(diffusers, name, None) if isinstance(name, str) else None
    entry = config.get("scheduler")
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], str)):
        raise _OptionError(f"--pipeline {source}: model_index.json names no scheduler; meancache records pipelines "
                           "whose scheduler is FlowMatchEulerDiscreteScheduler")
    scheduler_class = getattr(diffusers, entry[1], None)
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, FlowMatchEulerDiscreteScheduler)):
        raise _OptionError(f"--pipeline {source}: its scheduler is {entry[1]}; meancache records pipelines whose "
                           "scheduler is FlowMatchEulerDiscreteScheduler (FLUX, Qwen-Image, Z-Image, SD3, "
                           "HunyuanVideo, ...)")
    try:  # the scheduler's own config (a small JSON): a stochastic one is refused now, not after loading
        check_scheduler(scheduler_class.from_pretrained(where, subfolder="scheduler", local_files_only=local))
    except ValueError as exc:
        raise _OptionError(f"--pipeline {source}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a missing or damaged config, in whatever type diffusers raises
        raise _OptionError(f"--pipeline {source}: cannot read its scheduler config ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    null_components = {k: None for k, v in config.items()
                       if not k.startswith("_") and isinstance(v, (list, tuple)) and list(v) == [None, None]}

    # the calibration inputs, and every call argument the command will pass, against the pipeline's __call__
    needs = {"generator": ("--seed", args.seed, "the command seeds each input"),
             "output_type": ("--pipeline", source, "the command records latents: output_type='latent'")}
    if args.prompts is not None:
        inputs = [{"prompt": p} for p in _read_prompts(args.prompts)]
        for component in ("text_encoder", "tokenizer"):
            if component in null_components:  # e.g. saved without its text encoders to run from embeddings
                raise _OptionError(f"--prompts {args.prompts}: the pipeline was saved without a {component}: it "
                                   "cannot encode prompts; give --call-args with precomputed prompt embeddings")
        needs["prompt"] = ("--prompts", args.prompts, "give --call-args with the arguments it takes, such as "
                                                      "prompt embeddings")
    else:
        inputs = _read_call_args(args.call_args)
    common = {}
    given = {"--steps": args.steps, "--guidance": args.guidance, "--height": args.height, "--width": args.width,
             "--frames": args.frames}
    for option, value in given.items():
        if value is not None:
            common[_OPTION_ARGUMENT[option]] = value
            needs[_OPTION_ARGUMENT[option]] = (option, value, "--frames is for video pipelines"
                                               if option == "--frames" else "")
    if args.call_args is not None:
        by_argument = {arg: option for option, arg in _OPTION_ARGUMENT.items() if given[option] is not None}
        for i, item in enumerate(inputs):
            for key in item:
                if key in _COMMAND_SETS:
                    raise _OptionError(f"--call-args {args.call_args}: input {i} sets {key}: {_COMMAND_SETS[key]}")
                if key in by_argument:
                    raise _OptionError(f"--call-args {args.call_args}: input {i} sets {key}, and so does "
                                       f"{by_argument[key]}: give it in one place")
                needs.setdefault(key, ("--call-args", f"{args.call_args} (input {i})", ""))
    needs.setdefault("num_inference_steps", ("--pipeline", source, "the command sets the step count of every input"))
    if pipeline_class is not None:
        _check_call(pipeline_class, needs)
    num_steps = args.steps
    if num_steps is None:
        default = None
        if pipeline_class is not None:
            param = _call_parameters(pipeline_class)[0].get("num_inference_steps")
            default = None if param is None else param.default
        if not is_int(default):
            raise _OptionError(f"--steps: not given, and {name or 'the pipeline'}.__call__ states no default "
                               "num_inference_steps (or diffusers does not export the class): give --steps")
        num_steps = default
        where_steps = f"with {name}'s default {num_steps} steps"
        _library_rule("--steps", num_steps, _check_num_steps, given=f"{name}'s default")
    else:
        where_steps = f"with --steps {num_steps}"
    common["num_inference_steps"] = num_steps
    _check_budget_options(args.budget, num_steps, args.max_len, where_steps)
    # input i is seeded with --seed + i, and torch.Generator.manual_seed takes 0 .. 2**64 - 1
    last = 2**64 - len(inputs)
    _own_rule("--seed", args.seed, args.seed <= last,
              f"must be <= {last} with {len(inputs)} inputs (input i is seeded with --seed + i, torch takes seeds "
              "below 2**64)")
    return _PipelinePlan(source=where, local=local, pipeline_class=pipeline_class, null_components=null_components,
                         device=device, dtype=dtype, inputs=inputs, common=common, needs=needs, num_steps=num_steps,
                         seed=args.seed, rank=rank, world_size=world_size)


def _load_pipeline(plan: _PipelinePlan):
    """``DiffusionPipeline.from_pretrained`` in the plan's dtype (offline for a folder), moved to its device."""
    import warnings

    import diffusers
    from diffusers import DiffusionPipeline

    # diffusers 0.x reads torch_dtype (and from about 0.40 warns that 1.0 will read only dtype)
    key = "dtype" if int(diffusers.__version__.split(".")[0]) >= 1 else "torch_dtype"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(plan.source, local_files_only=plan.local,
                                                 **{key: plan.dtype}, **plan.null_components)
    pipe.to(plan.device)
    pipe.set_progress_bar_config(disable=True)  # record() shows its own bar, over the inputs
    return pipe


def _on_device(value, device: torch.device, dtype: torch.dtype):
    """A --call-args value with its tensors on ``device`` and its floating tensors in ``dtype`` (pipelines hand
    precomputed prompt embeddings to the transformer as they are)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_on_device(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _on_device(v, device, dtype) for k, v in value.items()}
    return value


def _pipeline_inputs(plan: _PipelinePlan, pipe) -> list[dict]:
    """The plan's call arguments (this rank's share under torchrun), each with its seeded generator, after the
    checks of the pipeline that need it loaded."""
    if plan.pipeline_class is None:  # a class diffusers does not export: its __call__ is known only now
        _check_call(type(pipe), plan.needs)
    check_scheduler(pipe.scheduler)
    inputs = []
    for i, own in enumerate(plan.inputs):
        call = {k: _on_device(v, plan.device, plan.dtype) for k, v in own.items()}
        # seeded by the input's index, never by the rank: the same input gets the same noise in any sharding
        call["generator"] = torch.Generator(plan.device).manual_seed(plan.seed + i)
        inputs.append(call)
    return inputs


def _pipeline_recording(plan: _PipelinePlan, pipe, quiet: bool, elements: int | None = None) -> Recording | None:
    """Record the plan's inputs (this rank's share under torchrun; None on ranks other than 0)."""
    inputs = _pipeline_inputs(plan, pipe)
    return record_sharded(pipe, inputs, progress=not quiet and plan.rank == 0,
                          dst=0 if plan.world_size > 1 else None, elements=elements, **plan.common)


def _json_ready(value):
    """A report value as JSON: schedules as ``Schedule.to_dict``, non-finite floats as None."""
    if isinstance(value, Schedule):
        return value.to_dict()
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _json_ready(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return repr(value)  # a kind of entry added to calibrate's report later: kept readable rather than dropped


def _check_out(out: pathlib.Path) -> None:
    """--out is a folder, or can be created as one: its nearest existing ancestor is a writable folder."""
    if out.exists() and not out.is_dir():
        raise _OptionError(f"--out {out}: exists and is not a folder; give a folder (it is created if missing)")
    ancestor = out
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise _OptionError(f"--out {out}: cannot be created: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise _OptionError(f"--out {out}: cannot be written: {ancestor} is not writable")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``meancache`` console script."""
    parser = argparse.ArgumentParser(prog="meancache", description="MeanCache schedule tools")
    sub = parser.add_subparsers(dest="command", required=True)
    cal = sub.add_parser(
        "calibrate", help="search schedules (PSSP) from a recording, an analytic flow, the digits model or a diffusers "
                          "pipeline"
    )
    src = cal.add_mutually_exclusive_group(required=True)
    src.add_argument("--recording", type=pathlib.Path, help="file written by Recording.save")
    src.add_argument("--flow", choices=["gaussian-mixture"], help="record an analytic flow instead")
    src.add_argument("--model", choices=["digits"], help="record the embedded digits model (meancache.examples.digits)")
    src.add_argument("--pipeline", metavar="ID_OR_PATH",
                     help="record a flow-matching diffusers pipeline: a folder written by save_pretrained (read "
                          "offline) or a Hub id")
    cal.add_argument("--budget", type=int, nargs="+", required=True, help="model evaluations, one or more")
    cal.add_argument("--out", type=pathlib.Path, required=True, help="output folder")
    cal.add_argument("--gamma", type=float, default=DEFAULT_GAMMA, help="peak-suppression exponent")
    cal.add_argument("--max-len", type=int, default=None,
                     help="longest segment in steps (default: as long as the budgets need, at least "
                          f"{DEFAULT_MAX_SEGMENT})")
    cal.add_argument("--elements", type=int, default=SEARCH_ELEMENTS,
                     help="latent elements per input the search reads, and a --pipeline recording keeps (default "
                          f"{SEARCH_ELEMENTS}, a fixed seeded subset)")
    cal.add_argument("--estimators", default=",".join(DEFAULT_ESTIMATORS),
                     help="estimator families searched, comma-separated: meancache, extrapolate, predict (default all)")
    cal.add_argument("--steps", type=int, default=None,
                     help="--flow, --model, --pipeline: sampler steps (default 50; --pipeline: the pipeline's default)")
    cal.add_argument("--shift", type=float, default=3.0, help="--flow: time shift of the sigma grid")
    cal.add_argument("--dim", type=int, default=64, help="--flow: latent size")
    cal.add_argument("--components", type=int, default=16, help="--flow: mixture components")
    cal.add_argument("--inputs", type=int, default=None,
                     help="--flow: calibration inputs (default 16); --model: batches of the ten digits (default 4)")
    cal.add_argument("--guidance", type=float, default=None,
                     help="--model, --pipeline: guidance scale (guidance_scale; default: the model's)")
    cal.add_argument("--seed", type=int, default=0,
                     help="--flow: seed of the flow and the noise; --pipeline: input i is seeded with seed + i")
    cal.add_argument("--prompts", type=pathlib.Path, default=None, metavar="FILE",
                     help="--pipeline: UTF-8 text file, one prompt per line (blank lines skipped)")
    cal.add_argument("--call-args", type=pathlib.Path, default=None, metavar="FILE",
                     help="--pipeline, instead of --prompts: a list of dicts of call arguments saved with torch.save "
                          "(e.g. prompt_embeds), one per calibration input")
    cal.add_argument("--height", type=int, default=None, help="--pipeline: image or video height (pixels)")
    cal.add_argument("--width", type=int, default=None, help="--pipeline: image or video width (pixels)")
    cal.add_argument("--frames", type=int, default=None, help="--pipeline: video frames (num_frames)")
    cal.add_argument("--device", default=None,
                     help="--pipeline: torch device (default cuda when available, else cpu; under torchrun, cuda "
                          "means cuda:LOCAL_RANK)")
    cal.add_argument("--dtype", default=None,
                     help=f"--pipeline: {', '.join(DTYPES)} (default bfloat16 on cuda, float32 elsewhere)")
    cal.add_argument("--validate", choices=VALIDATE_MODES, default="auto",
                     help="how the candidates are scored (calibrate's validate): runs = real sampled runs of the model "
                          "from the calibration inputs (not with --recording, nor under torchrun); replay = folds of "
                          "the recording; auto (default) = runs for --flow, replay otherwise")
    cal.add_argument("--draws", type=int, default=None,
                     help="--flow: new noise rows that join the real runs choosing between the candidates "
                          "(calibrate's draws; default: up to 1,024 rows in all for a cheap flow, 0 for none)")
    cal.add_argument("--refine", type=int, default=None,
                     help="model evaluations per budget for local moves after the choice (calibrate's refine; "
                          "default: 3,000 where the runs hold 64 rows or more, as a cheap --flow's do, else none; "
                          "0: none)")
    cal.add_argument("--fit", action="store_true",
                     help="also weigh the fitted candidates (calibrate's fit=True): per-step weights fitted to the "
                          "recording, kept only when they beat the best other candidate on inputs they were not "
                          "fitted on")
    cal.add_argument("--no-plot", action="store_true", help="write the JSON schedules only")
    cal.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    def fail(message: str, status: int = 2) -> int:
        print(f"meancache calibrate: error: {message}", file=sys.stderr)
        return status

    # argument errors first, before minutes of recording or calibrating
    if args.out.exists() and not args.out.is_dir():
        return fail(f"--out {args.out}: exists and is not a folder; give a folder (it is created if missing)")
    if args.recording is not None and args.recording.is_dir():
        return fail(f"--recording {args.recording}: is a folder; give the file written by Recording.save")
    if args.recording is not None and args.validate == "runs":
        return fail(f"--validate runs with --recording {args.recording}: real runs need the model, and a recording "
                    "holds none; use --validate replay (or auto), or give the model (--flow, --model, --pipeline)")
    estimators = tuple(name.strip() for name in args.estimators.split(","))
    try:  # the names now, not after minutes of recording
        _check_estimators(estimators)
    except ValueError:
        return fail(f"--estimators {args.estimators}: must be a comma-separated list of {', '.join(ESTIMATORS)}")
    plan = None
    try:
        _check_sources(args)
        if args.steps is None and args.pipeline is None:
            args.steps = 50
        _check_numbers(args)
        _check_out(args.out)
        if args.pipeline is not None:
            plan = _pipeline_plan(args)
    except _OptionError as exc:
        return fail(str(exc))
    if plan is not None:
        return _calibrate_pipeline(args, plan, estimators, fail)
    search = dict(budget=list(args.budget), gamma=args.gamma, max_len=args.max_len, estimators=estimators,
                  elements=args.elements, validate=args.validate, fit=args.fit)
    if args.draws is not None:
        search["draws"] = args.draws
    if args.refine is not None:
        search["refine"] = args.refine
    try:
        if args.recording is not None:
            rec = Recording.load(args.recording)
            _check_budget_options(args.budget, rec.num_steps, args.max_len,
                                  f"with the recording's {rec.num_steps} steps")
            schedules = calibrate(rec, **search)
        else:
            if args.model is not None:
                args.inputs = 4 if args.inputs is None else args.inputs
                target, inputs, kwargs = _digits_target(args)
            else:
                args.inputs = 16 if args.inputs is None else args.inputs
                target, inputs, kwargs = _flow_target(args)
            try:
                args.out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                return fail(f"--out {args.out}: cannot write the results: {_os_message(exc)}")
            # the recording is kept beside the schedules: --recording searches it again without the model
            schedules = calibrate(target, inputs, **search, **kwargs, out=args.out / "recording.pt",
                                  progress=not args.quiet)
            rec = Recording.load(args.out / "recording.pt", mmap=True)
    except ValueError as exc:
        return fail(str(exc))
    except OSError as exc:  # missing or unreadable file: the OS reason and the path, not a traceback
        return fail(_os_message(exc))
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        _write_schedules(args, rec, schedules)
    except OSError as exc:  # e.g. --out below a file, or not writable
        return fail(f"--out {args.out}: cannot write the results: {_os_message(exc)}")
    return 0


def _check_sources(args) -> None:
    """Options that belong to one source, given with another, and the inputs --pipeline needs."""
    if args.pipeline is None:
        for dest in _PIPELINE_ONLY:
            if getattr(args, dest) is not None:
                option = "--" + dest.replace("_", "-")
                raise _OptionError(f"{option} {getattr(args, dest)}: applies to --pipeline only")
        return
    if args.inputs is not None:
        raise _OptionError(f"--inputs {args.inputs}: applies to --flow and --model; with --pipeline the inputs are the "
                           "lines of --prompts or the dicts of --call-args")
    if (args.prompts is None) == (args.call_args is None):
        raise _OptionError(f"--pipeline {args.pipeline}: give the calibration inputs as exactly one of --prompts FILE "
                           "(one prompt per line) or --call-args FILE (a list of dicts of call arguments)")


def _write_schedules(args, rec: Recording, schedules: list[Schedule]) -> None:
    """One JSON (and one plot) per budget into --out, and their summary lines on stdout."""
    for schedule in schedules:
        stem = args.out / f"schedule-B{schedule.budget}"
        schedule.save(stem.with_suffix(".json"))
        if not args.no_plot:  # each segment priced at its own estimator
            plot_schedule(rec, schedule, None, stem.with_suffix(".png"))
        print(json.dumps({"budget": schedule.budget, "json": str(stem.with_suffix(".json")),
                          "plot": None if args.no_plot else str(stem.with_suffix(".png")),
                          "pattern": schedule.pattern()[0]}))


def _calibrate_pipeline(args, plan: _PipelinePlan, estimators, fail) -> int:
    """Load, record (sharded under torchrun), save the recording, search on rank 0, write --out."""
    import torch.distributed as dist

    if args.validate == "runs" and plan.world_size > 1:
        return fail(f"--validate runs under torchrun (world size {plan.world_size}): the real runs of the candidates "
                    "are not sharded; run one process, or use --validate replay (or auto) to shard the recording")
    own_group = plan.world_size > 1 and not (dist.is_available() and dist.is_initialized())
    if own_group:
        # gloo: the recordings travel as CPU tensors, whatever device the model runs on
        dist.init_process_group("gloo")
    try:
        try:
            pipe = _load_pipeline(plan)
        except Exception as exc:  # noqa: BLE001 - from_pretrained fails in many types; each is "cannot load it"
            return fail(f"--pipeline {args.pipeline}: cannot load the pipeline ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})")
        report: list = []
        search = dict(budget=list(args.budget), gamma=args.gamma, max_len=args.max_len, estimators=estimators,
                      report=report, elements=args.elements, fit=args.fit)
        if args.refine is not None:
            search["refine"] = args.refine
        pipeline_class = type(pipe).__name__
        if args.validate == "runs":  # one process (checked above): record and run the candidates in one call
            try:
                inputs = _pipeline_inputs(plan, pipe)
                args.out.mkdir(parents=True, exist_ok=True)
                schedules = calibrate(pipe, inputs, validate="runs", out=args.out / "recording.pt",
                                      progress=not args.quiet, **search, **plan.common)
                rec = Recording.load(args.out / "recording.pt", mmap=True)
            except (_OptionError, ValueError) as exc:
                return fail(str(exc))
            except OSError as exc:
                return fail(f"--out {args.out}: cannot write the results: {_os_message(exc)}")
            del pipe
        else:
            try:
                rec = _pipeline_recording(plan, pipe, args.quiet, args.elements)
            except _OptionError as exc:
                return fail(str(exc))
            except RankFailed as exc:
                return fail(str(exc), status=1)
            except ValueError as exc:
                return fail(str(exc))
            if rec is None:  # another rank than 0: its share is with rank 0, which searches and writes
                return 0
            del pipe  # the search needs the recording only: the model's memory goes back first
            try:
                args.out.mkdir(parents=True, exist_ok=True)
                # written before the search: the recording is the expensive part, and --recording resumes from it
                rec.save(args.out / "recording.pt")
            except OSError as exc:
                return fail(f"--out {args.out}: cannot write the results: {_os_message(exc)}")
            try:
                schedules = calibrate(rec, validate=args.validate, **search)
            except ValueError as exc:
                return fail(str(exc))
        settings = {
            "pipeline": args.pipeline, "pipeline_class": pipeline_class,
            "prompts": None if args.prompts is None else str(args.prompts),
            "call_args": None if args.call_args is None else str(args.call_args),
            "inputs": rec.num_inputs, "steps": rec.num_steps, "guidance": args.guidance, "height": args.height,
            "width": args.width, "frames": args.frames, "seed": args.seed, "device": str(plan.device),
            "dtype": str(plan.dtype).replace("torch.", ""), "world_size": plan.world_size,
            "budgets": list(args.budget), "gamma": args.gamma, "max_len": args.max_len, "elements": args.elements,
            "estimators": list(estimators), "validate": args.validate, "fit": args.fit,
        }
        try:
            _write_schedules(args, rec, schedules)
            with open(args.out / "report.json", "w", encoding="utf-8") as f:
                json.dump({"settings": settings, "budgets": _json_ready(report)}, f, indent=1)
                f.write("\n")
        except OSError as exc:
            return fail(f"--out {args.out}: cannot write the results: {_os_message(exc)}")
        return 0
    finally:
        if own_group:
            dist.destroy_process_group()


def _os_message(exc: OSError) -> str:
    """``path: reason`` of an OSError (``str(exc)`` adds an errno prefix and quotes)."""
    if exc.filename is None or exc.strerror is None:
        return str(exc)
    return f"{exc.filename}: {exc.strerror}"


if __name__ == "__main__":
    sys.exit(main())
