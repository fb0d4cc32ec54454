"""What step distillation needs to know about one pipeline kind, behind one interface: the student's noise levels
(exactly those its scheduler visits at inference), the guided teacher's output, the student's output, and the
affine step `x_next = a * x + b * output` that the student's sampler takes between two levels. The distillation loop
(distill.py) is written once against this interface.

Kinds: the class-conditional flow pipeline (class_pipeline.py), Flux-style transformers (FluxPipeline, flow matching,
Euler), and Stable Diffusion UNets (epsilon or v prediction; the student samples with deterministic DDIM).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from slimserve.diffusion.config import DistillationError, DistillConfig


class Adapter:
    """One pipeline kind. Levels are floats in the kind's own unit (flow sigma, or DDIM's integer timestep)."""

    component: str  # name of the distilled model in the pipeline ("transformer" or "unet")
    text: bool  # conditioned on captions (else on class labels)

    def __init__(self, pipe: Any, config: DistillConfig, captions: list[str], device: str) -> None:
        self.pipe, self.config, self.captions, self.device = pipe, config, captions, device

    @property
    def model(self) -> torch.nn.Module:
        return getattr(self.pipe, self.component)

    def levels(self) -> torch.Tensor:
        """The steps + 1 levels of the student's sampler, from pure noise to the clean sample."""
        raise NotImplementedError

    def fine_levels(self, start: float, end: float) -> torch.Tensor:
        """The teacher's finer grid from start to end (both included)."""
        return torch.linspace(start, end, self.config.substeps + 1)

    def noise_and_conditions(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeded start latents and one condition index per trajectory (a class label or a caption index)."""
        raise NotImplementedError

    def teacher(self, x: torch.Tensor, level: float, cond: torch.Tensor) -> torch.Tensor:
        """The teacher's output with classifier-free guidance at `config.guidance_scale`."""
        raise NotImplementedError

    def student(self, model: torch.nn.Module, x: torch.Tensor, level: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The student's output, unguided (one model call); level holds one value per sample."""
        raise NotImplementedError

    def step(self, level: torch.Tensor, next_level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) with x_next = a * x + b * output, one value per sample."""
        raise NotImplementedError

    def student_pipeline(self, model: torch.nn.Module) -> Any:
        """The pipeline that samples with the student (its scheduler is the one the levels came from)."""
        components = {**self.pipe.components, self.component: model}
        return type(self.pipe)(**components)

    def recipe(self) -> dict[str, Any]:
        """Arguments the student's pipeline call needs (stored in distillation.json)."""
        return {"num_inference_steps": self.config.student_steps, "guidance_scale": 1.0}


class ClassFlowAdapter(Adapter):
    component, text = "transformer", False

    def levels(self) -> torch.Tensor:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(self.config.student_steps)
        return scheduler.sigmas.float()

    def noise_and_conditions(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.pipe.transformer.config
        noise = torch.randn((count, model.in_channels, model.sample_size, model.sample_size), generator=generator)
        return noise, torch.randint(0, self.pipe.null_class, (count,), generator=generator)

    def teacher(self, x: torch.Tensor, level: float, cond: torch.Tensor) -> torch.Tensor:
        timestep = torch.tensor([level * 1000], device=x.device)
        return self.pipe.velocity(x, timestep, cond, self.config.guidance_scale)

    def student(self, model: torch.nn.Module, x: torch.Tensor, level: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return model(x, timestep=level * 1000, class_labels=cond).sample

    def step(self, level: torch.Tensor, next_level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones_like(level), next_level - level

    def student_pipeline(self, model: torch.nn.Module) -> Any:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        return type(self.pipe)(model, scheduler)


class FluxAdapter(Adapter):
    """Flux-style flow transformers. Without a guidance embedding (schnell-style) the teacher runs true CFG against
    the empty caption; with one (dev-style) the teacher's embedded guidance is the target and the student keeps the
    embedding at the same value."""

    component, text = "transformer", True

    def __init__(self, pipe: Any, config: DistillConfig, captions: list[str], device: str) -> None:
        super().__init__(pipe, config, captions, device)
        self.height = config.height or pipe.default_sample_size * pipe.vae_scale_factor
        self.width = config.width or pipe.default_sample_size * pipe.vae_scale_factor
        embedded = [self._encode(captions), self._encode([""])]
        (self.embeds, self.pooled, self.text_ids), (self.null_embeds, self.null_pooled, _) = embedded
        self.embedded_guidance = bool(pipe.transformer.config.guidance_embeds)

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            embeds, pooled, text_ids = self.pipe.encode_prompt(
                prompts, prompt_2=None, device=self.device, max_sequence_length=self.config.max_sequence_length
            )
        return embeds.float(), pooled.float(), text_ids

    def _latents(self, count: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        channels = self.pipe.transformer.config.in_channels // 4
        return self.pipe.prepare_latents(
            count, channels, self.height, self.width, torch.float32, torch.device("cpu"), generator
        )

    def levels(self) -> torch.Tensor:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        steps = self.config.student_steps
        sequence = self._latents(1, torch.Generator().manual_seed(0))[0].shape[1]
        scheduler_config = self.pipe.scheduler.config
        mu = calculate_shift(
            sequence,
            scheduler_config.get("base_image_seq_len", 256),
            scheduler_config.get("max_image_seq_len", 4096),
            scheduler_config.get("base_shift", 0.5),
            scheduler_config.get("max_shift", 1.15),
        )
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)  # as FluxPipeline.__call__ does
        return scheduler.sigmas.float()

    def noise_and_conditions(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        noise, _ = self._latents(count, generator)
        return noise, torch.randint(0, len(self.captions), (count,), generator=generator)

    def _call(self, model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, embeds, pooled) -> torch.Tensor:
        guidance = None
        if self.embedded_guidance:
            guidance = torch.full((len(x),), self.config.guidance_scale, device=x.device)
        patches = 2 * self.pipe.vae_scale_factor  # latents are packed in 2x2 patches
        image_ids = self.pipe._prepare_latent_image_ids(
            1, self.height // patches, self.width // patches, x.device, x.dtype
        )
        return model(
            hidden_states=x,
            timestep=sigma,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=self.text_ids.to(x.device),
            img_ids=image_ids,
            return_dict=False,
        )[0]

    def teacher(self, x: torch.Tensor, level: float, cond: torch.Tensor) -> torch.Tensor:
        sigma = torch.full((len(x),), level, device=x.device)
        embeds, pooled = self.embeds[cond].to(x.device), self.pooled[cond].to(x.device)
        output = self._call(self.model, x, sigma, embeds, pooled)
        if self.embedded_guidance or self.config.guidance_scale <= 1:
            return output
        null = self.null_embeds.expand_as(embeds).to(x.device), self.null_pooled.expand_as(pooled).to(x.device)
        unconditional = self._call(self.model, x, sigma, *null)
        return unconditional + self.config.guidance_scale * (output - unconditional)

    def student(self, model: torch.nn.Module, x: torch.Tensor, level: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self._call(model, x, level, self.embeds[cond].to(x.device), self.pooled[cond].to(x.device))

    def step(self, level: torch.Tensor, next_level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones_like(level), next_level - level

    def recipe(self) -> dict[str, Any]:
        guidance = self.config.guidance_scale if self.embedded_guidance else 1.0
        return {
            "num_inference_steps": self.config.student_steps,
            "guidance_scale": guidance,
            "height": self.height,
            "width": self.width,
            "max_sequence_length": self.config.max_sequence_length,
        }


class UNetAdapter(Adapter):
    """Stable Diffusion UNets. The student samples with deterministic DDIM on its own timesteps; the teacher
    integrates the same DDIM ODE on `substeps` finer timesteps per student step, with CFG against the empty caption.
    Levels are DDIM timesteps, -1 standing for the final (clean) level."""

    component, text = "unet", True

    def __init__(self, pipe: Any, config: DistillConfig, captions: list[str], device: str) -> None:
        super().__init__(pipe, config, captions, device)
        self.prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
        if self.prediction not in ("epsilon", "v_prediction"):
            raise DistillationError(f"UNet prediction type {self.prediction!r}: distill-steps needs epsilon or v")
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, thresholding=False)
        factor = pipe.vae_scale_factor
        self.height = config.height or pipe.unet.config.sample_size * factor
        self.width = config.width or pipe.unet.config.sample_size * factor
        with torch.no_grad():
            embeds, null = pipe.encode_prompt(captions, self.device, 1, True, negative_prompt=[""] * len(captions))
        self.embeds, self.null_embeds = embeds.float(), null[:1].float()
        alphas = self.scheduler.alphas_cumprod.float()
        self.alphas = torch.cat([alphas, torch.tensor([float(self.scheduler.final_alpha_cumprod)])])

    def levels(self) -> torch.Tensor:
        steps = self.config.student_steps
        self.scheduler.set_timesteps(steps)
        timesteps = self.scheduler.timesteps.float()
        ratio = self.scheduler.config.num_train_timesteps // steps  # DDIM's own step back
        if len(timesteps) > 1 and not torch.all(timesteps[:-1] - timesteps[1:] == ratio):
            raise DistillationError("the DDIM timesteps are not evenly spaced; use timestep_spacing leading")
        return torch.cat([timesteps, (timesteps[-1:] - ratio).clamp(min=-1)])

    def fine_levels(self, start: float, end: float) -> torch.Tensor:
        return torch.linspace(start, end, self.config.substeps + 1).round().clamp(min=-1).unique_consecutive()

    def _alpha(self, level: torch.Tensor) -> torch.Tensor:
        return self.alphas[level.long().cpu()].to(level.device)  # index -1 is the final level

    def noise_and_conditions(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        factor = self.pipe.vae_scale_factor
        shape = (count, self.pipe.unet.config.in_channels, self.height // factor, self.width // factor)
        noise = torch.randn(shape, generator=generator) * self.scheduler.init_noise_sigma
        return noise, torch.randint(0, len(self.captions), (count,), generator=generator)

    def teacher(self, x: torch.Tensor, level: float, cond: torch.Tensor) -> torch.Tensor:
        embeds = self.embeds[cond].to(x.device)
        if self.config.guidance_scale <= 1:
            return self.model(x, level, encoder_hidden_states=embeds).sample
        both = torch.cat([embeds, self.null_embeds.expand_as(embeds).to(x.device)])
        conditional, unconditional = self.model(torch.cat([x, x]), level, encoder_hidden_states=both).sample.chunk(2)
        return unconditional + self.config.guidance_scale * (conditional - unconditional)

    def student(self, model: torch.nn.Module, x: torch.Tensor, level: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return model(x, level, encoder_hidden_states=self.embeds[cond].to(x.device)).sample

    def step(self, level: torch.Tensor, next_level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, a_next = self._alpha(level), self._alpha(next_level)
        if self.prediction == "epsilon":  # x_next = sqrt(a') * x0 + sqrt(1 - a') * eps, x0 from x and eps
            ratio = (a_next / a).sqrt()
            return ratio, (1 - a_next).sqrt() - ratio * (1 - a).sqrt()
        # v: x0 = sqrt(a) x - sqrt(1 - a) v, eps = sqrt(1 - a) x + sqrt(a) v
        scale = (a_next * a).sqrt() + ((1 - a_next) * (1 - a)).sqrt()
        return scale, (1 - a_next).sqrt() * a.sqrt() - a_next.sqrt() * (1 - a).sqrt()

    def student_pipeline(self, model: torch.nn.Module) -> Any:
        return type(self.pipe)(**{**self.pipe.components, "unet": model, "scheduler": self.scheduler})

    def recipe(self) -> dict[str, Any]:
        return {**super().recipe(), "height": self.height, "width": self.width}


ADAPTERS = {
    "ClassConditionalFlowPipeline": ClassFlowAdapter,
    "FluxPipeline": FluxAdapter,
    "StableDiffusionPipeline": UNetAdapter,
}


def load_adapter(teacher_dir: Path, config: DistillConfig, captions: list[str], device: str) -> Adapter:
    """The teacher pipeline in `teacher_dir`, behind the adapter for its kind; one-line errors for what cannot work."""
    index = teacher_dir / "model_index.json"
    if not index.exists():
        raise DistillationError(f"{teacher_dir}: no diffusers pipeline (model_index.json missing)")
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except json.JSONDecodeError as error:
        raise DistillationError(f"{index}: not valid JSON ({error})") from None
    if name not in ADAPTERS:
        raise DistillationError(f"{teacher_dir}: {name} cannot be step-distilled; supported: {', '.join(ADAPTERS)}")
    adapter = ADAPTERS[name]
    if adapter.text and not captions:
        raise DistillationError(f"{name} is text-conditioned: give captions (--caption or --captions-file)")
    if name == "ClassConditionalFlowPipeline":
        from slimserve.diffusion.class_pipeline import ClassConditionalFlowPipeline as cls
    else:
        from diffusers import DiffusionPipeline as cls
    try:
        pipe = cls.from_pretrained(teacher_dir, dtype=torch.float32).to(device)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DistillationError(f"{teacher_dir}: cannot load the teacher pipeline ({first})") from None
    if getattr(pipe, adapter.component, None) is None:
        raise DistillationError(f"{teacher_dir}: the pipeline has no {adapter.component}")
    if adapter.text and getattr(pipe, "text_encoder", None) is None:
        raise DistillationError(f"{teacher_dir}: the pipeline has no text encoder to embed the captions")
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return adapter(pipe, config, captions, device)
