"""Building blocks of the engine's models: linear layers, attention, rotary embedding, norms, sampler."""
