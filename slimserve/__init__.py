from slimserve.config import SamplingParams

__all__ = ["SamplingParams", "LLM"]


def __getattr__(name: str):
    # Import the engine lazily: `import slimserve` stays cheap for the CLI and the compression tools.
    if name == "LLM":
        from slimserve.engine.llm import LLM

        return LLM
    raise AttributeError(name)
