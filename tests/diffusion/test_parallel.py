"""Two gloo ranks on the CPU give the single-process output: Ulysses and ring sequence parallelism, CFG parallelism."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.diffusion.tiny_pipelines import dit, flux, pixart, run, sd3, sd_unet


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, results) -> None:
    from slimserve.diffusion.parallel import CFGParallel, SequenceParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        outputs = {}
        for name, build in (("pixart", pixart), ("dit", dit)):
            pipe, inputs = build()
            outputs[f"{name} single"] = run(pipe, inputs, steps=3)
            attn = pipe.transformer.transformer_blocks[0].attn1
            for mode in ("ulysses", "ring"):
                parallel = SequenceParallel(pipe.transformer, mode)
                lengths = []
                hook = attn.register_forward_pre_hook(lambda module, args, seen=lengths: seen.append(args[0].shape[1]))
                outputs[f"{name} {mode}"] = run(pipe, inputs, steps=3)
                hook.remove()
                parallel.remove()
                outputs[f"{name} {mode} tokens per rank"] = torch.tensor(lengths)
            parallel = CFGParallel(pipe.transformer)
            outputs[f"{name} cfg"] = run(pipe, inputs, steps=3)
            parallel.remove()
            outputs[f"{name} restored"] = run(pipe, inputs, steps=3)
        results[rank] = outputs
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_the_single_process_output():
    pipe_tokens = {"pixart": (32 // 2 // 2) ** 2, "dit": (8 // 2) ** 2}  # (image / VAE factor / patch) ** 2
    manager = mp.Manager()
    results = manager.dict()
    # fork: the ranks inherit the imported modules instead of importing diffusers again
    mp.start_processes(_rank, args=(2, _free_port(), results), nprocs=2, join=True, start_method="fork")
    for rank in (0, 1):
        outputs = results[rank]
        for name in ("pixart", "dit"):
            single = outputs[f"{name} single"]
            assert torch.equal(outputs[f"{name} restored"], single)
            tokens = pipe_tokens[name]
            for mode in ("ulysses", "ring"):  # each rank's attention saw half of the image tokens
                assert (outputs[f"{name} {mode} tokens per rank"] == tokens // 2).all()
            for variant in ("ulysses", "ring", "cfg"):
                assert torch.allclose(outputs[f"{name} {variant}"], single, atol=1e-5), (rank, name, variant)
    assert torch.equal(results[0]["pixart ulysses"], results[1]["pixart ulysses"])


def _joint_rank(rank: int, world: int, port: int, results) -> None:
    from slimserve.diffusion.parallel import SequenceParallel
    from slimserve.errors import UnsupportedArchitectureError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        outputs = {}
        for name, build in (("flux", flux), ("sd3", sd3)):
            pipe, inputs = build()
            outputs[f"{name} single"] = run(pipe, inputs, steps=3)
            blocks = [*pipe.transformer.transformer_blocks, *getattr(pipe.transformer, "single_transformer_blocks", [])]
            for mode in ("ulysses", "ring"):
                parallel = SequenceParallel(pipe.transformer, mode)
                seen = []
                hooks = [
                    block.attn.register_forward_pre_hook(
                        lambda module, args, kwargs, seen=seen: seen.append(kwargs["hidden_states"].shape[1]),
                        with_kwargs=True,
                    )
                    for block in blocks
                ]
                outputs[f"{name} {mode}"] = run(pipe, inputs, steps=3)
                for hook in hooks:
                    hook.remove()
                parallel.remove()
                outputs[f"{name} {mode} lengths"] = torch.tensor(seen).unique()
            outputs[f"{name} restored"] = run(pipe, inputs, steps=3)
        pipe, inputs = flux()
        pipe.transformer.fuse_qkv_projections()  # a processor layout it does not repeat: refused, model untouched
        try:
            SequenceParallel(pipe.transformer, "ulysses")
        except UnsupportedArchitectureError as error:
            outputs["refusal"] = str(error)
        outputs["after refusal"] = run(pipe, inputs, steps=3)
        results[rank] = outputs
    finally:
        dist.destroy_process_group()


def test_joint_attention_blocks_on_two_gloo_ranks_equal_the_single_process_output():
    """Flux (double- and single-stream blocks, rotary) and SD3 (joint blocks with the extra image self-attention):
    image tokens sharded, text replicated."""
    manager = mp.Manager()
    results = manager.dict()
    mp.start_processes(_joint_rank, args=(2, _free_port(), results), nprocs=2, join=True, start_method="fork")
    image_tokens, text_tokens = 16, 6  # 16x16 images: 8x8 latents in 2x2 patches; 6 text tokens
    for rank in (0, 1):
        outputs = results[rank]
        for name in ("flux", "sd3"):
            single = outputs[f"{name} single"]
            assert torch.equal(outputs[f"{name} restored"], single)
            for mode in ("ulysses", "ring"):
                assert torch.allclose(outputs[f"{name} {mode}"], single, atol=1e-5), (rank, name, mode)
        # the double-stream and SD3 blocks' attention sees the rank's half of the image tokens, Flux's single-stream
        # blocks see the whole text ahead of that half
        flux_lengths = {image_tokens // 2, text_tokens + image_tokens // 2}
        assert set(outputs["flux ulysses lengths"].tolist()) == flux_lengths
        assert outputs["sd3 ring lengths"].tolist() == [image_tokens // 2]
        assert "default unfused attention processor" in outputs["refusal"] and "\n" not in outputs["refusal"]
        assert torch.allclose(outputs["after refusal"], outputs["flux single"], atol=1e-5)


def test_unet_is_refused_in_one_line():
    from slimserve.diffusion.parallel import SequenceParallel
    from slimserve.errors import UnsupportedArchitectureError

    pipe, _ = sd_unet()
    with pytest.raises(UnsupportedArchitectureError, match="needs transformer blocks"):
        SequenceParallel(pipe.unet)
