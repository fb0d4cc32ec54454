"""Plain-torch reference of rotary position embedding (the "rotate half" layout used by HF Llama)."""

import torch


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, H, D], k [N, Hkv, D], positions [N]; cos_sin_cache [max_pos, D] = cat(cos, sin) of the
    D/2 frequencies, fp32. Returns rotated copies of q and k in their own dtype."""
    cos, sin = cos_sin_cache[positions.long()].float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)
