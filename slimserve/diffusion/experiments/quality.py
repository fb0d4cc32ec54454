"""Quality of every acceleration on a trained model, CPU-feasible: a class-conditional DiT teacher trained on drawn
shapes, sampled by the teacher (50 Euler steps, CFG), naive few-step solvers, each cache, and the step-distilled
student, from the same noise and captions.

Metrics per seed: Fréchet distance in the features of a classifier trained on the same data (with the
real-vs-real floor at the same sample count), MSE/PSNR to the teacher's image from the same noise, prompt adherence
(colour and position read from pixels, shape by the classifier), model calls and CPU wall time per image.

    python -m slimserve.diffusion.experiments.quality --workdir /tmp/shapes-exp
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib
import torch

from slimserve.diffusion import AccelerationConfig, accelerate_
from slimserve.diffusion.class_pipeline import ClassConditionalFlowPipeline
from slimserve.diffusion.distill import DistillConfig, distill_steps
from slimserve.diffusion.experiments import artifacts
from slimserve.diffusion.experiments.metrics import frechet_distance, mean_interval, psnr
from slimserve.diffusion.experiments.shapes import NUM_CLASSES, adherence, caption, make_dataset
from slimserve.diffusion.experiments.train import ShapesClassifier

GUIDANCE = 3.0
TEACHER_STEPS = 50


@dataclass
class Method:
    name: str
    steps: int
    guidance: float = GUIDANCE
    acceleration: dict = field(default_factory=dict)
    student: bool = False


METHODS = [
    Method("teacher euler-50", TEACHER_STEPS, acceleration=dict(solver="euler")),
    Method("naive euler-4", 4, acceleration=dict(solver="euler")),
    Method("naive dpm++-4", 4, acceleration=dict(solver="dpm++")),
    Method("naive unipc-4", 4, acceleration=dict(solver="unipc")),
    Method("naive euler-8", 8, acceleration=dict(solver="euler")),
    Method("naive dpm++-8", 8, acceleration=dict(solver="dpm++")),
    Method("fixed cache interval-2", TEACHER_STEPS, acceleration=dict(solver="euler", cache="fixed", cache_interval=2)),
    Method("fixed cache interval-3", TEACHER_STEPS, acceleration=dict(solver="euler", cache="fixed", cache_interval=3)),
    Method(
        "first-block cache 0.08",
        TEACHER_STEPS,
        acceleration=dict(solver="euler", cache="first_block", cache_threshold=0.08),
    ),
    Method(
        "first-block cache 0.2",
        TEACHER_STEPS,
        acceleration=dict(solver="euler", cache="first_block", cache_threshold=0.2),
    ),
    Method("teacache 0.3", TEACHER_STEPS, acceleration=dict(solver="euler", cache="teacache", cache_threshold=0.3)),
    Method("teacache 0.6", TEACHER_STEPS, acceleration=dict(solver="euler", cache="teacache", cache_threshold=0.6)),
    Method("distilled student-4", 4, guidance=1.0, student=True),
]


def sample(pipe: ClassConditionalFlowPipeline, method: Method, labels, noise) -> tuple[torch.Tensor, float, float]:
    """Images, seconds per image and the fraction of model calls that ran the blocks."""
    acceleration = accelerate_(pipe, AccelerationConfig(**method.acceleration)) if method.acceleration else None
    synchronize(noise.device)
    start = time.perf_counter()
    images = pipe(labels, method.steps, guidance_scale=method.guidance, latents=noise).images
    synchronize(noise.device)
    seconds = (time.perf_counter() - start) / len(labels)
    computed = 1.0
    if acceleration is not None and acceleration.cache is not None:
        cache = acceleration.cache
        computed = cache.computed_steps / (cache.computed_steps + cache.reused_steps)
        acceleration.remove_cache()
    return images, seconds, computed


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(
    workdir: Path,
    seeds: list[int],
    per_seed: int,
    teacher_steps: int,
    distill: DistillConfig,
    device: str,
    patch_size: int,
) -> dict:
    teacher = artifacts.teacher(workdir, teacher_steps, device, patch_size)
    classifier: ShapesClassifier = artifacts.classifier(workdir, device)
    student_dir = workdir / "student"
    if not student_dir.exists():
        distill_steps(workdir / "teacher", student_dir, distill, device=device)
    student = ClassConditionalFlowPipeline.from_pretrained(student_dir).to(device)
    student.set_progress_bar_config(disable=True)
    reference = make_dataset(2000, seed=100)
    with torch.no_grad():
        reference_features = classifier.features(reference.images.to(device)).cpu()
    results: dict[str, dict[str, list[float]]] = {}
    grid: dict[str, torch.Tensor] = {}
    floor = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        labels = (torch.arange(per_seed) % NUM_CLASSES)[torch.randperm(per_seed, generator=generator)]
        noise = torch.randn(per_seed, 3, 16, 16, generator=generator).to(device)
        real = make_dataset(per_seed, seed=200 + seed)
        with torch.no_grad():
            floor.append(frechet_distance(classifier.features(real.images.to(device)).cpu(), reference_features))
        teacher_images = None
        for method in METHODS:
            pipe = student if method.student else teacher
            images, seconds, computed = sample(pipe, method, labels.to(device), noise)
            if teacher_images is None:
                teacher_images = images
            with torch.no_grad():
                features = classifier.features(images).cpu()
                shapes = classifier.shapes(images).cpu()
            images = images.float().cpu()
            row = results.setdefault(method.name, {})
            metrics = {
                "fd": frechet_distance(features, reference_features),
                "mse_to_teacher": float(((images - teacher_images) ** 2).mean()),
                "psnr_to_teacher": psnr(images, teacher_images),
                "seconds_per_image": seconds,
                "computed_fraction": computed,
                **{f"adherence_{k}": v for k, v in adherence(images, labels, shapes).items()},
            }
            for key, value in metrics.items():
                row.setdefault(key, []).append(value)
            if seed == seeds[0]:
                grid[method.name] = images[:8]
            print(
                f"seed {seed} {method.name:28s} fd {metrics['fd']:.3f} psnr {metrics['psnr_to_teacher']:.2f}",
                flush=True,
            )
    summary = {}
    for method in METHODS:
        row = {key: mean_interval(values) for key, values in results[method.name].items()}
        row["model_calls_per_image"] = method.steps * (2 if method.guidance > 1 else 1)
        summary[method.name] = row
    return {
        "methods": summary,
        "real_vs_real_fd": mean_interval(floor),
        "grid": grid,
        "grid_labels": labels[:8].tolist(),
    }


def save_grid(grid: dict[str, torch.Tensor], labels: list[int], path: Path) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(grid), len(labels), figsize=(len(labels) * 1.1, len(grid) * 1.15))
    for r, (name, images) in enumerate(grid.items()):
        for c in range(len(labels)):
            axis = axes[r, c]
            axis.imshow(((images[c].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
            axis.set_xticks([])
            axis.set_yticks([])
            if c == 0:
                axis.set_ylabel(name, fontsize=6, rotation=0, ha="right", va="center")
            if r == 0:
                axis.set_title(caption(labels[c])[2:], fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(report: dict) -> None:
    floor = report["real_vs_real_fd"]
    print(f"\nreal-vs-real FD floor: {floor['mean']:.3f} ± {floor['ci95']:.3f}")
    header = f"{'method':28s} {'calls':>5s} {'FD':>15s} {'PSNR vs teacher':>16s} {'adherence':>15s} {'computed':>8s}"
    print(header)
    for name, row in report["methods"].items():
        fd, ps, ad = row["fd"], row["psnr_to_teacher"], row["adherence_all"]
        print(
            f"{name:28s} {row['model_calls_per_image']:5d} {fd['mean']:7.3f} ± {fd['ci95']:5.3f} "
            f"{ps['mean']:8.2f} ± {ps['ci95']:4.2f} {ad['mean']:7.3f} ± {ad['ci95']:5.3f} "
            f"{row['computed_fraction']['mean']:8.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="where the teacher, classifier, student live")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--per-seed", type=int, default=144, help="images per seed and method")
    parser.add_argument("--teacher-steps", type=int, default=1500, help="training steps of the teacher")
    parser.add_argument("--distill-steps", type=int, default=600, help="training steps of the student")
    parser.add_argument("--trajectories", type=int, default=512, help="teacher trajectories the student learns")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--patch-size", type=int, default=2, help="teacher patch size (4: 16 tokens, for CPUs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/diffusion_quality.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    distill = DistillConfig(
        student_steps=4, guidance_scale=GUIDANCE, train_steps=args.distill_steps, num_trajectories=args.trajectories
    )
    report = evaluate(
        args.workdir, args.seeds, args.per_seed, args.teacher_steps, distill, args.device, args.patch_size
    )
    grid, grid_labels = report.pop("grid"), report.pop("grid_labels")
    print_table(report)
    png = args.out.with_suffix(".png")
    save_grid(grid, grid_labels, png)
    report.update(
        device=torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        command=" ".join(["python -m slimserve.diffusion.experiments.quality", *sys.argv[1:]]),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        seeds=args.seeds,
        images_per_seed=args.per_seed,
        teacher_training_steps=args.teacher_steps,
        teacher_patch_size=args.patch_size,
        distill=asdict(distill),
        guidance_scale=GUIDANCE,
        grid_png=str(png),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(finite_or_none(report), indent=2))


def finite_or_none(value):
    """JSON has no infinity: the teacher's PSNR to itself (and one-seed intervals) become null."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


if __name__ == "__main__":
    main()
