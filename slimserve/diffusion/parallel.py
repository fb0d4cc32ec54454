"""Multi-process inference on torch.distributed: sequence parallelism (each rank holds 1/P of the image tokens
through the blocks; self-attention exchanges them by Ulysses all-to-all or by passing K/V around a ring) and CFG
parallelism (the conditional and unconditional halves of a guided batch on different ranks).

Sequence parallelism covers blocks whose only token-mixing op is self-attention with cross-attention to the text
(DiT, PixArt, HunyuanDiT-style) and joint-attention blocks (SD3, Flux double- and single-stream), where the text
tokens join the image tokens inside attention: as in xDiT and ParaAttention, the image tokens are sharded and the
text tokens replicated on every rank; each rank's queries (its image shard plus the whole text) attend to all image
tokens plus the text once, and Flux's rotary embeddings are sliced to the rank's tokens.
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


def _tokens_to_heads(x: torch.Tensor, group: Any) -> torch.Tensor:
    """(B, H, S/P, D) local tokens, all heads -> (B, H/P, S, D) all tokens, this rank's heads (one all-to-all)."""
    world = dist.get_world_size(group)
    batch, heads, local, dim = x.shape
    if heads % world:
        raise UnsupportedArchitectureError(f"Ulysses needs heads ({heads}) divisible by the ranks ({world})")
    send = x.reshape(batch, world, heads // world, local, dim).transpose(0, 1).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)  # dim 0: destination rank -> source rank
    return received.permute(1, 2, 0, 3, 4).reshape(batch, heads // world, world * local, dim)


def _heads_to_tokens(x: torch.Tensor, group: Any) -> torch.Tensor:
    """(B, H/P, S, D) -> (B, H, S/P, D), the inverse all-to-all."""
    world = dist.get_world_size(group)
    batch, rank_heads, tokens, dim = x.shape
    send = x.reshape(batch, rank_heads, world, tokens // world, dim).permute(2, 0, 1, 3, 4).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return received.transpose(0, 1).reshape(batch, rank_heads * world, tokens // world, dim)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Any) -> torch.Tensor:
    """q, k, v: (B, H, S/P, D) local tokens, all heads -> all-to-all to (B, H/P, S, D) -> attention -> back."""
    q, k, v = (_tokens_to_heads(x, group) for x in (q, k, v))
    return _heads_to_tokens(nn.functional.scaled_dot_product_attention(q, k, v), group)


def joint_attention(
    mode: str, image: tuple[torch.Tensor, ...], text: tuple[torch.Tensor, ...], group: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over [text, all image tokens] for queries [text, this rank's image tokens]. image: q, k, v of the
    rank's shard (B, H, S/P, D); text: q, k, v of the whole text (B, H, T, D), the same on every rank.
    Returns the outputs of the image shard (B, H, S/P, D) and of the text (B, H, T, D)."""
    text_tokens = text[0].shape[2]
    if mode == "ring":
        queries = torch.cat([text[0], image[0]], dim=2)
        out = ring_attention(queries, image[1], image[2], group, local=(text[1], text[2]))
        return out[:, :, text_tokens:], out[:, :, :text_tokens]
    # Ulysses: the image heads are exchanged over the whole sequence; the replicated text needs no exchange, each
    # rank takes its heads of it, so the text joins the sequence exactly once.
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    heads = text[0].shape[1] // world
    q, k, v = (
        torch.cat([t[:, rank * heads : (rank + 1) * heads], _tokens_to_heads(x, group)], dim=2)
        for t, x in zip(text, image)
    )
    out = nn.functional.scaled_dot_product_attention(q, k, v)
    return _heads_to_tokens(out[:, :, text_tokens:], group), _all_gather_cat(out[:, :, :text_tokens], 1, group)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: Any,
    local: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Each rank keeps its queries; K/V blocks travel around the ring, partial results merge by log-sum-exp.
    `local` (replicated K/V, e.g. the text of joint attention) is attended once, on every rank, without travelling."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = torch.zeros_like(q, dtype=torch.float32)
    running_max = torch.full(q.shape[:-1] + (1,), -math.inf, dtype=torch.float32, device=q.device)
    running_sum = torch.zeros_like(running_max)

    def merge(block_k: torch.Tensor, block_v: torch.Tensor) -> None:
        nonlocal out, running_max, running_sum
        scores = (q.float() @ block_k.float().transpose(-1, -2)) * scale
        new_max = torch.maximum(running_max, scores.amax(dim=-1, keepdim=True))
        weights = torch.exp(scores - new_max)
        correction = torch.exp(running_max - new_max)
        out = out * correction + weights @ block_v.float()
        running_sum = running_sum * correction + weights.sum(dim=-1, keepdim=True)
        running_max = new_max

    if local is not None:
        merge(*local)
    kv = torch.stack([k, v]).contiguous()
    for hop in range(world):
        if hop + 1 < world:  # start passing the current block on while computing with it
            incoming = torch.empty_like(kv)
            ops = [
                dist.P2POp(dist.isend, kv, ranks[(rank + 1) % world], group),
                dist.P2POp(dist.irecv, incoming, ranks[(rank - 1) % world], group),
            ]
            requests = dist.batch_isend_irecv(ops)
        merge(kv[0], kv[1])
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


# The default processors of the joint-attention blocks (Flux, SD3), whose math JointSequenceParallelProcessor repeats.
JOINT_PROCESSORS = ("FluxAttnProcessor", "JointAttnProcessor2_0")


class JointSequenceParallelProcessor:
    """Joint attention (Flux double- and single-stream, SD3) from the rank's image shard and the whole text."""

    def __init__(self, mode: str, group: Any) -> None:
        self.mode, self.group, self.rank = mode, group, dist.get_rank(group)
        self.text_tokens = 0  # Flux single-stream blocks: the text tokens leading their sequence (set per call)

    @staticmethod
    def _heads(attn: nn.Module, x: torch.Tensor, projection: nn.Module, norm: nn.Module | None) -> torch.Tensor:
        x = projection(x).unflatten(-1, (attn.heads, -1))  # (B, S, H, D)
        return norm(x) if norm is not None else x

    def _rotate(self, parts: list[tuple[torch.Tensor, ...]], rotary: tuple[torch.Tensor, torch.Tensor]) -> list:
        """Rotary tables cover [text, all image tokens]: the text takes its rows, the image shard its own rows."""
        from diffusers.models.embeddings import apply_rotary_emb

        (tq, tk, tv), (iq, ik, iv) = parts
        text, local = tq.shape[1], iq.shape[1]
        start = text + self.rank * local
        text_rows = tuple(table[:text] for table in rotary)
        image_rows = tuple(table[start : start + local] for table in rotary)
        rotate = functools.partial(apply_rotary_emb, sequence_dim=1)
        return [
            (rotate(tq, text_rows), rotate(tk, text_rows), tv),
            (rotate(iq, image_rows), rotate(ik, image_rows), iv),
        ]

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ):
        if attention_mask is not None or kwargs:
            raise UnsupportedArchitectureError("sequence-parallel joint attention takes no mask or IP-adapter inputs")
        own = [(attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k), (attn.to_v, None)]
        if encoder_hidden_states is None:  # Flux single-stream: [text, image shard] through the same projections
            qkv = [self._heads(attn, hidden_states, *p) for p in own]
            parts = [tuple(x[:, : self.text_tokens] for x in qkv), tuple(x[:, self.text_tokens :] for x in qkv)]
        else:
            added = [
                (attn.add_q_proj, attn.norm_added_q),
                (attn.add_k_proj, attn.norm_added_k),
                (attn.add_v_proj, None),
            ]
            parts = [
                tuple(self._heads(attn, encoder_hidden_states, *p) for p in added),
                tuple(self._heads(attn, hidden_states, *p) for p in own),
            ]
        if image_rotary_emb is not None:
            parts = self._rotate(parts, image_rotary_emb)
        text, image = (tuple(x.transpose(1, 2) for x in part) for part in parts)  # (B, H, S, D)
        image_out, text_out = joint_attention(self.mode, image, text, self.group)
        image_out, text_out = (x.transpose(1, 2).flatten(2, 3).to(hidden_states.dtype) for x in (image_out, text_out))
        if encoder_hidden_states is None:
            return torch.cat([text_out, image_out], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out))
        if not attn.context_pre_only:  # SD3's last block keeps no text output projection
            text_out = attn.to_add_out(text_out)
        return image_out, text_out


class SequenceParallel:
    """Shards the image tokens across the group's ranks between the first block's input and the last block's
    output; every rank ends with the full output. `remove()` restores the model."""

    def __init__(self, model: nn.Module, mode: str = "ulysses", group: Any = None) -> None:
        if mode not in ("ulysses", "ring"):
            raise UnsupportedArchitectureError(f"unknown sequence-parallel mode {mode!r}; use ulysses or ring")
        if blk.is_unet(model):
            raise UnsupportedArchitectureError(f"{type(model).__name__}: sequence parallelism needs transformer blocks")
        blocks = blk.transformer_blocks(model)
        self.mode, self.group, self.world, self.rank = mode, group, dist.get_world_size(group), dist.get_rank(group)
        self._restore: list[tuple[Any, str, Any]] = []
        processor = SequenceParallelAttnProcessor(mode, group)
        try:
            for block in blocks:
                if blk.pairs_output(block):
                    self._install_joint(block, processor)
                    continue
                attn = getattr(block, "attn1", None)
                if attn is None:
                    raise UnsupportedArchitectureError(f"{type(block).__name__} has no self-attention attn1")
                self._set_processor(attn, processor)
        except UnsupportedArchitectureError:
            self.remove()  # leave the model as it was
            raise
        self._wrap(blocks[0], self._split_input)
        self._wrap(blocks[-1], functools.partial(self._gather_output, pairs=blk.pairs_output(blocks[-1])))

    def _set_processor(self, attn: nn.Module, processor: Any) -> None:
        self._restore.append((attn, "processor", attn.processor))
        attn.set_processor(processor)

    def _install_joint(self, block: nn.Module, self_attention: SequenceParallelAttnProcessor) -> None:
        attn = block.attn
        name = type(attn.processor).__name__
        if name not in JOINT_PROCESSORS or getattr(attn, "fused_projections", False):
            raise UnsupportedArchitectureError(
                f"{type(block).__name__}: sequence parallelism needs the default unfused attention processor ({name})"
            )
        processor = JointSequenceParallelProcessor(self.mode, self.group)
        self._set_processor(attn, processor)
        if getattr(block, "attn2", None) is not None:  # SD3.5's extra self-attention over the image tokens
            self._set_processor(block.attn2, self_attention)
        if type(block).__name__ == "FluxSingleTransformerBlock":  # its attention sees [text, image] as one sequence

            def count_text(module: nn.Module, args: tuple, kwargs: dict) -> None:
                text = blk.bound_arguments(module.forward, args, kwargs)["encoder_hidden_states"]
                processor.text_tokens = text.shape[1]

            self._restore.append((block.register_forward_pre_hook(count_text, with_kwargs=True), "hook", None))

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

    def _gather_output(self, original: Any, pairs: bool) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            if pairs:  # joint blocks return (text, image): the text is already whole on every rank
                return output[0], _all_gather_cat(output[1], 1, self.group)
            return _all_gather_cat(output, 1, self.group)

        return forward

    def remove(self) -> None:
        for module, name, value in reversed(self._restore):
            if name == "hook":
                module.remove()
            elif name == "processor":
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
