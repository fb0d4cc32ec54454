"""Pruning: unstructured and N:M sparsity (magnitude, Wanda, SparseGPT) and Minitron-style structured pruning.

from slimserve.compress.prune import SparsityConfig, prune_, save_pruned
report = prune_(model, SparsityConfig(method="sparsegpt", structure="2:4"), calibration=samples)
save_pruned(model, config, "out/")
"""

from slimserve.compress.prune.api import prune_
from slimserve.compress.prune.config import PRUNE_METHODS, SparsityConfig
from slimserve.compress.prune.save import save_pruned

__all__ = ["PRUNE_METHODS", "SparsityConfig", "prune_", "save_pruned"]
