"""Limits shared by every layer of meancache (a leaf module, so nothing has to reach up for a constant)."""

from __future__ import annotations

__all__ = ["MAX_ORDER"]

#: Largest window K (label ``v_diff_mean_jvp1_s6``); also the capacity bound of the history ring.
MAX_ORDER = 6
