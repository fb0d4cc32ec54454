import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from slimserve.diffusion import AccelerationConfig, accelerate_
from slimserve.diffusion.compile import compile_blocks_
from slimserve.diffusion.config import DiffusionConfigError
from slimserve.diffusion.quant import FP8Linear, Int8WeightOnlyLinear, fp8_linear_ref, quantize_fp8_rows
from slimserve.diffusion.solvers import is_flow_matching
from tests.diffusion.tiny_pipelines import BUILDERS, run


@pytest.mark.parametrize("model", sorted(BUILDERS))
def test_every_solver_runs_and_flow_models_keep_flow_sigmas(model):
    pipe, inputs = BUILDERS[model]()
    flow = is_flow_matching(pipe.scheduler)
    solvers = ("euler", "dpm++", "unipc") if flow else ("dpm++", "unipc", "ddim")
    outputs = []
    for solver in solvers:
        accelerate_(pipe, AccelerationConfig(solver=solver))
        assert is_flow_matching(pipe.scheduler) == flow
        images = run(pipe, inputs, steps=4)
        assert torch.isfinite(images).all()
        outputs.append(images)
    assert not torch.equal(outputs[0], outputs[1])
    accelerate_(pipe, AccelerationConfig(solver="auto"))
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    if flow:
        accelerate_(pipe, AccelerationConfig(solver="unipc"))
        assert isinstance(pipe.scheduler, UniPCMultistepScheduler) and pipe.scheduler.config.use_flow_sigmas
        accelerate_(pipe, AccelerationConfig(solver="euler"))
        assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)


def test_flow_dpm_solver_converges_to_the_same_image_as_many_euler_steps():
    pipe, inputs = BUILDERS["flux"]()
    accelerate_(pipe, AccelerationConfig(solver="euler"))
    reference = run(pipe, inputs, steps=200)
    errors = {}
    for solver in ("euler", "dpm++"):
        accelerate_(pipe, AccelerationConfig(solver=solver))
        errors[solver] = float(((run(pipe, inputs, steps=8) - reference) ** 2).mean())
    assert errors["dpm++"] < errors["euler"]


def test_fp8_linear_reference_matches_dequantized_product_and_the_float_layer():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(3, 5, 64)
    fp8 = FP8Linear(linear)
    x_q, x_scale = quantize_fp8_rows(x.reshape(-1, 64))
    manual = (x_q.float() * x_scale) @ (fp8.weight.float() * fp8.weight_scale).t() + linear.bias
    assert torch.allclose(fp8_linear_ref(x_q, x_scale, fp8.weight, fp8.weight_scale, fp8.bias), manual)
    exact = linear(x)
    assert fp8(x).shape == exact.shape
    assert (fp8(x) - exact).norm() / exact.norm() < 0.06
    int8 = Int8WeightOnlyLinear(linear)
    assert int8.weight.dtype == torch.int8
    assert (int8(x) - exact).norm() / exact.norm() < 0.01


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_quantized_blocks_stay_close_to_the_float_pipeline(scheme):
    pipe, inputs = BUILDERS["pixart"]()
    reference = run(pipe, inputs)
    acceleration = accelerate_(pipe, AccelerationConfig(solver="keep", quantization=scheme))
    assert acceleration.quantized_linears > 0
    layer = FP8Linear if scheme == "fp8" else Int8WeightOnlyLinear
    assert any(isinstance(m, layer) for m in pipe.transformer.transformer_blocks.modules())
    assert not any(isinstance(m, layer) for m in pipe.transformer.pos_embed.modules())
    images = run(pipe, inputs)
    assert not torch.equal(images, reference)
    assert (images - reference).abs().mean() < 0.03  # images in [0, 1]


def test_regional_compile_with_cache_equals_eager_and_does_not_recompile_per_resolution():
    torch._dynamo.reset()
    pipe, inputs = BUILDERS["pixart"]()
    reference = run(pipe, inputs)
    compile_blocks_(pipe.transformer, backend="eager")
    acceleration = accelerate_(pipe, AccelerationConfig(solver="keep", cache="fixed", cache_interval=1))
    assert torch.allclose(run(pipe, inputs), reference, atol=1e-5)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames > 0
    run(pipe, {**inputs, "height": 48, "width": 48})
    run(pipe, {**inputs, "height": 64, "width": 32})
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    acceleration.remove_cache()
    torch._dynamo.reset()


def test_bad_settings_are_one_line_errors():
    with pytest.raises(DiffusionConfigError, match="unknown solver"):
        AccelerationConfig(solver="heun3")
    with pytest.raises(DiffusionConfigError, match="cache_interval"):
        AccelerationConfig(cache="fixed", cache_interval=0)
    pipe, _ = BUILDERS["sd_unet"]()
    with pytest.raises(DiffusionConfigError, match="flow-matching"):
        accelerate_(pipe, AccelerationConfig(solver="euler"))
