"""`make gpu-check` (tools/gpu_check.py) without a GPU: the CPU dry run, the no-device exit, and the driver's logic.

The GPU run happens rarely, on a borrowed machine with minutes to spare, so everything about it that can go wrong
without a GPU is checked here on every `make test`: every stage's set-up in a dry run (interpreter, setup.py,
pytest collection of each test and benchmark selection, the sanitizer script, the end-to-end plan, and the files
written), the plain no-device run exiting 0 without writing anything, a hanging stage killed at its timeout while
the others still run and report, the time budget, the parsing of pytest and benchmark reports, and the FLUX
end-to-end script on a tiny transformer.
"""

from __future__ import annotations

import doctest
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.py"


def _load(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is being made
    spec.loader.exec_module(module)
    return module


gc = _load("meancache_tools_gpu_check", SCRIPT)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check-dry")
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    return done, out


def test_dry_run_passes_and_runs_every_stage(dry_run):
    done, out = dry_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["format"] == "meancache.gpu_check" and results["version"] == 1 and results["dry_run"] is True
    assert [s["name"] for s in results["stages"]] == list(gc.STAGES)
    assert results["passed"] is True
    for stage in results["stages"]:
        assert stage["status"] == "dry-run", stage
        assert stage["commands"], f"stage {stage['name']} lists no command it would run"
        assert stage["checks"], f"stage {stage['name']} checked nothing"
        assert all(c["status"] in ("pass", "skip") for c in stage["checks"]), stage["checks"]
        assert f"[gpu_check] {stage['name']}: dry-run" in done.stdout
    assert "DRY RUN: nothing measured" in done.stdout and "ALL CHECKS PASSED" in done.stdout


def test_dry_run_collects_what_the_gpu_run_would_call(dry_run):
    _, out = dry_run
    stages = {s["name"]: s for s in json.loads((out / "results.json").read_text())["stages"]}
    # every correctness run selects tests, and the GPU module is among them
    counts = {c["name"]: int(c["detail"].split()[0]) for c in stages["correctness"]["checks"]}
    assert set(counts) == {f"collect {label}" for label in gc.CORRECTNESS_RUNS}
    assert all(n > 0 for n in counts.values()), counts
    assert counts["collect gpu-kernels"] > 500
    assert any("tests/test_gpu_kernels.py" in c for c in stages["correctness"]["commands"])
    # the headline: one case per provider; the per-op runs: the rest of the 192 cases (6 ops: the 3 fused steps and
    # weighted_step with the published weights, 2 and 4 extrapolation terms)
    assert stages["bench-headline"]["checks"][0]["detail"] == f"{len(gc.PROVIDERS)} cases"
    per_op = [int(c["detail"].split()[0]) for c in stages["bench"]["checks"]]
    assert len(per_op) == len(gc.BENCH_OPS) and sum(per_op) + len(gc.PROVIDERS) == 192, per_op
    assert all("--benchmark-json=" in c for c in stages["bench"]["commands"])
    # the build would target the local GPU only, with the machine's cores
    build = stages["build"]
    assert all("setup.py --version" not in c for c in build["commands"])
    assert "build_ext --inplace" in build["commands"][0] and "TORCH_CUDA_ARCH_LIST=" in build["commands"][0]
    assert f"MAX_JOBS={os.cpu_count()}" in build["commands"][0]
    # memcheck over the CUDA ops, without the caching allocator
    assert stages["sanitizer"]["commands"][0].startswith("PYTORCH_NO_CUDA_MEMORY_CACHING=1 ")
    assert "--tool memcheck" in stages["sanitizer"]["commands"][0]
    plan = stages["e2e"]["e2e"]["plan"]
    assert (plan["size"], plan["steps"], plan["budgets"], plan["resolution"], plan["dtype"]) == \
        ("real", 50, [10, 17, 25], 1024, "bf16")
    assert plan["transformer"]["num_layers"] == 19 and plan["transformer"]["num_single_layers"] == 38


def test_dry_run_writes_results_files(dry_run):
    _, out = dry_run
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "results.json", "results.md"]
    results = json.loads((out / "results.json").read_text())
    assert results["env"]["torch"] == torch.__version__
    assert results["env"]["cuda_available"] is torch.cuda.is_available()
    md = (out / "results.md").read_text()
    assert md.startswith("## GPU check (dry run: nothing measured)")
    for heading in ("### skip_step on the 720p video latent (1, 16, 33, 90, 160), bf16", "### Every fused op",
                    "### End to end: FLUX.1-dev transformer"):
        assert heading in md
    assert "| stage | status | seconds | check | result |" in md
    log = (out / "gpu_check.log").read_text()
    for label in ("env", "build-setup-version", "correctness-collect", "sanitizer-cpu", "bench-collect", "e2e-plan"):
        assert f" {label}: ok " in log, label


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run on a machine without a GPU")
def test_without_a_gpu_it_prints_the_plan_and_exits_0(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--out", str(out)], cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "env-out")},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.rstrip().endswith("no CUDA device: nothing measured")
    for stage in gc.STAGES[1:]:
        assert re.search(rf"^  {re.escape(stage)} \(timeout \d+ s\)$", done.stdout, re.M), stage
    assert "setup.py build_ext --inplace" in done.stdout and "compute-sanitizer --tool memcheck" in done.stdout
    assert not out.exists() and not (tmp_path / "env-out").exists()  # nothing measured, nothing written


def test_makefile_target_needs_no_venv():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^\.PHONY:.*\bgpu-check\b", makefile, re.M)
    # no prerequisites: on a GPU machine the tree arrives without .venv and python3 runs the script
    rule = re.search(r"^gpu-check:(.*)\n\t(.*)$", makefile, re.M)
    assert rule and rule.group(1).strip() == "", rule and rule.group(0)
    assert "tools/gpu_check.sh" in rule.group(2)


# -- the driver's logic, with stand-in stages --------------------------------------------------------------------


def _fake_env(ctx, stage):
    ctx.env_info = {"cuda_available": True, "device_name": "Stand-in GPU", "capability": "9.0", "torch": "x",
                    "cpu_count": 2}
    stage.check("CUDA device visible", "pass")
    stage.status = "passed"


def _quick(ctx, stage):
    run = ctx.run(stage, f"{stage.name}-quick", [sys.executable, "-c", "print('fine')"])
    stage.check(f"{stage.name} ran", "pass" if run.status == "ok" else "fail")
    stage.status = "passed"


def _hang(ctx, stage):
    run = ctx.run(stage, "hang", [sys.executable, "-c", "import time; time.sleep(120)"])
    stage.check("hang", run.status)
    stage.status = run.status


def test_a_hanging_stage_is_killed_and_the_others_still_report(tmp_path, monkeypatch):
    fakes = {name: _quick for name in gc.STAGES}
    fakes.update(env=_fake_env, build=_hang)
    monkeypatch.setattr(gc, "STAGE_FUNCTIONS", fakes)
    t0 = time.monotonic()
    rc = gc.main(["--out", str(tmp_path), "--timeout", "build=2"])
    assert time.monotonic() - t0 < 60
    assert rc == 1
    results = json.loads((tmp_path / "results.json").read_text())
    stages = {s["name"]: s for s in results["stages"]}
    assert stages["build"]["status"] == "timeout" and stages["build"]["seconds"] < 30
    assert all(stages[n]["status"] == "passed" for n in gc.STAGES if n != "build")
    assert results["passed"] is False
    assert "| build | timeout |" in (tmp_path / "results.md").read_text()


def test_the_time_budget_skips_the_stages_it_cannot_fit(tmp_path, monkeypatch):
    fakes = {name: _quick for name in gc.STAGES}
    fakes.update(env=_fake_env, build=_hang)
    monkeypatch.setattr(gc, "STAGE_FUNCTIONS", fakes)
    monkeypatch.setattr(gc, "MIN_STAGE_S", 3)
    monkeypatch.setattr(gc, "OUTPUT_RESERVE_S", 0)
    gc.main(["--out", str(tmp_path), "--budget", "6", "--timeout", "build=30"])
    stages = {s["name"]: s for s in json.loads((tmp_path / "results.json").read_text())["stages"]}
    assert stages["build"]["status"] == "timeout" and stages["build"]["seconds"] < 10  # held to the budget
    for name in gc.STAGES[2:]:
        assert stages[name]["status"] == "skipped" and "budget" in stages[name]["reason"], stages[name]


def test_timeout_kills_the_whole_process_group(tmp_path):
    code = ("import subprocess, sys, time; "
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            "print(child.pid, flush=True); time.sleep(120)")
    run = gc.run_command("tree", [sys.executable, "-c", code], timeout=3, log=tmp_path / "tree.log")
    assert run.status == "timeout" and run.seconds < 20
    child = int(run.text().splitlines()[1])
    for _ in range(50):  # the orphaned grandchild is reaped by init shortly after the signal
        state = pathlib.Path(f"/proc/{child}/stat")
        if not state.exists() or state.read_text().split(")")[-1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {child} outlived its stage")


# -- reports -----------------------------------------------------------------------------------------------------

JUNIT = """<testsuites><testsuite>
<testcase classname="tests.test_gpu_kernels" name="test_tail_sizes[skip_step-7-fp16-cuda]"/>
<testcase classname="tests.test_gpu_kernels" name="test_tail_sizes[skip_step-7-fp16-triton]">
<failure message="bad&#10;second line"/></testcase>
<testcase classname="tests.test_gpu_kernels" name="test_cuda_graph_50_step_loop[fp32-cuda]"/>
<testcase classname="tests.test_gpu_kernels" name="test_compile_fullgraph_loop[torch]"><skipped/></testcase>
<testcase classname="tests.test_backend" name="test_available_backends_reports_every_backend_with_a_state"/>
<testcase classname="tests.test_compile" name="test_non_default_stream"><error message="boom"/></testcase>
</testsuite></testsuites>"""


def test_junit_report_is_grouped_by_check_and_backend(tmp_path):
    path = tmp_path / "report.xml"
    path.write_text(JUNIT)
    report = gc.parse_junit(path)
    groups = {(g["check"], g["backend"]): (g["passed"], g["failed"], g["skipped"]) for g in report["groups"]}
    assert groups == {
        ("ops vs reference", "cuda"): (1, 0, 0),
        ("ops vs reference", "triton"): (0, 1, 0),
        ("CUDA graph of a 50-step loop", "cuda"): (1, 0, 0),
        ("torch.compile(fullgraph=True) loop", "torch"): (0, 0, 1),
        ("backend choice", "-"): (1, 0, 0),
        ("non-default stream", "-"): (0, 1, 0),
    }
    assert [f["message"] for f in report["failures"]] == ["bad", "boom"]


def _bench_entry(op, shape, dtype, provider, ms, gbps, copy=4000.0):
    info = {"bytes": 1, "device": "Stand-in GPU"}
    if ms is not None:
        info.update(median_ms=ms, gbps=gbps, copy_gbps=copy, fraction_of_copy=gbps / copy)
    return {"param": f"{op}-{shape}-{dtype}-{provider}", "extra_info": info}


def test_headline_figures_and_targets():
    entries = [_bench_entry("skip_step", "video-720p", "bf16", p, ms, g) for p, ms, g in
               [("torch_ref", 1.8, 1000.0), ("torch_compile", 0.5, 3600.0), ("triton", 0.52, 3500.0),
                ("cuda", 0.45, 3560.0)]]
    entries.append(_bench_entry("compute_step", "flux-1024-packed", "fp32", "cuda", 0.01, 900.0))
    rows = gc.bench_rows(entries)
    assert [(r["op"], r["shape"], r["provider"]) for r in rows][:2] == [
        ("skip_step", "video-720p", "torch_ref"), ("skip_step", "video-720p", "torch_compile")]
    head = gc.headline(rows)
    assert head["fused"] == "cuda"
    assert head["x_eager"] == pytest.approx(4.0) and head["x_compile"] == pytest.approx(0.5 / 0.45)
    assert {k: v["met"] for k, v in head["targets"].items()} == {"copy_fraction": True, "x_eager": True,
                                                                 "x_compile": True}
    # without the extension the fused kernel is Triton's, and a slower-than-compile figure is a missed target
    no_cuda = gc.headline([r for r in rows if r["provider"] != "cuda"])
    assert no_cuda["fused"] == "triton" and no_cuda["targets"]["x_compile"]["met"] is False
    # CPU rows carry no timings: nothing to report
    assert gc.headline(gc.bench_rows([_bench_entry("skip_step", "video-720p", "bf16", "cuda", None, None)]))[
        "fused"] is None


def test_markdown_and_summary_of_a_measured_run():
    entries = [_bench_entry("skip_step", "video-720p", "bf16", p, ms, g) for p, ms, g in
               [("torch_ref", 1.2, 1000.0), ("torch_compile", 0.5, 3600.0), ("cuda", 0.45, 3560.0)]]
    rows = gc.bench_rows(entries)
    e2e = {"status": "ok", "path": "pipeline", "params": 11.9e9, "peak_memory_gib": 40.1, "rows": [
        {"label": "full", "transformer_calls": 50, "seconds": 14.0, "speedup": 1.0, "ideal_speedup": 1.0},
        {"label": "B=10", "transformer_calls": 10, "seconds": 2.9, "speedup": 4.83, "ideal_speedup": 5.0}]}
    results = {
        "dry_run": False, "started": "2026-12-01T10:00:00+00:00", "seconds": 470.0, "out_dir": "/out",
        "command": "python tools/gpu_check.py", "passed": True, "headline": gc.headline(rows), "bench": rows,
        "env": {"device_name": "NVIDIA H200", "cuda_available": True, "sm_count": 132, "memory_gib": 139.8,
                "capability": "9.0", "driver": "580.159.04", "torch": "2.11.0+cu130", "commit": "abc123"},
        "stages": [
            {"name": "build", "status": "passed", "seconds": 70.0, "reason": "", "commands": [],
             "checks": [{"name": "build with setup.py", "status": "pass", "detail": "70 s"}], "method": "setup.py",
             "arch_list": "9.0", "max_jobs": 16, "build_seconds": 70.0},
            {"name": "e2e", "status": "passed", "seconds": 80.0, "reason": "", "commands": [], "checks": [],
             "e2e": e2e},
        ],
    }
    md = gc.render_markdown(results)
    assert md.startswith("## GPU check on NVIDIA H200 (`make gpu-check`, 2026-12-01)")
    assert "TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16" in md
    assert "| cuda | 0.4500 | 3560 | 89 % | 1.00x |" in md and "| torch_ref | 1.2000 | 1000 | 25 % | 2.67x |" in md
    assert "at least 3x eager: MISSED (2.67x)" in md
    assert "| B=10 | 10 | 2.90 | 4.83x | 5.00x | 97 % |" in md
    summary = "\n".join(gc.summary_lines(results))
    assert "skip_step, 720p video latent, bf16, cuda: 3560 GB/s = 89 % of copy (met), 2.67x eager (MISSED), " \
           "1.11x compile (met)" in summary
    assert len(summary.splitlines()) <= 40  # one screen


def test_docstring_examples():
    assert doctest.testmod(gc, optionflags=doctest.ELLIPSIS).failed == 0


# -- the end-to-end script on a tiny transformer -----------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="needs diffusers")
@pytest.mark.parametrize("path", ["pipeline", "sampler"])
def test_e2e_script_on_a_tiny_flux(path, tmp_path):
    e2e = _load("meancache_tools_e2e_flux", ROOT / "tools" / "gpu_checks" / "e2e_flux.py")
    out = tmp_path / "e2e.json"
    rc = e2e.main(["--size", "tiny", "--device", "cpu", "--dtype", "fp32", "--steps", "6", "--budgets", "3",
                   "--path", path, "--json", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0 and result["status"] == "ok", result
    assert result["path"] == path
    assert [(r["label"], r["transformer_calls"]) for r in result["rows"]] == [("full", 6), ("B=3", 3)]
    assert all(r["finite"] and r["seconds"] > 0 for r in result["rows"])
    assert result["rows"][1]["ideal_speedup"] == 2.0 and 0 < result["rows"][1]["rel_diff_vs_full"] < 1
