"""Recording over several processes (``torchrun``): each rank records its share of the calibration inputs and the
shares are gathered, in input order, into one :class:`~meancache.calibration.recording.Recording`.

The search itself is cheap next to the recording (a model evaluation per step and input) and must run once, on
the whole recording, to give the single-process schedule: record with :func:`record_sharded`, then call
:func:`meancache.calibrate` on the rank that received the recording.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .recording import Recording
from .recording import record
from ..validation import is_int

__all__ = ["RankFailed", "record_sharded", "shard_indices"]


class RankFailed(RuntimeError):
    """Another rank could not record its share; the message names the rank and carries its error.

    A rank whose own recording failed re-raises its own exception instead (with its traceback)."""


def shard_indices(num_inputs: int, rank: int, world_size: int) -> list[int]:
    """The inputs rank ``rank`` of ``world_size`` records: round robin, ``rank, rank + W, rank + 2W, ...``.

    Round robin rather than contiguous blocks: when the inputs do not divide evenly, no rank has more than one
    input more than another.

    Example:
        >>> shard_indices(5, 0, 2), shard_indices(5, 1, 2), shard_indices(1, 1, 2)
        ([0, 2, 4], [1, 3], [])
    """
    for name, value, low in (("num_inputs", num_inputs, 1), ("world_size", world_size, 1)):
        if not is_int(value) or value < low:
            raise ValueError(f"{name}={value!r}: must be an int >= {low}")
    if not is_int(rank) or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r}: must be an int in 0..{world_size - 1} (world_size={world_size})")
    return list(range(rank, num_inputs, world_size))


def _world(group) -> tuple[int, int, bool]:
    """``(rank, world_size, distributed)`` of ``group`` (the default group when None), or ``(0, 1, False)`` when
    no process group is initialised."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group given but torch.distributed is not initialised: call init_process_group first")
        return 0, 1, False
    return dist.get_rank(group), dist.get_world_size(group), True


def _count(inputs) -> int:
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() < 1:
            raise ValueError(f"inputs has shape {tuple(inputs.shape)}: a batched tensor needs a leading input "
                             "dimension P >= 1")
        return inputs.shape[0]
    if isinstance(inputs, (list, tuple)):
        return len(inputs)
    raise ValueError(f"inputs={type(inputs).__name__}: must be a list (prompts, dicts of call arguments or latent "
                     "tensors) or one batched tensor (P, *shape)")


def _take(inputs, indices: list[int]):
    if isinstance(inputs, torch.Tensor):
        return inputs[indices]
    return [inputs[i] for i in indices]


def record_sharded(
    target,
    inputs,
    sigmas: Sequence[float] | torch.Tensor | None = None,
    *,
    progress: bool = True,
    group=None,
    dst: int | None = None,
    **call_kwargs,
) -> Recording | None:
    """:func:`meancache.record`, with the inputs shared out over the ranks of a process group.

    Without an initialised process group (or with one rank) this is ``meancache.record(target, inputs, sigmas,
    progress=progress, **call_kwargs)``. With ``W`` ranks, rank ``r`` records inputs ``r, r + W, ...``
    (:func:`shard_indices`) and the shares are gathered, one input per rank and round, so no message holds more than
    one input's trajectory; the receiving ranks put them back in input order. Every rank must call this with the
    same ``inputs``, ``sigmas`` and ``call_kwargs``.

    Each input is recorded alone either way (a pipeline runs once per input; give a velocity_fn a *list* of
    tensors), so the gathered recording is the single-process one value for value wherever the model gives the
    same values for the same input on every rank (same weights, same seeds: seed each input by its index, not by
    the rank), and the search on it gives the single-process schedules.

    Args:
        target: a diffusers pipeline or a ``velocity_fn(x, sigma)``, as for :func:`meancache.record`.
        inputs: a list of P prompts, dicts of call arguments or latent tensors, or one batched tensor
            ``(P, *shape)`` (whose rows a rank then runs as one batch: values may differ from a single-process
            run in the last bits).
        sigmas: the grid for a velocity_fn (None for a pipeline).
        progress: progress bar of this rank's recording.
        group: the process group (default: the default group, when torch.distributed is initialised).
        dst: the global rank that receives the recording (the others return None), or None (default) for every
            rank. Receiving on one rank keeps one copy of the recording in memory, not W.
        call_kwargs: shared call arguments of a pipeline (``num_inference_steps``, ``guidance_scale``, ...).

    Returns:
        The :class:`~meancache.Recording` of all P inputs in input order (``latents (P, N + 1, *shape)`` and
        ``velocities (P, N, *shape)``, float32 on the CPU), on the receiving ranks; None on the others. Its meta
        is the one of the recording of input 0 with ``inputs`` and ``model_evaluations`` (where present) counted
        over all ranks, and ``world_size`` added when W > 1.

    Raises:
        ValueError: the errors of :func:`meancache.record`; ranks whose recordings disagree in grid or latent
            shape (on every rank).
        RankFailed: on every rank whose own recording succeeded, when another rank's failed (the failed rank
            re-raises its own exception). No rank is left waiting in a collective: the outcome of every rank is
            exchanged before any trajectory is.

    The transport is ``torch.distributed`` object collectives (pickled CPU tensors). With an NCCL group they go
    through the GPU: set each rank's CUDA device first (``torch.cuda.set_device``), as torchrun scripts do; a
    gloo group needs nothing.

    Example (no process group: the plain recording):
        >>> import torch
        >>> inputs = [torch.zeros(1, 2), torch.ones(1, 2)]
        >>> rec = record_sharded(lambda x, s: x - 1.0, inputs, [1.0, 0.5, 0.0], progress=False)
        >>> tuple(rec.latents.shape), rec.latents[1, -1].tolist()
        ((2, 3, 1, 2), [[1.0, 1.0]])

    Under ``torchrun --nproc_per_node 2 script.py`` (tests/dist_calibration_worker.py runs this with gloo)::

        torch.distributed.init_process_group("gloo")
        rec = record_sharded(pipe, prompts, dst=0, num_inference_steps=28)
        if torch.distributed.get_rank() == 0:
            schedules = meancache.calibrate(rec, budget=[10, 14])
    """
    rank, world, distributed = _world(group)
    if not distributed or world == 1:
        if dst is not None and dst != rank:
            raise ValueError(f"dst={dst!r}: must be None or this process's rank {rank} (no other rank to send to)")
        return record(target, inputs, sigmas, progress=progress, **call_kwargs)
    import torch.distributed as dist

    if dst is not None and (not is_int(dst) or not 0 <= dst < dist.get_world_size()):
        raise ValueError(f"dst={dst!r}: must be None or a global rank in 0..{dist.get_world_size() - 1}")
    if isinstance(inputs, (str, dict)):  # one prompt or one dict: one input, as for record()
        inputs = [inputs]
    total = _count(inputs)
    if total < 1:
        raise ValueError("inputs is empty: give at least one calibration input")
    mine = shard_indices(total, rank, world)

    # 1. every rank records its share; the outcome (not yet the data) is exchanged, so a failure on one rank
    # stops every rank here instead of leaving the others waiting in a collective that never completes
    own_error = None
    rec = None
    status: tuple
    if not mine:  # fewer inputs than ranks: nothing to record, but the collectives must still be joined
        status = ("empty",)
    else:
        try:
            rec = record(target, _take(inputs, mine), sigmas, progress=progress, **call_kwargs)
            status = ("ok", rec.sigmas, rec.shape, rec.meta)
        except Exception as exc:  # noqa: BLE001 - any error must reach the other ranks, whatever its type
            own_error = exc
            status = ("error", f"{type(exc).__name__}: {exc}")
    statuses: list = [None] * world
    dist.all_gather_object(statuses, status, group=group)
    if own_error is not None:
        raise own_error
    failed = [(r, s[1]) for r, s in enumerate(statuses) if s[0] == "error"]
    if failed:
        raise RankFailed("; ".join(f"rank {r} of {world} could not record its inputs: {msg}" for r, msg in failed))
    done = [(r, s) for r, s in enumerate(statuses) if s[0] == "ok"]
    _, (_, grid, shape, meta) = done[0]
    for r, s in done[1:]:
        if s[1] != grid or s[2] != shape:
            raise ValueError(
                f"rank {r} recorded latents of shape {s[2]} on a {len(s[1]) - 1}-step grid, rank {done[0][0]} "
                f"{shape} on a {len(grid) - 1}-step grid: one recording needs one shape and one grid (give every "
                "rank the same inputs and call arguments)"
            )

    # 2. the trajectories, one input per rank and round: a message never holds more than one input's recording
    receive = dst is None or dist.get_rank() == dst  # dst is a global rank, as in torch's gather_object
    n = len(grid) - 1
    latents = torch.empty((total, n + 1, *shape), dtype=torch.float32) if receive else None
    velocities = torch.empty((total, n, *shape), dtype=torch.float32) if receive else None
    rounds = -(-total // world)
    for k in range(rounds):
        # clone: pickling a view would send the whole underlying recording
        item = (mine[k], rec.latents[k].clone(), rec.velocities[k].clone()) if k < len(mine) else None
        got: list = [None] * world
        if dst is None:
            dist.all_gather_object(got, item, group=group)
        else:
            dist.gather_object(item, got if receive else None, dst=dst, group=group)
        if receive:
            for entry in got:
                if entry is not None:
                    index, lat, vel = entry
                    latents[index] = lat
                    velocities[index] = vel
    if not receive:
        return None
    meta = dict(meta)
    if "inputs" in meta:
        meta["inputs"] = total
    if "model_evaluations" in meta:
        meta["model_evaluations"] = sum(s[3].get("model_evaluations", 0) for _, s in done)
    meta["world_size"] = world
    return Recording(grid, latents, velocities, meta)
