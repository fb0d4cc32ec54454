"""`prune_(model, SparsityConfig(...), calibration=...)`: sparsify a `transformers` causal LM in place, one
decoder layer at a time with the calibration machinery of quantization (each layer's statistics come from
the outputs of the already-pruned layers before it)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from slimserve.compress.api import Calibration, _default_device
from slimserve.compress.calibration import process_sequential
from slimserve.compress.errors import CalibrationError, QuantConfigError
from slimserve.compress.layer import hook_inputs, linear_errors, run_with_hooks
from slimserve.compress.modules import QuantizedLinear
from slimserve.compress.prune.config import SparsityConfig
from slimserve.compress.prune.methods import magnitude, sparsegpt, wanda
from slimserve.compress.quant.gptq import HessianAccumulator
from slimserve.compress.report import CompressionReport, LayerRecord, peak_memory_mb
from slimserve.compress.structure import decoder_layers, target_linears


def _check_shapes(model: nn.Module, config: SparsityConfig) -> None:
    if config.structure == "unstructured":
        return
    _, m = config.n_m
    quant_group = config.quant.weight_args().group_size if config.quant is not None else None
    for name, lin in target_linears(model, "", config.ignore).items():
        if lin.in_features % m:
            raise QuantConfigError(f"{config.structure} sparsity needs input widths divisible by {m}: {name}")
        if quant_group and lin.in_features % quant_group:
            raise QuantConfigError(f"group size {quant_group} does not divide the input width of {name}")


class LayerPruner:
    def __init__(self, layer: nn.Module, prefix: str, config: SparsityConfig, record: LayerRecord) -> None:
        self.layer, self.config, self.record = layer, config, record
        self.targets = target_linears(layer, prefix, config.ignore)
        self.local = {full: full[len(prefix) + 1 :] if prefix else full for full in self.targets}
        self.stats: dict[str, HessianAccumulator] = {}
        self.zeros = 0
        self.total = 0

    @torch.no_grad()
    def calibrate(self, run) -> None:
        device = next(self.layer.parameters()).device
        # The Hessian also scores the layer's output error in the report, for every method.
        for full, lin in self.targets.items():
            self.stats[full] = HessianAccumulator(lin.in_features, device)
        run_with_hooks(run, hook_inputs(dict(self.targets), lambda name, x: self.stats[name].add(x)))

    @torch.no_grad()
    def prune(self) -> None:
        quant = self.config.quant
        for full, lin in self.targets.items():
            w = lin.weight.detach()
            acc = self.stats.get(full)
            method, codes = self.config.method, None
            if method == "wanda":
                pruned = wanda(w, torch.diagonal(acc.h), self.config)
            elif method == "sparsegpt":
                out = sparsegpt(w, acc.h, self.config, quant.weight_args() if quant is not None else None)
                if out is None:
                    method = "magnitude (sparsegpt fallback)"
                    pruned = magnitude(w, self.config)
                else:
                    pruned, codes = out
            else:
                pruned = magnitude(w, self.config)
            self.record.linears[self.local[full]] = linear_errors(w, pruned, acc, method, None)
            self.zeros += int((pruned == 0).sum())
            self.total += pruned.numel()
            if codes is not None:
                module = QuantizedLinear(
                    codes.q, codes.scale, None, lin.bias, quant.weight_args(), None, quant.format, None
                )
                parent, _, child = self.local[full].rpartition(".")
                setattr(self.layer.get_submodule(parent) if parent else self.layer, child, module)
            else:
                lin.weight.copy_(pruned)


@torch.no_grad()
def prune_(
    model: nn.Module,
    config: SparsityConfig | str,
    calibration: Calibration | list[torch.Tensor] | None = None,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> CompressionReport:
    """Zero weights of every decoder-layer linear in place (lm_head and routers are left dense by default).
    Wanda and SparseGPT need calibration samples; magnitude takes them only to report output errors."""
    if isinstance(config, str):
        config = SparsityConfig(method=config)
    if isinstance(calibration, list):
        calibration = Calibration(calibration, "user")
    samples = calibration.samples if calibration is not None else []
    if config.needs_calibration and not samples:
        raise CalibrationError(f"{config.method} pruning needs calibration samples")
    _check_shapes(model, config)
    device = torch.device(device) if device is not None else _default_device()
    report = CompressionReport(scheme=config.describe(), device=str(device))
    if samples:
        report.calibration = calibration.describe()
    start = time.perf_counter()
    model.eval()
    counts = [0, 0]  # zeroed weights, weights

    def step(layer: nn.Module, name: str, record: LayerRecord, run: Callable[[], None] | None) -> None:
        pruner = LayerPruner(layer, name, config, record)
        if run is not None:
            pruner.calibrate(run)
        pruner.prune()
        counts[0] += pruner.zeros
        counts[1] += pruner.total

    process_sequential(model, samples, device, report, step, f"pruning layers ({config.method})", progress)
    report.scheme["global_sparsity"] = counts[0] / max(counts[1], 1)
    pruned = pruned_linears(model, config)
    report.skipped = sorted(n for n in target_linears(model, "", ()) if n not in pruned)
    report.seconds = time.perf_counter() - start
    report.peak_memory_mb = max([peak_memory_mb(device)] + [r.peak_memory_mb for r in report.layers])
    return report


def pruned_linears(model: nn.Module, config: SparsityConfig) -> set[str]:
    """Names of the linear layers `prune_` sparsifies (quantized ones included)."""
    inside = {id(m) for m in decoder_layers(model).modules()}
    names = {n for n, m in target_linears(model, "", config.ignore).items() if id(m) in inside}
    return names | {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and id(m) in inside}
