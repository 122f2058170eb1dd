"""Test set-up shared by every test file.

Without a GPU the Triton kernels run through Triton's interpreter, which must be switched on
before the kernels are imported (FACTS.md). Every kernel output starts as NaN, so an element a
kernel forgets to write fails the accuracy checks.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["FUSED_ATTN_POISON_OUTPUTS"] = "1"
os.environ.pop("FUSED_ATTN_BACKEND", None)

import pytest  # noqa: E402

import fused_attn  # noqa: E402

from fused_attn.dispatch import refusal_reasons  # noqa: E402
from fused_attn.options import AttentionOptions  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _serves_device(name):
    """Whether backend `name` runs on DEVICE at all (the `cpu` backend does not take CUDA tensors)."""
    probe = torch.zeros(1, 1, 1, 8, device=DEVICE)
    return not refusal_reasons(name, probe, probe, probe, AttentionOptions())


# Every test taking the `backend` fixture runs once per backend that can serve DEVICE tensors.
BACKENDS = [name for name in fused_attn.available_backends() if _serves_device(name)]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(autouse=True)
def fresh_seed():
    """A different seed per test run keeps inputs fresh; it is printed when a test fails."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch.manual_seed({seed})")  # shown with a failure's captured output
    yield seed
