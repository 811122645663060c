"""Setup shared by tests/ and benchmarks/.

Triton kernels are tested here under the Triton interpreter when no CUDA device is
present; the flag must be set before any kernel is decorated (i.e. before
``vatt_fast.kernels`` is imported), so it is set at conftest import time. On a GPU
machine the very same tests run the compiled kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    """Every device this machine has: the CPU, and CUDA when present."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
