"""PSNR and SSIM against closed forms."""

import math

import pytest
import torch

from meancache.examples.image_metrics import mean_psnr
from meancache.examples.image_metrics import psnr
from meancache.examples.image_metrics import ssim


def test_psnr_closed_form():
    ref = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.05
    got = psnr(ref + noise, ref)
    want = [10 * math.log10(1 / float(n.double().square().mean())) for n in noise]
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    assert torch.isinf(psnr(ref, ref)).all()
    # data_range scales the peak: 20 log10(2) dB more for range 2
    torch.testing.assert_close(psnr(ref + noise, ref, data_range=2.0) - got, torch.full((4,), 20 * math.log10(2), dtype=torch.float64))


def test_ssim_of_flat_images_is_the_luminance_term():
    # constant images: every variance and covariance is 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b = 0.3, 0.7
    c1 = 0.01**2
    got = ssim(torch.full((1, 8, 8), a), torch.full((1, 8, 8), b))
    torch.testing.assert_close(got, torch.tensor([(2 * a * b + c1) / (a * a + b * b + c1)], dtype=torch.float64))


def test_ssim_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 8, 8, generator=g)
    y = (x + 0.1 * torch.randn(5, 3, 8, 8, generator=g)).clamp(0, 1)
    z = torch.rand(5, 3, 8, 8, generator=g)
    torch.testing.assert_close(ssim(x, x), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(ssim(x, y), ssim(y, x))
    assert (ssim(x, y) > ssim(x, z)).all()
    assert (ssim(x, z) < 0.5).all()


@pytest.mark.parametrize("fn", [psnr, ssim])
def test_shape_errors_name_both_shapes(fn):
    with pytest.raises(ValueError, match=r"images \(2, 8, 8\) and reference \(3, 8, 8\)"):
        fn(torch.zeros(2, 8, 8), torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="must have one shape"):
        fn(torch.zeros(8, 8), torch.zeros(8, 8))


def test_ssim_window_rule():
    with pytest.raises(ValueError, match="window=4"):
        ssim(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), window=4)
    with pytest.raises(ValueError, match="window=17"):
        ssim(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), window=17)


def test_mean_psnr_skips_identical_images():
    assert mean_psnr(torch.tensor([10.0, 30.0])) == 20.0
    assert mean_psnr(torch.tensor([10.0, math.inf])) == 10.0
    assert mean_psnr(torch.tensor([math.inf, math.inf])) == math.inf
