"""Deprecated location of :mod:`meancache.examples.peer_caches` (diffusers' caches tuned to a budget), kept for one release."""

import warnings

from meancache.examples.peer_caches import *  # noqa: F401,F403

warnings.warn("meancache.peer_caches is deprecated; use meancache.examples.peer_caches", DeprecationWarning, stacklevel=2)
