"""Deprecated location of :mod:`meancache.examples.digits` (kept for one release): the embedded digits model is an
example, not part of the core library. ``python -m meancache.digits.train`` and ``.calibration`` still run."""

import warnings

import meancache.examples.digits as _moved
from meancache.examples.digits import *  # noqa: F401,F403

warnings.warn("meancache.digits is deprecated; use meancache.examples.digits", DeprecationWarning, stacklevel=2)
# submodules (train, calibration, model, classifier) are found in the new folder
__path__ = list(_moved.__path__)
