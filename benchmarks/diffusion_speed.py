"""Text-to-image latency on a GPU: the default diffusers FluxPipeline (50 steps, bf16, eager) against the same
pipeline accelerated in place by slimserve (the distilled step count, FP8 blocks, regional compile, fixed-interval
caching), at 1024x1024 (4096 image tokens + 512 text tokens), with a Flux.1-dev-shaped transformer and VAE of
random weights (fixed-step latency does not depend on the weights; quality is measured on trained models by
`python -m slimserve.diffusion.experiments.quality`). Text encoders are not run: both pipelines get the same
prompt embeddings.

Also per transformer call (the step time): bf16 eager, FP8 eager, FP8 compiled, each as a fraction of the bf16
matrix rate, and the FP8 layers' error against bf16 on the same inputs. Writes
benchmarks/results/diffusion-speed-<date>.json.

usage: python benchmarks/diffusion_speed.py [--steps 50] [--fast-steps 4] [--size 1024] [--tiny]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from slimserve.diffusion import AccelerationConfig, accelerate_
from slimserve.diffusion.blocks import repeated_blocks
from slimserve.diffusion.compile import compile_blocks_

BF16_FLOPS_PER_S = 790e12

FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
FLUX_SCHEDULER = dict(
    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
)
TINY = dict(FLUX_DEV, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))  # fmt: skip
TINY_VAE = dict(FLUX_VAE, block_out_channels=(8, 8, 16, 16), layers_per_block=1)


def build(tiny: bool, device: str, dtype: torch.dtype) -> FluxPipeline:
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # weights are created in bf16 on the GPU: no fp32 copy of 12B parameters
    with torch.device(device):
        transformer = FluxTransformer2DModel(**(TINY if tiny else FLUX_DEV)).eval()
        vae = AutoencoderKL(**(TINY_VAE if tiny else FLUX_VAE), norm_num_groups=8 if tiny else 32).eval()
    torch.set_default_dtype(default)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def generate(pipe: FluxPipeline, inputs: dict, steps: int, device: str) -> tuple[torch.Tensor, float]:
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        image = pipe(**inputs, num_inference_steps=steps, generator=torch.Generator(device).manual_seed(0)).images
    sync(device)
    return image, time.perf_counter() - start


def step_time(transformer, call: dict, device: str, repeats: int) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        out = transformer(**call).sample  # warm-up (and compilation)
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            out = transformer(**call).sample
        sync(device)
    return (time.perf_counter() - start) / repeats, out


def transformer_call(pipe: FluxPipeline, inputs: dict, size: int, device: str, dtype: torch.dtype) -> dict:
    """One denoising call's inputs, shaped as the pipeline builds them."""
    side = 2 * (size // (pipe.vae_scale_factor * 2))
    tokens = (side // 2) ** 2
    generator = torch.Generator(device).manual_seed(1)
    channels = pipe.transformer.config.in_channels
    ids = torch.zeros(side // 2, side // 2, 3, device=device)
    ids[..., 1] += torch.arange(side // 2, device=device)[:, None]
    ids[..., 2] += torch.arange(side // 2, device=device)[None, :]
    return dict(
        hidden_states=torch.randn(1, tokens, channels, generator=generator, device=device, dtype=dtype),
        encoder_hidden_states=inputs["prompt_embeds"],
        pooled_projections=inputs["pooled_prompt_embeds"],
        timestep=torch.tensor([0.5], device=device, dtype=dtype),
        guidance=torch.tensor([3.5], device=device, dtype=torch.float32),
        img_ids=ids.reshape(-1, 3),
        txt_ids=torch.zeros(inputs["prompt_embeds"].shape[1], 3, device=device),
    )


def transformer_flops(config: dict, image_tokens: int, text_tokens: int) -> float:
    """Matrix FLOPs of one call: 2 per weight per token, plus attention (QK^T and PV)."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    tokens = image_tokens + text_tokens
    double = 2 * (4 * hidden * hidden + 2 * 4 * hidden * hidden) * tokens
    single = 2 * (3 * hidden * hidden + 4 * hidden * hidden + 5 * hidden * hidden) * tokens
    attention = 4 * tokens * tokens * hidden
    return config["num_layers"] * (double + attention) + config["num_single_layers"] * (single + attention)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="steps of the default pipeline")
    parser.add_argument("--fast-steps", type=int, default=4, help="steps of the distilled pipeline")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=5, help="timed transformer calls per variant")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (checks the script)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = TINY if args.tiny else FLUX_DEV
    pipe = build(args.tiny, device, dtype)
    generator = torch.Generator(device).manual_seed(2)
    inputs = dict(
        prompt_embeds=torch.randn(1, 512, config["joint_attention_dim"], generator=generator, device=device).to(dtype),
        pooled_prompt_embeds=torch.randn(1, config["pooled_projection_dim"], generator=generator, device=device).to(
            dtype
        ),
        height=args.size,
        width=args.size,
        guidance_scale=3.5,
        output_type="pt",
    )
    rows: dict[str, dict] = {}
    call = transformer_call(pipe, inputs, args.size, device, dtype)
    tokens = call["hidden_states"].shape[1]
    flops = transformer_flops(config, tokens, 512)
    date = datetime.date.today().isoformat()
    out = args.out or f"benchmarks/results/diffusion-speed-{date}.json"
    report = dict(
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        command=" ".join(["python", *sys.argv]),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__,
        model="Flux.1-dev shape (random weights)" if not args.tiny else "tiny Flux",
        image_tokens=tokens,
        text_tokens=512,
        transformer_tflops_per_call=flops / 1e12,
        rows=rows,
    )

    def save() -> None:  # after every stage, so a run cut short keeps what it measured
        with open(out, "w") as f:
            json.dump(report, f, indent=2)

    generate(pipe, inputs, 2, device)  # warm-up: cuBLAS handles, attention kernels
    baseline_image, baseline = generate(pipe, inputs, args.steps, device)
    rows["default pipeline"] = dict(steps=args.steps, seconds=baseline)
    save()
    print(f"default diffusers pipeline, {args.steps} steps bf16: {baseline:.2f} s", flush=True)

    def record(name: str) -> torch.Tensor:
        seconds, out = step_time(pipe.transformer, call, device, args.repeats)
        rows[name] = dict(seconds_per_call=seconds, fraction_of_bf16_peak=flops / seconds / BF16_FLOPS_PER_S)
        print(f"{name}: {seconds * 1e3:.1f} ms per call", flush=True)
        save()
        return out

    reference = record("transformer bf16 eager")
    accelerate_(pipe, AccelerationConfig(solver="keep", quantization="fp8"))
    fp8_out = record("transformer fp8 eager")
    error = float((fp8_out.float() - reference.float()).norm() / reference.float().norm())
    rows["transformer fp8 eager"]["relative_error_vs_bf16"] = error
    start = time.perf_counter()
    try:
        compile_blocks_(pipe.transformer, backend=args.compile_backend)
        record("transformer fp8 compiled")
        rows["transformer fp8 compiled"]["compile_and_first_call_seconds"] = time.perf_counter() - start
    except Exception as error:  # a compiler failure is a result too: record it, go on eager
        rows["transformer fp8 compiled"] = dict(error=f"{type(error).__name__}: {error}"[:2000])
        print(f"compile failed: {rows['transformer fp8 compiled']['error'][:300]}", flush=True)
        for block in repeated_blocks(pipe.transformer):
            block.__dict__.pop("forward", None)
        save()

    acceleration = accelerate_(pipe, AccelerationConfig(solver="keep", cache="fixed", cache_interval=2))
    generate(pipe, inputs, args.fast_steps, device)  # a second resolution-free warm-up through the cache wrappers
    fast_image, fast = generate(pipe, inputs, args.fast_steps, device)
    cache = acceleration.cache
    rows["accelerated pipeline"] = dict(
        steps=args.fast_steps,
        seconds=fast,
        computed_steps=cache.computed_steps,
        reused_steps=cache.reused_steps,
        speedup=baseline / fast,
        latency_reduction=1 - fast / baseline,
    )
    print(f"accelerated ({args.fast_steps} steps, fp8, compiled, fixed cache): {fast:.2f} s", flush=True)
    rows["accelerated pipeline"]["compiled"] = "error" not in rows["transformer fp8 compiled"]
    print(f"\n{'variant':34s} {'time':>12s} {'note':>30s}")
    for name, row in rows.items():
        if "error" in row:
            print(f"{name:34s} failed: {row['error'][:80]}")
        elif "seconds" in row:
            print(f"{name:34s} {row['seconds']:10.2f} s {row['steps']:4d} steps")
        else:
            print(
                f"{name:34s} {row['seconds_per_call'] * 1e3:9.1f} ms {row['fraction_of_bf16_peak']:8.1%} of bf16 peak"
            )
    print(f"speedup {baseline / fast:.2f}x (latency -{(1 - fast / baseline):.0%})")
    report["images_finite"] = bool(torch.isfinite(baseline_image).all() and torch.isfinite(fast_image).all())
    save()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
