"""Session set-up shared by tests/, bench/ and the doctests in meancache/.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it is set here, before anything imports meancache's
kernels: without a CUDA device the Triton kernels then run on CPU tensors through the interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
