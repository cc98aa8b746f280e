#!/usr/bin/env python3
"""meancache under diffusers' Ring (or Ulysses) context parallelism on 2+ GPUs: the check the CPU tests cannot make.

Ring attention merges the partial attention of each key/value chunk with its log-sum-exp, and none of diffusers'
context-parallel attention backends returns one on CPU (``native`` refuses ``return_lse``; ``_native_cudnn``,
``_native_flash``, ``flash`` and ``sage`` are CUDA kernels). So tests/test_context_parallel.py proves Ulysses on CPU
processes, and this script proves Ring where there are GPUs.

What it runs, on every rank, for a tiny FLUX and a tiny Qwen-Image (true CFG) pipeline (tests/cp_workers.py builds
them, with the same weights, prompts and noise on every rank), transformer in float16 (``--dtype``; the CUDA
attention kernels with a log-sum-exp take half precision only) with ``--backend``:

* before the process group exists, the single-GPU references: plain, schedule mode (budget B), online mode;
* then ``enable_parallelism(ContextParallelConfig(ring_degree=nproc))`` and the same runs, plus a plain run before
  ``meancache.accelerate`` and one after ``meancache.disable``.

Checks (rank 0 gathers every rank's records): the sequence is really split (each rank's output projection gets
its share of the tokens); every rank makes exactly B transformer calls per guidance branch in schedule mode; every
rank's latents, scheduler velocities and online decisions are bit-identical to rank 0's; the plain run after
``disable`` equals the one before, bit for bit; the accelerated CP latents are within ``--tol`` of the single-GPU
accelerated run (half-precision attention: the ring's chunked softmax rounds differently) and the plain CP run is
too, and ``--tol`` is below half the cache's own effect (the accelerated vs the plain single-GPU run), so the
comparison can tell an accelerated run from a plain one. Whether online mode took the single-GPU decisions is
reported, not required (a half-precision rounding difference may move a measure across a threshold).

Usage (the launcher starts ``torch.distributed.run`` itself, with a timeout, and skips with exit status 0 and a
``SKIP`` line when there are fewer GPUs than ``--nproc``):

    python tools/ring_cp_check.py                          # Ring, 2 GPUs, nccl, _native_cudnn, float16
    python tools/ring_cp_check.py --backend _native_flash
    python tools/ring_cp_check.py --mode ulysses           # the same checks with Ulysses on GPUs
    python tools/ring_cp_check.py --device cpu --mode ulysses   # self-test of this script on CPU (gloo, float32)

``--json PATH`` writes the records and verdicts. Exit status: 0 when every check passed (or skipped), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
WORKER_FLAG = "MEANCACHE_RING_CP_WORKER"
MODELS = ("flux", "qwen-image")
CALLS_PER_STEP = {"flux": 1, "qwen-image": 2}
LSE_BACKENDS_ON_CUDA = ("_native_cudnn", "_native_flash", "flash")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("ring", "ulysses"), default="ring")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--nproc", type=int, default=2, help="ranks (GPUs); the ring or Ulysses degree")
    p.add_argument("--backend", default=None,
                   help="diffusers attention backend (default: _native_cudnn on cuda, native on cpu)")
    p.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16", help="transformer dtype on cuda")
    p.add_argument("--tol", type=float, default=None,
                   help="largest relative difference from the single-device run (default 5e-3 on cuda, 1e-5 on cpu)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole launch")
    p.add_argument("--json", default=None, help="write records and verdicts here")
    args = p.parse_args(argv)
    if args.backend is None:
        args.backend = "_native_cudnn" if args.device == "cuda" else "native"
    if args.tol is None:
        args.tol = 5e-3 if args.device == "cuda" else 1e-5
    if args.mode == "ring" and args.device == "cpu":
        p.error("ring attention needs a backend that returns the log-sum-exp; none of diffusers' runs on CPU")
    if args.mode == "ring" and args.device == "cuda" and args.backend not in LSE_BACKENDS_ON_CUDA:
        p.error(f"--backend {args.backend} does not return the log-sum-exp ring attention needs: "
                f"use one of {', '.join(LSE_BACKENDS_ON_CUDA)}")
    return args


# --------------------------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------------------------


def launch(args, argv) -> int:
    import torch

    if args.device == "cuda":
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if found < args.nproc:
            print(f"SKIP: {args.mode} context parallelism check needs {args.nproc} GPUs, found {found}")
            return 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           str(pathlib.Path(__file__).resolve()), *argv]
    env = {**os.environ, WORKER_FLAG: "1", "OMP_NUM_THREADS": "1"}
    print("+ " + " ".join(cmd), flush=True)
    t0 = time.monotonic()
    # own session, so a timeout ends the launcher and every rank it started, and nothing else
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True)
    try:
        rc = proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        print(f"FAIL: the ranks did not finish within {args.timeout:.0f} s")
        return 1
    print(f"ranks finished in {time.monotonic() - t0:.1f} s with exit status {rc}")
    return 0 if rc == 0 else 1


# --------------------------------------------------------------------------------------------------------------
# one rank
# --------------------------------------------------------------------------------------------------------------


def _to(pipe, kw, device, dtype):
    """Pipeline and float call arguments on the rank's device and dtype (masks and generators stay as they are)."""
    import torch

    pipe.to(device)
    if pipe.transformer.dtype != dtype:
        pipe.transformer.to(dtype)
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, dtype) if v.is_floating_point() else v.to(device)
        out[k] = v
    return pipe, out


def _records(args, name, device, dtype, parallel: bool) -> dict:
    import cp_workers
    import meancache
    import torch

    pipe, kw, info = cp_workers.make_case(name)
    pipe, kw = _to(pipe, kw, device, dtype)
    pipe.transformer.set_attention_backend(args.backend)
    if parallel:
        from diffusers import ContextParallelConfig

        degree = {"ring_degree": args.nproc} if args.mode == "ring" else {"ulysses_degree": args.nproc}
        if args.device == "cpu":
            with cp_workers.one_accelerator_reported():  # see its docstring: diffusers divides by the GPU count
                pipe.transformer.enable_parallelism(config=ContextParallelConfig(**degree))
        else:
            pipe.transformer.enable_parallelism(config=ContextParallelConfig(**degree))
    probe = cp_workers.Probe(pipe)
    rec = {}
    with torch.no_grad():
        rec["before"] = cp_workers.sampling_record(pipe, kw, info, probe, accelerated=False)
        meancache.accelerate(pipe, budget=cp_workers.BUDGET)
        rec["schedule"] = cp_workers.sampling_record(pipe, kw, info, probe)
        meancache.disable(pipe)
        rec["plain"] = cp_workers.sampling_record(pipe, kw, info, probe, accelerated=False)
        meancache.accelerate(pipe, budget=cp_workers.ONLINE_BUDGET, mode="online",
                             tolerance=cp_workers.ONLINE_TOLERANCE)
        rec["online"] = cp_workers.sampling_record(pipe, kw, info, probe)
    return rec


def _rel(a, b) -> float:
    import numpy as np

    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _verdicts(args, single: dict, per_rank: list) -> list[tuple[str, bool, str]]:
    import cp_workers
    import numpy as np

    checks = []

    def check(label, ok, detail=""):
        checks.append((label, bool(ok), detail))

    r0 = per_rank[0]
    for name in MODELS:
        cps = CALLS_PER_STEP[name]
        for rank, rec in enumerate(per_rank):
            rr = rec[name]
            check(f"{name} rank {rank}: schedule mode makes B={cp_workers.BUDGET} calls per branch",
                  rr["schedule"]["calls"] == cp_workers.BUDGET * cps, f"{rr['schedule']['calls']} calls")
            check(f"{name} rank {rank}: plain run after disable equals the one before, bit for bit",
                  np.array_equal(rr["plain"]["latents"], rr["before"]["latents"])
                  and rr["plain"]["calls"] == cp_workers.STEPS * cps)
            if rank == 0:
                continue
            for mode in ("before", "schedule", "plain", "online"):
                same = np.array_equal(rr[mode]["latents"], r0[name][mode]["latents"]) and len(
                    rr[mode]["velocities"]) == len(r0[name][mode]["velocities"]) and all(
                    np.array_equal(a, b) for a, b in zip(rr[mode]["velocities"], r0[name][mode]["velocities"]))
                check(f"{name} rank {rank}: {mode} latents and velocities identical to rank 0", same)
            check(f"{name} rank {rank}: online decisions identical to rank 0",
                  rr["online"]["compute_steps"] == r0[name]["online"]["compute_steps"],
                  str(rr["online"]["compute_steps"]))
        whole = single[name]["before"]["tokens"]
        check(f"{name}: every rank's output projection sees 1/{args.nproc} of the sequence (CP is really on)",
              all(rec[name][mode]["tokens"] == [whole[0] // args.nproc] for rec in per_rank for mode in rec[name])
              and len(whole) == 1 and whole[0] % args.nproc == 0, f"single {whole}")
        for mode in ("before", "schedule"):
            d = _rel(r0[name][mode]["latents"], single[name][mode]["latents"])
            check(f"{name}: {mode} CP run within {args.tol:g} of the single-device run", d <= args.tol, f"rel {d:.2e}")
        same_online = r0[name]["online"]["compute_steps"] == single[name]["online"]["compute_steps"]
        checks.append((f"{name}: online decisions {'equal' if same_online else 'DIFFER from'} the single-device "
                       f"run's (reported only)", True,
                       f"CP {r0[name]['online']['compute_steps']}, single {single[name]['online']['compute_steps']}"))
        effect = _rel(single[name]["schedule"]["latents"], single[name]["before"]["latents"])
        check(f"{name}: tolerance below half the cache's own effect (else the comparison proves nothing)",
              args.tol < effect / 2, f"effect rel {effect:.2e}")
    return checks


def worker(args) -> int:
    sys.path.insert(0, str(TESTS))
    import torch
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if args.device == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dtype, pg = (torch.float16 if args.dtype == "fp16" else torch.bfloat16), "nccl"
    else:
        device, dtype, pg = torch.device("cpu"), torch.float32, "gloo"
    torch.set_num_threads(1)

    # references first, while no process group exists (online mode would otherwise all-reduce them)
    single = {name: _records(args, name, device, dtype, parallel=False) for name in MODELS}
    dist.init_process_group(pg)
    mine = {name: _records(args, name, device, dtype, parallel=True) for name in MODELS}
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, mine)

    ok = True
    if rank == 0:
        checks = _verdicts(args, single, per_rank)
        print(f"\n{args.mode} context parallelism, {args.nproc} ranks, {args.device}, backend {args.backend}, "
              f"{dtype}, {len(MODELS)} pipelines")
        for label, passed, detail in checks:
            print(f"  {'ok  ' if passed else 'FAIL'} {label}" + (f"  ({detail})" if detail else ""))
        ok = all(passed for _, passed, _ in checks)
        print("PASS" if ok else "FAIL")
        if args.json:
            summary = {"mode": args.mode, "device": args.device, "backend": args.backend, "nproc": args.nproc,
                       "dtype": str(dtype), "passed": ok,
                       "checks": [{"check": c, "passed": p, "detail": d} for c, p, d in checks]}
            pathlib.Path(args.json).write_text(json.dumps(summary, indent=1))
    dist.destroy_process_group()
    return 0 if ok else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if os.environ.get(WORKER_FLAG) == "1":
        return worker(args)
    return launch(args, argv)


if __name__ == "__main__":
    sys.exit(main())
