"""Map Hugging Face architecture names to the engine's model classes."""

from torch import nn

from slimserve.config import ModelConfig
from slimserve.errors import UnsupportedArchitectureError
from slimserve.models.llama import LlamaForCausalLM
from slimserve.models.moe import MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MoeForCausalLM,
    "Qwen2MoeForCausalLM": MoeForCausalLM,
    "Qwen3MoeForCausalLM": MoeForCausalLM,
}


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    if cfg.architecture not in MODEL_REGISTRY:
        supported = ", ".join(sorted(MODEL_REGISTRY))
        raise UnsupportedArchitectureError(f"unsupported architecture {cfg.architecture!r}; supported: {supported}")
    return MODEL_REGISTRY[cfg.architecture]
