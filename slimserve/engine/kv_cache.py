"""KV-cache block manager with prefix caching.

The cache is `num_blocks` blocks of `block_size` token slots. A sequence owns a list of blocks (its block
table). A full block is registered under a chained hash of its tokens (and all tokens before it), so a
later sequence with the same prefix reuses it: blocks are reference counted, and a block nobody uses
keeps its contents in an LRU queue until its slot is needed for something else.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from slimserve.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    tokens: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: list[int] = list(range(num_blocks - 1, -1, -1))  # never-hashed blocks, popped from the end
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self.hash_to_block: dict[int, int] = {}
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids) + len(self.evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _chain_hash(self, parent: int | None, tokens: tuple[int, ...]) -> int:
        return hash((parent, tokens))

    def _take_free_block(self) -> int:
        if self.free_ids:
            block_id = self.free_ids.pop()
        else:
            block_id, _ = self.evictable.popitem(last=False)
            block = self.blocks[block_id]
            if self.hash_to_block.get(block.block_hash) == block_id:
                del self.hash_to_block[block.block_hash]
            block.block_hash, block.tokens = None, ()
        self.blocks[block_id].ref_count = 1
        return block_id

    def allocate_cached_prefix(self, seq: Sequence) -> None:
        """On admission, adopt the cached blocks matching the sequence's leading full blocks. At least one
        token is left to compute, since the step that computes it produces the next token's logits."""
        if not self.enable_prefix_caching or seq.block_table:
            return
        num_full = (len(seq.token_ids) - 1) // self.block_size
        parent = None
        for i in range(num_full):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            block_hash = self._chain_hash(parent, tokens)
            self.prefix_queries += 1
            block_id = self.hash_to_block.get(block_hash)
            if block_id is None or self.blocks[block_id].tokens != tokens:
                break
            self.prefix_hits += 1
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.evictable[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(block_hash)
            parent = block_hash
        seq.num_computed_tokens = len(seq.block_table) * self.block_size

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give the sequence enough blocks for `num_new_tokens` more computed tokens (check can_allocate)."""
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish blocks that became full of computed tokens, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        for i in range(len(seq.block_hashes), num_full):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            block_hash = self._chain_hash(parent, tokens)
            block = self.blocks[seq.block_table[i]]
            block.block_hash, block.tokens = block_hash, tokens
            self.hash_to_block.setdefault(block_hash, block.block_id)
            seq.block_hashes.append(block_hash)

    def trim(self, seq: Sequence) -> None:
        """Give back the blocks past the sequence's computed tokens (reserved for drafts the target
        rejected). They were never registered in the prefix cache."""
        keep = self.blocks_needed(seq.num_computed_tokens)
        for block_id in seq.block_table[keep:]:
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                block.block_hash, block.tokens = None, ()
                self.free_ids.append(block_id)
        del seq.block_table[keep:]

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks. Tail blocks go first into the LRU queue, so they are evicted
        before the shared prefix they extend."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is not None and self.hash_to_block.get(block.block_hash) == block_id:
                    self.evictable[block_id] = None
                else:
                    block.block_hash, block.tokens = None, ()
                    self.free_ids.append(block_id)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
