"""`slimserve diffuse` (generate images with an accelerated diffusers pipeline) and `slimserve distill-steps`."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from slimserve.diffusion.config import CACHES, QUANTIZATIONS, SOLVERS, DistillationError, DistillConfig
from slimserve.errors import ModelNotFoundError


def add_acceleration_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("acceleration")
    group.add_argument(
        "--solver",
        default="auto",
        choices=SOLVERS,
        help="sampler (auto: DPM-Solver++ 2M, or a distilled student's own)",
    )
    group.add_argument("--cache", default="none", choices=CACHES, help="reuse the denoiser's blocks across steps")
    group.add_argument("--cache-interval", type=int, default=2, help="fixed cache: recompute every N-th step")
    group.add_argument("--cache-threshold", type=float, default=0.1, help="first_block/teacache reuse threshold")
    group.add_argument("--quantization", default="none", choices=QUANTIZATIONS, help="linear layers of the blocks")
    group.add_argument("--compile", action="store_true", help="torch.compile each repeated block")


def add_diffuse_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("diffuse", help="generate images with a diffusers pipeline, accelerated in place")
    p.add_argument("model", help="diffusers pipeline folder (model_index.json)")
    p.add_argument("--prompt", action="append", help="text prompt (repeatable; text-to-image pipelines)")
    p.add_argument("--class-label", type=int, action="append", help="class label (repeatable; class pipelines)")
    p.add_argument("--num-inference-steps", type=int, default=None, help="default: the distilled count, else 28")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: 1 for distilled students, else 3.5")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, float16, bfloat16")
    p.add_argument("--out", required=True, help="PNG file for the images (one row)")
    add_acceleration_args(p)
    p.set_defaults(func=run_diffuse)
    return p


def add_distill_steps_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    defaults = DistillConfig()
    p = subparsers.add_parser(
        "distill-steps", help="distill a many-step guided teacher into a few-step student (diffusers folder)"
    )
    p.add_argument(
        "teacher",
        help="pipeline folder (model_index.json): class-conditional flow, FluxPipeline or StableDiffusionPipeline",
    )
    p.add_argument("--caption", action="append", help="caption for text pipelines (repeatable)")
    p.add_argument("--captions-file", help="text file with one caption per line (text pipelines)")
    p.add_argument("--height", type=int, default=None, help="text pipelines: image height (default: the pipeline's)")
    p.add_argument("--width", type=int, default=None, help="text pipelines: image width (default: the pipeline's)")
    p.add_argument("--max-sequence-length", type=int, default=defaults.max_sequence_length, help="Flux: T5 tokens")
    p.add_argument("--out", required=True, help="student pipeline folder (must not exist); work in <out>.work")
    p.add_argument("--student-steps", type=int, default=defaults.student_steps)
    p.add_argument("--substeps", type=int, default=defaults.substeps, help="teacher Euler steps per student step")
    p.add_argument("--guidance-scale", type=float, default=defaults.guidance_scale, help="CFG scale distilled in")
    p.add_argument("--num-trajectories", type=int, default=defaults.num_trajectories)
    p.add_argument("--train-steps", type=int, default=defaults.train_steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.set_defaults(func=run_distill_steps)
    return p


def run_distill_steps(args: argparse.Namespace) -> None:
    from slimserve.diffusion.distill import distill_steps

    config = DistillConfig(
        student_steps=args.student_steps,
        substeps=args.substeps,
        guidance_scale=args.guidance_scale,
        num_trajectories=args.num_trajectories,
        train_steps=args.train_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        height=args.height,
        width=args.width,
        max_sequence_length=args.max_sequence_length,
    )
    captions = list(args.caption or [])
    if args.captions_file:
        path = Path(args.captions_file)
        if not path.is_file():
            raise DistillationError(f"{path}: captions file not found")
        captions += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    print(distill_steps(args.teacher, args.out, config, captions=captions))


def load_pipeline(folder: Path, device: str, dtype: Any) -> Any:
    index = folder / "model_index.json"
    if not index.exists():
        raise ModelNotFoundError(f"{folder}: not a diffusers pipeline folder (model_index.json missing)")
    from diffusers import DiffusionPipeline

    from slimserve.diffusion.class_pipeline import ClassConditionalFlowPipeline

    name = json.loads(index.read_text()).get("_class_name")
    cls = ClassConditionalFlowPipeline if name == ClassConditionalFlowPipeline.__name__ else DiffusionPipeline
    return cls.from_pretrained(folder, dtype=dtype).to(device)


def run_diffuse(args: argparse.Namespace) -> None:
    import torch

    from slimserve.diffusion import AccelerationConfig, accelerate_
    from slimserve.diffusion.class_pipeline import ClassConditionalFlowPipeline

    folder = Path(args.model)
    recipe_file = folder / "distillation.json"
    recipe = json.loads(recipe_file.read_text()) if recipe_file.exists() else {}
    config = AccelerationConfig(
        solver="keep" if recipe and args.solver == "auto" else args.solver,  # a student keeps the sampler it learned
        cache=args.cache,
        cache_interval=args.cache_interval,
        cache_threshold=args.cache_threshold,
        quantization=args.quantization,
        compile=args.compile,
    )
    if not args.prompt and not args.class_label:
        raise ModelNotFoundError("give --prompt (text-to-image) or --class-label (class pipelines)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    dtype = dtypes.get(args.dtype, torch.bfloat16 if device == "cuda" else torch.float32)
    pipe = load_pipeline(folder, device, dtype)
    steps = args.num_inference_steps or recipe.get("num_inference_steps", 28)
    guidance = args.guidance_scale if args.guidance_scale is not None else recipe.get("guidance_scale", 3.5)
    accelerate_(pipe, config)
    generator = torch.Generator(device).manual_seed(args.seed)
    start = time.perf_counter()
    if isinstance(pipe, ClassConditionalFlowPipeline):
        if not args.class_label:
            raise ModelNotFoundError(f"{folder} is a class-conditional pipeline: give --class-label")
        images = pipe(args.class_label, steps, guidance_scale=guidance, generator=generator).images
        images = (images.float().cpu() + 1) / 2
    else:
        size = dict(height=args.height or recipe.get("height"), width=args.width or recipe.get("width"))
        kwargs = {k: v for k, v in size.items() if v is not None}
        result = pipe(
            prompt=args.prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            output_type="pt",
            **kwargs,
        )
        images = result.images.float().cpu()
    seconds = time.perf_counter() - start
    save_row(images, Path(args.out))
    print(f"{args.out}: {len(images)} images, {steps} steps, {seconds:.2f} s")


def save_row(images: Any, path: Path) -> None:
    """Images (N, C, H, W in [0, 1]) side by side in one PNG, written to a temporary file and renamed."""
    import torch
    from PIL import Image

    row = torch.cat(list(images.clamp(0, 1)), dim=-1)
    array = (row.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(handle)
    Image.fromarray(array).save(temporary)
    os.replace(temporary, path)
