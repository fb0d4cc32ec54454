"""Tiny random diffusers pipelines built offline from configs, each with the inputs one call needs (prompt
embeddings instead of text encoders, so no tokenizer is downloaded)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)


def tiny_vae(shift_factor: float | None = None) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        shift_factor=shift_factor,
    )


def dit() -> tuple[Any, dict]:
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=4,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_num_groups=4,
    )
    pipe = DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DDIMScheduler())
    return pipe, dict(class_labels=[1, 7], guidance_scale=3.0, output_type="pt")


def pixart() -> tuple[Any, dict]:
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=4,
        sample_size=8,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=12,
        norm_num_groups=4,
    )
    pipe = PixArtAlphaPipeline(
        tokenizer=None, text_encoder=None, transformer=transformer, vae=tiny_vae(), scheduler=DDIMScheduler()
    )
    generator = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, 5, 12, generator=generator)
    inputs = dict(
        prompt_embeds=embeds,
        prompt_attention_mask=torch.ones(1, 5, dtype=torch.long),
        negative_prompt=None,
        negative_prompt_embeds=torch.zeros_like(embeds),
        negative_prompt_attention_mask=torch.ones(1, 5, dtype=torch.long),
        height=32,
        width=32,
        guidance_scale=4.0,
        use_resolution_binning=False,
        output_type="pt",
    )
    return pipe, inputs


def flux(guidance_embeds: bool = False) -> tuple[Any, dict]:
    """Schnell-style by default; with guidance_embeds, dev-style (guidance distilled into an embedding)."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        pooled_projection_dim=12,
        axes_dims_rope=(2, 2, 4),
        guidance_embeds=guidance_embeds,
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=tiny_vae(shift_factor=0.1),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    generator = torch.Generator().manual_seed(1)
    inputs = dict(
        prompt_embeds=torch.randn(1, 6, 12, generator=generator),
        pooled_prompt_embeds=torch.randn(1, 12, generator=generator),
        height=16,
        width=16,
        guidance_scale=1.0,
        output_type="pt",
    )
    return pipe, inputs


def sd3() -> tuple[Any, dict]:
    """SD3.5-shaped: joint-attention blocks, the first with the extra image self-attention, RMS-normed q/k."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        caption_projection_dim=16,
        pooled_projection_dim=12,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.1),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    generator = torch.Generator().manual_seed(1)
    inputs = dict(
        prompt_embeds=torch.randn(1, 6, 12, generator=generator),
        pooled_prompt_embeds=torch.randn(1, 12, generator=generator),
        negative_prompt_embeds=torch.randn(1, 6, 12, generator=generator),
        negative_pooled_prompt_embeds=torch.randn(1, 12, generator=generator),
        height=16,
        width=16,
        guidance_scale=4.0,
        output_type="pt",
    )
    return pipe, inputs


def sd_unet() -> tuple[Any, dict]:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        cross_attention_dim=12,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    generator = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, 5, 12, generator=generator)
    inputs = dict(
        prompt_embeds=embeds,
        negative_prompt_embeds=torch.zeros_like(embeds),
        height=16,
        width=16,
        guidance_scale=5.0,
        output_type="pt",
    )
    return pipe, inputs


BUILDERS = {"dit": dit, "pixart": pixart, "flux": flux, "sd_unet": sd_unet}


def run(pipe: Any, inputs: dict, steps: int = 6, seed: int = 0) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # models built from a config start in training mode (DiT's label dropout)
    with torch.no_grad():
        result = pipe(**inputs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed))
    return result.images


def tiny_tokenizer(max_length: int) -> Any:
    """A word-level tokenizer built in memory (no vocabulary download); unknown words map to one id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "a photo of cat dog red blue house tree on the in painting".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]", model_max_length=max_length
    )


def tiny_clip(hidden: int, projection: int | None = None) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=32,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8,
        projection_dim=projection or hidden,
    )
    return CLIPTextModel(config).eval()


def flux_with_text(guidance_embeds: bool = False) -> Any:
    """The tiny Flux pipeline with its CLIP and T5 text encoders (tiny, random) and in-memory tokenizers."""
    from transformers import T5Config, T5EncoderModel

    pipe, _ = flux(guidance_embeds)
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=32, d_model=12, d_kv=4, d_ff=16, num_layers=1, num_heads=2)).eval()
    components = {**pipe.components, "text_encoder": tiny_clip(12), "tokenizer": tiny_tokenizer(8)}
    components.update(text_encoder_2=t5, tokenizer_2=tiny_tokenizer(8))
    return FluxPipeline(**components)


def sd_with_text() -> Any:
    """The tiny Stable Diffusion pipeline with a tiny random CLIP text encoder and an in-memory tokenizer."""
    pipe, _ = sd_unet()
    return StableDiffusionPipeline(**{**pipe.components, "text_encoder": tiny_clip(12), "tokenizer": tiny_tokenizer(8)})
