"""Continuous-batching scheduler with chunked prefill and preemption by recompute.

Each step has a budget of `max_num_batched_tokens`. Running sequences go first (a decode costs one
token, an unfinished prefill continues with a chunk), then waiting sequences are admitted while budget,
sequence slots and KV blocks last. When a running sequence needs a block and none is free, the most
recently arrived running sequence is preempted: its blocks are freed and it is recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from slimserve.config import EngineConfig
from slimserve.engine.kv_cache import BlockManager
from slimserve.engine.sequence import Sequence, SequenceStatus
from slimserve.layers.sampler import uses_penalties


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    # Decode steps to run back to back (each sequence then computes num_steps tokens, one per step).
    num_steps: int = 1

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(
        self, config: EngineConfig, block_manager: BlockManager, max_model_len: int, num_decode_steps: int
    ) -> None:
        self.max_model_len = max_model_len
        self.num_decode_steps = num_decode_steps
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def decode_window(self) -> int:
        """How many decode steps to run without the host: several only when every running sequence is
        decoding, no waiting request could take a slot meanwhile, and none uses penalties (which need the
        previous token on the host). Never past max_model_len, and no longer than anyone still needs."""
        if self.num_decode_steps == 1 or not self.running:
            return 1
        if self.waiting and len(self.running) < self.max_num_seqs:
            return 1
        if any(s.num_uncomputed_tokens != 1 or uses_penalties(s.params) for s in self.running):
            return 1
        room = min(self.max_model_len - len(s.token_ids) for s in self.running)
        wanted = max(s.params.max_tokens - s.num_output_tokens for s in self.running)
        return max(1, min(self.num_decode_steps, room, wanted))

    def schedule(self, num_lookahead_slots: int = 0) -> ScheduledBatch:
        """num_lookahead_slots: KV slots to reserve past a decoding sequence's next token (for speculative
        drafts), where the free blocks allow it without preempting anyone; such steps run one at a time."""
        batch = ScheduledBatch(num_steps=1 if num_lookahead_slots else self.decode_window())
        budget = self.max_num_batched_tokens
        # Running sequences, oldest first; preempt from the newest end when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.can_allocate(seq, num_new * batch.num_steps):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break
            lookahead = num_lookahead_slots if seq.num_uncomputed_tokens == 1 else 0
            lookahead = min(lookahead, self.max_model_len - len(seq.token_ids))
            if lookahead and self.block_manager.can_allocate(seq, num_new + lookahead):
                num_new_slots = num_new + lookahead
            else:
                num_new_slots = num_new * batch.num_steps
            self.block_manager.allocate(seq, num_new_slots)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
            i += 1
        if batch.num_steps > 1:
            return batch
        # Admit waiting sequences (in arrival order; preempted ones were put back at the front).
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self.block_manager.allocate_cached_prefix(seq)
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.can_allocate(seq, num_new):
                self.block_manager.free(seq)
                break
            self.block_manager.allocate(seq, num_new)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished (or aborted) and give its blocks back at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
