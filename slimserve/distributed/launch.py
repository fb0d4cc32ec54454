"""Start the ranks of a tensor-parallel engine.

Rank 0 is the process that built the engine: it schedules, broadcasts each step's plan and samples. The
other ranks only run forward passes (`serve_steps`). Two ways to get them:

* one machine: `LLM(model, tensor_parallel_size=N)` spawns ranks 1..N-1 itself (torch.multiprocessing)
  and meets them through a TCP rendezvous on localhost;
* several machines: `torchrun` starts every rank with the standard rendezvous variables (RANK,
  WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); each runs the same script, and on ranks other than
  0 the engine constructor serves rank 0's steps and exits when rank 0's engine shuts down.

NCCL connects the ranks on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slimserve.config import EngineConfig, ModelConfig, parse_dtype
from slimserve.distributed.layers import AttentionHeads
from slimserve.distributed.state import ParallelState, split_evenly
from slimserve.errors import SlimserveError

logger = logging.getLogger(__name__)

# A rank that waits longer than this for a collective gives up (a dead peer must not hang forever).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass
class TensorParallelLaunch:
    parallel: ParallelState
    device: torch.device  # this rank's device
    processes: list = field(default_factory=list)  # ranks this process spawned

    def shutdown(self) -> None:
        """Tell the other ranks to stop (an empty plan), wait for the spawned ones, leave the group."""
        if not self.parallel.is_parallel or not dist.is_initialized():
            return
        self.parallel.broadcast_object(None)
        for process in self.processes:
            process.join(timeout=60)
        dist.destroy_process_group()


def check_tensor_parallel(cfg: ModelConfig, world_size: int, expert_parallel: bool = False) -> None:
    """Fail before any process starts when the model cannot be split over `world_size` ranks."""
    parallel = ParallelState(0, world_size)
    AttentionHeads.partition(cfg.num_attention_heads, cfg.num_key_value_heads, parallel)
    split_evenly(cfg.intermediate_size, parallel, "intermediate_size")
    if cfg.moe is not None and expert_parallel:
        split_evenly(cfg.moe.num_experts, parallel, "num_experts")
    elif cfg.moe is not None:
        split_evenly(cfg.moe.expert_intermediate_size, parallel, "moe_intermediate_size")
    # Layers that refuse to be split (quantized dense layers) say so here, on the meta device, not in every rank.
    from slimserve.models.registry import model_class

    with torch.device("meta"):
        model_class(cfg)(cfg, ParallelState(0, world_size, expert_parallel=expert_parallel))


def check_expert_parallel(config: EngineConfig, model_config: ModelConfig) -> None:
    """Expert parallelism spreads whole experts over the tensor-parallel ranks (without it each rank holds a
    slice of every expert); say when it cannot apply."""
    if not config.enable_expert_parallel:
        return
    raw = model_config.raw
    if not (raw.get("num_local_experts") or raw.get("num_experts")):
        logger.warning("enable_expert_parallel has no effect: %s has no experts", model_config.architecture)
    elif config.tensor_parallel_size == 1:
        logger.warning("enable_expert_parallel has no effect with tensor_parallel_size=1")


def started_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_tensor_parallel(
    config: EngineConfig, model_config: ModelConfig, model_path: str, device: torch.device
) -> TensorParallelLaunch:
    check_expert_parallel(config, model_config)
    world = config.tensor_parallel_size
    if world == 1:
        return TensorParallelLaunch(ParallelState(), device)
    check_tensor_parallel(model_config, world, config.enable_expert_parallel)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if started_by_torchrun():
        if int(os.environ["WORLD_SIZE"]) != world:
            raise SlimserveError(
                f"torchrun started {os.environ['WORLD_SIZE']} processes but tensor_parallel_size={world}"
            )
        rank = int(os.environ["RANK"])
        device = _rank_device(device, int(os.environ.get("LOCAL_RANK", rank)))
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, device_id=_device_id(device))
        parallel = ParallelState(rank, world, expert_parallel=config.enable_expert_parallel)
        if rank != 0:
            serve_steps(config, model_config, model_path, device, parallel)
            raise SystemExit(0)
        return TensorParallelLaunch(parallel, device)
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise SlimserveError(f"tensor_parallel_size={world} but only {torch.cuda.device_count()} GPUs are visible")
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    context = mp.get_context("spawn")  # fresh interpreters: no CUDA state is inherited
    processes = [
        context.Process(
            target=_worker_main,
            args=(rank, world, init_method, backend, config, model_config, model_path, device.type),
            name=f"slimserve-tp{rank}",
            daemon=True,
        )
        for rank in range(1, world)
    ]
    for process in processes:
        process.start()
    device = _rank_device(device, 0)
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=0,
        world_size=world,
        timeout=COLLECTIVE_TIMEOUT,
        device_id=_device_id(device),
    )
    return TensorParallelLaunch(
        ParallelState(0, world, expert_parallel=config.enable_expert_parallel), device, processes
    )


def serve_steps(
    config: EngineConfig, model_config: ModelConfig, model_path: str, device: torch.device, parallel: ParallelState
) -> None:
    """A rank other than 0: build the same runner, then run each plan rank 0 broadcasts until it sends None."""
    from slimserve.engine.runner import ModelRunner

    runner = ModelRunner(config, model_config, model_path, device, parse_dtype(config.dtype, device), parallel)
    while (plan := parallel.broadcast_object()) is not None:
        runner.run_plan(plan, None)
    dist.destroy_process_group()


def _worker_main(
    rank: int,
    world: int,
    init_method: str,
    backend: str,
    config: EngineConfig,
    model_config: ModelConfig,
    model_path: str,
    device_type: str,
) -> None:
    device = _rank_device(torch.device(device_type), rank)
    if device.type == "cpu":
        # The ranks share the host's cores.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=COLLECTIVE_TIMEOUT,
        device_id=_device_id(device),
    )
    parallel = ParallelState(rank, world, expert_parallel=config.enable_expert_parallel)
    serve_steps(config, model_config, model_path, device, parallel)


def _rank_device(device: torch.device, local_rank: int) -> torch.device:
    if device.type != "cuda":
        return device
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def _device_id(device: torch.device) -> torch.device | None:
    return device if device.type == "cuda" else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
