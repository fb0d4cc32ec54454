"""Quantize one decoder layer: balance (SmoothQuant or AWQ), collect statistics, swap its linear layers."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import torch
from torch import nn

from slimserve.compress.args import QuantArgs
from slimserve.compress.configs import QuantConfig
from slimserve.compress.errors import CalibrationError
from slimserve.compress.modules import QuantizedLinear
from slimserve.compress.quant import awq, kv
from slimserve.compress.quant.gptq import HessianAccumulator, gptq
from slimserve.compress.quant.hqq import hqq
from slimserve.compress.quant.rtn import QuantizedWeight, rtn
from slimserve.compress.quant.smoothquant import AbsMax, smooth_scales
from slimserve.compress.report import CompressionReport, LayerRecord, LinearRecord
from slimserve.compress.structure import BalanceGroup, apply_balance, balance_groups, linear_of, target_linears

RunLayer = Callable[[], None]


def hook_inputs(modules: dict[str, nn.Module], collect: Callable[[str, torch.Tensor], None]) -> list:
    """Forward hooks that hand each named module's input to `collect(name, x)`."""

    def make(name: str):
        return lambda mod, inputs, out: collect(name, inputs[0])

    return [m.register_forward_hook(make(n)) for n, m in modules.items()]


def run_with_hooks(run: RunLayer, handles: list) -> None:
    """One calibration pass with the hooks in place; they are removed whatever happens."""
    try:
        run()
    finally:
        for h in handles:
            h.remove()


class LayerQuantizer:
    def __init__(
        self, layer: nn.Module, prefix: str, config: QuantConfig, record: LayerRecord, report: CompressionReport
    ) -> None:
        self.layer, self.prefix, self.config = layer, prefix, config
        self.record, self.report = record, report
        self.wargs: QuantArgs = config.weight_args()
        self.iargs: QuantArgs | None = config.input_args()
        self.targets = target_linears(layer, prefix, config.ignore)
        self.local = {full: full[len(prefix) + 1 :] if prefix else full for full in self.targets}
        self.hessians: dict[str, HessianAccumulator] = {}
        self.act_absmax: dict[str, AbsMax] = {}
        self.reference: dict[str, torch.Tensor] = {}  # weights before AWQ clipping, to measure errors against

    def _groups(self, norm_only: bool) -> list[BalanceGroup]:
        """Balance groups whose linears are all quantized (scaling an ignored layer would be pointless)."""
        names = set(self.local.values())
        return [
            g
            for g in balance_groups(self.layer)
            if all(n in names for n in g.linears) and not (norm_only and isinstance(g.prev, nn.Linear))
        ]

    def _run_observing_group_inputs(
        self, groups: list, collect: Callable[[str, torch.Tensor], None], run: RunLayer
    ) -> None:
        """Run the layer once with `collect` seeing the input of each group's first linear (its inputs are
        the whole group's)."""
        run_with_hooks(run, hook_inputs({g.linears[0]: linear_of(self.layer, g.linears[0]) for g in groups}, collect))

    @torch.no_grad()
    def calibrate(self, run: RunLayer) -> None:
        if self.config.smoothquant is not None:
            self._smooth(run)
        if self.config.method == "awq":
            self._awq(run)
        self._collect_stats(run)

    def _smooth(self, run: RunLayer) -> None:
        groups = self._groups(norm_only=True)
        stats = {g.linears[0]: AbsMax() for g in groups}
        self._run_observing_group_inputs(groups, lambda n, x: stats[n].add(x), run)
        for g in groups:
            weights = [linear_of(self.layer, n).weight for n in g.linears]
            s = smooth_scales(stats[g.linears[0]].value, weights, self.config.smoothquant.alpha)
            apply_balance(self.layer, g, s)
            self.record.balance[g.prev_name] = {"max_scale": s.max().item(), "min_scale": s.min().item()}

    def _awq(self, run: RunLayer) -> None:
        """Scales for every group first, then clipping (AutoAWQ's order): a linear in two groups (up_proj feeds
        down_proj and is fed by the norm) is then clipped, and kept as the report's reference, once balanced."""
        opts = self.config.awq
        groups = self._groups(norm_only=False)
        samplers = {g.linears[0]: awq.InputSampler(opts.max_tokens) for g in groups}
        self._run_observing_group_inputs(groups, lambda n, x: samplers[n].add(x), run)
        scales = {}
        layer_error = self._layer_output_error(run) if opts.objective == "layer" else None
        for g in groups:
            sampler = samplers[g.linears[0]]
            weights = [linear_of(self.layer, n).weight for n in g.linears]
            if layer_error is None:
                error = awq.linear_output_error(weights, sampler.sample(opts.max_tokens))
            else:
                error = functools.partial(layer_error, [linear_of(self.layer, n) for n in g.linears])
            s, err, plain = awq.search_scale(weights, error, sampler.mean_abs(), self.wargs, opts)
            apply_balance(self.layer, g, s)
            scales[g.prev_name] = s
            self.record.balance[g.prev_name] = {"error": err, "error_unscaled": plain}
        if opts.clip:
            for g in groups:
                self._awq_clip(g, samplers[g.linears[0]].sample(opts.clip_tokens) / scales[g.prev_name])

    def _layer_output_error(self, run: RunLayer) -> Callable[[list[nn.Linear], list[torch.Tensor]], float]:
        """error(linears, weights): mean squared error of the whole layer's output over the calibration data
        with `weights` in place of those linears' (AutoAWQ scores attention and MLP scales on their block's
        output: errors in q/k pass through the softmax, those of gate through the SiLU)."""
        outputs: list[torch.Tensor] = []

        def capture(mod: nn.Module, inputs: tuple, out: torch.Tensor | tuple) -> None:
            outputs.append((out[0] if isinstance(out, tuple) else out).float())

        run_with_hooks(run, [self.layer.register_forward_hook(capture)])
        reference = outputs.copy()

        def error(linears: list[nn.Linear], weights: list[torch.Tensor]) -> float:
            saved = [lin.weight.detach().clone() for lin in linears]
            for lin, w in zip(linears, weights):
                lin.weight.copy_(w.to(lin.weight.dtype))
            outputs.clear()
            try:
                run_with_hooks(run, [self.layer.register_forward_hook(capture)])
            finally:
                for lin, w in zip(linears, saved):
                    lin.weight.copy_(w)
            total = sum((o - r).pow(2).sum().item() for o, r in zip(outputs, reference))
            return total / sum(r.numel() for r in reference)

        return error

    def _awq_clip(self, group: BalanceGroup, x: torch.Tensor) -> None:
        """Clip the group's linears on their (scaled) inputs x, keeping the unclipped weights as the reference."""
        for n in group.linears:
            if n.endswith(("q_proj", "k_proj")):
                continue  # their error is squashed by the softmax; clipping them tends to hurt
            lin = linear_of(self.layer, n)
            self.reference[f"{self.prefix}.{n}"] = lin.weight.detach().clone()
            lin.weight.copy_(awq.search_clip(lin.weight, x, self.wargs, self.config.awq).to(lin.weight.dtype))

    def _collect_stats(self, run: RunLayer) -> None:
        device = next(self.layer.parameters()).device
        static_act = self.iargs is not None and not self.iargs.dynamic
        for full, lin in self.targets.items():
            self.hessians[full] = HessianAccumulator(lin.in_features, device)
            if static_act:
                self.act_absmax[full] = AbsMax()

        def collect(name: str, x: torch.Tensor) -> None:
            self.hessians[name].add(x)
            if static_act:
                self.act_absmax[name].add(x)

        handles = hook_inputs(dict(self.targets), collect)
        observers: dict[nn.Module, kv.KVObserver] = {}
        if self.config.kv_cache is not None:
            for attn in kv.attention_modules(self.layer):
                observers[attn] = kv.KVObserver()
                handles.append(kv.attach(attn, None, observers[attn]))
        run_with_hooks(run, handles)
        if self.config.kv_cache is not None:
            kv_args = self.config.kv_cache.args()
            # A skipped layer's scales are written too (other readers quantize every layer), but its cache stays
            # in full precision, so the layers after it calibrate on unrounded keys and values, as served.
            rounded = self.record.index not in self.config.kv_cache.skip_layers
            for attn, obs in observers.items():
                kv.set_scales(attn, obs, kv_args, next(attn.parameters()).dtype)
                if rounded:
                    kv.attach(attn, kv_args)

    def _input_absmax(self, full: str) -> torch.Tensor:
        """The largest input seen per channel; for an expert that saw no token, the largest any expert of
        the same projection in this layer saw (they all read the same hidden states)."""
        value = self.act_absmax[full].value
        if value is not None:
            return value
        key = _sibling_key(full)
        seen = [a.value for n, a in self.act_absmax.items() if a.value is not None and _sibling_key(n) == key]
        if not seen:
            raise CalibrationError(f"{full}: no calibration token reached this layer; give more calibration data")
        return torch.stack(seen).amax(0)

    @torch.no_grad()
    def quantize(self) -> None:
        for full, lin in self.targets.items():
            self.record.linears[self.local[full]] = self._quantize_linear(full, lin)
            self.hessians.pop(full, None)  # freed as soon as used: the MLP's is the layer's largest tensor

    def _quantize_linear(self, full: str, lin: nn.Linear) -> LinearRecord:
        w = lin.weight.detach()
        dtype = w.dtype
        acc = self.hessians.get(full)
        method, damping = self.config.method, None
        result: QuantizedWeight | None = None
        if method == "gptq" and acc.n == 0:
            method = "rtn (no calibration tokens)"  # an expert the router never chose: no Hessian to use
        elif method == "gptq":
            out = gptq(w, acc.h, self.wargs, self.config.gptq, dtype, self.config.observer)
            if out is None:
                self.report.gptq_fallbacks.append(full)
                method = "rtn (gptq fallback)"
            else:
                result, damping = out.weight, out.damping
        elif method == "hqq":
            result = hqq(w, self.wargs, self.config.hqq, dtype)
        if result is None:
            result = rtn(w, self.wargs, dtype, self.config.observer)
        input_scale = None
        if full in self.act_absmax:
            amax = self._input_absmax(full).amax()
            input_scale = torch.where(amax > 0, amax / self.iargs.qmax, torch.ones_like(amax)).reshape(1).to(dtype)
        module = QuantizedLinear(
            result.q, result.scale, result.zero_point, lin.bias, self.wargs, self.iargs, self.config.format, input_scale
        )
        parent_name, _, child = self.local[full].rpartition(".")
        setattr(self.layer.get_submodule(parent_name) if parent_name else self.layer, child, module)
        return linear_errors(self.reference.get(full, w), result.dequantize(self.wargs), acc, method, damping)


_EXPERT_INDEX = re.compile(r"\.experts\.\d+\.")


def _sibling_key(name: str) -> str:
    return _EXPERT_INDEX.sub(".experts.*.", name)


def linear_errors(
    w: torch.Tensor, wq: torch.Tensor, acc: HessianAccumulator | None, method: str, damping: float | None
) -> LinearRecord:
    w, d = w.float(), (wq.float() - w.float())
    weight_error = (d.norm() / w.norm().clamp(min=1e-12)).item()
    output_error = None
    if acc is not None and acc.n > 0:
        h = acc.h
        output_error = ((d @ h) * d).sum().item() / max(((w @ h) * w).sum().item(), 1e-12)
    return LinearRecord(method, weight_error, output_error, damping)
