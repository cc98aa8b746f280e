"""Limits shared by every layer of meancache (a leaf module, so nothing has to reach up for a constant)."""

from __future__ import annotations

__all__ = ["MAX_ORDER"]

#: Largest window K (and history ring capacity): the published label set goes up to ``jvp_s6``.
MAX_ORDER = 6
