"""Quantization algorithms (RTN, GPTQ, AWQ, SmoothQuant, KV cache) over the number grids of qdq.py."""
