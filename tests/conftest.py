"""Shared fixtures. Triton kernels run on CPU tensors through the interpreter where there is no GPU."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit runs, i.e. before `neuroada_kernels` is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.helpers import tiny_llama  # noqa: E402


@pytest.fixture
def model() -> torch.nn.Module:
    return tiny_llama(seed=0)
