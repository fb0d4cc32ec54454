"""FP8 expert banks over two gloo ranks: expert parallelism (whole experts per rank, FP8 inputs rounded per
token as in one process) and tensor parallelism (every expert's FP8 rows and scales split by features), with
attention and the shared expert left unquantized, give the single-process tokens and log-probabilities.
Checkpoints that also quantize dense layers stay single-process, with one clear error."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimserve import LLM, SamplingParams
from slimserve.compress import preset, quantize_, save_compressed
from slimserve.compress.configs import DEFAULT_IGNORE
from slimserve.errors import CheckpointError
from slimserve.layers.moe_fp8 import Fp8FusedExperts
from tests.parallel.engine_outputs import ENGINE as ONE_PROCESS_ENGINE
from tests.parallel.engine_outputs import PROMPTS, assert_logprobs_equal
from tests.tiny_models import VOCAB, build_tiny_model

# One thread per rank: two ranks share two cores.
ENGINE = dict(ONE_PROCESS_ENGINE, cpu_threads=1)
EXPERTS_ONLY = DEFAULT_IGNORE + ("re:.*self_attn\\..*", "re:.*shared_expert\\..*")


@pytest.fixture(autouse=True)
def restore_threads():
    """The engines here run one thread per rank; later tests get this process's threads back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def fp8_checkpoint(tmp_path, scheme: str, ignore=EXPERTS_ONLY) -> str:
    folder = build_tiny_model("qwen2-moe", str(tmp_path / "qwen2-moe"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    config = preset(scheme, ignore=ignore)
    quantize_(model, config, progress=False)
    return str(save_compressed(model, config, tmp_path / scheme))


# Under tensor parallelism each rank rounds its slice of the intermediate features with a per-token scale of
# that slice (as vLLM does): a finer scale, a different function; weight-only FP8 is split exactly.
@pytest.mark.parametrize("scheme,expert_parallel", [("FP8", True), ("FP8_WEIGHT_ONLY", False)], ids=["ep", "tp"])
def test_fp8_experts_two_ranks_equal_one(tmp_path, scheme, expert_parallel):
    folder = fp8_checkpoint(tmp_path, scheme)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=VOCAB)
    single = LLM(folder, **ENGINE)
    assert any(isinstance(m, Fp8FusedExperts) for m in single.engine.runner.model.modules())
    expected = single.generate(PROMPTS, params, use_tqdm=False)
    llm = LLM(folder, tensor_parallel_size=2, enable_expert_parallel=expert_parallel, **ENGINE)
    got = llm.generate(PROMPTS, params, use_tqdm=False)
    llm.engine.shutdown()
    for want, have in zip(expected, got):
        assert have.outputs[0].token_ids == want.outputs[0].token_ids
        assert_logprobs_equal(want, have)


def test_quantized_dense_layers_refuse_two_ranks(tmp_path):
    folder = fp8_checkpoint(tmp_path, "FP8_WEIGHT_ONLY", ignore=DEFAULT_IGNORE)
    with pytest.raises(CheckpointError, match="tensor_parallel_size 1"):
        LLM(folder, tensor_parallel_size=2, **ENGINE)
