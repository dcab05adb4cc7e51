"""The ragged batch of one iteration: every request's new tokens, flattened, plus the metadata
``orca.attention`` needs to find each request's context in the paged KV cache."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch


@dataclasses.dataclass
class RaggedBatch:
    input_ids: torch.Tensor  # [T] int64: new tokens of all requests, request after request
    positions: torch.Tensor  # [T] int64: each token's position in its own sequence
    slot_mapping: torch.Tensor  # [T] int64: cache slot each new token's K/V is written to
    query_start_loc: torch.Tensor  # [R + 1] int64: request r owns tokens [qsl[r], qsl[r + 1])
    seq_lens: torch.Tensor  # [R] int64: context length after this iteration (cached + new)
    block_tables: torch.Tensor  # [R, max_blocks] int64: cache blocks of each request, in order
    logits_indices: torch.Tensor  # [N] int64: rows of T whose logits are returned

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def build(
        cls,
        new_token_ids: Sequence[Sequence[int]],
        num_computed: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        all_logits: bool = False,
        sample: Sequence[bool] | None = None,
        device: torch.device | str = "cpu",
    ) -> "RaggedBatch":
        """Request r has ``num_computed[r]`` tokens in the cache already and feeds
        ``new_token_ids[r]`` now; ``block_tables[r]`` must cover all of them. Logits are returned
        for every token (``all_logits``), else for the last token of each request (only those
        where ``sample[r]`` is True, when given)."""
        num_reqs = len(new_token_ids)
        if not (num_reqs == len(num_computed) == len(block_tables)):
            raise ValueError(f"{num_reqs} requests but {len(num_computed)} computed counts and "
                             f"{len(block_tables)} block tables")
        if sample is not None and len(sample) != num_reqs:
            raise ValueError(f"{num_reqs} requests but {len(sample)} sample flags")
        # Plain Python lists, one tensor each at the end: tensor ops cost microseconds apiece, and
        # torch's version of this (repeat_interleave, gathers over the block table) took ~0.6 ms an
        # iteration in the engine at 32 requests, in caches the forward had just swept out
        max_blocks = max(1, max((len(t) for t in block_tables), default=0))
        ids, positions, slots, starts, lens, rows, last = [], [], [], [0], [], [], []
        for r in range(num_reqs):
            toks, done, table = new_token_ids[r], int(num_computed[r]), block_tables[r]
            n = len(toks)
            end = done + n
            if len(table) * block_size < end:
                raise ValueError(f"request {r}: {len(table)} blocks of {block_size} cannot hold {end} tokens")
            ids.extend(toks)
            if n == 1:  # a decode: the common case, without the generators
                positions.append(done)
                slots.append(table[done // block_size] * block_size + done % block_size)
            else:
                positions.extend(range(done, end))
                slots.extend(table[p // block_size] * block_size + p % block_size for p in range(done, end))
            starts.append(starts[-1] + n)
            lens.append(end)
            rows.append(list(table) + [0] * (max_blocks - len(table)))
            if n and (sample is None or sample[r]):
                last.append(starts[-1] - 1)
        long = torch.long
        logits_indices = torch.arange(starts[-1]) if all_logits else torch.tensor(last, dtype=long)
        tensors = (torch.tensor(ids, dtype=long), torch.tensor(positions, dtype=long), torch.tensor(slots, dtype=long),
                   torch.tensor(starts, dtype=long), torch.tensor(lens, dtype=long),
                   torch.tensor(rows, dtype=long) if rows else torch.zeros(0, 1, dtype=long), logits_indices)
        if torch.device(device).type != "cpu":
            tensors = to_device_at_once(tensors, device)
        return cls(*tensors)


def to_device_at_once(tensors, device) -> tuple[torch.Tensor, ...]:
    """``tensors`` (int64, on the host) on ``device`` with one copy: concatenated on the host, sent
    whole, and cut there into views of the same shapes. A batch is seven small tensors, and each
    pageable host-to-GPU copy is a synchronous transfer of its own (~10-20 us of latency apiece,
    every iteration); one copy of a few KB pays that once."""
    # each part starts on a 128-byte boundary, as a tensor of its own would: Triton specialises its
    # kernels on 16-byte aligned pointers, and an unaligned one would compile (and run) a variant
    sizes = [-(-t.numel() // ALIGN_ELEMENTS) * ALIGN_ELEMENTS for t in tensors]
    flat = torch.zeros(sum(sizes), dtype=tensors[0].dtype)
    offset = 0
    for t, size in zip(tensors, sizes):
        flat[offset:offset + t.numel()] = t.reshape(-1)
        offset += size
    flat = flat.to(device)
    parts = flat.split(sizes)
    return tuple(part[:t.numel()].view(t.shape) for part, t in zip(parts, tensors))


ALIGN_ELEMENTS = 16  # int64 elements: 128 bytes
