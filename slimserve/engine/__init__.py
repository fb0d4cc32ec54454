"""The inference engine: requests -> scheduler -> runner -> model -> sampler -> scheduler."""
