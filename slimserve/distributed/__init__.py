"""Tensor and expert parallelism on torch.distributed: the parallel state, sharded layers, the worker
processes of a multi-GPU engine and the all-to-all dispatch of tokens to experts on other ranks."""
