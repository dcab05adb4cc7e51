"""The paged KV cache's bookkeeping: which integer block ids each request holds.

No tensors here (they live in the model runner). The manager answers "fits / does not fit"; the
scheduler decides whom to preempt. Invariant, checked by ``check()``: every block id is either
free or in exactly one request's table, so ``num_free_blocks + num_used_blocks == num_blocks``
at all times.
"""
from __future__ import annotations

import collections


class KVBlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = collections.deque(range(num_blocks))
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_missing_blocks(self, request_id: str, num_tokens: int) -> int:
        """Blocks ``request_id`` still lacks to hold ``num_tokens`` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(self._tables.get(request_id, ())))

    def allocate(self, request_id: str, num_tokens: int) -> bool:
        """Grow the request's table to hold ``num_tokens`` tokens. All or nothing: on False no
        block changed hands."""
        missing = self.num_missing_blocks(request_id, num_tokens)
        if missing > len(self._free):
            return False
        table = self._tables.setdefault(request_id, [])
        for _ in range(missing):
            table.append(self._free.popleft())
        return True

    def free(self, request_id: str) -> int:
        """Return every block of the request; returns how many."""
        table = self._tables.pop(request_id, [])
        # Recently freed blocks go to the back: blocks are reused round-robin, which spreads
        # writes and makes a stale-table bug show up as wrong output rather than hide.
        self._free.extend(table)
        return len(table)

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def holds(self, request_id: str) -> bool:
        return request_id in self._tables

    def check(self) -> None:
        held = [b for t in self._tables.values() for b in t]
        every = held + list(self._free)
        assert len(every) == self.num_blocks and set(every) == set(range(self.num_blocks)), \
            f"block accounting broken: {len(held)} held + {len(self._free)} free != {self.num_blocks}"
