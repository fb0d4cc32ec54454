"""What the engine tests over two ranks share: the prompts, the engine settings and the comparison of a
multi-rank run's outputs with the single-process engine's."""

import torch

PROMPTS = [[5, 6, 7, 8], list(range(10, 40)), [300, 301, 302, 303, 304, 305, 306]]
ENGINE = dict(dtype="float32", device="cpu", block_size=4, max_num_batched_tokens=16, num_decode_steps=4)


def assert_logprobs_equal(want, have) -> None:
    """At every step, each token the single-process run reported has the same log-probability (1e-5)."""
    for step_want, step_have in zip(want.outputs[0].logprobs, have.outputs[0].logprobs):
        ids = sorted(step_want)
        a = torch.tensor([step_want[i] for i in ids])
        b = torch.tensor([step_have.get(i, float("nan")) for i in ids])
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
