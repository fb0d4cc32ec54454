"""CUDA graphs of the draft head's one-token steps (drafts 2..k), one per batch size up to the speculation
limit: embedding, fusion, decoder layer and the target's LM head replay as one launch. Rows past the real
batch are padding (no cache slot, length 0)."""

from __future__ import annotations

import torch

from slimserve.engine.runner import ModelRunner, cuda_graph_batch_sizes
from slimserve.engine.speculative import cuda_graphs
from slimserve.engine.speculative.eagle_head import EagleHead
from slimserve.layers.attention import AttentionMetadata


class EagleStepGraphs:
    def __init__(self, head: EagleHead, target: ModelRunner, max_bs: int) -> None:
        dev = target.device
        self.head, self.target = head, target
        self.tokens = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.features = torch.zeros(max_bs, head.config.hidden_size, dtype=target.dtype, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.slots = torch.full((max_bs,), -1, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.cu = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        self.tables = torch.zeros(max_bs, target.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def capture(cls, head: EagleHead, target: ModelRunner, max_batch: int) -> EagleStepGraphs | None:
        if not cuda_graphs.wants_graphs(target):
            return None
        sizes = cuda_graph_batch_sizes(min(max_batch, target.config.max_num_seqs))
        graphs = cls(head, target, max(sizes))
        pool = None
        for bs in reversed(sizes):
            meta = AttentionMetadata(
                slot_mapping=graphs.slots[:bs],
                cu_seqlens_q=graphs.cu[: bs + 1],
                seq_lens=graphs.seq_lens[:bs],
                block_tables=graphs.tables[:bs],
                max_seqlen_q=1,
            )

            def step(bs: int = bs, meta: AttentionMetadata = meta) -> tuple[torch.Tensor, torch.Tensor]:
                embeds = torch.nn.functional.embedding(graphs.tokens[:bs], target.model.embed_tokens)
                out = head(embeds, graphs.features[:bs], graphs.positions[:bs], meta)
                return out, target.model.compute_logits(out)

            graph, (out, logits) = cuda_graphs.capture(step, pool)
            pool = graph.pool()
            graphs.graphs[bs] = (graph, out, logits)
        cuda_graphs.synchronize(target.device)
        return graphs

    def batch_size(self, n: int) -> int | None:
        return next((bs for bs in sorted(self.graphs) if bs >= n), None)

    def load_tables(self, bs: int, tables: torch.Tensor) -> None:
        n = tables.shape[0]
        self.tables[:n, : tables.shape[1]].copy_(tables)
        self.seq_lens[n:bs].fill_(0)
        self.slots[n:bs].fill_(-1)

    def run(
        self, bs: int, tokens: torch.Tensor, features: torch.Tensor, positions, slots, seq_lens
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step for n = len(tokens) rows (positions, slots, seq_lens: device int32 [n])."""
        n = tokens.shape[0]
        self.tokens[:n].copy_(tokens)
        self.features[:n].copy_(features)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(slots)
        self.seq_lens[:n].copy_(seq_lens)
        graph, out, logits = self.graphs[bs]
        graph.replay()
        return out[:n], logits[:n]
