#!/usr/bin/env python3
"""Every GPU figure of meancache from one prepared run on a bare GPU machine (`make gpu-check`).

Stages, in the order they run (each in subprocesses with its own timeout, all inside one time budget, so a hang in
one stage still leaves the others' results):

  env             GPU, driver, torch, Triton, nvcc, commit (tools/gpu_checks/env_info.py). No CUDA device: print
                  the plan and "no CUDA device: nothing measured", exit 0.
  build           meancache._C in place against the torch that is there (`python setup.py build_ext --inplace`),
                  TORCH_CUDA_ARCH_LIST of the visible GPU only, MAX_JOBS = the cores; timed. If setup.py fails,
                  torch's JIT builder (tools/gpu_checks/build_jit.py); if that fails too, the reason is recorded
                  and the run goes on with Triton and the reference.
  correctness     pytest: every op x backend (cuda, triton, torch) against the reference on the GPU
                  (tests/test_gpu_kernels.py, tests/test_ops.py, tests/test_weighted_step.py,
                  tests/test_backend.py, the GPU tests of tests/test_compile.py): fp16/bf16/fp32/fp64, bench
                  shapes, tails, misaligned storage, non-contiguous inputs, aliased ring slots, a 50-step loop in a
                  CUDA graph, a side stream, torch.compile(fullgraph=True) of a loop.
  sanitizer       compute-sanitizer --tool memcheck over tools/gpu_checks/sanitize_ops.py (each CUDA op once).
  bench-headline  bench/bench_ops.py for skip_step on the 720p video latent, bf16: every provider.
  e2e             FLUX.1 transformer at real size, random weights, bf16, 1024x1024, 50 steps: full vs B = 10/17/25
                  (tools/gpu_checks/e2e_flux.py). Skipped, with a line saying so, without diffusers.
  bench           the rest of bench/bench_ops.py (one pytest run per op, so a timeout loses one op's rows only).

Output: results.json, results.md (a section ready to paste into bench/RESULTS.md), gpu_check.log (every stage's
output) and bench_ops.json (pytest-benchmark) in $OUT when set, else bench/gpu-check/; then a one-screen summary
with pass/fail per check and the headline figures. Exit status: 0 when every check passed (targets missed do not
count as failures), 1 otherwise; 0 without a CUDA device (2 with --require-gpu).

--dry-run (no GPU needed; part of `make test` through tests/test_gpu_check.py) runs every stage's set-up instead:
environment probe, setup.py and the JIT builder's plan, pytest collection of every test and benchmark the run would
call (each selection must be non-empty), the sanitizer script on CPU, the end-to-end plan, and the output writing.

Example:
    $ python tools/gpu_check.py --dry-run --out /tmp/gpu-check     # anywhere: checks the script itself
    $ python tools/gpu_check.py                                     # on a GPU machine: everything, ~8 minutes
    $ python tools/gpu_check.py --stages env,build,correctness      # a subset
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from dataclasses import field

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Most wanted first: when the budget runs short, what is cut is the tail of the per-op benchmarks, after the
# headline case and the end-to-end figures.
STAGES = ("env", "build", "correctness", "sanitizer", "bench-headline", "e2e", "bench", "ring-cp")
# Seconds per stage at most; the run as a whole is also held to --budget. Guesses for an H200, not yet measured:
# env 10, build 60-120, correctness 60-150, sanitizer 30-60, bench-headline 20-40, e2e 60-90, bench 100-150; the
# stage times of a real run are in its results.json.
TIMEOUTS = {"env": 60, "build": 240, "correctness": 210, "sanitizer": 120, "bench-headline": 120, "e2e": 240,
            "bench": 240, "ring-cp": 240}
DEFAULT_BUDGET_S = 540  # the whole run: 9 minutes, inside one 10-minute device command
MIN_STAGE_S = 20  # a stage is not started with less time than this left
OUTPUT_RESERVE_S = 5  # kept back from the budget for writing the results
# Per test (with pytest-timeout, when installed): a test that hangs fails alone instead of taking its whole pytest
# run, and that run's report, down at the stage timeout. A bench case includes an Inductor compile.
TEST_TIMEOUT_S = 90
BENCH_CASE_TIMEOUT_S = 180

# One pytest run each, with a junit report each: a run killed at the stage timeout loses its own results only.
CORRECTNESS_RUNS = {
    "gpu-kernels": ("tests/test_gpu_kernels.py",),
    "ops": ("tests/test_ops.py", "tests/test_weighted_step.py"),
    "backend-compile": ("tests/test_backend.py",
                        "tests/test_compile.py::test_cuda_graph_capture_and_replay_of_a_sampling_loop",
                        "tests/test_compile.py::test_non_default_stream"),
}
BENCH_FILE = "bench/bench_ops.py"
# Each op id of bench/bench_ops.py, one pytest run each (`-k op`): no id may be a substring of another, or one run
# would also select the other's cases. The weighted_step rows are split three ways (published weights, 2- and
# 4-term extrapolation) for the same reason.
BENCH_OPS = ("skip_step", "compute_step", "estimate", "weighted_step_published", "weighted_step_e2",
             "weighted_step_e4")
PROVIDERS = ("torch_ref", "torch_compile", "triton", "cuda")
HEADLINE = {"op": "skip_step", "shape": "video-720p", "dtype": "bf16"}
# pytest ids of the headline cases: run by id, and left out of the per-op runs of stage `bench` with --deselect
HEADLINE_IDS = tuple(f"{BENCH_FILE}::test_op[skip_step-video-720p-bf16-{p}]" for p in PROVIDERS)
HEADLINE_SHAPE = "(1, 16, 33, 90, 160)"
# Targets of the kernels issue for the headline case, reported as met or missed (a miss is not a failed check).
TARGETS = {"copy_fraction": 0.85, "x_eager": 3.0, "x_compile": 1.0}
BACKEND_NAMES = ("cuda", "triton", "torch")
OUT_FILES = ("results.json", "results.md", "gpu_check.log", "bench_ops.json")


# ---------------------------------------------------------------------------------------------------------------
# Running commands
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One subprocess: its command, how it ended and where its output is."""

    label: str
    argv: list[str]
    status: str  # ok, failed, timeout, error
    rc: int | None
    seconds: float
    log: pathlib.Path

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


def run_command(label: str, argv: list[str], *, timeout: float, log: pathlib.Path, env: dict | None = None,
                cwd: pathlib.Path = ROOT) -> Run:
    """Run ``argv`` with stdout and stderr into ``log``; after ``timeout`` seconds kill its whole process group.

    The command gets a process group of its own, so pytest's workers, Inductor's compile workers and nvcc's children
    end with it: a hang cannot outlive its stage.

    Example:
        >>> import pathlib, sys, tempfile
        >>> log = pathlib.Path(tempfile.mkdtemp()) / "sleep.log"
        >>> run_command("sleep", [sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5, log=log).status
        'timeout'
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "w") as out:
        out.write(f"$ {shlex.join(argv)}\n")
        out.flush()
        try:
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            out.write(f"cannot start: {exc}\n")
            return Run(label, argv, "error", None, time.monotonic() - t0, log)
        try:
            rc = proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out.write(f"\n[gpu_check] killed after {timeout:.0f} s (stage timeout)\n")
            return Run(label, argv, "timeout", None, time.monotonic() - t0, log)
        except BaseException:  # Ctrl-C: take the children down too, then stop
            _kill_group(proc)
            raise
    return Run(label, argv, "ok" if rc == 0 else "failed", rc, time.monotonic() - t0, log)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------------------------------------------------------
# Parsing what the commands leave behind
# ---------------------------------------------------------------------------------------------------------------


def arch_list(capability: str | None) -> str | None:
    """TORCH_CUDA_ARCH_LIST for the visible GPU only: its compute capability, e.g. ``"9.0"``.

    Example:
        >>> arch_list("9.0"), arch_list(None)
        ('9.0', None)
    """
    if not capability or not re.fullmatch(r"\d+\.\d+", capability):
        return None
    return capability


def test_category(file: str, func: str) -> str:
    """The check a GPU test counts towards in the summary.

    Example:
        >>> test_category("tests/test_gpu_kernels.py", "test_cuda_graph_50_step_loop")
        'CUDA graph of a 50-step loop'
        >>> test_category("tests/test_ops.py", "test_odd_sizes")
        'ops vs reference'
    """
    if "cuda_graph" in func:
        return "CUDA graph of a 50-step loop" if "50" in func else "CUDA graph of a sampling loop"
    if "stream" in func:
        return "non-default stream"
    if "compile" in func:
        return "torch.compile(fullgraph=True) loop"
    if "test_backend" in file or "backend" in func:
        return "backend choice"
    if "sampling" in func or "loop" in func:
        return "sampling loop vs reference"
    return "ops vs reference"


def test_backend(test_id: str) -> str:
    """The backend a parametrised test ran on (a ``cuda``/``triton``/``torch`` part of its id), or ``-``.

    Example:
        >>> test_backend("test_real_latent_shapes[skip_step-flux-1024-fp32-triton]"), test_backend("test_x")
        ('triton', '-')
    """
    match = re.search(r"\[(.*)\]$", test_id)
    if match:
        for part in match.group(1).split("-"):
            if part in BACKEND_NAMES:
                return part
    return "-"


def parse_junit(path: pathlib.Path) -> dict:
    """Counts per (category, backend) and the failing test ids from a pytest ``--junitxml`` report.

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "r.xml"
        >>> _ = p.write_text('<testsuites><testsuite><testcase classname="tests.test_ops" '
        ...                  'name="test_odd_sizes[skip_step-one-fp32-cuda]"/></testsuite></testsuites>')
        >>> parse_junit(p)["groups"]
        [{'check': 'ops vs reference', 'backend': 'cuda', 'passed': 1, 'failed': 0, 'skipped': 0}]
    """
    root = ET.parse(path).getroot()
    groups: dict[tuple[str, str], dict] = {}
    failures = []
    for case in root.iter("testcase"):
        name = case.get("name", "")
        file = case.get("classname", "").replace(".", "/")
        func = name.split("[", 1)[0]
        key = (test_category(file, func), test_backend(name))
        group = groups.setdefault(key, {"check": key[0], "backend": key[1], "passed": 0, "failed": 0, "skipped": 0})
        if case.find("failure") is not None or case.find("error") is not None:
            group["failed"] += 1
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            message = (bad.get("message") or "").strip().splitlines()
            failures.append({"test": f"{file}::{name}", "message": message[0][:300] if message else ""})
        elif case.find("skipped") is not None:
            group["skipped"] += 1
        else:
            group["passed"] += 1
    ordered = sorted(groups.values(), key=lambda g: (g["check"], BACKEND_NAMES.index(g["backend"])
                                                     if g["backend"] in BACKEND_NAMES else 9))
    return {"groups": ordered, "failures": failures}


def collected_ids(output: str) -> list[str]:
    """The test ids listed by ``pytest --collect-only -q``.

    Example:
        >>> collected_ids("tests/test_ops.py::test_a[x]\\ntests/test_ops.py::test_b\\n\\n2 tests collected in 0.1s")
        ['tests/test_ops.py::test_a[x]', 'tests/test_ops.py::test_b']
    """
    return [line.strip() for line in output.splitlines() if "::" in line and not line.startswith(" ")]


def selected(ids: list[str], specs) -> list[str]:
    """The ids a pytest command line of ``specs`` (files, or file::test ids) runs.

    Example:
        >>> selected(["a.py::t[1]", "a.py::u", "b.py::t"], ["a.py::t", "b.py"])
        ['a.py::t[1]', 'b.py::t']
    """
    def hit(test_id: str, spec: str) -> bool:
        if "::" not in spec:
            return test_id.startswith(spec + "::")
        return test_id == spec or test_id.startswith(spec + "[")

    return [i for i in ids if any(hit(i, spec) for spec in specs)]


def bench_rows(benchmarks: list[dict]) -> list[dict]:
    """One row per bench_ops case from pytest-benchmark's JSON: op, shape, dtype, provider and the GPU figures.

    The id of a case is ``op-shape-dtype-provider``; shape ids contain dashes, so op and the last two parts are
    taken from the ends. Timings come from ``extra_info`` (CUDA-event medians), absent on CPU runs.

    Example:
        >>> bench_rows([{"param": "skip_step-video-720p-bf16-cuda", "extra_info": {"median_ms": 0.5, "gbps": 3000.0,
        ...             "copy_gbps": 4000.0, "fraction_of_copy": 0.75, "bytes": 1}}])[0]["shape"]
        'video-720p'
    """
    rows = []
    for bench in benchmarks:
        parts = str(bench.get("param", "")).split("-")
        if len(parts) < 4:
            continue
        info = bench.get("extra_info", {})
        rows.append({
            "op": parts[0], "shape": "-".join(parts[1:-2]), "dtype": parts[-2], "provider": parts[-1],
            "median_ms": info.get("median_ms"), "gbps": info.get("gbps"), "copy_gbps": info.get("copy_gbps"),
            "fraction_of_copy": info.get("fraction_of_copy"), "bytes": info.get("bytes"),
            "device": info.get("device"),
        })
    order = {p: i for i, p in enumerate(PROVIDERS)}
    rows.sort(key=lambda r: (BENCH_OPS.index(r["op"]) if r["op"] in BENCH_OPS else 9, r["shape"], r["dtype"],
                             order.get(r["provider"], 9)))
    return rows


def headline(rows: list[dict]) -> dict:
    """The headline case (skip_step, 720p video latent, bf16): per-provider figures, the fused kernel's ratios to
    eager and to torch.compile, and each target met or missed.

    The fused kernel is what the automatic backend choice runs on CUDA tensors: the CUDA extension when it was built,
    else Triton.

    Example:
        >>> rows = [dict(op="skip_step", shape="video-720p", dtype="bf16", provider=p, median_ms=ms, gbps=g,
        ...              copy_gbps=4000.0, fraction_of_copy=g / 4000.0)
        ...         for p, ms, g in [("torch_ref", 2.0, 900.0), ("torch_compile", 0.6, 3000.0), ("cuda", 0.5, 3600.0)]]
        >>> h = headline(rows)
        >>> h["fused"], h["x_eager"], h["targets"]["copy_fraction"]["met"]
        ('cuda', 4.0, True)
    """
    mine = {r["provider"]: r for r in rows if all(r.get(k) == v for k, v in HEADLINE.items())}
    timed = {p: r for p, r in mine.items() if r.get("median_ms")}
    result: dict = {"case": dict(HEADLINE, shape_tuple=HEADLINE_SHAPE), "providers": mine, "fused": None}
    fused = next((p for p in ("cuda", "triton") if p in timed), None)
    if fused is None:
        return result
    ms = timed[fused]["median_ms"]
    result["fused"] = fused
    result["copy_gbps"] = timed[fused].get("copy_gbps")
    result["gbps"] = timed[fused].get("gbps")
    result["copy_fraction"] = timed[fused].get("fraction_of_copy")
    result["x_eager"] = timed["torch_ref"]["median_ms"] / ms if "torch_ref" in timed else None
    result["x_compile"] = timed["torch_compile"]["median_ms"] / ms if "torch_compile" in timed else None
    result["targets"] = {
        name: {"target": goal, "value": result.get(name),
               "met": None if result.get(name) is None else result[name] >= goal}
        for name, goal in TARGETS.items()
    }
    return result


def sanitizer_errors(output: str) -> int | None:
    """The error count of compute-sanitizer's ``ERROR SUMMARY`` line, or None when it printed none.

    Example:
        >>> sanitizer_errors("========= ERROR SUMMARY: 0 errors"), sanitizer_errors("nothing")
        (0, None)
    """
    match = re.search(r"ERROR SUMMARY: (\d+) error", output)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Stage:
    """The record of one stage: what it ran, how it ended, its checks and data."""

    name: str
    status: str = "pending"  # passed, failed, timeout, skipped, dry-run, no-device
    seconds: float = 0.0
    reason: str = ""
    commands: list[str] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    data: dict = field(default_factory=dict)

    def check(self, name: str, status: str, detail: str = "") -> None:
        self.checks.append({"name": name, "status": status, "detail": detail})

    def as_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "seconds": round(self.seconds, 1), "reason": self.reason,
                "commands": self.commands, "checks": self.checks, **self.data}


class Context:
    """Shared state of a run: mode, interpreter, directories, the time budget and what earlier stages found."""

    def __init__(self, args, mode: str):
        self.mode = mode  # plan (no device: list commands), dry (CPU dry run), real
        self.python = args.python
        self.out_dir = args.out
        self.work = pathlib.Path(tempfile.mkdtemp(prefix="meancache-gpu-check-"))
        self.deadline = time.monotonic() + args.budget
        self.timeouts = dict(TIMEOUTS, **args.timeout)
        self.workers = args.workers
        self.env_info: dict = {}
        self.extension = False
        self.bench_ids: list[str] | None = None
        self.runs: list[Run] = []
        self.stage_deadline = self.deadline
        base = dict(os.environ)
        # The checkout first on the path: the tree's meancache (and its in-place meancache._C), not an installed one.
        base["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [base.get("PYTHONPATH")])])
        base["PYTHONUNBUFFERED"] = "1"
        if mode == "real":
            base.pop("TRITON_INTERPRET", None)  # a leftover 1 would run every Triton kernel on the CPU
            base.pop("MEANCACHE_BACKEND", None)  # the automatic choice is what is checked; tests force their own
        self.env = base

    def remaining(self) -> float:
        return self.deadline - OUTPUT_RESERVE_S - time.monotonic()

    def run(self, stage: Stage, label: str, argv: list[str], *, env: dict | None = None,
            timeout: float | None = None) -> Run:
        """Run one command of ``stage`` inside the stage's and the run's time left."""
        left = self.stage_deadline - time.monotonic()
        result = run_command(label, argv, timeout=min(timeout or left, left), log=self.work / "logs" / f"{label}.log",
                             env={**self.env, **(env or {})})
        self.runs.append(result)
        return result

    def py(self, *args: str) -> list[str]:
        return [self.python, *args]

    def pytest(self, *args: str, per_test: float | None = None) -> list[str]:
        """A pytest command line; ``per_test`` seconds per test when pytest-timeout is there to enforce it."""
        limit = [f"--timeout={per_test:.0f}"] if per_test and self.env_info.get("pytest_timeout") else []
        return [self.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *limit, *args]


def _record(stage: Stage, argv: list[str]) -> None:
    stage.commands.append(shlex.join(argv))


def stage_env(ctx: Context, stage: Stage) -> None:
    out = ctx.work / "env.json"
    argv = ctx.py("tools/gpu_checks/env_info.py", str(out))
    _record(stage, argv)
    run = ctx.run(stage, "env", argv)
    if run.status != "ok" or not out.is_file():
        stage.status, stage.reason = ("timeout" if run.status == "timeout" else "failed"), run.tail(5)
        return
    ctx.env_info = json.loads(out.read_text())
    info = ctx.env_info
    stage.data["env"] = info
    if info.get("cuda_available"):
        stage.check("CUDA device visible", "pass", f"{info.get('device_name')} (sm_{info.get('capability')})")
    else:
        why = info.get("torch_error") or info.get("cuda_error") or "torch.cuda.is_available() is False"
        stage.check("CUDA device visible", "skip" if ctx.mode != "real" else "fail", why)
    if ctx.mode == "dry":
        stage.status = "dry-run"
    else:
        stage.status = "passed" if info.get("cuda_available") else "no-device"


def _build_env(ctx: Context) -> dict:
    arch = arch_list(ctx.env_info.get("capability")) or "<compute capability of GPU 0>"
    # MEANCACHE_FORCE_CUDA_BUILD: a build that would quietly fall back to pure Python fails instead, with its reason.
    return {"TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(ctx.env_info.get("cpu_count") or os.cpu_count() or 1),
            "MEANCACHE_FORCE_CUDA_BUILD": "1", "MEANCACHE_SKIP_CUDA_BUILD": "0"}


VERIFY_EXTENSION = (
    "import meancache._C as c, torch; from meancache import _backend; "
    "state = _backend.available_backends()['cuda']; print('extension:', c.__file__); print('cuda backend:', state); "
    "assert _backend.select_backend(torch.randn(5, device='cuda')) == 'cuda', state"
)


def stage_build(ctx: Context, stage: Stage) -> None:
    env = _build_env(ctx)
    stage.data.update(arch_list=env["TORCH_CUDA_ARCH_LIST"], max_jobs=int(env["MAX_JOBS"]))
    setup = ctx.py("setup.py", "build_ext", "--inplace")
    jit = ctx.py("tools/gpu_checks/build_jit.py")
    env_words = " ".join(f"{k}={v}" for k, v in env.items())
    stage.commands += [f"{env_words} {shlex.join(setup)}", f"{env_words} {shlex.join(jit)}  (if setup.py fails)"]
    if ctx.mode == "plan":
        return
    if ctx.mode == "dry":
        # setup.py must still parse and read the project metadata; the JIT builder must find its sources.
        for label, argv, extra in (("build-setup-version", ctx.py("setup.py", "--version"),
                                    {"MEANCACHE_SKIP_CUDA_BUILD": "1"}),
                                   ("build-jit-plan", ctx.py("tools/gpu_checks/build_jit.py", "--dry-run"), {})):
            run = ctx.run(stage, label, argv, env=extra)
            stage.check(label, "pass" if run.status == "ok" else "fail", run.tail(1))
        stage.status = "dry-run" if all(c["status"] == "pass" for c in stage.checks) else "failed"
        return

    # A library left by an earlier build would hide a failed one; keep it, out of the import path.
    previous = sorted((ROOT / "meancache").glob("_C*.so"))
    if previous:
        keep = ROOT / "build" / "gpu-check-previous"
        keep.mkdir(parents=True, exist_ok=True)
        for path in previous:
            shutil.move(str(path), keep / path.name)
        stage.data["previous_library_moved_to"] = str(keep.relative_to(ROOT))
    for method, argv in (("setup.py", setup), ("jit", jit)):
        t0 = time.monotonic()
        run = ctx.run(stage, f"build-{method}", argv, env=env)
        verify = None
        if run.status == "ok":
            verify = ctx.run(stage, f"build-{method}-verify", ctx.py("-c", VERIFY_EXTENSION), timeout=60)
        ok = verify is not None and verify.status == "ok"
        detail = f"{run.seconds:.0f} s" if ok else (verify.tail(8) if verify is not None else run.tail(12))
        stage.check(f"build with {method}", "pass" if ok else "fail", detail)
        if ok:
            ctx.extension = True
            stage.data.update(method=method, build_seconds=round(time.monotonic() - t0, 1))
            break
        if run.status == "timeout" or ctx.stage_deadline - time.monotonic() < MIN_STAGE_S:
            break
    if ctx.extension:
        # The fallback passing after setup.py failed still leaves a failed check: setup.py is what users run.
        stage.status = "passed" if all(c["status"] == "pass" for c in stage.checks) else "failed"
    else:
        stage.status = "failed"
        stage.reason = "meancache._C was not built: the run goes on with Triton and the reference"


def stage_correctness(ctx: Context, stage: Stage) -> None:
    xdist = ["-n", str(ctx.workers)] if ctx.workers > 0 and ctx.env_info.get("xdist") else []
    runs = {}
    for label, tests in CORRECTNESS_RUNS.items():
        junit = ctx.work / f"correctness-{label}.xml"
        runs[label] = (junit, ctx.pytest(*tests, f"--junitxml={junit}", *xdist, per_test=TEST_TIMEOUT_S))
        _record(stage, runs[label][1])
    if ctx.mode == "plan":
        return
    if ctx.mode == "dry":
        # One collection of everything (a pytest start costs seconds), then each run's share of it.
        specs = [spec for tests in CORRECTNESS_RUNS.values() for spec in tests]
        run = ctx.run(stage, "correctness-collect", ctx.pytest(*specs, "--collect-only"))
        ids = collected_ids(run.text()) if run.status == "ok" else []
        for label, tests in CORRECTNESS_RUNS.items():
            count = len(selected(ids, tests))
            stage.check(f"collect {label}", "pass" if count else "fail",
                        f"{count} tests" if run.status == "ok" else run.tail(3))
        stage.data["collected"] = len(ids)
        stage.status = _status_from_checks(ctx, stage)
        return
    # GPU_CHECK_EXPECT_EXTENSION: tests/test_gpu_kernels.py then fails if the automatic choice is not the extension.
    env = {"GPU_CHECK_EXPECT_EXTENSION": "1" if ctx.extension else "0"}
    groups: dict = {}
    failures: list = []
    problems = []
    for label, (junit, argv) in runs.items():
        if ctx.stage_deadline - time.monotonic() < MIN_STAGE_S:
            problems.append(f"{label}: not run, out of time")
            continue
        run = ctx.run(stage, f"correctness-{label}", argv, env=env)
        if not junit.is_file():
            problems.append(f"{label}: {run.status}, no report\n{run.tail(10)}")
            continue
        if run.status == "timeout":
            problems.append(f"{label}: timeout")
        report = parse_junit(junit)
        failures += report["failures"]
        for g in report["groups"]:
            into = groups.setdefault((g["check"], g["backend"]), dict(g, passed=0, failed=0, skipped=0))
            for key in ("passed", "failed", "skipped"):
                into[key] += g[key]
    ordered = sorted(groups.values(), key=lambda g: (g["check"], _backend_rank(g["backend"])))
    stage.data.update(groups=ordered, failures=failures[:50])
    for check, status, detail in correctness_checks(ordered):
        stage.check(check, status, detail)
    for failure in failures[:5]:
        stage.check("failed: " + failure["test"].split("::")[-1][:60], "fail", failure["message"])
    if problems:
        stage.reason = "\n".join(problems)
        stage.status = "timeout" if any("timeout" in p or "out of time" in p for p in problems) else "failed"
    else:
        stage.status = "failed" if failures else "passed"


def correctness_checks(groups: list[dict]) -> list[tuple[str, str, str]]:
    """One (check, status, detail) per check, its backends side by side as passed/run (skips counted apart).

    Example:
        >>> correctness_checks([dict(check="ops vs reference", backend="cuda", passed=9, failed=1, skipped=0),
        ...                     dict(check="ops vs reference", backend="torch", passed=10, failed=0, skipped=2)])
        [('ops vs reference', 'fail', 'cuda 9/10, torch 10/10 +2 skipped')]
    """
    out = []
    for check in dict.fromkeys(g["check"] for g in groups):
        mine = [g for g in groups if g["check"] == check]
        parts = []
        for g in mine:
            part = f"{g['passed']}/{g['passed'] + g['failed']}" + (f" +{g['skipped']} skipped" if g["skipped"] else "")
            parts.append(part if g["backend"] == "-" else f"{g['backend']} {part}")
        failed = any(g["failed"] for g in mine)
        status = "fail" if failed else ("pass" if any(g["passed"] for g in mine) else "skip")
        out.append((check, status, ", ".join(parts)))
    return out


def _backend_rank(name: str) -> int:
    return BACKEND_NAMES.index(name) if name in BACKEND_NAMES else len(BACKEND_NAMES)


def stage_sanitizer(ctx: Context, stage: Stage) -> None:
    tool = ctx.env_info.get("compute_sanitizer")
    # The CUDA ops are what memcheck is for; without the extension the Triton kernels take their place.
    backends = "cuda" if ctx.extension or ctx.mode != "real" else "triton"
    script = ctx.py("tools/gpu_checks/sanitize_ops.py", "--backends", backends)
    argv = [tool or "compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "97", "--print-limit", "20",
            *script]
    stage.commands.append("PYTORCH_NO_CUDA_MEMORY_CACHING=1 " + shlex.join(argv))
    stage.data.update(tool=tool, backends=backends)
    if ctx.mode == "plan":
        return
    if ctx.mode == "dry":
        run = ctx.run(stage, "sanitizer-cpu", ctx.py("tools/gpu_checks/sanitize_ops.py", "--device", "cpu"))
        stage.check("sanitize_ops.py on CPU", "pass" if run.status == "ok" else "fail", run.tail(1))
        stage.check("compute-sanitizer found", "pass" if tool else "skip", tool or "not on this machine")
        stage.status = "dry-run" if run.status == "ok" else "failed"
        return
    if not tool:
        stage.status, stage.reason = "skipped", "compute-sanitizer not found (PATH, CUDA_HOME/bin, /usr/local/cuda/bin)"
        return
    # Without the caching allocator every tensor is its own cudaMalloc, so an access past its end is one memcheck
    # sees, instead of landing in a neighbour inside a cached block.
    run = ctx.run(stage, "sanitizer", argv, env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})
    text = run.text()
    errors = sanitizer_errors(text)
    found = re.search(rf"sanitize_ops: {backends}: (\d+) cases, (\d+) mismatches", text)
    stage.data.update(errors=errors, cases=int(found.group(1)) if found else None)
    ok = run.status == "ok" and errors == 0 and found is not None and found.group(2) == "0"
    detail = (f"{found.group(1)} cases, {found.group(2)} mismatches, " if found else "no case count, ") + \
        f"{errors if errors is not None else '?'} memcheck errors"
    stage.check(f"memcheck [{backends}]", "pass" if ok else "fail", detail if ok else detail + "\n" + run.tail(15))
    stage.status = "passed" if ok else ("timeout" if run.status == "timeout" else "failed")


def _bench_ids(ctx: Context, stage: Stage) -> list[str]:
    """Every case id of bench_ops.py, collected once per dry run (stages bench-headline and bench share it)."""
    if ctx.bench_ids is None:
        run = ctx.run(stage, "bench-collect", ctx.pytest(BENCH_FILE, "--collect-only"))
        ctx.bench_ids = collected_ids(run.text()) if run.status == "ok" else []
        if run.status != "ok":
            stage.check("collect bench_ops.py", "fail", run.tail(3))
    return ctx.bench_ids


def _bench(ctx: Context, stage: Stage, label: str, selection: list[str], expect: list[str],
           exclude: tuple = ()) -> list[dict]:
    """One pytest run of bench_ops.py; its rows, or nothing when it wrote no JSON. ``selection`` is the command
    line after the file; in a dry run ``expect`` (the ids it must select, by prefix) is checked against collection."""
    out = ctx.work / f"{label}.json"
    argv = ctx.pytest(*selection, f"--benchmark-json={out}", per_test=BENCH_CASE_TIMEOUT_S)
    _record(stage, argv)
    if ctx.mode == "plan":
        return []
    if ctx.mode == "dry":
        ids = _bench_ids(ctx, stage)
        found = [i for i in ids if any(i == e or i.startswith(e) for e in expect) and i not in exclude]
        stage.check(f"collect {label}", "pass" if found else "fail", f"{len(found)} cases")
        return []
    if ctx.stage_deadline - time.monotonic() < MIN_STAGE_S:
        stage.check(label, "timeout", "not run: out of time")
        return []
    run = ctx.run(stage, label, argv)
    if not out.is_file():
        stage.check(label, "timeout" if run.status == "timeout" else "fail", run.tail(12))
        return []
    benchmarks = json.loads(out.read_text()).get("benchmarks", [])
    stage.data.setdefault("benchmarks", []).extend(benchmarks)
    stage.check(label, "pass" if run.status == "ok" else "fail",
                f"{len(benchmarks)} cases" + ("" if run.status == "ok" else "\n" + run.tail(12)))
    return bench_rows(benchmarks)


def _status_from_checks(ctx: Context, stage: Stage) -> str:
    statuses = {c["status"] for c in stage.checks}
    if ctx.mode == "dry":
        return "failed" if "fail" in statuses else "dry-run"
    return "failed" if "fail" in statuses else ("timeout" if "timeout" in statuses else "passed")


def stage_bench_headline(ctx: Context, stage: Stage) -> None:
    rows = _bench(ctx, stage, "bench-headline", list(HEADLINE_IDS), expect=list(HEADLINE_IDS))
    if ctx.mode == "dry" and stage.checks[-1]["detail"] != f"{len(HEADLINE_IDS)} cases":
        stage.checks[-1]["status"] = "fail"  # every provider of the headline case must exist
    if ctx.mode == "plan":
        return
    if ctx.mode == "real":
        stage.data["rows"] = rows
        stage.data["headline"] = headline(rows)
    stage.status = _status_from_checks(ctx, stage)


def stage_bench(ctx: Context, stage: Stage) -> None:
    rows = []
    for op in BENCH_OPS:
        # -k by op: every id starts with it; the headline cases ran in their own stage
        deselect = [word for i in HEADLINE_IDS if i.startswith(f"{BENCH_FILE}::test_op[{op}-")
                    for word in ("--deselect", i)]
        rows += _bench(ctx, stage, f"bench-{op}", [BENCH_FILE, "-k", op, *deselect],
                       expect=[f"{BENCH_FILE}::test_op[{op}-"], exclude=HEADLINE_IDS)
    if ctx.mode == "plan":
        return
    stage.data["rows"] = rows
    stage.status = _status_from_checks(ctx, stage)


def _dry_check(ctx: Context, stage: Stage, check: str, argv: list[str], output: pathlib.Path | None = None) -> bool:
    """Dry run of a script stage: run ``argv`` (a plan or ``--help``) and record one check; True when it passed."""
    run = ctx.run(stage, check.replace(" ", "-"), argv)
    ok = run.status == "ok" and (output is None or output.is_file())
    stage.check(check, "pass" if ok else "fail", run.tail(1)[-120:])
    stage.status = "dry-run" if ok else "failed"
    return ok


def _without_diffusers(ctx: Context, stage: Stage, purpose: str) -> bool:
    """Skip ``stage`` with a line saying why when diffusers was not carried to the GPU machine."""
    if ctx.env_info.get("diffusers"):
        return False
    stage.status = "skipped"
    stage.reason = f"diffusers is not installed: carry its wheel in .whl/ to {purpose}"
    return True


def stage_e2e(ctx: Context, stage: Stage) -> None:
    out = ctx.work / "e2e.json"
    argv = ctx.py("tools/gpu_checks/e2e_flux.py", "--json", str(out))
    _record(stage, argv)
    if ctx.mode == "plan":
        return
    if ctx.mode == "dry":
        if _dry_check(ctx, stage, "e2e plan", [*argv, "--dry-run"], out):
            stage.data["e2e"] = json.loads(out.read_text())
        return
    if _without_diffusers(ctx, stage, "run FLUX end to end (docs/kernels.md, The GPU check)"):
        return
    run = ctx.run(stage, "e2e", argv)
    result = json.loads(out.read_text()) if out.is_file() else {"status": "failed", "reason": run.tail(10)}
    stage.data["e2e"] = result
    if result.get("status") == "ok" and run.status == "ok":
        stage.status = "passed"
        for row in result["rows"][1:]:
            stage.check(f"FLUX {row['label']}", "pass" if row["finite"] else "fail",
                        f"{row['speedup']:.2f}x of ideal {row['ideal_speedup']:.2f}x, {row['seconds']:.1f} s")
    else:
        stage.status = "timeout" if run.status == "timeout" else "failed"
        stage.reason = result.get("reason") or run.tail(10)


def stage_ring_cp(ctx: Context, stage: Stage) -> None:
    """diffusers' Ring attention (and Ulysses) under meancache on 2+ GPUs: tools/ring_cp_check.py, which skips
    itself with a line on fewer GPUs. The CPU tests cannot cover Ring (no CPU attention backend returns the LSE)."""
    out = ctx.work / "ring_cp.json"
    argv = ctx.py("tools/ring_cp_check.py", "--timeout", "200", "--json", str(out))
    _record(stage, argv)
    if ctx.mode == "plan":
        return
    if ctx.mode == "dry":
        _dry_check(ctx, stage, "ring-cp script parses", [*ctx.py("tools/ring_cp_check.py"), "--help"])
        return
    if _without_diffusers(ctx, stage, "run the Ring check"):
        return
    run = ctx.run(stage, "ring-cp", argv)
    result = json.loads(out.read_text()) if out.is_file() else {}
    stage.data["ring_cp"] = result
    if run.status == "ok" and "SKIP" in run.tail(5):
        stage.status = "skipped"
        stage.reason = run.tail(1).strip() or "fewer than 2 GPUs"
    else:
        stage.status = "passed" if run.status == "ok" else ("timeout" if run.status == "timeout" else "failed")
        if run.status != "ok":
            stage.reason = run.tail(10)


STAGE_FUNCTIONS = {"env": stage_env, "build": stage_build, "correctness": stage_correctness,
                   "sanitizer": stage_sanitizer, "bench-headline": stage_bench_headline, "e2e": stage_e2e,
                   "bench": stage_bench, "ring-cp": stage_ring_cp}


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------


def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


def render_markdown(results: dict) -> str:
    """results.json as a section ready to paste into bench/RESULTS.md (measured figures only; dashes elsewhere)."""
    env = results.get("env", {})
    stages = {s["name"]: s for s in results["stages"]}
    date = results["started"][:10]
    title = "GPU check (dry run: nothing measured)" if results["dry_run"] else f"GPU check on {env.get('device_name')}"
    lines = [f"## {title} (`make gpu-check`, {date})", ""]
    commit = env.get("commit") or "unknown (no .git and no GPU_CHECK_COMMIT)"
    dirty = " with local changes" if env.get("dirty") else ""
    lines += [
        f"Machine: {env.get('device_name') or 'no CUDA device'}"
        + (f" ({env.get('sm_count')} SMs, {env.get('memory_gib')} GiB, sm_{env.get('capability')})"
           if env.get("cuda_available") else "")
        + f", driver {env.get('driver') or '-'}, {env.get('cpu_count')} CPU cores; Python {env.get('python')}, "
          f"torch {env.get('torch')}, Triton {env.get('triton') or '-'}, nvcc {env.get('nvcc') or '-'}, "
          f"diffusers {env.get('diffusers') or 'not installed'}.",
        f"Code: commit {commit}{dirty}, source digest {env.get('source_digest')}. "
        f"Command: `{results['command']}`, {results['seconds']:.0f} s in all.",
        "",
    ]
    build = stages.get("build", {})
    if build.get("method"):
        lines += [f"Extension: `meancache._C` built in place with {build['method']} for "
                  f"TORCH_CUDA_ARCH_LIST={build.get('arch_list')}, MAX_JOBS={build.get('max_jobs')}, in "
                  f"{build.get('build_seconds')} s.", ""]
    elif build:
        reason = (build.get("reason") or "").strip()
        lines += [f"Extension: not built ({build.get('status')}){'; ' + reason if reason else ''}.", ""]
    lines += ["| stage | status | seconds | check | result |", "|---|---|---|---|---|"]
    for stage in results["stages"]:
        checks = stage["checks"] or [{"name": "", "status": "", "detail": ""}]
        for i, check in enumerate(checks):
            detail = _detail_line(check, 100).replace("|", "/")
            head = f"| {stage['name']} | {stage['status']} | {stage['seconds']:.0f} " if i == 0 else "| | | "
            lines.append(f"{head}| {check['name']} | {check['status']}{': ' + detail if detail else ''} |")
        if stage.get("reason") and stage["status"] in ("skipped", "failed", "timeout"):
            lines.append(f"| | | | reason | {stage['reason'].splitlines()[-1][:120]} |")

    head = results.get("headline") or {}
    lines += ["", f"### skip_step on the 720p video latent {HEADLINE_SHAPE}, bf16", ""]
    if head.get("fused"):
        lines.append(f"Device-to-device copy bandwidth in the same run: {_fmt(head.get('copy_gbps'), '.0f')} GB/s "
                     "(bytes read + written). Medians of CUDA-event timings (triton.testing.do_bench).")
        lines += ["", "| provider | median ms | GB/s | % of copy BW | speedup of the fused kernel |",
                  "|---|---|---|---|---|"]
        fused_ms = head["providers"][head["fused"]]["median_ms"]
        for provider in PROVIDERS:
            row = head["providers"].get(provider)
            if row is None:
                continue
            ratio = (row["median_ms"] / fused_ms) if row.get("median_ms") else None
            lines.append(f"| {provider} | {_fmt(row.get('median_ms'), '.4f')} | {_fmt(row.get('gbps'), '.0f')} | "
                         f"{_pct(row.get('fraction_of_copy'))} | {_fmt(ratio, '.2f', 'x')} |")
        t = head["targets"]
        lines += ["", f"Targets ({head['fused']}): at least 85 % of the copy bandwidth: "
                      f"{_met(t['copy_fraction'])} ({_pct(head.get('copy_fraction'))}); at least 3x eager: "
                      f"{_met(t['x_eager'])} ({_fmt(head.get('x_eager'), '.2f', 'x')}); no slower than "
                      f"torch.compile: {_met(t['x_compile'])} ({_fmt(head.get('x_compile'), '.2f', 'x')})."]
    else:
        lines.append("not measured")

    rows = results.get("bench") or []
    lines += ["", "### Every fused op (bench/bench_ops.py)", ""]
    if any(r.get("median_ms") for r in rows):
        lines += ["| op | shape | dtype | provider | median ms | GB/s | % of copy BW |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['provider']} | "
                         f"{_fmt(r.get('median_ms'), '.4f')} | {_fmt(r.get('gbps'), '.0f')} | "
                         f"{_pct(r.get('fraction_of_copy'))} |")
    else:
        lines.append("not measured")

    e2e = (stages.get("e2e") or {}).get("e2e") or {}
    lines += ["", "### End to end: FLUX.1-dev transformer, random weights, bf16, 1024x1024, 50 steps", ""]
    if e2e.get("status") == "ok":
        lines.append(f"Path: {e2e['path']} ({e2e.get('params', 0) / 1e9:.1f} B parameters, peak "
                     f"{e2e.get('peak_memory_gib')} GiB); one timed call per row after a warm-up.")
        lines += ["", "| run | transformer calls | seconds | speedup | ideal 50/B | of ideal |",
                  "|---|---|---|---|---|---|"]
        for row in e2e["rows"]:
            lines.append(f"| {row['label']} | {row['transformer_calls']} | {row['seconds']:.2f} | "
                         f"{row['speedup']:.2f}x | {row['ideal_speedup']:.2f}x | "
                         f"{_pct(row['speedup'] / row['ideal_speedup'])} |")
    else:
        e2e_stage = stages.get("e2e") or {}
        why = e2e_stage.get("reason") or e2e.get("reason") or e2e_stage.get("status") or "stage not run"
        lines.append(f"not measured: {why.strip().splitlines()[-1]}")
    return "\n".join(lines) + "\n"


def _detail_line(check: dict, width: int) -> str:
    """The line of a check's detail worth a table cell: the first, or for a failure the last (an error's message
    ends a log tail)."""
    lines = [line for line in (check.get("detail") or "").splitlines() if line.strip()]
    if not lines:
        return ""
    return (lines[-1] if check["status"] == "fail" else lines[0]).strip()[:width]


def _met(target: dict) -> str:
    return "not measured" if target["met"] is None else ("met" if target["met"] else "MISSED")


def summary_lines(results: dict) -> list[str]:
    """The one-screen summary printed at the end: a line per stage and check, then the headline figures."""
    env = results.get("env", {})
    mark = {"pass": "PASS", "fail": "FAIL", "skip": "skip", "timeout": "TIME"}
    lines = ["", "=" * 100,
             f"meancache gpu-check{' (DRY RUN: nothing measured)' if results['dry_run'] else ''}: "
             f"{env.get('device_name') or 'no CUDA device'} | torch {env.get('torch')} | triton {env.get('triton')} "
             f"| nvcc {env.get('nvcc')} | driver {env.get('driver')} | commit {(env.get('commit') or '?')[:12]}"]
    for stage in results["stages"]:
        lines.append(f"{stage['name']:<15} {stage['status'].upper():<8} {stage['seconds']:6.0f} s"
                     + (f"  {stage['reason'].splitlines()[-1][:70]}" if stage.get("reason") else ""))
        for check in stage["checks"]:
            lines.append(f"    {mark.get(check['status'], check['status']):<5} {check['name'][:38]:<38} "
                         f"{_detail_line(check, 55)}")
    head = results.get("headline") or {}
    if head.get("fused"):
        t = head["targets"]
        lines.append(f"skip_step, 720p video latent, bf16, {head['fused']}: {_fmt(head.get('gbps'), '.0f')} GB/s = "
                     f"{_pct(head.get('copy_fraction'))} of copy ({_met(t['copy_fraction'])}), "
                     f"{_fmt(head.get('x_eager'), '.2f', 'x')} eager ({_met(t['x_eager'])}), "
                     f"{_fmt(head.get('x_compile'), '.2f', 'x')} compile ({_met(t['x_compile'])})")
    else:
        lines.append("skip_step, 720p video latent, bf16: not measured")
    lines.append(f"{'ALL CHECKS PASSED' if results['passed'] else 'SOME CHECKS FAILED'} in {results['seconds']:.0f} s; "
                 f"results in {results['out_dir']}")
    lines.append("=" * 100)
    return lines


def write_outputs(ctx: Context, results: dict) -> None:
    out = ctx.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "results.md").write_text(render_markdown(results))
    with open(out / "gpu_check.log", "w") as log:
        for run in ctx.runs:
            log.write(f"\n{'=' * 30} {run.label}: {run.status} (rc {run.rc}) in {run.seconds:.1f} s {'=' * 30}\n")
            log.write(run.text())
    benchmarks = [b for s in results["stages"] for b in s.get("benchmarks", [])]
    if benchmarks:
        (out / "bench_ops.json").write_text(json.dumps({"benchmarks": benchmarks}, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def _timeouts(values: list[str]) -> dict:
    out = {}
    for value in values:
        name, _, seconds = value.partition("=")
        if name not in STAGES or not seconds.replace(".", "", 1).isdigit():
            raise argparse.ArgumentTypeError(
                f"--timeout {value!r}: use STAGE=SECONDS with STAGE in {', '.join(STAGES)}")
        out[name] = float(seconds)
    return out


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="run every stage's set-up on the CPU; measure nothing")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="output folder (default: $OUT when set, else bench/gpu-check)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--skip", default="", help="comma-separated stages to leave out")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole run")
    parser.add_argument("--timeout", action="append", default=[], metavar="STAGE=SECONDS",
                        help="override one stage's timeout (repeatable)")
    parser.add_argument("--workers", type=int, default=4,
                        help="pytest-xdist workers for the correctness stage when xdist is installed (0: none)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for every stage (default: this one)")
    parser.add_argument("--require-gpu", action="store_true",
                        help="exit 2 instead of 0 when no CUDA device is visible (for the GPU machine's command)")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.stages.split(",") if s.strip()]
    skipped = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = [s for s in [*chosen, *skipped] if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    # env always runs: every other stage reads what it found
    args.stages = [s for s in STAGES if (s in chosen and s not in skipped) or s == "env"]
    try:
        args.timeout = _timeouts(args.timeout)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if args.out is None:
        args.out = pathlib.Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "gpu-check"
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.monotonic()
    ctx = Context(args, "dry" if args.dry_run else "real")
    stages: list[Stage] = []
    try:
        for name in args.stages:
            stage = Stage(name)
            stages.append(stage)
            if name != "env" and ctx.remaining() < MIN_STAGE_S and ctx.mode == "real":
                stage.status, stage.reason = "skipped", f"time budget of {args.budget:.0f} s spent"
                continue
            ctx.stage_deadline = time.monotonic() + min(ctx.timeouts[name], ctx.remaining())
            s0 = time.monotonic()
            print(f"[gpu_check] {name} ...", flush=True)
            STAGE_FUNCTIONS[name](ctx, stage)
            stage.seconds = time.monotonic() - s0
            print(f"[gpu_check] {name}: {stage.status} in {stage.seconds:.0f} s", flush=True)
            if name == "env" and ctx.mode == "real" and not ctx.env_info.get("cuda_available"):
                return _no_device(ctx, args, stage) + (2 if args.require_gpu else 0)
        passed = all(s.status in ("passed", "skipped", "dry-run") for s in stages) and not any(
            c["status"] in ("fail", "timeout") for s in stages for c in s.checks)
        bench = [r for s in stages if s.name in ("bench-headline", "bench") for r in s.data.get("rows", [])]
        head = next((s.data["headline"] for s in stages if "headline" in s.data), None)
        results = {
            "format": "meancache.gpu_check", "version": 1, "dry_run": args.dry_run,
            "started": started.isoformat(timespec="seconds"), "seconds": round(time.monotonic() - t0, 1),
            "command": shlex.join(["python", "tools/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]),
            "out_dir": str(args.out), "stage_order": list(STAGES), "budget_s": args.budget,
            "env": ctx.env_info, "passed": passed, "headline": head, "bench": bench,
            "stages": [s.as_dict() for s in stages],
        }
        write_outputs(ctx, results)
        print("\n".join(summary_lines(results)))
        return 0 if passed else 1
    finally:
        shutil.rmtree(ctx.work, ignore_errors=True)


def _no_device(ctx: Context, args, env_stage: Stage) -> int:
    """Without a CUDA device: say what the run would do, measure nothing, write nothing, succeed (CI runs this)."""
    why = ctx.env_info.get("torch_error") or ctx.env_info.get("cuda_error") or env_stage.reason.strip() \
        or "torch.cuda.is_available() is False"
    print(f"[gpu_check] {why}")
    print(f"[gpu_check] on a GPU machine this run would do, within {args.budget:.0f} s, writing to {args.out}:")
    ctx.mode = "plan"
    for name in args.stages[1:]:
        stage = Stage(name)
        STAGE_FUNCTIONS[name](ctx, stage)
        print(f"  {name} (timeout {ctx.timeouts[name]:.0f} s)")
        for command in stage.commands:
            print(f"      {command}")
    print("no CUDA device: nothing measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
