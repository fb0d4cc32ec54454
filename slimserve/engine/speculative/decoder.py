"""The speculative step: the proposer drafts up to k tokens per sequence, the target scores every sequence's
last token and its drafts in one forward pass (a short prefill through the paged-attention path), and the
verifier keeps the longest acceptable prefix plus one token of the target's own. The KV entries the
rejected drafts wrote are past the new num_computed_tokens, so they are overwritten later; the engine gives
back whole blocks they occupied (BlockManager.trim)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from slimserve.engine.runner import ModelRunner, StepOutput
from slimserve.engine.scheduler import ScheduledBatch, Scheduler
from slimserve.engine.sequence import Sequence
from slimserve.engine.speculative.config import SpeculativeConfig
from slimserve.engine.speculative.ngram_window import NgramWindows, WindowRow
from slimserve.engine.speculative.proposer import Proposal, Proposer, RowSampling
from slimserve.engine.speculative.rejection import greedy_verify, rejection_sample
from slimserve.engine.speculative.stats import SpeculativeStats
from slimserve.engine.speculative.verify_graphs import VerifyGraph, VerifyGraphs
from slimserve.layers.sampler import apply_penalties, uses_penalties


class SpeculativeDecoder:
    def __init__(
        self,
        config: SpeculativeConfig,
        runner: ModelRunner,
        proposer: Proposer,
        seed: int,
        windows: NgramWindows | None = None,
    ) -> None:
        """windows: device-side windows of speculative iterations, for proposers that can draft on the device."""
        self.config = config
        self.k = config.num_speculative_tokens
        self.runner = runner
        self.proposer = proposer
        self.device = runner.device
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed + 1)
        self.stats = SpeculativeStats()
        self.request_stats: dict[str, SpeculativeStats] = {}
        self.graphs = VerifyGraphs.capture(runner, self.k, config.disable_by_batch_size)
        self.windows = windows
        # Tokens that end a request (the engine's EOS ids): a window's iterations after one are not counted.
        self.eos_token_ids: set[int] = set()
        # Tokens per window iteration so far (per sequence), to size windows to what the requests still need.
        self.window_tokens, self.window_iterations = 0, 0

    def window(self, scheduler: Scheduler) -> int:
        """Speculative iterations to queue on the device this step: the scheduler's decode window when
        every running sequence is greedy without log-probabilities (1: one iteration through the host)."""
        running = scheduler.running
        if self.windows is None or not 0 < len(running) <= self.config.disable_by_batch_size:
            return 1
        if any(not s.params.greedy or s.params.logprobs is not None for s in running):
            return 1
        # Iterations past the end of every request are wasted: no more than the tokens still wanted take at
        # the rate seen so far.
        wanted = max(s.params.max_tokens - s.num_output_tokens for s in running)
        rate = self.window_tokens / self.window_iterations if self.window_iterations else 1.0
        return min(scheduler.decode_window(), max(1, math.ceil(wanted / rate)))

    def lookahead(self, num_running: int, window: int = 1) -> int:
        """KV slots to reserve past each decoding sequence's next token this step (0: no speculation): k
        for one iteration, room for window iterations of k + 1 positions each otherwise."""
        if not 0 < num_running <= self.config.disable_by_batch_size:
            return 0
        return window * (self.k + 1) - 1 if window > 1 else self.k

    def budget(self, seq: Sequence) -> int:
        """Drafts worth proposing: no more than the KV blocks the sequence holds, the context and the
        tokens it may still generate allow. Penalized requests need every previous token: no drafts."""
        if uses_penalties(seq.params):
            return 0
        length = len(seq.token_ids)
        room = min(len(seq.block_table) * self.runner.block_size, self.runner.max_model_len) - length
        remaining = seq.params.max_tokens - seq.num_output_tokens - 1
        return max(0, min(self.k, room, remaining))

    def release(self, live: Iterable[str]) -> None:
        live = set(live)
        self.request_stats = {r: s for r, s in self.request_stats.items() if r in live}
        self.proposer.release(live)

    def observe(self, batch: ScheduledBatch, hidden: torch.Tensor | None) -> None:
        """A step the target ran on its own (prefill, or decode above the batch-size limit)."""
        starts = [s.num_computed_tokens for s in batch.seqs]
        self.proposer.observe(batch.seqs, starts, list(batch.num_new_tokens), hidden)

    # ---- the speculative step -----------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, window: int = 1) -> StepOutput | None:
        """Propose, score and verify (window iterations queued on the device where they fit); None when
        nobody has drafts (the runner's plain decode step is cheaper)."""
        seqs = batch.seqs
        if window > 1 and self.windows is not None:
            iterations = self.windows.iterations_that_fit(seqs, window)
            if iterations > 1:
                return self._execute_window(seqs, iterations)
        budgets = [self.budget(s) for s in seqs]
        sampling = RowSampling.of(seqs, self.device)
        proposal = self.proposer.propose(seqs, budgets, sampling)
        drafts = [d[:b] for d, b in zip(proposal.draft_ids, budgets)]
        starts = [min(s.num_computed_tokens, self.proposer.recompute_from(s)) for s in seqs]
        if not any(drafts) and all(st == s.num_computed_tokens for st, s in zip(starts, seqs)):
            return None
        hidden, logits, cu = self._score(seqs, drafts, starts)
        width = logits.shape[1] - 1
        draft_ids = torch.tensor([d + [0] * (width - len(d)) for d in drafts], dtype=torch.long).to(self.device)
        num_drafts = torch.tensor([len(d) for d in drafts]).to(self.device)
        if any(uses_penalties(s.params) for s in seqs):
            logits[:, 0] = apply_penalties(
                logits[:, 0].clone(), [s.params for s in seqs], [s.output_token_ids for s in seqs]
            )
        num_accepted, tokens = greedy_verify(logits.argmax(dim=-1), draft_ids, num_drafts)
        if not sampling.all_greedy:
            self._rejection_sample(seqs, sampling, proposal, logits, draft_ids, num_drafts, num_accepted, tokens)
        host = torch.cat([num_accepted[:, None], tokens], dim=1).tolist()
        accepted = [row[0] for row in host]
        emitted = [row[1 : row[0] + 2] for row in host]
        for seq, d, n in zip(seqs, drafts, accepted):
            self._count(seq, len(d), n)
        committed = [len(s.token_ids) + n for s, n in zip(seqs, accepted)]
        self.proposer.verified(seqs, starts, committed, hidden, cu)
        logprobs, top = self._logprobs(seqs, logits, tokens, accepted)
        return StepOutput(list(range(len(seqs))), emitted, logprobs, top)

    def _execute_window(self, seqs: list[Sequence], iterations: int) -> StepOutput:
        rows = self.windows.run(seqs, iterations)
        for seq, row in zip(seqs, rows):
            for drafted, emitted in self._live_iterations(seq, row):
                self.window_tokens += len(emitted)
                self.window_iterations += 1
                self._count(seq, drafted, len(emitted) - 1)
        emitted = [[t for tokens in row.emitted for t in tokens] for row in rows]
        return StepOutput(list(range(len(seqs))), emitted, None, None)

    def _count(self, seq: Sequence, num_drafts: int, num_accepted: int) -> None:
        """One verification, in the engine's and the request's acceptance counters."""
        self.stats.add(num_drafts, num_accepted)
        self.request_stats.setdefault(seq.request_id, SpeculativeStats()).add(num_drafts, num_accepted)

    def _live_iterations(self, seq: Sequence, row: WindowRow) -> list[tuple[int, list[int]]]:
        """The iterations before the sequence stops (max_tokens, EOS, a stop token id); the device ran the
        rest of the window for nothing."""
        params = seq.params
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        remaining = params.max_tokens - seq.num_output_tokens
        live = []
        for drafted, emitted in zip(row.num_drafts, row.emitted):
            if remaining <= 0:
                break
            live.append((drafted, emitted))
            remaining -= len(emitted)
            if stops.intersection(emitted):
                break
        return live

    def _score(
        self, seqs: list[Sequence], drafts: list[list[int]], starts: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """One target pass over each sequence's uncomputed tokens and drafts. Returns the hidden states of
        all rows, the logits [B, K+1, V] after the last token and after each draft (rows past a sequence's
        drafts repeat its last one), and the row offsets of the sequences. When a captured graph fits, every
        sequence's drafts are padded to k (the padding is scored, never accepted)."""
        bs = self.runner.block_size
        graph = self._graph_for(seqs, starts)
        padded = [self.k if graph is not None else len(d) for d in drafts]
        width = max(padded)
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        cu = [0]
        for seq, d, n_pad, start in zip(seqs, drafts, padded, starts):
            tokens = seq.token_ids[start:] + d + [0] * (n_pad - len(d))
            end = start + len(tokens)
            table = seq.block_table
            ids.extend(tokens)
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            seq_lens.append(end)
            cu.append(cu[-1] + len(tokens))
        if graph is not None:
            hidden, logits = graph.run(ids, positions, slots, seq_lens, [s.block_table for s in seqs])
            return hidden, logits.float().view(len(seqs), width + 1, -1), cu
        rows = [[cu[i + 1] - n - 1 + min(j, n) for j in range(width + 1)] for i, n in enumerate(padded)]
        tables = [s.block_table for s in seqs]
        n_tok, n_seq = len(ids), len(seqs)
        table_width = max(len(t) for t in tables)
        flat_tables = [b for t in tables for b in t + [0] * (table_width - len(t))]
        packed = self.runner._to_device(ids + positions + slots + seq_lens + cu + flat_tables)
        parts = list(packed.split([n_tok, n_tok, n_tok, n_seq, n_seq + 1, n_seq * table_width]))
        parts[5] = parts[5].view(n_seq, table_width)
        hidden = self.runner._forward(parts, max(cu[i + 1] - cu[i] for i in range(n_seq)))
        index = torch.tensor(rows).to(self.device).view(-1)
        logits = self.runner.model.compute_logits(hidden[index]).float()
        return hidden, logits.view(n_seq, width + 1, -1), cu

    def _graph_for(self, seqs: list[Sequence], starts: list[int]) -> VerifyGraph | None:
        """The verification graph for this batch, if one is captured and every sequence has one token to
        catch up and KV room for k drafts."""
        if self.graphs is None:
            return None
        limit = self.runner.max_model_len
        bs = self.runner.block_size
        for seq, start in zip(seqs, starts):
            length = len(seq.token_ids)
            if start != length - 1 or length + self.k > min(limit, len(seq.block_table) * bs):
                return None
        return self.graphs.get(len(seqs), self.k)

    def _rejection_sample(
        self,
        seqs: list[Sequence],
        sampling: RowSampling,
        proposal: Proposal,
        logits: torch.Tensor,
        draft_ids: torch.Tensor,
        num_drafts: torch.Tensor,
        num_accepted: torch.Tensor,
        tokens: torch.Tensor,
    ) -> None:
        """Overwrite the sampled rows of num_accepted and tokens with speculative sampling's outcome."""
        rows_list = [i for i, g in enumerate(sampling.greedy) if not g]
        rows = torch.tensor(rows_list, device=self.device)
        width, vocab = logits.shape[1], logits.shape[2]
        target = sampling.probs(logits[rows].view(-1, vocab), rows.repeat_interleave(width)).view(-1, width, vocab)
        draft = None
        if proposal.draft_probs is not None:
            draft = proposal.draft_probs[rows, : width - 1]
            if draft.shape[1] < width - 1:  # drafts padded for a graph: their probabilities are never read
                draft = torch.cat([draft, draft.new_zeros(len(rows_list), width - 1 - draft.shape[1], vocab)], 1)
        uniforms = torch.rand(len(rows_list), width - 1, device=self.device, generator=self.generator)
        noise = torch.empty(len(rows_list), vocab, device=self.device).exponential_(generator=self.generator)
        for j, i in enumerate(rows_list):
            # A request with its own seed draws its own randomness, whatever it is batched with.
            gen = seqs[i].generator
            if gen is not None:
                uniforms[j] = torch.rand(width - 1, device=self.device, generator=gen)
                noise[j].exponential_(generator=gen)
        accepted, chosen = rejection_sample(target, draft_ids[rows], num_drafts[rows], draft, uniforms, noise)
        num_accepted[rows] = accepted
        tokens[rows] = chosen

    @staticmethod
    def _logprobs(
        seqs: list[Sequence], logits: torch.Tensor, tokens: torch.Tensor, accepted: list[int]
    ) -> tuple[list[list[float]] | None, list[list[dict[int, float]]] | None]:
        """Log-probabilities of the emitted tokens under the target (as the plain sampler reports them)."""
        wanted = [s.params.logprobs for s in seqs if s.params.logprobs is not None]
        if not wanted:
            return None, None
        logprobs = logits.log_softmax(dim=-1)
        chosen = logprobs.gather(2, tokens[:, :, None])[:, :, 0].tolist()
        chosen = [row[: n + 1] for row, n in zip(chosen, accepted)]
        top = None
        if max(wanted):
            values, ids = logprobs.topk(max(wanted), dim=-1)
            top = [
                [dict(zip(i, v)) for i, v in zip(row_ids[: n + 1], row_values[: n + 1])]
                for row_ids, row_values, n in zip(ids.tolist(), values.tolist(), accepted)
            ]
        return chosen, top
