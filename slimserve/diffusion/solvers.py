"""Solver choice per model: flow-matching models (SD3, Flux, our DiT) vs noise/v-prediction models (SD, PixArt)."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from slimserve.diffusion.config import DiffusionConfigError


def is_flow_matching(scheduler: Any) -> bool:
    """Flow-matching schedulers (FlowMatch*, or DPM/UniPC set up for flow sigmas) predict a velocity."""
    config = scheduler.config
    return type(scheduler).__name__.startswith("FlowMatch") or bool(config.get("use_flow_sigmas", False))


def make_scheduler(scheduler: Any, solver: str) -> Any:
    """A new scheduler of the chosen solver, on the same noise schedule as `scheduler`."""
    if solver == "keep":
        return scheduler
    if solver == "auto":  # DPM-Solver++ 2M; on flow models over the same shifted sigmas as flow-matching Euler
        solver = "dpm++"
    config = dict(scheduler.config)
    if is_flow_matching(scheduler):
        shift = config.get("shift", config.get("flow_shift", 1.0))
        flow = dict(
            use_flow_sigmas=True,
            prediction_type="flow_prediction",
            flow_shift=shift,
            use_dynamic_shifting=config.get("use_dynamic_shifting", False),
            time_shift_type=config.get("time_shift_type", "exponential"),
        )
        if solver == "euler":
            if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
                return scheduler
            return FlowMatchEulerDiscreteScheduler(
                shift=shift,
                use_dynamic_shifting=flow["use_dynamic_shifting"],
                num_train_timesteps=config.get("num_train_timesteps", 1000),
            )
        if solver == "dpm++":
            return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2, **flow)
        if solver == "unipc":
            return UniPCMultistepScheduler.from_config(config, solver_order=2, **flow)
        raise DiffusionConfigError(f"solver {solver!r} does not apply to flow-matching models; use euler, dpm++, unipc")
    if solver == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if solver == "unipc":
        return UniPCMultistepScheduler.from_config(config, solver_order=2)
    if solver == "ddim":
        return DDIMScheduler.from_config(config)
    raise DiffusionConfigError(f"solver {solver!r} needs a flow-matching model; use dpm++, unipc or ddim")
