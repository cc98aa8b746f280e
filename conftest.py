"""Session set-up shared by tests/, bench/ and the doctests in meancache/.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it is set here, before anything imports meancache's
kernels: without a CUDA device the Triton kernels then run on CPU tensors through the interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _grad_mode_is_left_as_found():
    """A test that switches autograd off globally (``torch.set_grad_enabled(False)`` in code it calls) would change
    how every later op runs (the ops record a graph only in grad mode): fail that test, and restore the mode."""
    before = torch.is_grad_enabled()
    yield
    after = torch.is_grad_enabled()
    if after != before:
        torch.set_grad_enabled(before)
        pytest.fail(f"the test left torch.is_grad_enabled() = {after} (was {before}); scope it with torch.no_grad()")
