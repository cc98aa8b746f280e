"""The embedded model: a small class-conditional FLUX transformer that draws 8x8 handwritten digits.

It is trained (:mod:`meancache.examples.digits.train`) on the digit images that ship with scikit-learn, and its weights
ship inside the package, so ``make demo`` shows MeanCache on a real diffusers flow-matching transformer without
downloading anything.

* :func:`load_pipeline` - the :class:`DigitsPipeline` with the packaged (or any saved) weights.
* :class:`DigitsPipeline` - a diffusers pipeline: FLUX transformer, ``FlowMatchEulerDiscreteScheduler``, batched
  classifier-free guidance.
* :class:`DigitClassifier` (:mod:`meancache.examples.digits.classifier`) - an independent logistic-regression judge of
  which digit a sample shows.

This subpackage needs diffusers (and scikit-learn for the data and the classifier); ``import meancache`` does not.
"""

from __future__ import annotations

from .model import IMAGE_SIZE
from .model import NULL_CLASS
from .model import WEIGHTS_PATH
from .model import DigitsPipeline
from .model import build_pipeline
from .model import load_pipeline
from .model import save_weights

__all__ = [
    "IMAGE_SIZE",
    "NULL_CLASS",
    "WEIGHTS_PATH",
    "DigitsPipeline",
    "build_pipeline",
    "load_pipeline",
    "save_weights",
]
