"""Caching on denoisers whose pipelines need real text encoders (SD3's joint blocks, HunyuanDiT's long skips),
driven by a plain sampling loop: a zero threshold equals the uncached loop exactly, a loose one skips steps."""

import pytest
import torch
from diffusers import HunyuanDiT2DModel, SD3Transformer2DModel
from diffusers.models.embeddings import get_2d_rotary_pos_embed

from slimserve.diffusion.cache_policies import policy_from_config
from slimserve.diffusion.caching import DenoiserCache
from slimserve.diffusion.config import AccelerationConfig


def sd3():
    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        caption_projection_dim=16,
        pooled_projection_dim=10,
        out_channels=4,
    ).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        encoder_hidden_states=torch.randn(2, 5, 12, generator=g), pooled_projections=torch.randn(2, 10, generator=g)
    )
    return model, inputs, (2, 4, 8, 8)


def hunyuan():
    torch.manual_seed(0)
    model = HunyuanDiT2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        patch_size=2,
        sample_size=8,
        hidden_size=16,
        num_layers=4,
        cross_attention_dim=12,
        cross_attention_dim_t5=16,
        pooled_projection_dim=12,
        text_len=5,
        text_len_t5=5,
    ).eval()
    g = torch.Generator().manual_seed(1)
    rotary = get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4), output_type="pt")
    inputs = dict(
        encoder_hidden_states=torch.randn(2, 5, 12, generator=g),
        text_embedding_mask=torch.ones(2, 5, dtype=torch.long),
        encoder_hidden_states_t5=torch.randn(2, 5, 16, generator=g),
        text_embedding_mask_t5=torch.ones(2, 5, dtype=torch.long),
        image_meta_size=torch.tensor([[8, 8, 8, 8, 0, 0]] * 2, dtype=torch.float32),
        style=torch.zeros(2, dtype=torch.long),
        image_rotary_emb=rotary,
    )
    return model, inputs, (2, 4, 8, 8)


def sample(model, inputs, shape, steps=6):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for t in torch.linspace(999, 1, steps):
            out = model(x, timestep=t.expand(shape[0]), **inputs, return_dict=False)[0][:, : shape[1]]
            x = x - out / steps
    return x


@pytest.mark.parametrize("build", [sd3, hunyuan], ids=["sd3", "hunyuan"])
@pytest.mark.parametrize("scheme", ["fixed", "first_block", "teacache"])
def test_zero_threshold_equals_uncached_and_loose_reuses(build, scheme):
    model, inputs, shape = build()
    reference = sample(model, inputs, shape)
    exact = dict(cache_interval=1, cache_threshold=0.0)
    loose = dict(cache_interval=3, cache_threshold=10.0)
    start = 1 if scheme == "first_block" else 0
    cache = DenoiserCache(model, policy_from_config(AccelerationConfig(cache=scheme, **exact)), start)
    assert torch.equal(sample(model, inputs, shape), reference)
    cache.remove()
    cache = DenoiserCache(model, policy_from_config(AccelerationConfig(cache=scheme, **loose)), start)
    cached = sample(model, inputs, shape)
    assert cache.reused_steps > 0 and torch.isfinite(cached).all() and not torch.equal(cached, reference)
    cache.remove()
    assert torch.equal(sample(model, inputs, shape), reference)
