"""Prompt-lookup speculation in windows queued on the device: for an all-greedy decode batch, several
propose-verify-accept iterations run back to back without the host. The n-gram lookup reads each
sequence's token history on the device, the target scores the last token and the drafts, and the accepted
tokens are appended to the history there, so an iteration needs nothing from the host: with CUDA graphs it
is one replay, and the host reads every iteration's tokens once at the end of the window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimserve.engine.runner import ModelRunner, cuda_graph_batch_sizes
from slimserve.engine.sequence import Sequence
from slimserve.engine.speculative import cuda_graphs
from slimserve.engine.speculative.rejection import greedy_verify
from slimserve.engine.speculative.verify_graphs import VerifyInputs

# History entries left of position 0 (one fewer than the longest n-gram) hold this value, never a token id.
_NO_TOKEN = -1


def device_prompt_lookup(
    history: torch.Tensor, lengths: torch.Tensor, num_tokens: int, min_n: int, max_n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The device form of `ngram.prompt_lookup` for a batch. history [B, max_n - 1 + T]: max_n - 1 columns of
    _NO_TOKEN, then each sequence's tokens; lengths [B] (long) tokens per row. Returns (drafts [B, num_tokens]
    (long; 0 past the count), num_drafts [B]): the tokens after the latest earlier occurrence of the
    longest suffix n-gram, max_n down to min_n, as many as the sequence holds after it (at most num_tokens).

    A match of length n ends at position e when token e - i equals token L - 1 - i for every i < n: one
    comparison of every position against the last max_n tokens, a running AND over i gives every n at once,
    and the latest end before the suffix's own last token wins, for the longest n that has one."""
    pad = max_n - 1
    dev = history.device
    span = history.shape[1] - pad
    ends = torch.arange(span, device=dev)
    back = torch.arange(max_n, device=dev)
    suffix = history.gather(1, (lengths[:, None] - 1 - back).clamp_min(0) + pad)  # [B, max_n]
    windows = history[:, pad + ends[None, :] - back[:, None]]  # [B, max_n, span]: token e - i
    match = (windows == suffix[:, :, None]).to(torch.int8).cummin(dim=1).values.bool()
    match &= (ends[None, :] <= lengths[:, None] - 2)[:, None, :]
    latest = torch.where(match, ends, -1).amax(dim=2)[:, min_n - 1 :]  # [B, n from min_n to max_n]
    found = latest >= 0
    # The longest n with a match: the last True of `found` (argmax of its index where found).
    longest = (found * torch.arange(1, found.shape[1] + 1, device=dev)).argmax(dim=1, keepdim=True)
    start = torch.where(found.any(dim=1), latest.gather(1, longest)[:, 0] + 1, -1)
    offsets = torch.arange(num_tokens, device=dev)
    drafts = history.gather(1, (start.clamp_min(0)[:, None] + offsets).clamp_max(span - 1) + pad).long()
    num_drafts = torch.where(start >= 0, (lengths - start).clamp(0, num_tokens), 0)
    # Past the count the padding is any valid token id (it is scored, never accepted).
    return torch.where(offsets[None, :] < num_drafts[:, None], drafts, 0), num_drafts


@dataclass
class WindowRow:
    """What one sequence got from a window: per iteration, the drafts proposed and the tokens emitted (the
    accepted drafts and the target's own next token)."""

    num_drafts: list[int]
    emitted: list[list[int]]


class NgramWindows:
    """Device state for windows of up to `max_batch` sequences: the token histories, the verification
    inputs, and per batch size one iteration (a CUDA graph where the runner captures graphs). A window runs at
    most max_iterations iterations."""

    def __init__(
        self, runner: ModelRunner, k: int, min_n: int, max_n: int, max_batch: int, max_iterations: int
    ) -> None:
        self.runner, self.k, self.min_n, self.max_n = runner, k, min_n, max_n
        self.width = k + 1
        self.max_len = runner.max_model_len
        self.max_windows = max_iterations
        dev = runner.device
        self.sizes = cuda_graph_batch_sizes(min(max_batch, runner.config.max_num_seqs))
        max_bs = max(self.sizes)
        # Token histories: max_n - 1 columns of _NO_TOKEN, max_len tokens, one scratch column that absorbs
        # the writes of tokens that were not emitted.
        self.history = torch.full((max_bs, max_n - 1 + self.max_len + 1), _NO_TOKEN, dtype=torch.int32, device=dev)
        self.lengths = torch.ones(max_bs, dtype=torch.long, device=dev)
        # Tokens of KV room each sequence holds (its blocks, capped by max_model_len); 0 marks padding rows.
        self.room = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.verify = VerifyInputs(runner, self.width, max_bs)
        self.offsets = torch.arange(self.width, device=dev)
        self.iteration = torch.zeros(1, dtype=torch.long, device=dev)
        # Per iteration and row: drafts proposed, tokens emitted, and the target's argmax of every query row.
        self.out_counts = torch.zeros(self.max_windows, max_bs, 2, dtype=torch.long, device=dev)
        self.out_tokens = torch.zeros(self.max_windows, max_bs, self.width, dtype=torch.long, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if cuda_graphs.wants_graphs(runner):
            pool = None
            for bs in reversed(self.sizes):
                # Capturing runs the iteration once (compiling its kernels), which records it as iteration 0.
                self.iteration.zero_()
                self.graphs[bs], _ = cuda_graphs.capture(lambda bs=bs: self._iterate(bs), pool)
                pool = self.graphs[bs].pool()
            cuda_graphs.synchronize(dev)

    # ---- host side ---------------------------------------------------------------------------------
    def iterations_that_fit(self, seqs: list[Sequence], wanted: int) -> int:
        """Iterations every sequence has KV room for: one iteration may write k + 1 positions past the last
        accepted token, so after w iterations a sequence reaches at most L + w(k + 1) - 1 tokens."""
        if len(seqs) > max(self.sizes):
            return 0
        fits = min((self._room(s) - len(s.token_ids) + 1) // self.width for s in seqs)
        return max(0, min(wanted, fits, self.max_windows))

    def _room(self, seq: Sequence) -> int:
        return min(len(seq.block_table) * self.runner.block_size, self.max_len)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], iterations: int) -> list[WindowRow]:
        n = len(seqs)
        bs = next(b for b in self.sizes if b >= n) if self.graphs else n
        self._load(seqs, bs)
        for _ in range(iterations):
            if self.graphs:
                self.graphs[bs].replay()
            else:
                self._iterate(bs)
        counts = self.out_counts[:iterations, :n].tolist()
        tokens = self.out_tokens[:iterations, :n].tolist()
        return [
            WindowRow(
                [counts[w][i][0] for w in range(iterations)],
                [tokens[w][i][: counts[w][i][1]] for w in range(iterations)],
            )
            for i in range(n)
        ]

    def _load(self, seqs: list[Sequence], bs: int) -> None:
        """Histories, lengths, KV room and block tables of the batch, in one host-to-device copy; rows past
        it are padding (room 0: no cache slot, length 0, nothing emitted)."""
        n = len(seqs)
        longest = max(len(s.token_ids) for s in seqs)
        table_width = max(len(s.block_table) for s in seqs)
        host: list[int] = []
        for s in seqs:
            host += s.token_ids + [_NO_TOKEN] * (longest - len(s.token_ids))
        for s in seqs:
            host += s.block_table + [0] * (table_width - len(s.block_table))
        host += [len(s.token_ids) for s in seqs] + [self._room(s) for s in seqs]
        packed = self.runner._to_device(host)
        pad = self.max_n - 1
        a, b = n * longest, n * (longest + table_width)
        self.history[:n, pad:].fill_(_NO_TOKEN)
        self.history[:n, pad : pad + longest].copy_(packed[:a].view(n, longest))
        self.verify.tables[:n, :table_width].copy_(packed[a:b].view(n, table_width))
        self.lengths[:n].copy_(packed[b : b + n])
        self.room[:n].copy_(packed[b + n :])
        self.lengths[n:bs].fill_(1)
        self.room[n:bs].fill_(0)
        self.iteration.zero_()

    # ---- one iteration, on the device ------------------------------------------------------------------
    def _iterate(self, bs: int) -> tuple[torch.Tensor]:
        """Propose from the history, score the last token and the drafts, append what is accepted."""
        k, width, block_size = self.k, self.width, self.runner.block_size
        pad = self.max_n - 1
        history = self.history[:bs]
        lengths = self.lengths[:bs]
        active = self.room[:bs] > 0
        drafts, num_drafts = device_prompt_lookup(history[:, :-1], lengths, k, self.min_n, self.max_n)
        num_drafts = num_drafts * active
        last = history.gather(1, lengths[:, None] - 1 + pad).long().clamp_min(0)  # padding rows: token 0
        positions = lengths[:, None] - 1 + self.offsets
        verify = self.verify
        tables = verify.tables[:bs]
        blocks = tables.gather(1, (positions // block_size).clamp_max(tables.shape[1] - 1))
        slots = torch.where(active[:, None], blocks * block_size + positions % block_size, -1)
        rows = bs * width
        verify.ids[:rows].copy_(torch.cat([last, drafts], dim=1).view(-1))
        verify.positions[:rows].copy_(positions.view(-1))
        verify.slots[:rows].copy_(slots.view(-1))
        verify.seq_lens[:bs].copy_(torch.where(active, lengths + k, 0))
        logits = self.runner.model.compute_logits(verify.forward(bs))
        target = logits.view(bs, width, -1).argmax(dim=-1)
        num_accepted, tokens = greedy_verify(target, drafts, num_drafts)
        emitted = (num_accepted + 1) * active
        # Emitted tokens land after the history; the others go to the scratch column.
        write_at = torch.where(self.offsets < emitted[:, None], lengths[:, None] + self.offsets, self.max_len) + pad
        history.scatter_(1, write_at, tokens.to(history.dtype))
        lengths.add_(emitted)
        self.out_counts[:, :bs].index_copy_(0, self.iteration, torch.stack([num_drafts, emitted], dim=1)[None])
        self.out_tokens[:, :bs].index_copy_(0, self.iteration, tokens[None])
        self.iteration.add_(1)
        return (tokens,)
