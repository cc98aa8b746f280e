"""Child-process side of tests/test_context_parallel.py: the spawn harness, the test-only accelerator shim, the
pipelines both sides build, and the functions every rank runs.

Only torch is imported at module level, so importing this module is cheap; diffusers, the tiny pipelines and
meancache are imported where they are used (the ranks get them preloaded, see :func:`run_ranks`).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue as queue_mod
import shutil
import tempfile
import time
import traceback

import torch

#: Denoising steps of every run here (the issue asks for 10-20).
STEPS = 12
#: Transformer evaluations per sampling run in schedule mode (Schedule.default(5, 12): steps 0, 1, 3, 8, 11).
BUDGET = 5
#: Online mode: the most evaluations it may spend, and a tolerance loose enough that its decisions depend on the
#: prompt. With the default 0.02 the velocity of these tiny random models changes so fast that every prompt spends
#: the whole budget on the same steps, and a test of "each rank decides for itself" would prove nothing.
ONLINE_BUDGET = 8
ONLINE_TOLERANCE = 0.3
#: Seeds of the prompts (embeddings and noise) of the data-parallel runs: rank 0 serves two requests, rank 1 one.
DP_SEEDS = {0: [10, 12], 1: [11]}
#: Online data-parallel runs: one request per rank, so a collective inside the library pairs up instead of hanging.
#: Alone, seed 21 computes steps 0, 1, 3, 8, 11 and seed 22 steps 0, 1, 5, 11.
DP_ONLINE_SEEDS = {0: [21], 1: [22]}
#: Seconds the parent waits for all ranks of one spawn before it kills them and fails.
DEFAULT_TIMEOUT_S = 120.0


# ---------------------------------------------------------------------------------------------------------------
# the shim
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def one_accelerator_reported():
    """Make ``torch.accelerator.device_count()`` report 1 instead of 0, for the duration of the block.

    Why it exists: diffusers 0.42.1 ``ModelMixin._resolve_parallel_config`` (diffusers/models/modeling_utils.py,
    line 1719, reached from ``enable_parallelism``) computes the rank's device as
    ``torch.device(device_type, rank % torch.accelerator.device_count())``. On a machine without an accelerator the
    count is 0 and that line raises ``ZeroDivisionError`` before any mesh is built, although the rest of context
    parallelism (gloo, the CPU device mesh, Ulysses all-to-all) runs on CPU. With the count at 1 the device becomes
    ``cpu:0``, which is where every tensor lives anyway. Test helpers only: it is never part of meancache, and it
    changes nothing where an accelerator exists.
    """
    real = torch.accelerator.device_count
    if real() > 0:
        yield
        return
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = real


# ---------------------------------------------------------------------------------------------------------------
# the spawn harness
# ---------------------------------------------------------------------------------------------------------------


class ChildFailed(AssertionError):
    """A rank raised, died or did not finish in time; the message carries the rank's traceback."""


def _child(fn, rank: int, world_size: int, init_method: str, results, args) -> None:
    try:
        # one thread per rank: two ranks share the 2-core machine, and torch's 2-thread regions on these tiny
        # tensors stall (meancache/examples/tiny_pipelines.py says more)
        torch.set_num_threads(1)
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        dist.destroy_process_group()
        results.put(("ok", rank, out))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent, KeyboardInterrupt included
        # no destroy_process_group here: the parent kills the other ranks, which may be waiting on this one
        results.put(("error", rank, traceback.format_exc()))


def run_ranks(fn, world_size: int = 2, *args, timeout_s: float = DEFAULT_TIMEOUT_S) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes joined in one gloo group.

    Returns the ranks' return values (picklable; send tensors as numpy arrays), in rank order. Raises
    :class:`ChildFailed` with the child's traceback as soon as one rank raises, with the exit code when one dies
    without reporting (a crash), or after ``timeout_s`` seconds; in every case the other ranks are killed first,
    since a rank whose peer is gone may wait in its next collective for ever.
    """
    # spawn, not fork: the parent may have run OpenMP regions, and a forked child of such a process can hang in
    # its first parallel op; a fresh interpreter costs the import of torch and diffusers (about 6 s of CPU each)
    ctx = multiprocessing.get_context("spawn")
    store_dir = tempfile.mkdtemp(prefix="meancache-cp-")
    init_method = "file://" + os.path.join(store_dir, "store")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_child, args=(fn, rank, world_size, init_method, results, args), daemon=True)
        for rank in range(world_size)
    ]
    got: dict[int, object] = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        while len(got) < world_size:
            try:
                status, rank, payload = results.get(timeout=0.2)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode is not None]
                if dead:
                    # a rank that reported just before exiting is still in the queue's pipe: give it a moment
                    try:
                        status, rank, payload = results.get(timeout=2.0)
                    except queue_mod.Empty:
                        r = dead[0]
                        raise ChildFailed(
                            f"rank {r} of {world_size} exited with code {procs[r].exitcode} without a result"
                        ) from None
                elif time.monotonic() > deadline:
                    missing = [r for r in range(world_size) if r not in got]
                    raise ChildFailed(f"ranks {missing} of {world_size} did not finish within {timeout_s:.0f} s")
                else:
                    continue
            if status == "error":
                raise ChildFailed(f"rank {rank} of {world_size} raised:\n{payload}")
            got[rank] = payload
        for p in procs:
            p.join(timeout=10)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        results.close()
        shutil.rmtree(store_dir, ignore_errors=True)
    return [got[r] for r in range(world_size)]


def fail_on_rank_1(rank: int, world_size: int) -> str:
    """Harness self-test: rank 1 raises while rank 0 waits in a collective that will never complete."""
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("deliberate failure on rank 1")
    dist.barrier()
    return "rank 0 passed the barrier"


# ---------------------------------------------------------------------------------------------------------------
# pipelines (built identically by the single-process parent and by every rank)
# ---------------------------------------------------------------------------------------------------------------


def make_case(name: str, seed: int = 0):
    """A tiny ``flux`` or ``qwen-image`` pipeline from meancache.examples.tiny_pipelines, called with STEPS steps.

    Context parallelism splits every sequence into equal shares per rank, and diffusers asserts that the length is
    divisible by the number of ranks. The tiny Qwen-Image prompt embeddings have 7 and 5 tokens, so they are
    replaced by 8 and 6 tokens drawn from a generator seeded with ``seed``.
    """
    from meancache.examples import tiny_pipelines

    pipe, kw, info = tiny_pipelines.build(name, seed=seed)
    kw["num_inference_steps"] = STEPS
    if name == "qwen-image":
        g = torch.Generator().manual_seed(1000 + seed)
        kw["prompt_embeds"] = torch.randn(1, 8, 32, generator=g)
        kw["prompt_embeds_mask"] = torch.ones(1, 8, dtype=torch.long)
        kw["negative_prompt_embeds"] = torch.randn(1, 6, 32, generator=g)
        kw["negative_prompt_embeds_mask"] = torch.ones(1, 6, dtype=torch.long)
    return pipe, kw, info


def fresh(kw: dict, seed: int = 0) -> dict:
    """The same call with a new generator: every rank (and the parent) draws the same initial noise."""
    return dict(kw, generator=torch.Generator().manual_seed(seed))


class Probe:
    """Counts real transformer forwards and keeps the velocity of every scheduler step that really ran.

    The scheduler wrapper sits on the instance, below meancache: meancache takes whatever ``scheduler.step`` is at
    call time as the original step and calls it on compute steps only, so the recorded velocities are exactly the
    ones meancache logs into its history (and measures in online mode).
    """

    def __init__(self, pipe):
        self.calls = 0
        self.velocities: list[torch.Tensor] = []
        self.tokens: set[int] = set()
        pipe.transformer.register_forward_pre_hook(self._count)
        # the tokens the output projection gets: context parallelism splits the sequence before the blocks and
        # gathers it after this layer, so a rank sees its share here, and a single process the whole sequence
        pipe.transformer.proj_out.register_forward_pre_hook(self._tokens)
        scheduler = pipe.scheduler
        step = type(scheduler).step

        def recording_step(model_output, timestep, sample, *a, **kw):
            self.velocities.append(model_output.detach().clone())
            return step(scheduler, model_output, timestep, sample, *a, **kw)

        scheduler.step = recording_step

    def _count(self, *_):
        self.calls += 1

    def _tokens(self, module, args):
        self.tokens.add(int(args[0].shape[1]))

    def reset(self):
        self.calls = 0
        self.velocities = []
        self.tokens = set()


def to_numpy(t: torch.Tensor):
    """A float32 host copy that pickles by value (bfloat16 and CUDA tensors included, for tools/ring_cp_check.py)."""
    return t.detach().to("cpu", torch.float32).numpy().copy()


def run(pipe, kw, info, seed: int = 0) -> torch.Tensor:
    return getattr(pipe(**fresh(kw, seed)), info["output_attr"])


def sampling_record(pipe, kw, info, probe: Probe, seed: int = 0, accelerated: bool = True) -> dict:
    """One call: final latents, real transformer forwards, scheduler velocities, and meancache's summary."""
    import meancache

    probe.reset()
    latents = run(pipe, kw, info, seed)
    rec = {
        "latents": to_numpy(latents),
        "calls": probe.calls,
        "velocities": [to_numpy(v) for v in probe.velocities],
        "tokens": sorted(probe.tokens),
    }
    if not accelerated:
        return rec
    s = meancache.summary(pipe)
    # the summary's own count of transformer calls (``model_calls``; ``transformer_calls`` before the rename)
    calls = getattr(s, "model_calls", None)
    rec["summary_calls"] = s.transformer_calls if calls is None else calls
    rec["compute_steps"] = list(s.schedule.compute_steps) if s.schedule is not None else None
    return rec


def single_process_records(name: str) -> dict:
    """What the single-process runs give (no process group): the reference of every rank's result."""
    import meancache

    pipe, kw, info = make_case(name)
    probe = Probe(pipe)
    out = {"plain": sampling_record(pipe, kw, info, probe, accelerated=False)}
    meancache.accelerate(pipe, budget=BUDGET)
    out["schedule"] = sampling_record(pipe, kw, info, probe)
    meancache.disable(pipe)
    meancache.accelerate(pipe, budget=ONLINE_BUDGET, mode="online", tolerance=ONLINE_TOLERANCE)
    out["online"] = sampling_record(pipe, kw, info, probe)
    return out


def single_process_dp(seed: int, mode: str) -> dict:
    import meancache

    pipe, kw, info = make_case("flux", seed=seed)
    probe = Probe(pipe)
    if mode == "online":
        meancache.accelerate(pipe, budget=ONLINE_BUDGET, mode="online", tolerance=ONLINE_TOLERANCE)
    else:
        meancache.accelerate(pipe, budget=BUDGET)
    return sampling_record(pipe, kw, info, probe, seed)


# ---------------------------------------------------------------------------------------------------------------
# what every rank runs
# ---------------------------------------------------------------------------------------------------------------


def context_parallel_session(rank: int, world_size: int) -> dict:
    """Ulysses context parallelism over all ranks, then data-parallel serving, in one process group.

    Context parallel part, for FLUX and Qwen-Image (true CFG, two transformer calls per step): the transformer is
    split with ``enable_parallelism(ContextParallelConfig(ulysses_degree=world_size))``, then a plain CP run, one in
    schedule mode, one after ``meancache.disable`` and one in online mode, every rank with the same prompt and
    noise (what context parallelism requires).

    Data parallel part (no context parallelism, same process group): every rank serves its own prompts with its own
    accelerated FLUX pipeline; online mode first, one request per rank, then schedule mode with a different number
    of requests per rank, which would hang if schedule mode made any collective call.
    """
    import meancache
    from diffusers import ContextParallelConfig

    out: dict = {"rank": rank}
    for name in ("flux", "qwen-image"):
        pipe, kw, info = make_case(name)
        with one_accelerator_reported():
            pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world_size))
        probe = Probe(pipe)
        rec = {"before": sampling_record(pipe, kw, info, probe, accelerated=False)}  # plain CP, never accelerated
        meancache.accelerate(pipe, budget=BUDGET)
        rec["schedule"] = sampling_record(pipe, kw, info, probe)
        meancache.disable(pipe)
        rec["plain"] = sampling_record(pipe, kw, info, probe, accelerated=False)
        meancache.accelerate(pipe, budget=ONLINE_BUDGET, mode="online", tolerance=ONLINE_TOLERANCE)
        rec["online"] = sampling_record(pipe, kw, info, probe)
        out[name] = rec

    out["dp_online"] = {}
    for seed in DP_ONLINE_SEEDS[rank]:
        pipe, kw, info = make_case("flux", seed=seed)
        probe = Probe(pipe)
        meancache.accelerate(pipe, budget=ONLINE_BUDGET, mode="online", tolerance=ONLINE_TOLERANCE)
        out["dp_online"][seed] = sampling_record(pipe, kw, info, probe, seed)

    out["dp_schedule"] = {}
    for seed in DP_SEEDS[rank]:
        pipe, kw, info = make_case("flux", seed=seed)
        probe = Probe(pipe)
        meancache.accelerate(pipe, budget=BUDGET)
        out["dp_schedule"][seed] = sampling_record(pipe, kw, info, probe, seed)
    return out
