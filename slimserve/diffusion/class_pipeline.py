"""A class-conditional pixel-space flow-matching pipeline (DiT transformer + flow scheduler), the model family of
the quality experiment; it saves and loads in the diffusers folder layout like any other pipeline."""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, DiTTransformer2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput


class ClassConditionalFlowPipeline(DiffusionPipeline):
    """`pipe(class_labels, num_inference_steps, guidance_scale)`: images in [-1, 1] (N, C, H, W)."""

    def __init__(self, transformer: DiTTransformer2DModel, scheduler) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @property
    def null_class(self) -> int:
        return self.transformer.config.num_embeds_ada_norm

    def velocity(
        self, latents: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor, guidance_scale: float
    ) -> torch.Tensor:
        """The model's prediction, with classifier-free guidance when guidance_scale > 1 (one batched call)."""
        if guidance_scale <= 1:
            return self.transformer(latents, timestep=timestep.expand(len(latents)), class_labels=labels).sample
        both = torch.cat([latents, latents])
        null = torch.full_like(labels, self.null_class)
        out = self.transformer(both, timestep=timestep.expand(len(both)), class_labels=torch.cat([labels, null]))
        cond, uncond = out.sample.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | torch.Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
    ) -> ImagePipelineOutput:
        device = self._execution_device
        labels = torch.as_tensor(class_labels, device=device).reshape(-1)
        config = self.transformer.config
        shape = (len(labels), config.in_channels, config.sample_size, config.sample_size)
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        latents = latents.to(device=device, dtype=self.transformer.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            velocity = self.velocity(latents, t.reshape(1), labels, guidance_scale)
            latents = self.scheduler.step(velocity, t, latents).prev_sample
        return ImagePipelineOutput(images=latents.clamp(-1, 1) if output_type == "pt" else latents)
