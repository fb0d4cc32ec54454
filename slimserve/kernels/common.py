"""Pieces the Triton kernels share."""

import functools
import os

import torch

from slimserve.kernels.dispatch import HAS_TRITON, INTERPRETED

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def dot(a, b, UPCAST: tl.constexpr):
        # The CPU interpreter cannot multiply bf16 or FP8 held as raw integers; on a GPU UPCAST is off.
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, input_precision="ieee")

    @triton.jit
    def wait_for_previous(USE_PDL: tl.constexpr):
        """Under programmatic dependent launch: let the next kernel's programs be scheduled, then wait until the
        kernel before this one has finished and its writes are visible. Every program calls it before it reads
        what earlier kernels of the forward pass wrote and before it writes anything. Weights, and the step's
        inputs (positions, KV slots, sequence lengths: written before the forward pass's first kernel, which
        waits for them), may load first."""
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()


@functools.cache
def _compute_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with programmatic dependent launch (Hopper and later): a kernel then
    starts while the one before it drains, streams its weights, and waits at `wait_for_previous`, which hides
    most of the gap between the small kernels of a decode step (CUDA graphs keep the overlap). SLIMSERVE_PDL=0
    turns it off, to time both."""
    if device.type != "cuda" or INTERPRETED or os.environ.get("SLIMSERVE_PDL", "1") == "0":
        return False
    return _compute_capability(device.index if device.index is not None else torch.cuda.current_device())[0] >= 9


def pdl_options(device: torch.device) -> dict[str, bool]:
    """The launch options of a kernel that calls `wait_for_previous`: its USE_PDL flag and Triton's launch_pdl
    always agree (a kernel launched early that does not wait would race with the one before it)."""
    enabled = pdl_enabled(device)
    return {"USE_PDL": enabled, "launch_pdl": enabled}
