"""Multi-process inference on torch.distributed: sequence parallelism (each rank holds 1/P of the image tokens
through the blocks; self-attention exchanges them by Ulysses all-to-all or by passing K/V around a ring) and CFG
parallelism (the conditional and unconditional halves of a guided batch on different ranks).

Sequence parallelism covers blocks whose only token-mixing op is self-attention with cross-attention to the text
(DiT, PixArt, HunyuanDiT-style); joint-attention blocks (SD3, Flux) mix text into the sequence and are refused.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from slimserve.diffusion import blocks as blk
from slimserve.errors import UnsupportedArchitectureError


def _all_gather_cat(tensor: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Any) -> torch.Tensor:
    """q, k, v: (B, H, S/P, D) local tokens, all heads -> all-to-all to (B, H/P, S, D) -> attention -> back."""
    world = dist.get_world_size(group)
    batch, heads, local, dim = q.shape
    if heads % world:
        raise UnsupportedArchitectureError(f"Ulysses needs heads ({heads}) divisible by the ranks ({world})")

    def to_heads(x: torch.Tensor) -> torch.Tensor:  # (B, H, S/P, D) -> (B, H/P, S, D)
        send = x.reshape(batch, world, heads // world, local, dim).transpose(0, 1).contiguous()
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=group)  # dim 0: destination rank -> source rank
        return received.permute(1, 2, 0, 3, 4).reshape(batch, heads // world, world * local, dim)

    def to_tokens(x: torch.Tensor) -> torch.Tensor:  # (B, H/P, S, D) -> (B, H, S/P, D)
        send = x.reshape(batch, heads // world, world, local, dim).permute(2, 0, 1, 3, 4).contiguous()
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=group)
        return received.transpose(0, 1).reshape(batch, heads, local, dim)

    out = nn.functional.scaled_dot_product_attention(to_heads(q), to_heads(k), to_heads(v))
    return to_tokens(out)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Any) -> torch.Tensor:
    """Each rank keeps its queries; K/V blocks travel around the ring, partial results merge by log-sum-exp."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = torch.zeros_like(q, dtype=torch.float32)
    running_max = torch.full(q.shape[:-1] + (1,), -math.inf, dtype=torch.float32, device=q.device)
    running_sum = torch.zeros_like(running_max)
    kv = torch.stack([k, v]).contiguous()
    for hop in range(world):
        if hop + 1 < world:  # start passing the current block on while computing with it
            incoming = torch.empty_like(kv)
            ops = [
                dist.P2POp(dist.isend, kv, ranks[(rank + 1) % world], group),
                dist.P2POp(dist.irecv, incoming, ranks[(rank - 1) % world], group),
            ]
            requests = dist.batch_isend_irecv(ops)
        scores = (q.float() @ kv[0].float().transpose(-1, -2)) * scale
        block_max = scores.amax(dim=-1, keepdim=True)
        new_max = torch.maximum(running_max, block_max)
        weights = torch.exp(scores - new_max)
        correction = torch.exp(running_max - new_max)
        out = out * correction + weights @ kv[1].float()
        running_sum = running_sum * correction + weights.sum(dim=-1, keepdim=True)
        running_max = new_max
        if hop + 1 < world:
            for request in requests:
                request.wait()
            kv = incoming
    return (out / running_sum).to(q.dtype)


class SequenceParallelAttnProcessor:
    """Self-attention over the whole sequence from each rank's slice of it (diffusers processor interface)."""

    def __init__(self, mode: str, group: Any) -> None:
        self.attention = {"ulysses": ulysses_attention, "ring": ring_attention}[mode]
        self.group = group

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states=None, **kwargs: Any):
        if encoder_hidden_states is not None or kwargs.get("attention_mask") is not None:
            raise UnsupportedArchitectureError("sequence-parallel self-attention takes no mask or encoder states")
        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3:
            raise UnsupportedArchitectureError("sequence parallelism needs token-sequence attention (B, S, C)")
        residual = hidden_states
        batch = hidden_states.shape[0]
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = self.attention(q, k, v, self.group)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class SequenceParallel:
    """Shards the image tokens across the group's ranks between the first block's input and the last block's
    output; every rank ends with the full output. `remove()` restores the model."""

    def __init__(self, model: nn.Module, mode: str = "ulysses", group: Any = None) -> None:
        if mode not in ("ulysses", "ring"):
            raise UnsupportedArchitectureError(f"unknown sequence-parallel mode {mode!r}; use ulysses or ring")
        blocks = blk.transformer_blocks(model)
        if any(blk.pairs_output(b) for b in blocks) or blk.is_unet(model):
            raise UnsupportedArchitectureError(f"{type(model).__name__}: sequence parallelism needs DiT/PixArt blocks")
        self.group, self.world, self.rank = group, dist.get_world_size(group), dist.get_rank(group)
        self._restore: list[tuple[nn.Module, str, Any]] = []
        processor = SequenceParallelAttnProcessor(mode, group)
        for block in blocks:
            attn = getattr(block, "attn1", None)
            if attn is None:
                raise UnsupportedArchitectureError(f"{type(block).__name__} has no self-attention attn1")
            self._restore.append((attn, "processor", attn.processor))
            attn.set_processor(processor)
        self._wrap(blocks[0], self._split_input)
        self._wrap(blocks[-1], self._gather_output)

    def _wrap(self, block: nn.Module, make: Any) -> None:
        original = block.forward
        self._restore.append((block, "forward", block.__dict__.get("forward")))
        block.forward = functools.wraps(original)(make(original))

    def _split_input(self, original: Any) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            bound = inspect.signature(original).bind(*args, **kwargs)
            tokens = bound.arguments["hidden_states"]
            if tokens.shape[1] % self.world:
                raise UnsupportedArchitectureError(
                    f"{tokens.shape[1]} image tokens do not split evenly over {self.world} ranks"
                )
            bound.arguments["hidden_states"] = tokens.chunk(self.world, dim=1)[self.rank]
            return original(*bound.args, **bound.kwargs)

        return forward

    def _gather_output(self, original: Any) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return _all_gather_cat(original(*args, **kwargs), 1, self.group)

        return forward

    def remove(self) -> None:
        for module, name, value in reversed(self._restore):
            if name == "processor":
                module.set_processor(value)
            elif value is None:
                del module.forward
            else:
                module.forward = value
        self._restore.clear()


class CFGParallel:
    """A guided batch (conditional and unconditional halves stacked on dim 0) splits across the group's ranks:
    each runs its part of every batch-sized input, the outputs are gathered back in order."""

    def __init__(self, model: nn.Module, group: Any = None) -> None:
        self.model, self.group = model, group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        original = model.forward
        self._original = model.__dict__.get("forward")
        model.forward = functools.wraps(original)(self._make(original))

    def _make(self, original: Any) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            bound = inspect.signature(original).bind(*args, **kwargs)
            batch = next(iter(bound.arguments.values())).shape[0]
            if batch % self.world:
                return original(*args, **kwargs)  # an unguided odd batch: every rank runs it whole
            for name, value in bound.arguments.items():
                if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
                    bound.arguments[name] = value.chunk(self.world)[self.rank]
            output = original(*bound.args, **bound.kwargs)
            if isinstance(output, tuple):
                return tuple(_all_gather_cat(o, 0, self.group) for o in output)
            output.sample = _all_gather_cat(output.sample, 0, self.group)
            return output

        return forward

    def remove(self) -> None:
        if self._original is None:
            del self.model.forward
        else:
            self.model.forward = self._original
