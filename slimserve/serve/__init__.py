"""OpenAI-compatible HTTP server over the engine, and a client that benchmarks such servers."""
