"""Choose the Triton kernel on CUDA and the plain-torch reference elsewhere."""

import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and t.is_cuda
