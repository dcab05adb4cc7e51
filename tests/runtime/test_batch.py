"""RaggedBatch.build against an independent formulation of the same metadata (tensor ops over the
flattened tokens, what build did before it moved to Python lists), on random mixes of decodes,
prompt chunks and requests with nothing to feed; and its refusals."""
import dataclasses
import random

import pytest
import torch

from orca_compile.runtime.batch import RaggedBatch


def _reference(new, done, tables, block_size, all_logits=False, sample=None):
    q_lens = torch.tensor([len(t) for t in new], dtype=torch.long)
    computed = torch.tensor(done, dtype=torch.long)
    qsl = torch.zeros(len(new) + 1, dtype=torch.long)
    torch.cumsum(q_lens, 0, out=qsl[1:])
    req = torch.repeat_interleave(torch.arange(len(new)), q_lens)
    positions = computed[req] + torch.arange(int(q_lens.sum())) - qsl[req]
    width = max(1, max((len(t) for t in tables), default=0))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
    slots = bt[req, positions // block_size] * block_size + positions % block_size
    keep = q_lens > 0 if sample is None else torch.tensor(sample) & (q_lens > 0)
    logits = torch.arange(int(q_lens.sum())) if all_logits else (qsl[1:] - 1)[keep]
    ids = torch.tensor([t for seq in new for t in seq], dtype=torch.long)
    return ids, positions, slots, qsl, computed + q_lens, bt, logits


@pytest.mark.parametrize("seed", range(12))
def test_build_matches_the_tensor_formulation(seed):
    rng = random.Random(seed)
    bs = rng.choice([1, 4, 16])
    new, done, tables = [], [], []
    free = list(range(500))
    rng.shuffle(free)
    for _ in range(rng.randint(1, 9)):
        kind = rng.random()
        n = 1 if kind < 0.5 else 0 if kind < 0.6 else rng.randint(2, 40)  # decode, nothing, prompt chunk
        c = rng.randint(0, 60)
        blocks = -(-(c + n) // bs) + rng.randint(0, 2)  # some tables longer than they need to be
        new.append([rng.randrange(1000) for _ in range(n)])
        done.append(c)
        tables.append([free.pop() for _ in range(blocks)])
    sample = [rng.random() < 0.7 for _ in new]
    for kwargs in ({}, {"all_logits": True}, {"sample": sample}):
        got = RaggedBatch.build(new, done, tables, bs, **kwargs)
        want = _reference(new, done, tables, bs, **kwargs)
        fields = ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens", "block_tables",
                  "logits_indices")
        for name, w in zip(fields, want):
            g = getattr(got, name)
            assert g.dtype == torch.long and torch.equal(g, w), (name, kwargs, g, w)


def test_an_empty_iteration_builds_empty_tensors():
    b = RaggedBatch.build([], [], [], 16)
    assert b.num_tokens == 0 and b.query_start_loc.tolist() == [0] and b.block_tables.shape == (0, 1)
    assert b.logits_indices.numel() == 0


def test_refusals():
    with pytest.raises(ValueError, match="2 requests but 1 computed counts"):
        RaggedBatch.build([[1], [2]], [0], [[0], [1]], 16)
    with pytest.raises(ValueError, match="request 1: 1 blocks of 4 cannot hold 5 tokens"):
        RaggedBatch.build([[1], [2, 3]], [0, 3], [[0], [1]], 4)
    with pytest.raises(ValueError, match="2 requests but 1 sample flags"):
        RaggedBatch.build([[1], [2]], [0, 0], [[0], [1]], 16, sample=[True])


@pytest.mark.parametrize("new", [[[5, 6, 7], [8], []], []])
def test_a_device_batch_is_one_copy_cut_into_the_same_tensors(new):
    """Off the CPU the seven tensors travel as one copy (``to_device_at_once``); done here on the
    CPU, the views must equal the host tensors, shapes and values, and share one buffer."""
    from orca_compile.runtime.batch import to_device_at_once

    done = [4, 9, 0][:len(new)]
    tables = [[3, 1], [0, 2, 5], [4]][:len(new)]
    host = RaggedBatch.build(new, done, tables, 4)
    fields = [getattr(host, f.name) for f in dataclasses.fields(RaggedBatch)]
    moved = to_device_at_once(fields, "cpu")
    for want, got in zip(fields, moved):
        assert got.dtype == torch.long and got.shape == want.shape and torch.equal(got, want)
    assert len({t.untyped_storage().data_ptr() for t in moved}) == 1
    assert all(t.data_ptr() % 16 == 0 for t in moved)  # Triton's aligned-pointer specialisation holds
    # and the path build takes off the CPU gives the same shapes (meta: no values, no GPU needed)
    meta = RaggedBatch.build(new, done, tables, 4, device="meta")
    assert [getattr(meta, f.name).shape for f in dataclasses.fields(RaggedBatch)] == [t.shape for t in fields]
