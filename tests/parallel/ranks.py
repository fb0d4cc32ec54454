"""What each spawned gloo rank of test_spawned_ranks.py runs (kept apart from the test module so that the
ranks import neither transformers nor the test models)."""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from slimserve.checkpoint.hf_folder import iter_safetensors
from slimserve.config import ModelConfig
from slimserve.distributed.expert_parallel import ExpertParallelDispatcher
from slimserve.distributed.state import ParallelState
from slimserve.layers.attention import AttentionMetadata
from slimserve.models.llama import LlamaForCausalLM

WORLD = 2
NUM_EXPERTS, TOP_K, HIDDEN, INTER = 8, 3, 16, 12


def model_logits(folder: str, parallel: ParallelState) -> torch.Tensor:
    """Logits of every token of two sequences (5 and 7 tokens) prefilled in one flat batch."""
    cfg = ModelConfig.from_folder(folder)
    model = LlamaForCausalLM(cfg, parallel)
    model.load_weights(iter_safetensors(folder, torch.device("cpu"), torch.float32))
    for attn in model.attention_layers():
        attn.k_cache = torch.zeros(4, 4, attn.num_kv_heads, attn.head_dim)
        attn.v_cache = torch.zeros_like(attn.k_cache)
    ids = torch.tensor([5, 9, 33, 7, 100, 41, 42, 43, 44, 45, 46, 47])
    positions = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6])
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([0, 1, 2, 3, 4, 8, 9, 10, 11, 12, 13, 14]),
        cu_seqlens_q=torch.tensor([0, 5, 12]),
        seq_lens=torch.tensor([5, 7]),
        block_tables=torch.tensor([[0, 1], [2, 3]]),
        max_seqlen_q=7,
    )
    with torch.inference_mode():
        return model.compute_logits(model(ids, positions, meta))


def expert_bank(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(NUM_EXPERTS, 2 * INTER, HIDDEN, generator=g)
    return gate_up, torch.randn(NUM_EXPERTS, HIDDEN, INTER, generator=g)


def run_experts(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """A SiLU-gated MLP per row, with the expert the row names."""
    h = torch.einsum("rh,rih->ri", x, gate_up[ids])
    gate, up = h.chunk(2, dim=-1)
    return torch.einsum("ri,rhi->rh", F.silu(gate) * up, down[ids])


def routed_tokens(rank: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(num_tokens, HIDDEN, generator=g)
    scores = torch.randn(num_tokens, NUM_EXPERTS, generator=g).softmax(-1)
    weights, ids = scores.topk(TOP_K, dim=-1)
    return x, ids, weights


def reference_moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    gate_up, down = expert_bank()
    out = torch.zeros_like(x)
    for k in range(TOP_K):
        out += weights[:, k, None] * run_experts(gate_up, down, x, ids[:, k])
    return out


def rank_main(rank: int, port: int, folders: list[str], expected: list[torch.Tensor]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    parallel = ParallelState(rank, WORLD)
    for folder, want in zip(folders, expected):
        torch.testing.assert_close(model_logits(folder, parallel), want, atol=1e-5, rtol=0)
    # Expert parallelism: this rank holds experts [4 * rank, 4 * rank + 4); ranks route different numbers
    # of tokens (rank 1 none at all in the second round).
    gate_up, down = expert_bank()
    dispatcher = ExpertParallelDispatcher(NUM_EXPERTS, parallel)
    local = slice(dispatcher.expert_start, dispatcher.expert_start + dispatcher.num_local_experts)
    for num_tokens in ([9, 4], [6, 0]):
        x, ids, weights = routed_tokens(rank, num_tokens[rank])
        out = dispatcher(x, ids, weights, lambda h, e: run_experts(gate_up[local], down[local], h, e))
        torch.testing.assert_close(out, reference_moe(x, ids, weights), atol=1e-5, rtol=0)
    # Tokens every rank holds (as under tensor parallelism): each rank dispatches a share; 5 tokens over
    # 2 ranks leave rank 1 one row short.
    x, ids, weights = routed_tokens(7, 5)
    out = dispatcher.replicated(x, ids, weights, lambda h, e: run_experts(gate_up[local], down[local], h, e))
    torch.testing.assert_close(out, reference_moe(x, ids, weights), atol=1e-5, rtol=0)
    dist.destroy_process_group()
