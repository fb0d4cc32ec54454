"""`quantize_(model, config, calibration=...)`: quantize a `transformers` causal LM in place."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from slimserve.compress.calibration import quantize_sequential
from slimserve.compress.configs import QuantConfig, preset
from slimserve.compress.errors import CalibrationError, QuantConfigError
from slimserve.compress.layer import LayerQuantizer
from slimserve.compress.modules import QuantizedLinear
from slimserve.compress.moe import uncalibrated_experts, unfuse_experts
from slimserve.compress.quant import kv_sensitivity
from slimserve.compress.report import CompressionReport, LayerRecord, peak_memory_mb
from slimserve.compress.rotation import rotate_model
from slimserve.compress.structure import decoder_layers, target_linears
from slimserve.config import check_layers_exist


@dataclass
class Calibration:
    """Token sequences (each of shape (1, seq_len)) and where they came from ("generic", "self", a file)."""

    samples: list[torch.Tensor]
    source: str

    def describe(self) -> dict:
        lengths = [s.shape[-1] for s in self.samples]
        return {
            "source": self.source,
            "num_samples": len(self.samples),
            "seq_len": max(lengths, default=0),
            "tokens": sum(lengths),
        }


def _check_shapes(model: nn.Module, config: QuantConfig) -> None:
    """Every quantized input width must split into whole weight groups, activation groups and weight blocks
    (runtimes pad partial row blocks but not partial column groups)."""
    w, a = config.weight_args(), config.input_args()
    widths = {"group size": w.group_size if w.strategy == "group" else None}
    widths["block width"] = w.block_structure[1] if w.strategy == "block" else None
    if a is not None and a.strategy == "group":
        widths["activation group size"] = a.group_size
    for name, lin in target_linears(model, "", config.ignore).items():
        for what, size in widths.items():
            if size and lin.in_features % size:
                raise QuantConfigError(f"{what} {size} does not divide the input width {lin.in_features} of {name}")


def _outside_layers(model: nn.Module, config: QuantConfig) -> list[str]:
    """Linear layers to quantize outside the decoder stack (lm_head when it is not ignored): rounded to
    nearest, as no calibrated layer inputs exist for them."""
    inside = {id(m) for m in decoder_layers(model).modules()}
    names = [n for n, m in target_linears(model, "", config.ignore).items() if id(m) not in inside]
    a = config.input_args()
    if names and a is not None and not a.dynamic:
        raise QuantConfigError(f"static activation scales exist for decoder layers only: ignore {', '.join(names)}")
    return names


def _float_matrices(model: nn.Module) -> list[str]:
    """Matrices left in floating point that are neither embeddings nor skipped linear layers: e.g. fused
    MoE expert tensors and routers, which this quantizer does not handle."""
    out = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Embedding, QuantizedLinear)):
            continue
        for p_name, p in mod.named_parameters(recurse=False):
            if p.ndim >= 2 and p.is_floating_point():
                out.append(f"{mod_name}.{p_name}")
    return sorted(out)


def _sensitivity_samples(samples: list[torch.Tensor], tokens: int) -> list[torch.Tensor]:
    """The first whole samples that hold `tokens` calibration tokens (at least one sample)."""
    out: list[torch.Tensor] = []
    for s in samples:
        if out and sum(x.shape[-1] for x in out) >= tokens:
            break
        out.append(s)
    return out


@torch.no_grad()
def _resolve_kv_skip(
    model: nn.Module, config: QuantConfig, samples: list[torch.Tensor], device: torch.device, report: CompressionReport
) -> QuantConfig:
    """The config with its full-precision KV layers decided (the automatic choice scores every layer on the
    calibration data, the whole model on `device`), recorded in the report."""
    kv_config = config.kv_cache
    num_layers = len(decoder_layers(model))
    if kv_config.auto_skip:
        if kv_config.auto_skip >= num_layers:
            raise QuantConfigError(f"KV-cache auto:{kv_config.auto_skip} leaves none of {num_layers} layers quantized")
        home = next(model.parameters()).device
        try:
            model.to(device)
            chosen = _sensitivity_samples(samples, kv_config.sensitivity_tokens)
            report.kv_cache_layer_kl = kv_sensitivity.layer_kl(model, chosen, kv_config.args())
        finally:
            model.to(home)
        skip = kv_sensitivity.most_sensitive(report.kv_cache_layer_kl, kv_config.auto_skip)
        kv_config = replace(kv_config, skip_layers=tuple(skip), auto_skip=0)
    check_layers_exist(list(kv_config.skip_layers), num_layers, "KV-cache skip layers", QuantConfigError)
    report.kv_cache_skip_layers = list(kv_config.skip_layers)
    return replace(config, kv_cache=kv_config)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quantize_(
    model: nn.Module,
    config: QuantConfig | str,
    calibration: Calibration | list[torch.Tensor] | None = None,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> CompressionReport:
    """Swap the model's linear layers for quantized ones (and add KV-cache quantization) in place.

    Methods and activation schemes that need data (GPTQ, AWQ, SmoothQuant, static activation scales, KV
    cache) take `calibration`; plain RTN with dynamic activations needs none."""
    if isinstance(config, str):
        config = preset(config)
    if isinstance(calibration, list):
        calibration = Calibration(calibration, "user")
    if config.needs_calibration and (calibration is None or not calibration.samples):
        raise CalibrationError(f"{type(config).__name__} with method {config.method!r} needs calibration samples")
    # Fused MoE expert banks become per-expert linear layers (the same function) before anything else looks.
    banks = unfuse_experts(model)
    _check_shapes(model, config)
    outside = _outside_layers(model, config)
    device = torch.device(device) if device is not None else _default_device()
    report = CompressionReport(scheme=config.describe(), device=str(device))
    if calibration is not None and calibration.samples:
        # Even RTN takes calibration data when given: the report then has every layer's output error.
        report.calibration = calibration.describe()
    start = time.perf_counter()
    model.eval()
    for bank in banks:
        bank.calibrate_all = config.moe_calibrate_all_experts
    if config.rotation is not None:
        rotate_model(model, config.rotation)
    if config.kv_cache is not None:
        config = _resolve_kv_skip(model, config, calibration.samples, device, report)
    quantize_sequential(model, config, calibration.samples if report.calibration else None, device, report, progress)
    if outside:
        record = LayerRecord(index=-1, seconds=0.0, peak_memory_mb=0.0)
        rtn_config = replace(config, method="rtn", smoothquant=None, kv_cache=None)
        LayerQuantizer(model, "", rtn_config, record, report).quantize()
        report.layers.append(record)
    for bank in banks:
        bank.calibrate_all = False
    if report.calibration:
        report.uncalibrated_experts = uncalibrated_experts(model)
    report.skipped = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    report.unquantized_weights = _float_matrices(model)
    report.seconds = time.perf_counter() - start
    report.peak_memory_mb = max([peak_memory_mb(device)] + [r.peak_memory_mb for r in report.layers])
    return report
