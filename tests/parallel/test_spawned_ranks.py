"""Two gloo ranks on the CPU: the tensor-parallel model gives the single-process model's logits, and the
expert-parallel dispatch gives a plain expert bank's output. One spawned group runs both checks."""

import socket

import torch
import torch.multiprocessing as mp
from transformers import AutoConfig

from slimserve.checkpoint.random_model import save_random_model
from slimserve.distributed.expert_parallel import ExpertParallelDispatcher
from slimserve.distributed.state import ParallelState
from tests.parallel.ranks import (
    NUM_EXPERTS,
    WORLD,
    expert_bank,
    model_logits,
    rank_main,
    reference_moe,
    routed_tokens,
    run_experts,
)
from tests.tiny_models import FAMILIES, build_tiny_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process(tmp_path):
    # qwen3: KV heads split (2 over 2 ranks), q/k norm, tied head. mqa: its one KV head replicated, an
    # untied head, and a vocabulary that does not divide evenly (the last rank's rows are padded).
    mqa = dict(FAMILIES["mqa"])
    config = AutoConfig.for_model(
        mqa.pop("model_type"),
        vocab_size=509,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        **mqa,
    )
    folders = [build_tiny_model("qwen3", str(tmp_path / "qwen3")), save_random_model(config, str(tmp_path / "mqa"))]
    expected = [model_logits(f, ParallelState()) for f in folders]
    mp.spawn(rank_main, args=(_free_port(), folders, expected), nprocs=WORLD, join=True)


def test_single_process_dispatch_is_the_plain_moe():
    gate_up, down = expert_bank()
    x, ids, weights = routed_tokens(0, 11)
    out = ExpertParallelDispatcher(NUM_EXPERTS, ParallelState())(
        x, ids, weights, lambda h, e: run_experts(gate_up, down, h, e)
    )
    torch.testing.assert_close(out, reference_moe(x, ids, weights), atol=1e-5, rtol=0)
