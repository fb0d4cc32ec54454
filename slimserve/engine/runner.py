"""Model runner: owns the model and the KV cache, turns a scheduled batch into flat tensors, runs the
forward pass (replaying a captured CUDA graph for decode-only steps) and samples the next tokens."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from slimserve.checkpoint.hf_folder import iter_safetensors
from slimserve.config import KV_CACHE_DTYPES, EngineConfig, ModelConfig, check_layer_indices, check_layers_exist
from slimserve.distributed.state import ParallelState
from slimserve.engine.scheduler import ScheduledBatch
from slimserve.errors import CheckpointError, SlimserveError
from slimserve.layers.attention import AttentionMetadata
from slimserve.layers.cpu_quant import quantize_for_cpu
from slimserve.layers.sampler import SampledTokens, Sampler, SamplingBatch
from slimserve.layers.sparse import sparse_structure, use_sparse_24
from slimserve.models.dummy import load_dummy_weights
from slimserve.models.registry import model_class

logger = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 2 << 30


@dataclass
class StepOutput:
    """Host-side result of a step: for each sampling row (an index into the batch), the token of every
    decode step, with log-probabilities when some request asked for them."""

    rows: list[int]
    token_ids: list[list[int]]
    logprobs: list[list[float]] | None
    top_logprobs: list[list[dict[int, float]]] | None


@dataclass
class StepPlan:
    """Everything a rank needs to run one scheduled batch; rank 0 builds it and broadcasts it to the
    other tensor-parallel ranks, which run the same forward passes (their collectives meet rank 0's)."""

    packed: list[int]  # ids, positions, slots (per token), seq_lens, cu_seqlens, block tables
    num_tokens: int
    num_seqs: int
    table_width: int
    max_seqlen_q: int
    last_tokens: list[int]  # flat index of the last token of each row that samples
    decode_only: bool
    num_steps: int
    # All-greedy decode window without log-probabilities: the CUDA graphs take the argmax themselves.
    greedy_window: bool


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def kv_cache_skip_layers(config: EngineConfig, model_config: ModelConfig) -> list[int]:
    """Layers whose cache stays in the model's dtype: the engine's setting, else the checkpoint's (a quantized
    cache only; a cache in the model's dtype skips nothing)."""
    if KV_CACHE_DTYPES[config.kv_cache_dtype] is None:
        return []
    if config.kv_cache_skip_layers is not None:
        layers, where, error = config.kv_cache_skip_layers, "kv_cache_skip_layers", SlimserveError
    else:
        where, error = "config.json quantization_config.kv_cache_skip_layers", CheckpointError
        stored = (model_config.raw.get("quantization_config") or {}).get("kv_cache_skip_layers") or []
        layers = check_layer_indices(stored, where)
    check_layers_exist(layers, model_config.num_hidden_layers, where, error)
    return list(layers)


def cuda_graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_num_seqs + 1, 16))
    return sorted({s for s in sizes if s <= max_num_seqs} | {max_num_seqs})


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        model_path: str,
        device: torch.device,
        dtype: torch.dtype,
        parallel: ParallelState | None = None,
        extra_kv_bytes_per_block: int = 0,
    ) -> None:
        """extra_kv_bytes_per_block: cache memory a speculative proposer needs beside each target block."""
        self.config = config
        self.parallel = parallel or ParallelState()
        self.extra_kv_bytes_per_block = extra_kv_bytes_per_block
        # Final hidden states of the latest eager forward pass (read by speculative proposers).
        self.last_hidden: torch.Tensor | None = None
        self.model_config = model_config
        self.device = device
        self.dtype = dtype
        self.block_size = config.block_size
        # The dtype of the quantized layers' cache (the model's dtype without quantization), and each layer's.
        self.kv_dtype = KV_CACHE_DTYPES[config.kv_cache_dtype] or dtype
        self.kv_skip_layers = kv_cache_skip_layers(config, model_config)
        skipped = set(self.kv_skip_layers)
        self.kv_dtypes = [dtype if i in skipped else self.kv_dtype for i in range(model_config.num_hidden_layers)]
        self.kv_caches: dict[torch.dtype, torch.Tensor] = {}  # one tensor per cache dtype, all its layers
        with torch.device(device), _default_dtype(dtype):
            self.model = model_class(model_config)(model_config, self.parallel, config.quantization)
        # KV heads this rank keeps (a slice of them under tensor parallelism).
        self.num_kv_heads = self.model.attention_layers()[0].num_kv_heads
        if config.load_format == "dummy":
            load_dummy_weights(self.model, config.seed)
        else:
            self.model.load_weights(iter_safetensors(model_path, device, dtype))
        if config.cpu_quantization is not None:
            if device.type != "cpu":
                raise SlimserveError("cpu_quantization needs the CPU device (--device cpu)")
            quantize_for_cpu(self.model, config.cpu_quantization)
        self.model.eval()
        self.sparse_layers: list[str] = []
        if config.sparse_kernels and sparse_structure(model_config.raw) == "2:4":
            self.sparse_layers = use_sparse_24(self.model)
        int8_layers = [a for a, d in zip(self.model.attention_layers(), self.kv_dtypes) if d == torch.int8]
        if not all(a.has_kv_scales for a in int8_layers):
            raise SlimserveError("kv_cache_dtype int8 needs calibrated k_scale/v_scale in the checkpoint")
        for attn in self.model.attention_layers():
            attn.k_scale, attn.v_scale = attn.k_scale.to(device), attn.v_scale.to(device)
        self.sampler = Sampler(config.seed, device)
        self.max_model_len = config.max_model_len or model_config.max_context_len
        self.num_blocks = self._plan_kv_cache()
        self.max_model_len = min(self.max_model_len, self.num_blocks * self.block_size)
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self._allocate_kv_cache()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if device.type == "cuda" and not config.enforce_eager:
            self._capture_cuda_graphs()

    # ---- KV cache -------------------------------------------------------------------------------
    @property
    def kv_bytes_per_block(self) -> int:
        """Keys and values of one block in every layer, each layer at its own cache dtype."""
        per_element = sum(d.itemsize for d in self.kv_dtypes)
        return 2 * self.num_kv_heads * self.model_config.head_dim * self.block_size * per_element

    def describe_kv_layers(self) -> str | None:
        """Which layers keep their cache in the model's dtype, when the cache mixes dtypes (else None)."""
        if not self.kv_skip_layers:
            return None
        full = str(self.dtype).removeprefix("torch.")
        return f"{self.config.kv_cache_dtype}, layers {', '.join(map(str, self.kv_skip_layers))} in {full}"

    def _plan_kv_cache(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.device.type != "cuda":
            # No memory probe on the CPU: a fixed budget, never more than the batch could ever use.
            most = self.config.max_num_seqs * -(-self.max_model_len // self.block_size)
            return max(1, min(CPU_KV_CACHE_BYTES // (self.kv_bytes_per_block + self.extra_kv_bytes_per_block), most))
        peak = self._profile_peak_memory()
        free, total = torch.cuda.mem_get_info(self.device)
        non_torch = (total - free) - torch.cuda.memory_allocated(self.device)
        available = total * self.config.gpu_memory_utilization - non_torch - peak
        # Every rank must hold the same blocks: the smallest rank decides.
        per_block = self.kv_bytes_per_block + self.extra_kv_bytes_per_block
        num_blocks = self.parallel.min_over_ranks(int(available // per_block), self.device)
        if num_blocks < 1:
            raise RuntimeError("no GPU memory left for the KV cache; raise gpu_memory_utilization")
        return num_blocks

    def _profile_peak_memory(self) -> int:
        """Peak memory of the largest step (a full token budget, logits for max_num_seqs rows)."""
        num_tokens = min(self.config.max_num_batched_tokens, self.max_model_len)
        num_blocks = -(-num_tokens // self.block_size)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._allocate_kv_cache(num_blocks)
        ids = torch.zeros(num_tokens, dtype=torch.int32, device=self.device)
        positions = torch.arange(num_tokens, dtype=torch.int32, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=positions,
            cu_seqlens_q=torch.tensor([0, num_tokens], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=self.device),
            block_tables=torch.arange(num_blocks, dtype=torch.int32, device=self.device)[None],
            max_seqlen_q=num_tokens,
        )
        with torch.inference_mode():
            hidden = self.model(ids, positions, meta)
            rows = min(self.config.max_num_seqs, num_tokens)
            self.model.compute_logits(hidden[:rows]).float().softmax(-1)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        self.kv_caches = {}
        for attn in self.model.attention_layers():
            attn.k_cache = attn.v_cache = torch.empty(0)
        torch.cuda.empty_cache()
        return peak

    def _allocate_kv_cache(self, num_blocks: int | None = None) -> None:
        num_blocks = num_blocks or self.num_blocks
        attns = self.model.attention_layers()
        self.kv_caches = {}
        for dtype in dict.fromkeys(self.kv_dtypes):
            layers = [i for i, d in enumerate(self.kv_dtypes) if d == dtype]
            shape = (2, len(layers), num_blocks, self.block_size, self.num_kv_heads, self.model_config.head_dim)
            cache = self.kv_caches[dtype] = torch.zeros(shape, dtype=dtype, device=self.device)
            for j, i in enumerate(layers):
                attns[i].k_cache, attns[i].v_cache = cache[0, j], cache[1, j]

    # ---- batch preparation -------------------------------------------------------------------------
    def _prepare(self, batch: ScheduledBatch) -> tuple[list[int], list[list[int]], list[int]]:
        """Flat host lists: [ids, positions, slots, seq_lens, cu_seqlens], block tables, sample rows."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        cu = [0]
        sample_rows: list[int] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            end = start + n
            table = seq.block_table
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            seq_lens.append(end)
            cu.append(cu[-1] + n)
            if end == len(seq.token_ids):
                sample_rows.append(len(seq_lens) - 1)
        return [ids, positions, slots, seq_lens, cu], [s.block_table for s in batch.seqs], sample_rows

    def _to_device(self, values: list[int]) -> torch.Tensor:
        host = torch.tensor(values, dtype=torch.int32)
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host

    # ---- forward -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepOutput:
        """Run one scheduled batch: a prefill/mixed step, or `batch.num_steps` decode steps back to back."""
        self.last_hidden = None
        (ids, positions, slots, seq_lens, cu), tables, sample_rows = self._prepare(batch)
        width = max(len(t) for t in tables)
        flat_tables = [b for t in tables for b in (t + [0] * (width - len(t)))]
        seqs = [batch.seqs[i] for i in sample_rows]
        sampling = self.sampler.prepare([s.params for s in seqs], [s.generator for s in seqs]) if seqs else None
        plan = StepPlan(
            packed=ids + positions + slots + seq_lens + cu + flat_tables,
            num_tokens=len(ids),
            num_seqs=len(seq_lens),
            table_width=width,
            max_seqlen_q=max(batch.num_new_tokens),
            last_tokens=[cu[i + 1] - 1 for i in sample_rows],
            decode_only=batch.is_decode_only,
            num_steps=batch.num_steps,
            greedy_window=(
                sampling is not None
                and sampling.sampled_rows is None
                and not sampling.want_logprobs
                and batch.num_steps > 1
            ),
        )
        self.parallel.broadcast_object(plan)
        output_ids = [s.output_token_ids for s in seqs] if batch.num_steps == 1 else None
        steps = self.run_plan(plan, sampling, output_ids)
        return self._to_host(sample_rows, steps) if steps else StepOutput([], [], None, None)

    @torch.inference_mode()
    def run_plan(
        self, plan: StepPlan, sampling: SamplingBatch | None, output_ids: list[list[int]] | None = None
    ) -> list[SampledTokens]:
        """The forward passes of one step, on every rank; only rank 0 samples (`sampling` is None elsewhere)."""
        n_tok, n_seq = plan.num_tokens, plan.num_seqs
        packed = self._to_device(plan.packed)
        parts = list(packed.split([n_tok, n_tok, n_tok, n_seq, n_seq + 1, n_seq * plan.table_width]))
        parts[5] = parts[5].view(n_seq, plan.table_width)
        if not plan.last_tokens:
            self._forward(parts, plan.max_seqlen_q)
            return []
        if plan.decode_only:
            return self._decode_steps(plan, parts, sampling, output_ids)
        hidden = self._forward(parts, plan.max_seqlen_q)
        logits = self.model.compute_logits(hidden[torch.tensor(plan.last_tokens, device=self.device)])
        return [self._sample(logits, sampling, output_ids, share=False)]

    def _sample(
        self, logits: torch.Tensor, sampling: SamplingBatch | None, output_ids: list[list[int]] | None, share: bool
    ) -> SampledTokens:
        """Rank 0 samples; with `share`, the other ranks receive the tokens (the next decode step's input)."""
        if self.parallel.is_driver:
            tokens = self.sampler.sample(logits, sampling, output_ids)
        else:
            tokens = SampledTokens(torch.empty(logits.shape[0], dtype=torch.long, device=self.device), None, None, None)
        if share:
            self.parallel.broadcast(tokens.token_ids)
        return tokens

    def _forward(self, parts: list[torch.Tensor], max_seqlen_q: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=parts[2],
            cu_seqlens_q=parts[4],
            seq_lens=parts[3],
            block_tables=parts[5],
            max_seqlen_q=max_seqlen_q,
        )
        self.last_hidden = self.model(parts[0], parts[1], meta)
        return self.last_hidden

    def _decode_steps(
        self,
        plan: StepPlan,
        parts: list[torch.Tensor],
        sampling: SamplingBatch | None,
        output_ids: list[list[int]] | None,
    ) -> list[SampledTokens]:
        """Decode steps queued without waiting for the host: each step's sampled tokens become the next
        step's input on the device, and positions, lengths and cache slots advance there too."""
        n = plan.num_seqs
        graph_bs = self._graph_batch_size(n)
        if graph_bs is not None:
            self._load_graph_inputs(graph_bs, parts)
            if plan.greedy_window:
                return self._greedy_graph_steps(graph_bs, n, plan.num_steps)
            state = [
                self.g_ids[:n],
                self.g_positions[:n],
                self.g_slots[:n],
                self.g_seq_lens[:n],
                None,
                self.g_tables[:n],
            ]
        else:
            state = parts
        ids, positions, slots, seq_lens, _, tables = state
        results = []
        for step in range(plan.num_steps):
            if step:
                ids.copy_(results[-1].token_ids)
                positions.add_(1)
                seq_lens.add_(1)
                block = tables.gather(1, (positions // self.block_size).long()[:, None])[:, 0]
                slots.copy_(block * self.block_size + positions % self.block_size)
            if graph_bs is not None:
                self.graphs[graph_bs].replay()
                logits = self.g_logits[graph_bs][:n]
            else:
                logits = self.model.compute_logits(self._forward(state, 1))
            results.append(self._sample(logits, sampling, output_ids, share=step < plan.num_steps - 1))
        return results

    def _greedy_graph_steps(self, graph_bs: int, n: int, num_steps: int) -> list[SampledTokens]:
        """All-greedy windows replay graphs that also take the argmax and advance their own inputs, so a
        step costs the host one replay and one copy."""
        tokens = torch.empty(num_steps, n, dtype=torch.long, device=self.device)
        for step in range(num_steps):
            self.greedy_graphs[graph_bs].replay()
            tokens[step].copy_(self.g_next[:n])
        return [SampledTokens(tokens[step], None, None, None) for step in range(num_steps)]

    def _greedy_advance(self, bs: int, logits: torch.Tensor) -> None:
        """Inside the greedy graph: argmax, then the next step's inputs. Padding rows (length 0) keep no
        slot and length 0, so they never write into the cache."""
        valid = self.g_seq_lens[:bs] > 0
        tokens = logits.argmax(dim=-1)
        self.g_next[:bs].copy_(tokens)
        self.g_ids[:bs].copy_(tokens)
        self.g_positions[:bs] += valid
        self.g_seq_lens[:bs] += valid
        positions = self.g_positions[:bs]
        block_index = (positions // self.block_size).clamp_max(self.max_blocks_per_seq - 1).long()
        block = self.g_tables[:bs].gather(1, block_index[:, None])[:, 0]
        self.g_slots[:bs].copy_(torch.where(valid, block * self.block_size + positions % self.block_size, -1))

    @staticmethod
    def _to_host(rows: list[int], steps: list[SampledTokens]) -> StepOutput:
        """One device-to-host transfer for all steps: per row, its token of every step."""
        token_ids = torch.stack([s.token_ids for s in steps], dim=1).tolist()
        logprobs = top = None
        if steps[0].logprobs is not None:
            logprobs = torch.stack([s.logprobs for s in steps], dim=1).tolist()
        if steps[0].top_ids is not None:
            ids = torch.stack([s.top_ids for s in steps], dim=1).tolist()
            values = torch.stack([s.top_logprobs for s in steps], dim=1).tolist()
            top = [[dict(zip(i, v)) for i, v in zip(row_ids, row_values)] for row_ids, row_values in zip(ids, values)]
        return StepOutput(rows, token_ids, logprobs, top)

    # ---- CUDA graphs ---------------------------------------------------------------------------------
    def _graph_batch_size(self, n: int) -> int | None:
        return next((b for b in sorted(self.graphs) if b >= n), None)

    def _capture_cuda_graphs(self) -> None:
        max_bs = max(cuda_graph_batch_sizes(self.config.max_num_seqs))
        dev = self.device
        self.g_ids = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.g_positions = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.g_slots = torch.full((max_bs,), -1, dtype=torch.int32, device=dev)
        self.g_seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.g_cu = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        self.g_tables = torch.zeros(max_bs, self.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.g_next = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.g_logits: dict[int, torch.Tensor] = {}
        self.greedy_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = None
        for bs in reversed(cuda_graph_batch_sizes(self.config.max_num_seqs)):
            meta = AttentionMetadata(
                slot_mapping=self.g_slots[:bs],
                cu_seqlens_q=self.g_cu[: bs + 1],
                seq_lens=self.g_seq_lens[:bs],
                block_tables=self.g_tables[:bs],
                max_seqlen_q=1,
            )

            def step(bs: int = bs, meta: AttentionMetadata = meta) -> torch.Tensor:
                hidden = self.model(self.g_ids[:bs], self.g_positions[:bs], meta)
                return self.model.compute_logits(hidden)

            step()  # warm up: compiles the Triton kernels for this shape outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.g_logits[bs] = step()
            pool = graph.pool()
            self.graphs[bs] = graph
            greedy = torch.cuda.CUDAGraph()
            with torch.cuda.graph(greedy, pool=pool):
                self._greedy_advance(bs, step())
            self.greedy_graphs[bs] = greedy
        torch.cuda.synchronize(dev)

    def _load_graph_inputs(self, graph_bs: int, parts: list[torch.Tensor]) -> None:
        """Copy a decode batch into the graph's static inputs; rows past it are padding (no slot, length 0)."""
        n = parts[0].shape[0]
        self.g_ids[:n].copy_(parts[0])
        self.g_positions[:n].copy_(parts[1])
        self.g_slots[:n].copy_(parts[2])
        self.g_slots[n:graph_bs].fill_(-1)
        self.g_seq_lens[:n].copy_(parts[3])
        self.g_seq_lens[n:graph_bs].fill_(0)
        self.g_tables[:n, : parts[5].shape[1]].copy_(parts[5])
