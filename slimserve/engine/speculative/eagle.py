"""EAGLE-style proposer: the trained draft head drafts from the target's final hidden states.

For each sequence the proposer keeps the target features it has not fed to the head yet (positions
`pending_start` on) and how far the head's own KV cache is valid (`head_computed`). Features arrive from
verification passes and from the target's eager steps (prefill); a sequence whose features have a gap (a
step ran as a CUDA graph above the speculation batch limit, or its prompt came from the prefix cache) drafts
nothing once and asks the next verification to recompute its target states from the gap on (rewriting the
same keys and values)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimserve.engine.runner import ModelRunner
from slimserve.engine.sequence import Sequence
from slimserve.engine.speculative.eagle_graphs import EagleStepGraphs
from slimserve.engine.speculative.eagle_head import EagleHead
from slimserve.engine.speculative.proposer import Proposal, Proposer, RowSampling
from slimserve.layers.attention import AttentionMetadata


@dataclass
class _State:
    preemptions: int
    head_computed: int = 0
    pending_start: int = 0
    pending: list[torch.Tensor] = field(default_factory=list)

    @property
    def pending_end(self) -> int:
        return self.pending_start + sum(t.shape[0] for t in self.pending)

    def add(self, start: int, features: torch.Tensor) -> None:
        """Features of positions start.. (recomputed positions replace pending ones; a gap drops them)."""
        if start < self.head_computed:
            self.head_computed = self.pending_start = start
            self.pending = [features]
        elif start <= self.pending_end:
            kept = torch.cat(self.pending)[: start - self.pending_start] if self.pending else None
            self.pending = ([kept] if kept is not None and kept.shape[0] else []) + [features]


class EagleProposer(Proposer):
    def __init__(self, head: EagleHead, target: ModelRunner, seed: int, max_batch: int) -> None:
        self.head = head
        self.target = target
        self.device = target.device
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed + 3)
        cfg = target.model_config
        shape = (2, target.num_blocks, target.block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=target.dtype, device=self.device)
        attn = head.layer.self_attn.attn
        attn.k_cache, attn.v_cache = self.kv_cache[0], self.kv_cache[1]
        self.states: dict[str, _State] = {}
        self.graphs = EagleStepGraphs.capture(head, target, max_batch)

    @classmethod
    def load(cls, folder: str, target: ModelRunner, seed: int, max_batch: int) -> EagleProposer:
        """max_batch: the largest batch that speculates (CUDA graphs are captured up to it)."""
        head = EagleHead.load(folder, target.model_config, target.device, target.dtype)
        return cls(head, target, seed, max_batch)

    def _state(self, seq: Sequence) -> _State:
        state = self.states.get(seq.request_id)
        if state is None or state.preemptions != seq.num_preemptions:
            state = self.states[seq.request_id] = _State(seq.num_preemptions)
        return state

    def _ready(self, seq: Sequence) -> bool:
        """Features cover the head's gap up to the token before the last (whose successor drafts start at)."""
        state = self._state(seq)
        return (
            bool(state.pending)
            and state.pending_start == state.head_computed
            and state.pending_end == (len(seq.token_ids) - 1)
        )

    def recompute_from(self, seq: Sequence) -> int:
        state = self._state(seq)
        if self._ready(seq):
            return seq.num_computed_tokens
        return state.pending_end if state.pending_start == state.head_computed else state.head_computed

    def observe(self, seqs, starts, num_new, hidden) -> None:
        offset = 0
        for seq, start, n in zip(seqs, starts, num_new):
            if hidden is not None:
                self._state(seq).add(start, hidden[offset : offset + n].clone())
            offset += n

    def verified(self, seqs, starts, committed, hidden, cu) -> None:
        for i, (seq, start, end) in enumerate(zip(seqs, starts, committed)):
            self._state(seq).add(start, hidden[cu[i] : cu[i] + end - start].clone())

    def release(self, live: set[str]) -> None:
        self.states = {r: s for r, s in self.states.items() if r in live}

    # ---- drafting -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], budgets: list[int], sampling: RowSampling) -> Proposal:
        rows = [i for i, (s, b) in enumerate(zip(seqs, budgets)) if b > 0 and self._ready(s)]
        drafts: list[list[int]] = [[] for _ in seqs]
        if not rows:
            return Proposal(drafts)
        k = max(budgets[i] for i in rows)
        bs = self.target.block_size
        n = len(rows)
        tables = [seqs[i].block_table for i in rows]
        width = max(len(t) for t in tables)
        flat_tables = [b for t in tables for b in t + [0] * (width - len(t))]
        # Step 0 feeds every pending (feature, next token) pair; the last output drafts the first token.
        ids, features, positions, slots, seq_lens, cu = [], [], [], [], [], [0]
        for i in rows:
            seq, state = seqs[i], self.states[seqs[i].request_id]
            start, end = state.head_computed, len(seq.token_ids) - 1
            ids.extend(seq.token_ids[start + 1 : end + 1])
            features.append(torch.cat(state.pending))
            positions.extend(range(start, end))
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in range(start, end))
            seq_lens.append(end)
            cu.append(cu[-1] + end - start)
            state.head_computed, state.pending_start, state.pending = end, end, []
        # Steps 1..k-1: position L - 2 + j holds (predicted feature, draft j); rows past their budget
        # recompute their last position and write nothing. All their positions are known now: one upload.
        lengths = [len(seqs[i].token_ids) for i in rows]
        later: list[int] = []
        for j in range(1, k):
            live = [j < budgets[i] for i in rows]
            pos = [length - 2 + j if ok else length - 2 for length, ok in zip(lengths, live)]
            later += pos + [t[p // bs] * bs + p % bs if ok else -1 for t, p, ok in zip(tables, pos, live)]
            later += [p + 1 for p in pos]
        packed = self.target._to_device(ids + positions + slots + seq_lens + cu + flat_tables + later)
        m = len(ids)
        parts = list(packed.split([m, m, m, n, n + 1, n * width, len(later)]))
        table_dev = parts[5].view(n, width)
        max_q = max(b - a for a, b in zip(cu, cu[1:]))
        out = self._forward(parts[0], torch.cat(features), parts[1], parts[2], parts[3], parts[4], table_dev, max_q)
        feature = out[parts[4][1:].long() - 1]
        sub = sampling.subset(rows)
        model = self.target.model
        token, probs = self._sample(model.compute_logits(feature), sub)
        tokens, all_probs = [token], [probs]
        steps = parts[6].view(max(k - 1, 0), 3, n)
        graph_bs = self.graphs.batch_size(n) if self.graphs is not None else None
        if graph_bs is not None and k > 1:
            self.graphs.load_tables(graph_bs, table_dev)
        step_cu = torch.arange(n + 1, dtype=torch.int32, device=self.device)
        for pos, slot, lens in steps:
            if graph_bs is not None:
                feature, logits = self.graphs.run(graph_bs, token, feature, pos, slot, lens)
            else:
                feature = self._forward(token, feature, pos, slot, lens, step_cu, table_dev, 1)
                logits = model.compute_logits(feature)
            token, probs = self._sample(logits, sub)
            tokens.append(token)
            all_probs.append(probs)
        host = torch.stack(tokens, dim=1).tolist()
        for r, i in enumerate(rows):
            drafts[i] = host[r][: budgets[i]]
        draft_probs = None
        if not sampling.all_greedy:
            stacked = torch.stack(all_probs, dim=1)
            draft_probs = stacked.new_zeros(len(seqs), k, stacked.shape[2])
            draft_probs[rows] = stacked
        return Proposal(drafts, draft_probs)

    def _forward(self, ids, features, positions, slots, seq_lens, cu, tables, max_q: int) -> torch.Tensor:
        """The head over a flat batch of device tensors; max_q: the most rows of one sequence."""
        meta = AttentionMetadata(
            slot_mapping=slots,
            cu_seqlens_q=cu,
            seq_lens=seq_lens,
            block_tables=tables,
            max_seqlen_q=max_q,
        )
        embeds = torch.nn.functional.embedding(ids.long(), self.target.model.embed_tokens)
        return self.head(embeds, features.to(embeds.dtype), positions, meta)

    def _sample(self, logits: torch.Tensor, sampling: RowSampling) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = logits.float()
        token = logits.argmax(dim=-1)
        if sampling.all_greedy:
            return token, None
        probs = sampling.probs(logits)
        sampled = sampling.sample(probs, self.generator)
        return torch.where(torch.tensor(sampling.greedy, device=self.device), token, sampled), probs
