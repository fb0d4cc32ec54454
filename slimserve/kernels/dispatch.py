"""Choose the Triton kernel on CUDA and the plain-torch reference elsewhere."""

import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
# Under Triton's CPU interpreter some kernels take exact but slower paths (see their UPCAST / ON_GRID flags).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and t.is_cuda
