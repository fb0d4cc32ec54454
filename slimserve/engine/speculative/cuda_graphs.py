"""CUDA-graph capture for the speculative passes, in one place so tests can emulate it on the CPU."""

from __future__ import annotations

from collections.abc import Callable

import torch

from slimserve.engine.runner import ModelRunner


def wants_graphs(runner: ModelRunner) -> bool:
    return runner.device.type == "cuda" and not runner.config.enforce_eager


def capture(fn: Callable[[], tuple[torch.Tensor, ...]], pool) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]:
    """Run fn once to compile its kernels, then capture it; replay() recomputes the returned tensors."""
    with torch.inference_mode():
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = fn()
    return graph, outputs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
