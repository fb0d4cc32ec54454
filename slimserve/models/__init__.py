"""Model families of the engine, looked up by the Hugging Face `architectures` name."""
