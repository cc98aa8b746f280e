"""A short run of every fused op for ``compute-sanitizer --tool memcheck`` (stage `sanitizer` of tools/gpu_check.py).

Each op runs once per dtype on latents chosen to reach every code path of the kernels: the 16-byte vector path with
a scalar tail, the scalar path of a misaligned latent or ring, a grid-stride loop (more elements than one pass of
the grid covers), a ring whose write slot is the window start, and a single element. Every result is compared with
the pure-torch reference, so a run that the sanitizer passes is also a correct one. Inputs are random, never zeros.

``weighted_step`` runs twice: with the published estimator as weights (2 terms read from the ring plus the latent
term, the Euler step) and with 4 terms read from a separate stack of computed velocities, no latent term (its ring
row unread) and the scaled estimate as output.

With ``--device cpu`` the small cases run on the reference backend (the two grid-stride cases, sized for a GPU, are
left out): the CPU dry run uses that to keep this script working without a GPU.

Example (on a GPU machine, from the repository root):
    $ PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 97 \\
          python tools/gpu_checks/sanitize_ops.py --backends cuda
    sanitize_ops: cuda: 105 cases, 0 mismatches
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import zlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from meancache import ops  # noqa: E402
from meancache.estimators import meancache_weights  # noqa: E402
from meancache.reference import step_scalars  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}
SIGMAS = (0.92, 0.71, 0.66)
OPS = ("skip_step", "compute_step", "estimate", "weighted_step", "weighted_step_vc")
# the 4-term weights of weighted_step_vc (a cubic's, summing to 1) and its stack of computed velocities
VC_WEIGHTS = [-0.24, 1.13, -2.61, 2.72]
VC_ROWS = 4
CPU_MAX_NUMEL = 100_000
# name: (latent shape, storage offset of x and of the ring in elements, ring capacity, step, k)
CASES = {
    "vector+tail": ((3, 4099), 0, 6, 9, 4),
    "misaligned-x": ((2, 1031), 1, 6, 9, 4),
    "misaligned-ring": ((4, 512), 0, 6, 9, 4),  # offset applied to the ring only, below
    "scalar-grid-stride": ((5, 131, 1031), 0, 6, 9, 4),  # 675k elements, odd rows: several passes of the grid
    "vector-grid-stride": ((3, 800_000), 0, 6, 9, 4),  # 2.4M: more 16-byte groups than one grid of an H200 holds
    "write-slot-is-window-start": ((7, 33), 0, 3, 7, 3),
    "one-element": ((1,), 0, 2, 4, 1),  # step 4: the vc form reads rows 0..3, which only steps >= 4 have written
}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _tensor(shape, dtype, device, offset, g):
    """A contiguous random tensor whose storage starts ``offset`` elements into its allocation."""
    flat = torch.randn(_numel(shape) + offset, generator=g).to(dtype=dtype, device=device)
    return flat[offset:].view(shape)


def run_case(op: str, name: str, dtype: torch.dtype, device: str, backend: str) -> bool:
    """Run ``op`` on case ``name`` under ``backend`` and on the reference; True when they agree."""
    shape, offset, capacity, step, k = CASES[name]
    g = torch.Generator().manual_seed(zlib.crc32(f"{op}/{name}/{dtype}".encode()))
    ring_offset = 1 if name == "misaligned-ring" else 0
    x = _tensor(shape, dtype, device, offset, g)
    v = _tensor(shape, dtype, device, offset, g)
    xs = _tensor((capacity, *shape), torch.float32, device, ring_offset, g)
    vs = _tensor((capacity, *shape), torch.float32, device, ring_offset, g)
    vc = _tensor((VC_ROWS, *shape), torch.float32, device, offset, g)
    results = []
    for which in (backend, "torch"):
        os.environ["MEANCACHE_BACKEND"] = which
        a, b = xs.clone(), vs.clone()
        if ring_offset:  # clone() realigns; keep the misaligned storage for the backend under test
            a = _tensor((capacity, *shape), torch.float32, device, ring_offset, g).copy_(xs)
            b = _tensor((capacity, *shape), torch.float32, device, ring_offset, g).copy_(vs)
        if op == "skip_step":
            out = ops.skip_step(x, a, b, step, k, *SIGMAS)
        elif op == "compute_step":
            out = ops.compute_step(x, v, a, b, step, SIGMAS[1], SIGMAS[2])
        elif op == "estimate":
            out = ops.estimate(x, a, b, step, k, *SIGMAS, out_scale=-1.0)
        elif op == "weighted_step":  # the published estimator as weights: what skip_step computes
            start, last = (step - k) % capacity, (step - 1) % capacity
            inv_d, dt = step_scalars(*SIGMAS)
            w_start, w_last, x_weight = meancache_weights(inv_d, dt)
            out = ops.weighted_step(x, a, b, None, step, [start, last], [w_start, w_last], start, x_weight, dt)
        else:  # 4 terms from vc in reverse order, no latent term, the scaled estimate in float32
            out = ops.weighted_step(x, a, b, vc, step, [3, 2, 1, 0], VC_WEIGHTS, (step + 1) % capacity, 0.0,
                                    SIGMAS[2] - SIGMAS[1], out_scale=-1.0, out_dtype=torch.float32, euler=False)
        results.append((out.float(), a, b))
    os.environ.pop("MEANCACHE_BACKEND", None)
    (out, a, b), (ref, ra, rb) = results
    tol = TOL[dtype]
    return bool(torch.allclose(out, ref, rtol=tol, atol=tol) and torch.equal(a, ra)
                and torch.allclose(b, rb, rtol=1e-5, atol=1e-5))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="cuda", help="comma-separated backends to run (cuda, triton, torch)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: run the reference backend on CPU tensors (the dry run)")
    args = parser.parse_args(argv)
    backends = ["torch"] if args.device == "cpu" else [b for b in args.backends.split(",") if b]
    if args.device == "cuda" and not torch.cuda.is_available():
        print("sanitize_ops: no CUDA device is visible", file=sys.stderr)
        return 2
    failed = 0
    for backend in backends:
        cases = mismatches = 0
        for op in OPS:
            for dtype in DTYPES.values():
                for name, (shape, *_) in CASES.items():
                    if args.device == "cpu" and _numel(shape) > CPU_MAX_NUMEL:
                        continue
                    cases += 1
                    if not run_case(op, name, dtype, args.device, backend):
                        mismatches += 1
                        print(f"sanitize_ops: MISMATCH {backend} {op} {name} {dtype}")
        if args.device == "cuda":
            torch.cuda.synchronize()
        print(f"sanitize_ops: {backend}: {cases} cases, {mismatches} mismatches")
        failed += mismatches
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
