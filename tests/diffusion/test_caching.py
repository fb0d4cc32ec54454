import pytest
import torch

from slimserve.diffusion import AccelerationConfig, accelerate_
from tests.diffusion.tiny_pipelines import BUILDERS, run

EXACT = {
    "fixed": dict(cache="fixed", cache_interval=1),
    "first_block": dict(cache="first_block", cache_threshold=0.0),
    "teacache": dict(cache="teacache", cache_threshold=0.0),
}
LOOSE = {
    "fixed": dict(cache="fixed", cache_interval=3),
    "first_block": dict(cache="first_block", cache_threshold=10.0),
    "teacache": dict(cache="teacache", cache_threshold=10.0),
}


@pytest.mark.parametrize("model", sorted(BUILDERS))
@pytest.mark.parametrize("scheme", sorted(EXACT))
def test_zero_threshold_cache_equals_uncached_and_loose_cache_skips(model, scheme):
    pipe, inputs = BUILDERS[model]()
    reference = run(pipe, inputs)

    acceleration = accelerate_(pipe, AccelerationConfig(solver="keep", **EXACT[scheme]))
    assert torch.equal(run(pipe, inputs), reference)
    assert acceleration.cache.reused_steps == 0 and acceleration.cache.computed_steps > 0
    acceleration.remove_cache()

    acceleration = accelerate_(pipe, AccelerationConfig(solver="keep", **LOOSE[scheme]))
    cached = run(pipe, inputs)
    assert acceleration.cache.reused_steps > 0
    assert acceleration.cache.computed_steps > 0
    assert not torch.equal(cached, reference)
    assert torch.isfinite(cached).all()
    # A second generation starts from a fresh cache: same noise, same result.
    assert torch.equal(run(pipe, inputs), cached)
    acceleration.remove_cache()
    assert torch.equal(run(pipe, inputs), reference)


def test_separate_cond_and_uncond_calls_keep_separate_caches():
    """Two model calls per timestep (cond, uncond) are two branches; each reuses only its own residual."""
    from slimserve.diffusion.caching import StepTracker

    tracker = StepTracker()
    seen = [(tracker.begin_call(torch.tensor([t])).step, tracker.branch) for t in (999, 999, 500, 500, 999)]
    assert seen == [(0, 0), (0, 1), (1, 0), (1, 1), (0, 0)]
