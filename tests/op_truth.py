"""The fused ops' formulas written out plainly, in a chosen math dtype: the truth the op tests (CPU and GPU) hold
every backend to."""

from __future__ import annotations

import torch

from meancache.reference import step_scalars

#: sigma at the window start, at this step and at the next one, shared by the op tests
SIGMAS = (0.92, 0.71, 0.66)


def truth(op, x, v, xs, vs, step=9, k=4, math_dtype=torch.float64):
    """``(output, ring xs, ring vs)`` after one call of ``op`` with every operand in ``math_dtype`` (float64: the
    truth; the latent dtype: what an eager torch loop computes). ``estimate`` is taken with ``out_scale=-1``."""
    c = xs.shape[0]
    start, last, write = (step - k) % c, (step - 1) % c, step % c
    inv_d, dt = step_scalars(*SIGMAS)
    xd, xsd, vsd = x.to(math_dtype), xs.to(math_dtype), vs.to(math_dtype)
    if op == "compute_step":
        vd = v.to(math_dtype)
        xsd[write], vsd[write] = xd, vd
        return xd + dt * vd, xsd, vsd
    v_hat = vsd[last] - (vsd[start] - (xd - xsd[start]) * inv_d) * inv_d * dt
    xsd[write], vsd[write] = xd, v_hat
    return (xd + dt * v_hat if op == "skip_step" else -v_hat), xsd, vsd


def random_latent(shape, dtype, device, g: torch.Generator, strided: bool = False) -> torch.Tensor:
    """A random latent from ``g``: contiguous, or (``strided``) a slice of a wider tensor, not contiguous, as a
    caller's view of packed latents would be."""
    if strided:
        wide = torch.randn(*shape[:-1], shape[-1] + 5, generator=g).to(dtype=dtype, device=device)
        x = wide[..., 2 : 2 + shape[-1]]
        assert not x.is_contiguous()
        return x
    return torch.randn(shape, generator=g).to(dtype=dtype, device=device)
