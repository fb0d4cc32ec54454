"""Sequential calibration: one decoder layer at a time on the accelerator, the rest of the model on the CPU.

The inputs of every layer are captured in one cheap pass (each layer is replaced by a recorder that returns
its input unchanged, and the last one stops the forward with an exception), so the embedding, the attention
masks and the rotary tables are computed by the model itself. Then each layer is quantized and run on its
inputs, and its quantized outputs become the next layer's inputs."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from slimserve.compress.configs import QuantConfig
from slimserve.compress.layer import LayerQuantizer
from slimserve.compress.modules import dequantized_once
from slimserve.compress.report import CompressionReport, LayerRecord, peak_memory_mb, reset_peak_memory
from slimserve.compress.structure import decoder_layers


class _StopForward(Exception):
    pass


def _shared(value: Any, previous: Any) -> Any:
    """`previous` when it holds the same tensors as `value`: samples of one length get the same attention
    mask and rotary tables, and one copy of them per layer is enough (128 copies of a 2048x2048 mask would
    take a gigabyte)."""
    if isinstance(value, tuple) and isinstance(previous, tuple) and len(value) == len(previous):
        parts = tuple(_shared(v, p) for v, p in zip(value, previous))
        return previous if all(a is b for a, b in zip(parts, previous)) else parts
    same = (
        isinstance(value, torch.Tensor)
        and isinstance(previous, torch.Tensor)
        and value.shape == previous.shape
        and value.dtype == previous.dtype
        and value.device == previous.device
        and torch.equal(value, previous)
    )
    return previous if same else value


class _Recorder(nn.Module):
    """Stands in for a decoder layer during the capture pass."""

    def __init__(self, layer: nn.Module, index: int, last: bool, sink: list[list[dict[str, Any]]], first: list):
        super().__init__()
        # Kept out of the module tree so that moving the model leaves the real layer where it is.
        object.__setattr__(self, "_layer", layer)
        self.index, self.last, self.sink, self.first = index, last, sink, first

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise TypeError("decoder layers are expected to take everything but hidden_states by keyword")
        if self.index == 0:
            self.first.append(hidden_states)
        previous = self.sink[self.index][-1] if self.sink[self.index] else {}
        self.sink[self.index].append({k: _shared(v, previous.get(k)) for k, v in kwargs.items()})
        if self.last:
            raise _StopForward
        return hidden_states


@torch.no_grad()
def capture_inputs(
    model: nn.Module, layers: nn.ModuleList, samples: list[torch.Tensor], device: torch.device
) -> tuple[list[torch.Tensor], list[list[dict[str, Any]]]]:
    """The first layer's hidden states per sample and every layer's keyword arguments per sample."""
    originals = list(layers)
    kwargs: list[list[dict[str, Any]]] = [[] for _ in originals]
    first: list[torch.Tensor] = []
    for i, layer in enumerate(originals):
        layers[i] = _Recorder(layer, i, i == len(originals) - 1, kwargs, first)
    home = next(model.parameters()).device
    try:
        model.to(device)
        for ids in samples:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        model.to(home)
        for i, layer in enumerate(originals):
            layers[i] = layer
    return first, kwargs


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_layer(layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]]) -> None:
    """One pass over the calibration set for the hooks that observe it; each output is dropped at once."""
    for h, kw in zip(hidden, kwargs):
        layer(h, **kw)


@torch.no_grad()
def advance_inputs(layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]]) -> None:
    """Replace each sample's hidden states by the layer's output, one sample at a time, so that the inputs
    and the outputs of the whole calibration set never both sit in accelerator memory."""
    with dequantized_once(layer):
        for j, kw in enumerate(kwargs):
            hidden[j] = _layer_output(layer(hidden[j], **kw))


# What one layer's step does: calibrate on `run` (one pass over the calibration set; None without samples),
# then quantize or prune the layer in place.
LayerStep = Callable[[nn.Module, str, LayerRecord, Callable[[], None] | None], None]


@torch.no_grad()
def process_sequential(
    model: nn.Module,
    samples: list[torch.Tensor] | None,
    device: torch.device,
    report: CompressionReport,
    step: LayerStep,
    desc: str,
    progress: bool = True,
) -> None:
    """Apply `step` to every decoder layer in order, each on the accelerator in turn; with samples, each layer
    is calibrated on the outputs of the already-processed layers before it."""
    layers = decoder_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers)
    hidden, kwargs = capture_inputs(model, layers, samples, device) if samples else (None, None)
    bar = tqdm(range(len(layers)), desc=desc, disable=not progress)
    for i in bar:
        start = time.perf_counter()
        reset_peak_memory(device)
        layer = layers[i]
        home = next(layer.parameters()).device
        layer.to(device)
        record = LayerRecord(index=i, seconds=0.0, peak_memory_mb=0.0)
        step(layer, f"{prefix}.{i}", record, None if hidden is None else partial(run_layer, layer, hidden, kwargs[i]))
        if hidden is not None:
            advance_inputs(layer, hidden, kwargs[i])
        layer.to(home)
        record.seconds = time.perf_counter() - start
        record.peak_memory_mb = peak_memory_mb(device)
        report.layers.append(record)
        bar.set_postfix(sec=f"{record.seconds:.1f}", peak_mb=f"{record.peak_memory_mb:.0f}")


def quantize_sequential(
    model: nn.Module,
    config: QuantConfig,
    samples: list[torch.Tensor] | None,
    device: torch.device,
    report: CompressionReport,
    progress: bool = True,
) -> None:
    """Quantize every decoder layer in order (see process_sequential)."""

    def step(layer: nn.Module, name: str, record: LayerRecord, run: Callable[[], None] | None) -> None:
        quantizer = LayerQuantizer(layer, name, config, record, report)
        if run is not None:
            quantizer.calibrate(run)
        quantizer.quantize()

    process_sequential(model, samples, device, report, step, "quantizing layers", progress)
