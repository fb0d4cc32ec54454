"""CUDA graphs of the target's verification pass: every sequence scores its last token and k drafts
(k + 1 query rows each), for each captured batch size up to the speculation limit. Rows past the real
batch are padding (no cache slot, length 0)."""

from __future__ import annotations

import torch

from slimserve.engine.runner import ModelRunner, cuda_graph_batch_sizes
from slimserve.engine.speculative import cuda_graphs
from slimserve.layers.attention import AttentionMetadata


class VerifyGraph:
    def __init__(self, owner: VerifyGraphs, bs: int, graph: torch.cuda.CUDAGraph, hidden, logits) -> None:
        self.owner, self.bs, self.graph, self.hidden, self.logits = owner, bs, graph, hidden, logits

    def run(
        self,
        ids: list[int],
        positions: list[int],
        slots: list[int],
        seq_lens: list[int],
        tables: list[list[int]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Load a batch of len(seq_lens) sequences with width + 1 rows each, replay; (hidden, logits) rows."""
        o = self.owner
        n, rows, pad_rows = len(seq_lens), len(ids), self.bs * o.width - len(ids)
        table_width = o.tables.shape[1]
        flat_tables = [b for t in tables for b in t[:table_width] + [0] * (table_width - len(t))]
        host = ids + positions + slots + [-1] * pad_rows + seq_lens + [0] * (self.bs - n) + flat_tables
        packed = o.runner._to_device(host)
        a, b = rows, 2 * rows
        o.ids[:rows].copy_(packed[:a])
        o.positions[:rows].copy_(packed[a:b])
        c = b + rows + pad_rows
        o.slots[: self.bs * o.width].copy_(packed[b:c])
        o.seq_lens[: self.bs].copy_(packed[c : c + self.bs])
        o.tables[:n].copy_(packed[c + self.bs :].view(n, table_width))
        self.graph.replay()
        return self.hidden[:rows], self.logits[:rows]


class VerifyInputs:
    """Static inputs of a verification pass over up to max_bs sequences of `width` query rows each (the last
    token and the drafts), for CUDA graphs to read."""

    def __init__(self, runner: ModelRunner, width: int, max_bs: int) -> None:
        self.runner = runner
        self.width = width
        dev = runner.device
        rows = max_bs * width
        self.ids = torch.zeros(rows, dtype=torch.int32, device=dev)
        self.positions = torch.zeros(rows, dtype=torch.int32, device=dev)
        self.slots = torch.full((rows,), -1, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.cu = torch.arange(max_bs + 1, dtype=torch.int32, device=dev) * width
        self.tables = torch.zeros(max_bs, runner.max_blocks_per_seq, dtype=torch.int32, device=dev)

    def forward(self, bs: int) -> torch.Tensor:
        """The target's final hidden states of the first bs sequences' rows."""
        rows = bs * self.width
        meta = AttentionMetadata(
            slot_mapping=self.slots[:rows],
            cu_seqlens_q=self.cu[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.tables[:bs],
            max_seqlen_q=self.width,
        )
        return self.runner.model(self.ids[:rows], self.positions[:rows], meta)


class VerifyGraphs(VerifyInputs):
    def __init__(self, runner: ModelRunner, k: int, max_bs: int) -> None:
        super().__init__(runner, k + 1, max_bs)
        self.k = k
        self.graphs: dict[int, VerifyGraph] = {}

    @classmethod
    def capture(cls, runner: ModelRunner, k: int, max_batch: int) -> VerifyGraphs | None:
        """Graphs for CUDA runners that capture graphs at all; None elsewhere (the eager path is used)."""
        if not cuda_graphs.wants_graphs(runner):
            return None
        sizes = cuda_graph_batch_sizes(min(max_batch, runner.config.max_num_seqs))
        graphs = cls(runner, k, max(sizes))
        pool = None
        model = runner.model
        for bs in reversed(sizes):

            def step(bs: int = bs) -> tuple[torch.Tensor, torch.Tensor]:
                hidden = graphs.forward(bs)
                return hidden, model.compute_logits(hidden)

            graph, (hidden, logits) = cuda_graphs.capture(step, pool)
            pool = graph.pool()
            graphs.graphs[bs] = VerifyGraph(graphs, bs, graph, hidden, logits)
        cuda_graphs.synchronize(runner.device)
        return graphs

    def get(self, batch_size: int, width: int) -> VerifyGraph | None:
        if width != self.k:
            return None
        return next((g for bs, g in sorted(self.graphs.items()) if bs >= batch_size), None)
