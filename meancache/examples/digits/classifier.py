"""An independent judge of generated digits: multinomial logistic regression on the real 8x8 images.

It never sees the generator or its samples in training, so "the classifier reads the requested digit" measures
the generator, not a shared bias. Fitting takes about a second and is deterministic.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["DigitClassifier"]


def _features(images) -> np.ndarray:
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.ndim != 3 or x.shape[1:] != (8, 8):
        raise ValueError(f"images has shape {x.shape}: must be (B, 8, 8) with values in [0, 1]")
    return x.reshape(x.shape[0], 64).astype(np.float64)


class DigitClassifier:
    """Logistic regression fitted on scikit-learn's digits (pixels in [0, 1]).

    Args:
        holdout: fraction of the real digits kept out of the fit to measure the classifier's own accuracy
            (:attr:`holdout_accuracy`).
        seed: seeds the split.

    Example::

        >>> from meancache.examples.digits.train import load_data
        >>> clf = DigitClassifier()
        >>> clf.holdout_accuracy > 0.9
        True
        >>> x, y = load_data()
        >>> float((clf.predict((x[:50] + 1) / 2) == y[:50].numpy()).mean()) > 0.9
        True
    """

    def __init__(self, holdout: float = 0.25, seed: int = 0):
        from sklearn.datasets import load_digits
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import train_test_split

        data = load_digits()
        x = data.images.reshape(-1, 64) / 16.0
        x_fit, x_out, y_fit, y_out = train_test_split(
            x, data.target, test_size=holdout, random_state=seed, stratify=data.target
        )
        self.model = LogisticRegression(max_iter=2000, C=1.0)
        self.model.fit(x_fit, y_fit)
        #: accuracy on the held-out real digits
        self.holdout_accuracy = float(self.model.score(x_out, y_out))

    def predict(self, images) -> np.ndarray:
        """Digits ``(B,)`` int for images ``(B, 8, 8)`` in [0, 1] (numpy or torch, any float dtype).

        >>> DigitClassifier().predict(torch.zeros(2, 8, 8)).shape
        (2,)
        """
        return self.model.predict(_features(images))

    def accuracy(self, images, labels) -> float:
        """Fraction of ``images`` ``(B, 8, 8)`` read as their ``labels`` ``(B,)``.

        >>> from meancache.examples.digits.train import load_data
        >>> x, y = load_data()
        >>> DigitClassifier().accuracy((x[-100:] + 1) / 2, y[-100:]) > 0.9
        True
        """
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        return float((self.predict(images) == labels).mean())
