"""Reading checkpoints: Hugging Face folders and GGUF files, and fetching the embedded real models."""
