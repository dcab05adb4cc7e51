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
        # Python lists first and one tensor each: per-request tensor ops cost ~1 ms an iteration at
        # 32 requests, as much as the forward of a small model
        q_list = [len(t) for t in new_token_ids]
        computed_list = [int(c) for c in num_computed]
        max_blocks = max(1, max((len(t) for t in block_tables), default=0))
        rows = []
        for r, table in enumerate(block_tables):
            need = computed_list[r] + q_list[r]
            if len(table) * block_size < need:
                raise ValueError(f"request {r}: {len(table)} blocks of {block_size} cannot hold {need} tokens")
            rows.append(list(table) + [0] * (max_blocks - len(table)))
        q_lens = torch.tensor(q_list, dtype=torch.long)
        computed = torch.tensor(computed_list, dtype=torch.long)
        seq_lens = computed + q_lens
        query_start_loc = torch.zeros(num_reqs + 1, dtype=torch.long)
        torch.cumsum(q_lens, 0, out=query_start_loc[1:])
        total = sum(q_list)
        req = torch.repeat_interleave(torch.arange(num_reqs), q_lens)
        positions = computed[req] + torch.arange(total) - query_start_loc[req]
        tables = torch.tensor(rows, dtype=torch.long) if rows else torch.zeros(0, 1, dtype=torch.long)
        slot_mapping = tables[req, positions // block_size] * block_size + positions % block_size
        ids = torch.tensor([t for seq in new_token_ids for t in seq], dtype=torch.long)
        if all_logits:
            logits_indices = torch.arange(total)
        else:
            keep = q_lens > 0 if sample is None else torch.tensor(list(sample), dtype=torch.bool) & (q_lens > 0)
            logits_indices = (query_start_loc[1:] - 1)[keep]
        return cls(*(x.to(device) for x in (ids, positions, slot_mapping, query_start_loc, seq_lens,
                                               tables, logits_indices)))
