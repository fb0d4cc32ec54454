import pytest
import torch

from slimserve.config import ModelConfig
from slimserve.engine.speculative.eagle_head import EagleHead
from slimserve.models.llama import LlamaForCausalLM
from tests.tiny_models import build_tiny_model


@pytest.fixture(scope="session")
def target_folder(tmp_path_factory) -> str:
    return build_tiny_model("qwen2.5", str(tmp_path_factory.mktemp("target")))


@pytest.fixture(scope="session")
def draft_folder(tmp_path_factory) -> str:
    """Another random model of the same vocabulary: its drafts are mostly rejected."""
    return build_tiny_model("llama3.2", str(tmp_path_factory.mktemp("draft")), seed=1)


@pytest.fixture(scope="session")
def head_folder(tmp_path_factory, target_folder) -> str:
    """An untrained head (started from the target's last layer): drafts of every quality."""
    from slimserve.checkpoint.hf_folder import iter_safetensors

    cfg = ModelConfig.from_folder(target_folder)
    target = LlamaForCausalLM(cfg)
    target.load_weights(iter_safetensors(target_folder, torch.device("cpu"), torch.float32))
    head = EagleHead(cfg)
    head.init_from_target(target)
    folder = str(tmp_path_factory.mktemp("head") / "head")
    head.save(folder, target_folder)
    return folder
