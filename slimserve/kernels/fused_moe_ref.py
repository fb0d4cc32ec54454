"""Plain-torch reference of the fused mixture-of-experts MLP: each token's top-k experts, SiLU-gated,
weighted by the router and summed (an expert loop, as transformers' eager experts do it)."""

import torch
import torch.nn.functional as F


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_start: int = 0,
) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I] hold experts
    expert_start .. expert_start + E - 1; topk_weights / topk_ids [T, k] name global experts.
    Returns [T, H]: the sum over each token's experts held here (others contribute nothing)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    local = topk_ids.long() - expert_start
    for e in torch.unique(local).tolist():  # only the experts some token chose
        if not 0 <= e < w13.shape[0]:
            continue
        token, slot = torch.where(local == e)
        gate, up = F.linear(x[token], w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e])
        out.index_add_(0, token, y.float() * topk_weights[token, slot, None].float())
    return out.to(x.dtype)
