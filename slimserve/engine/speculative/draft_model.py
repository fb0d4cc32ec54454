"""Draft-model proposer: a smaller checkpoint that shares the target's tokenizer drafts k tokens
autoregressively with its own model runner and KV cache. The draft cache has as many blocks as the target's
and uses the sequences' block tables, so no second block manager is needed; the draft catches up lazily (a
short prefill of the tokens it has not seen) at the start of each proposal."""

from __future__ import annotations

import torch

from slimserve.engine.runner import ModelRunner
from slimserve.engine.sequence import Sequence
from slimserve.engine.speculative.proposer import Proposal, Proposer, RowSampling


class DraftModelProposer(Proposer):
    def __init__(self, runner: ModelRunner, target_vocab: int, seed: int) -> None:
        self.runner = runner
        self.device = runner.device
        self.target_vocab = target_vocab
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed + 2)
        # Per request: (positions below this hold valid draft KV, the request's preemption count then).
        self.computed: dict[str, tuple[int, int]] = {}
        self.written: dict[str, int] = {}

    def _start(self, seq: Sequence) -> int:
        computed, preemptions = self.computed.get(seq.request_id, (0, seq.num_preemptions))
        if preemptions != seq.num_preemptions:
            computed = 0  # the blocks were given back and refilled: the draft's cache is stale
        return min(computed, len(seq.token_ids) - 1)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], budgets: list[int], sampling: RowSampling) -> Proposal:
        k = max(budgets)
        if k == 0:
            return Proposal([[] for _ in seqs])
        bs = self.runner.block_size
        starts = [self._start(s) for s in seqs]
        lengths = [len(s.token_ids) for s in seqs]
        tables = [s.block_table for s in seqs]
        # Step 0: the tokens the draft has not seen (at least the last one), logits after the last.
        ids, positions, slots, seq_lens, cu = [], [], [], [], [0]
        for seq, start, length in zip(seqs, starts, lengths):
            ids.extend(seq.token_ids[start:])
            positions.extend(range(start, length))
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in range(start, length))
            seq_lens.append(length)
            cu.append(cu[-1] + length - start)
        if cu[-1] == len(seqs):
            # One token each (the usual case): a decode step, replayed as a CUDA graph where captured.
            logits = self._decode(torch.tensor(ids).to(self.device), positions, slots, seq_lens, tables)
        else:
            max_q = max(b - a for a, b in zip(cu, cu[1:]))
            hidden = self.runner._forward(self._parts(ids, positions, slots, seq_lens, cu, tables), max_q)
            last = torch.tensor([c - 1 for c in cu[1:]]).to(self.device)
            logits = self.runner.model.compute_logits(hidden[last])
        # Steps 1..k-1 feed one draft each; a row past its budget recomputes its last position, writing nothing.
        later = []
        for j in range(1, k):
            pos = [n - 1 + (j if j < b else 0) for n, b in zip(lengths, budgets)]
            slot = [t[p // bs] * bs + p % bs if j < b else -1 for t, p, b in zip(tables, pos, budgets)]
            later.append((pos, slot, [p + 1 for p in pos]))
        draft_tokens, draft_probs = [], []
        token, probs = self._sample(logits, sampling)
        draft_tokens.append(token)
        draft_probs.append(probs)
        for pos, slot, lens in later:
            logits = self._decode(token, pos, slot, lens, tables)
            token, probs = self._sample(logits, sampling)
            draft_tokens.append(token)
            draft_probs.append(probs)
        host = torch.stack(draft_tokens, dim=1).tolist()
        for seq, b, length in zip(seqs, budgets, lengths):
            self.computed[seq.request_id] = (length, seq.num_preemptions)
            self.written[seq.request_id] = length + max(b, 1) - 1
        probs = None if sampling.all_greedy else torch.stack(draft_probs, dim=1)
        return Proposal([row[:b] for row, b in zip(host, budgets)], probs)

    def _parts(self, ids, positions, slots, seq_lens, cu, tables) -> list[torch.Tensor]:
        n_tok, n_seq = len(ids), len(seq_lens)
        width = max(len(t) for t in tables)
        flat = [b for t in tables for b in t + [0] * (width - len(t))]
        packed = self.runner._to_device(ids + positions + slots + seq_lens + cu + flat)
        parts = list(packed.split([n_tok, n_tok, n_tok, n_seq, n_seq + 1, n_seq * width]))
        parts[5] = parts[5].view(n_seq, width)
        return parts

    def _decode(self, token: torch.Tensor, pos, slot, lens, tables) -> torch.Tensor:
        """One draft decode step (a replayed CUDA graph when the runner has one for this batch size)."""
        n = len(pos)
        parts = self._parts([0] * n, pos, slot, lens, list(range(n + 1)), tables)
        parts[0] = token.to(torch.int32)
        graph_bs = self.runner._graph_batch_size(n)
        if graph_bs is None:
            return self.runner.model.compute_logits(self.runner._forward(parts, 1))
        self.runner._load_graph_inputs(graph_bs, parts)
        self.runner.graphs[graph_bs].replay()
        return self.runner.g_logits[graph_bs][:n]

    def _sample(self, logits: torch.Tensor, sampling: RowSampling) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Greedy rows take the argmax; sampled rows draw from the draft's filtered distribution, which is
        returned over the target's vocabulary (zero past the draft's)."""
        logits = logits[:, : self.target_vocab].float()
        token = logits.argmax(dim=-1)
        if sampling.all_greedy:
            return token, None
        probs = sampling.probs(logits)
        if probs.shape[1] < self.target_vocab:
            probs = torch.nn.functional.pad(probs, (0, self.target_vocab - probs.shape[1]))
        sampled = sampling.sample(probs, self.generator)
        greedy = torch.tensor(sampling.greedy, device=self.device)
        return torch.where(greedy, token, sampled), probs

    def verified(self, seqs, starts, committed, hidden, cu) -> None:
        for seq, end in zip(seqs, committed):
            written = self.written.get(seq.request_id, 0)
            self.computed[seq.request_id] = (min(written, end), seq.num_preemptions)

    def release(self, live: set[str]) -> None:
        self.computed = {r: v for r, v in self.computed.items() if r in live}
        self.written = {r: v for r, v in self.written.items() if r in live}
