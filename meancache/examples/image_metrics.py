"""Image similarity for quality reports: PSNR and SSIM of a batch against a reference batch.

Both take images ``(B, H, W)`` or ``(B, C, H, W)`` with values in ``[0, data_range]`` and return one value per
image, computed in float64.
"""

from __future__ import annotations

import math

import torch

__all__ = ["mean_psnr", "psnr", "ssim"]


def _pair(images, reference, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.as_tensor(images).to(torch.float64)
    b = torch.as_tensor(reference).to(torch.float64)
    if a.shape != b.shape or a.ndim not in (3, 4):
        raise ValueError(
            f"{name}: images {tuple(a.shape)} and reference {tuple(b.shape)} must have one shape, (B, H, W) or "
            "(B, C, H, W)"
        )
    if a.ndim == 3:
        a, b = a[:, None], b[:, None]
    return a, b


def psnr(images, reference, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, ``(B,)`` float64; identical images give ``inf``.

    >>> ref = torch.zeros(2, 4, 4)
    >>> [round(v, 6) for v in psnr(ref + 0.1, ref).tolist()]
    [20.0, 20.0]
    """
    a, b = _pair(images, reference, "psnr")
    mse = (a - b).square().flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(images, reference, data_range: float = 1.0, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004), ``(B,)`` float64, averaged over pixels and channels.

    Local statistics use a ``window`` x ``window`` Gaussian of width ``sigma`` with reflected borders, so every
    pixel of an image as small as 8x8 counts (a "valid"-only window would keep just its centre). Constants
    ``C1 = (0.01 L)^2`` and ``C2 = (0.03 L)^2`` with ``L = data_range``.

    >>> x = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    >>> ssim(x, x).tolist()
    [1.0, 1.0, 1.0]
    >>> y = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))
    >>> bool((ssim(y, x) < 0.5).all())
    True
    """
    a, b = _pair(images, reference, "ssim")
    if window % 2 == 0 or window < 3 or window // 2 >= min(a.shape[-2:]):
        raise ValueError(f"window={window}: must be odd, >= 3 and smaller than twice the image side")
    c = a.shape[1]
    w = _gaussian_window(window, sigma).expand(c, 1, window, window)
    pad = window // 2

    def blur(x):
        x = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
        return torch.nn.functional.conv2d(x, w, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def mean_psnr(values: torch.Tensor) -> float:
    """Mean PSNR of a batch over the images that differ from their reference; ``inf`` if none differs.

    An identical image has infinite PSNR, which would make any mean infinite.

    >>> mean_psnr(torch.tensor([20.0, float("inf"), 30.0])), mean_psnr(torch.tensor([float("inf")]))
    (25.0, inf)
    """
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else math.inf
