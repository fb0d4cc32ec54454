"""Compute kernels. Each function exists twice: a plain-torch reference (used on the CPU and as the
oracle in tests) and a Triton kernel (used on CUDA). `dispatch` picks one by the tensors' device."""
