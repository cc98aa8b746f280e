"""Bounded history of a MeanCache trajectory: a ring of the last few (latent, velocity) pairs.

The official release keeps every step's latent, an fp32 copy of it and its velocity, so its memory grows with the
number of steps (algorithm.md §9.3). A skipped step with window K reads only the entry K steps back and the newest
one (§5), so a ring of ``capacity <= 6`` entries is exact. Entries are stored in float32 (float64 for float64
latents), whatever the latent dtype.

Schedules with ``extrapolate`` segments also keep the velocities of the last ``depth <= 4`` *computed* steps (the
nodes of the extrapolation polynomial, :mod:`meancache.estimators`) beside the ring, with their sigmas on the host.
"""

from __future__ import annotations

import torch

from ._limits import MAX_ORDER
from .estimators import MAX_TERMS
from .validation import is_int

__all__ = ["History", "history_dtype"]


def history_dtype(latent_dtype: torch.dtype) -> torch.dtype:
    """The dtype MeanCache keeps history and does its math in: float64 for float64 latents, else float32.

    Example:
        >>> import torch
        >>> history_dtype(torch.bfloat16)
        torch.float32
    """
    if not latent_dtype.is_floating_point:
        raise ValueError(f"latents dtype={latent_dtype}: must be a floating-point dtype")
    return torch.float64 if latent_dtype == torch.float64 else torch.float32


def _outside_inference_mode() -> bool:
    """True outside ``torch.inference_mode``; False while torch.compile traces (dynamo refuses the query, and a
    compiled loop never meets a ring made under inference mode: its storage is allocated before tracing)."""
    return not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled()


class History:
    """Ring buffer of the last ``capacity`` logged steps of one trajectory.

    Step ``j`` (counted from the start of the trajectory) lives in slot ``j % capacity`` of ``xs`` and ``vs``,
    each of shape ``(capacity, *latent_shape)`` and dtype :func:`history_dtype`. Storage is allocated on the first
    :meth:`push` and reused afterwards, so memory is ``2 * capacity * numel * itemsize`` bytes for any number of
    steps.

    Args:
        capacity: entries kept, 1..6 (the largest window K the schedule uses is enough).
        depth: computed velocities kept for extrapolation, 0..4 (0: none, nothing allocated). They live in ``vc``,
            shape ``(depth, *latent_shape)``, and are kept by :meth:`keep`.

    Example:
        >>> import torch
        >>> h = History(2)
        >>> for j in range(5):
        ...     h.push(torch.full((3,), float(j)), torch.zeros(3))
        >>> h.count, len(h), h.x(4)[0].item(), h.oldest
        (5, 2, 4.0, 3)
    """

    def __init__(self, capacity: int = MAX_ORDER, depth: int = 0):
        if not is_int(capacity) or not 1 <= capacity <= MAX_ORDER:
            raise ValueError(f"capacity={capacity!r}: must be an int in 1..{MAX_ORDER}")
        if not is_int(depth) or not 0 <= depth <= MAX_TERMS:
            raise ValueError(f"depth={depth!r}: must be an int in 0..{MAX_TERMS}")
        self.capacity = int(capacity)
        self.depth = int(depth)
        self.count = 0
        self.xs: torch.Tensor | None = None
        self.vs: torch.Tensor | None = None
        self.vc: torch.Tensor | None = None
        self._kept: list[tuple[int, float]] = []  # (slot in vc, sigma) of the kept computed steps, oldest first
        self._kept_total = 0

    def __len__(self) -> int:
        """Entries currently held (at most ``capacity``)."""
        return min(self.count, self.capacity)

    @property
    def oldest(self) -> int:
        """Step index of the oldest entry still held."""
        return self.count - len(self)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor storage held by the ring (0 before the first push)."""
        ring = 0 if self.xs is None else 2 * self.xs.numel() * self.xs.element_size()
        return ring + (0 if self.vc is None else self.vc.numel() * self.vc.element_size())

    def clear(self) -> None:
        """Forget every entry but keep the storage for the next trajectory.

        Storage that a trajectory run with autograd recording wrote into is part of that trajectory's graph:
        writing the next trajectory into it would chain the two graphs (and keep every earlier one alive), so such
        storage is dropped and allocated afresh by the next :meth:`prepare`.

        Example:
            >>> import torch
            >>> h = History(2)
            >>> h.push(torch.zeros(3, requires_grad=True), torch.ones(3)); h.clear()
            >>> h.count, h.xs is None
            (0, True)
        """
        self.count = 0
        self._kept = []
        self._kept_total = 0
        if any(t is not None and t.requires_grad for t in (self.xs, self.vs, self.vc)):
            self.xs = self.vs = self.vc = None

    def ensure_depth(self, depth: int) -> None:
        """Keep at least ``depth`` computed velocities from now on (a reused ring meeting a deeper plan); only
        between trajectories."""
        if depth > self.depth:
            self.depth = depth
            self.vc = None  # reallocated by the next prepare()

    @property
    def nodes(self) -> list[tuple[int, float]]:
        """``(slot in vc, sigma)`` of the kept computed steps, oldest first (at most ``depth``)."""
        return self._kept

    def keep(self, sigma: float, v: torch.Tensor) -> None:
        """Keep the velocity ``v`` of a computed step at ``sigma`` as an extrapolation node, evicting the oldest
        beyond ``depth``. A no-op when ``depth`` is 0.

        Example:
            >>> import torch
            >>> h = History(2, depth=2)
            >>> _ = h.prepare(torch.zeros(3))
            >>> for s in (1.0, 0.5, 0.25):
            ...     h.keep(s, torch.full((3,), s))
            >>> [sigma for _, sigma in h.nodes], h.vc[h.nodes[-1][0]][0].item()
            ([0.5, 0.25], 0.25)
        """
        if not self.depth:
            return
        slot = self._kept_total % self.depth
        self.vc[slot].copy_(v)
        self._kept_total += 1
        self._kept = (self._kept + [(slot, float(sigma))])[-self.depth :]

    def _slot(self, step: int) -> int:
        if not self.oldest <= step < self.count:
            raise IndexError(f"step {step} is not in the history (holds steps {self.oldest}..{self.count - 1})")
        return step % self.capacity

    def x(self, step: int) -> torch.Tensor:
        """Latent at the start of ``step`` (a view into the ring)."""
        return self.xs[self._slot(step)]

    def v(self, step: int) -> torch.Tensor:
        """Velocity used at ``step``: the model's, or the estimate on a skipped step (a view into the ring)."""
        return self.vs[self._slot(step)]

    def prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ring ``(xs, vs)`` for latents like ``x``, allocated on the first step and reused afterwards.

        Raises ValueError when the latent's shape, device or dtype changes in the middle of a trajectory.
        """
        dtype = history_dtype(x.dtype)
        if _outside_inference_mode():
            self._leave_inference()
        if self.xs is None or self.xs.shape[1:] != x.shape or self.xs.device != x.device or self.xs.dtype != dtype:
            if self.count:
                raise ValueError(
                    f"latent shape/device/dtype changed mid-trajectory: history holds "
                    f"{tuple(self.xs.shape[1:])} {self.xs.dtype} on {self.xs.device}, got {tuple(x.shape)} "
                    f"{x.dtype} on {x.device}; call reset() between trajectories"
                )
            self.xs = torch.empty((self.capacity, *x.shape), dtype=dtype, device=x.device)
            self.vs = torch.empty_like(self.xs)
            self.vc = None
        if self.depth and self.vc is None:
            self.vc = torch.empty((self.depth, *x.shape), dtype=dtype, device=x.device)
        return self.xs, self.vs

    def _leave_inference(self) -> None:
        """Make storage allocated under ``torch.inference_mode`` writable outside it.

        Inference tensors refuse in-place writes outside inference mode, so a ring made by a warm-up call under
        ``inference_mode`` would break every later ordinary call. Between trajectories the storage is simply
        dropped (reallocated by :meth:`prepare`); mid-trajectory it is cloned, which keeps the logged entries.
        """
        for name in ("xs", "vs", "vc"):
            t = getattr(self, name)
            if t is not None and t.is_inference():
                setattr(self, name, t.clone() if self.count or self._kept_total else None)

    def advance(self) -> None:
        """Count the step a fused op just logged into slot ``count % capacity``."""
        self.count += 1

    def shift(self, delta: torch.Tensor) -> None:
        """Add ``delta`` (shaped like one latent) to every logged latent: re-anchors the history when the sampler's
        latent was changed from outside (a step-end callback), keeping the differences between logged latents.

        Example:
            >>> import torch
            >>> h = History(2)
            >>> h.push(torch.zeros(3), torch.ones(3)); h.shift(torch.full((3,), 0.5))
            >>> h.x(0).tolist()
            [0.5, 0.5, 0.5]
        """
        if self.xs is not None:
            if _outside_inference_mode():
                self._leave_inference()
            self.xs.add_(delta.to(self.xs.dtype))

    def push(self, x: torch.Tensor, v: torch.Tensor) -> None:
        """Log step ``count``: copy ``x`` and ``v`` (any float dtype) into the ring, evicting the oldest entry."""
        xs, vs = self.prepare(x)
        slot = self.count % self.capacity
        xs[slot].copy_(x)
        vs[slot].copy_(v)
        self.count += 1
