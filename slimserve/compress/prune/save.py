"""Write a pruned model (optionally also quantized) as a compressed-tensors checkpoint with a
`sparsity_config`, so that runtimes know which layers hold the N:M pattern."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from slimserve.compress.prune.api import pruned_linears
from slimserve.compress.prune.config import SparsityConfig
from slimserve.compress.report import CompressionReport
from slimserve.compress.writer import save_compressed


def save_pruned(
    model: nn.Module,
    config: SparsityConfig,
    out: str | os.PathLike,
    tokenizer: Any = None,
    report: CompressionReport | None = None,
) -> Path:
    targets = sorted(pruned_linears(model, config))
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in targets)
    global_sparsity = report.scheme.get("global_sparsity", config.sparsity) if report is not None else config.sparsity
    sparsity = config.sparsity_config(targets, ignore, global_sparsity)
    return save_compressed(model, config.quant, out, tokenizer, report, sparsity=sparsity)
