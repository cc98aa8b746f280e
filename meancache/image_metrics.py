"""Deprecated location of :mod:`meancache.examples.image_metrics` (PSNR and SSIM), kept for one release."""

import warnings

from meancache.examples.image_metrics import *  # noqa: F401,F403

warnings.warn("meancache.image_metrics is deprecated; use meancache.examples.image_metrics", DeprecationWarning, stacklevel=2)

