"""tensor_parallel: one rank's shard of a ``final`` graph, Megatron-style, found from the dataflow.

Which linear is which is read off the graph, not off module names:

* **attention**: walking back from each ``orca::attention``'s q, k and v (through views,
  transposes, the rotary embedding's ops, a fused projection's ``split``) reaches the linear that
  produced each: those are *column-parallel*, sharded by heads (q by query heads, k and v by KV
  heads). Walking forward from the attention's output (views and reshapes) reaches the linear
  that consumes it (the output projection): *row-parallel*.
* **MLP**: a linear whose input is computed, through pointwise ops only (activations, products,
  scalar constants), from the outputs of other linears that all read one tensor is *row-parallel*
  and those linears *column-parallel* (Llama's gate and up feeding down; GPT-2's fc feeding proj).

A column-parallel linear keeps the rank's block of output features (of each part of a fused
projection: GPT-2's ``c_attn`` is q, k, v side by side, and its ``split`` sizes shrink with it);
a row-parallel one keeps the rank's block of input features, drops its bias, and is followed by
``orca::all_reduce`` (the sum over the ranks), then the bias. Everything else (embeddings, norms,
the residual stream, the LM head) is replicated: every rank holds the full ``[T, hidden]`` stream
after each all-reduce, and the LM head runs on every rank, so sampling needs no gather (the
planner may later choose a vocab-parallel head; with a few ranks on a CPU the replicated head
costs duplicated FLOPs at the last layer only and no communication).

KV heads: with at least as many KV heads as ranks each rank keeps ``nkv / tp`` of them; with
fewer (multi-query, or GQA with small ``nkv``) each rank keeps the one KV head its query heads
read, so K and V (and their cache) are replicated ``tp / nkv`` times, as vLLM and TensorRT-LLM do.

Requires: a ``final`` graph (``meta["val"]`` on the nodes, attention split, not lowered). Ensures
(checked): every attention has ``nh / tp`` query heads and the kept KV heads; every row-parallel
linear is followed by one ``orca::all_reduce``; the values re-propagated on fake tensors; lints.
A head or feature count that ``tp`` does not divide, or a linear feeding attention that the pass
cannot follow, is a ``ValueError`` naming the node and the numbers.

Before / after (a Llama layer, tp = 2 of 4 heads, 2 KV heads)::

    linear: f64[T, 64] = aten.linear(mul_4, q_proj_weight)            # [64, 64]
    ...
    attention: f64[T, 4, 16] = orca.attention(...)
    reshape_3: f64[T, 64] = aten.reshape(attention, [T, -1])
    linear_3: f64[T, 64] = aten.linear(reshape_3, o_proj_weight)
  ->
    linear: f64[T, 32] = aten.linear(mul_4, q_proj_weight)            # [32, 64]: heads 0-1 of rank 0
    ...
    attention: f64[T, 2, 16] = orca.attention(...)                    # k_cache_0: [NB, BS, 1, 16]
    reshape_3: f64[T, 32] = aten.reshape(attention, [T, -1])
    linear_3: f64[T, 64] = aten.linear(reshape_3, o_proj_weight)      # [64, 32]: its input block
    all_reduce: f64[T, 64] = orca.all_reduce(linear_3)
"""
from __future__ import annotations

import copy
import dataclasses
import operator

import torch
import torch.fx

from orca_compile.ops import ALL_GATHER, ALL_REDUCE, ATTENTION
from orca_compile.passes.graph_utils import fetch_attr

aten = torch.ops.aten
_LINEARS = {aten.linear.default: (0, 1, 2, False), aten.addmm.default: (1, 2, 0, True)}  # x, w, bias, w is [in, out]
_HEAD_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
             aten.permute.default, aten.unsqueeze.default, aten.clone.default, aten.contiguous.default,
             aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.neg.default, aten.cat.default,
             aten.slice.Tensor, aten.chunk.default,  # GPT-OSS's rotary: halves by chunk, x1 c - x2 s
             aten.expand.default, aten.to.dtype, aten._to_copy.default, operator.getitem,
             aten.split.Tensor, aten.split_with_sizes.default}
_POINTWISE = {aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.mul.Scalar,
              aten.add.Scalar, aten.pow.Tensor_Scalar, aten.tanh.default, aten.sigmoid.default,
              aten.silu.default, aten.relu.default, aten.gelu.default, aten.erf.default, aten.neg.default,
              aten.rsub.Scalar, aten.to.dtype, aten._to_copy.default}


@dataclasses.dataclass
class _Column:
    """A column-parallel linear: its output's parts (a fused projection has several), each
    ``(size, heads)``; ``keep(rank)`` of each part is what the rank holds."""
    node: torch.fx.Node
    parts: list  # [(size, heads, kept head range (start, stop))], in output-feature order


def tensor_parallel(gm: torch.fx.GraphModule, rank: int, world_size: int, replicated=(),
                    vocab_parallel_head: bool = False) -> torch.fx.GraphModule:
    """Rank ``rank``'s shard of ``gm`` for ``world_size``-way tensor parallelism: a new module
    holding only its shard of each split weight (``gm`` is untouched).

    The planner's intra-operator choices: ``replicated`` names blocks ``(kind, layer)`` (``kind``:
    ``"attention"`` or ``"mlp"``) that every rank runs whole, with no all-reduce (more weights
    and work per rank, one collective fewer); ``vocab_parallel_head`` shards the LM head by
    vocabulary rows and gathers the logits (``orca::all_gather``) instead of running it whole on
    every rank."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {world_size!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    replicated = {(str(kind), int(layer)) for kind, layer in replicated}
    unknown = {kind for kind, _ in replicated} - set(BLOCK_KINDS)
    if unknown:
        raise ValueError(f"replicated blocks are of kinds {BLOCK_KINDS}, got {sorted(unknown)}")
    out = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    out.meta.update(gm.meta)
    out.meta["orca_weight_slices"] = dict(gm.meta.get("orca_weight_slices", {}))
    if world_size == 1:
        out.meta["orca_partition"] = {"tensor_parallel_size": 1, "rank": 0, "row_parallel": 0, "column_parallel": 0,
                                      "replicated": [], "vocab_parallel_head": False}
        return out
    graph = out.graph
    for node, block in blocks(graph).items():  # the planner prices each block from these tags
        node.meta["orca_block"] = block
    columns, rows, caches = _sites(graph, rank, world_size, replicated)
    head = None
    if vocab_parallel_head:
        head = lm_head(graph)
        vocab = int(head.meta["val"].shape[-1])
        if vocab % world_size:
            raise ValueError(f"tensor_parallel_size={world_size} does not divide the vocabulary ({vocab} logits of "
                             f"{head.name}); a vocab-parallel head needs it to")
        per = vocab // world_size
        columns[head] = _Column(head, [(vocab, None, (rank * per, (rank + 1) * per))])
    for col in columns.values():
        _shard_column(out, col)
    _shard_per_head_args(out, rank, world_size, replicated)
    for row in rows:
        _shard_row(out, row, rank, world_size)
    if head is not None:
        with graph.inserting_after(head):
            gathered = graph.call_function(ALL_GATHER, (head, world_size))
        gathered.meta = dict(head.meta)
        head.replace_all_uses_with(gathered, delete_user_cb=lambda user: user is not gathered)
    _refresh_values(out, caches)
    out.meta["orca_partition"] = {"tensor_parallel_size": world_size, "rank": rank,
                                  "row_parallel": len(rows), "column_parallel": len(columns),
                                  "replicated": sorted(replicated), "vocab_parallel_head": head is not None}
    _postcondition(out, rows)
    graph.lint()
    out.recompile()
    return out


BLOCK_KINDS = ("attention", "mlp")


def _sites(graph, rank, world_size, replicated=frozenset()):
    """The linears to shard: ``{node: _Column}``, the row-parallel ones in order, and the KV cache
    placeholders with the head range the rank keeps; blocks in ``replicated`` are left out."""
    columns: dict[torch.fx.Node, _Column] = {}
    rows: list[torch.fx.Node] = []
    caches: dict[torch.fx.Node, tuple[int, int]] = {}  # cache placeholder -> kept KV head range
    for att in graph.find_nodes(op="call_function", target=ATTENTION):
        if ("attention", int(att.meta.get("orca_layer", -1))) not in replicated:
            _attention_site(att, rank, world_size, columns, rows, caches)
    _mlp_sites(graph, rank, world_size, columns, rows, replicated)
    return columns, rows, caches


def blocks(graph: torch.fx.Graph) -> dict:
    """``{node: (kind, layer)}`` for the nodes of each shardable block (the planner prices a block
    sharded and whole): an attention block is its q/k/v projections, what lies between them and
    ``orca::attention``, the attention and its output projection; an MLP block its column linears,
    the pointwise ops between them and its row linear. ``kind`` ``"head"`` marks the LM head."""
    columns, rows, _ = _sites(graph, 0, 1)
    out = {}
    for row in rows:
        kind = "attention" if _reads_attention(row) else "mlp"
        layer = _layer(row)
        stack, seen = [row], set()
        while stack:  # back from the row linear to the column linears, through the layer's ops
            n = stack.pop()
            if n in seen or n.op != "call_function" or _layer(n) != layer:
                continue
            seen.add(n)
            out[n] = (kind, layer)
            if n not in columns:
                stack.extend(n.all_input_nodes)
    try:
        out[lm_head(graph)] = ("head", -1)
    except ValueError:
        pass
    return out


def _reads_attention(row) -> bool:
    n = row.args[_LINEARS[row.target][0]]
    while isinstance(n, torch.fx.Node) and n.op == "call_function":
        if n.target is ATTENTION:
            return True
        n = n.args[0] if n.args else None
    return False


def _layer(node) -> int | None:
    from orca_compile.passes.partition.pipeline_split import layer_of

    return layer_of(node) if isinstance(node, torch.fx.Node) else None


def lm_head(graph: torch.fx.Graph) -> torch.fx.Node:
    """The linear whose output reaches the graph's output through pointwise ops only (the
    logits: a soft-cap's ``div``, ``tanh``, ``mul`` may follow)."""
    outputs = graph.output_node().all_input_nodes
    found = list(_pointwise_leaves(outputs[0]) or ()) if len(outputs) == 1 else []
    if len(found) != 1:
        raise ValueError(f"tensor parallel: the graph's output is not one linear's (found "
                         f"{sorted(f.name for f in found) or 'none'}); no LM head to shard")
    return found[0]


# ---- finding the sites ------------------------------------------------------------------------

def _heads_kept(num_heads: int, num_q_heads: int, rank: int, world_size: int, what: str, node) -> tuple[int, int]:
    """The head range rank ``rank`` keeps of ``num_heads`` (query heads: ``num_q_heads``)."""
    if num_heads % world_size == 0:
        per = num_heads // world_size
        return rank * per, (rank + 1) * per
    if what != "query" and world_size % num_heads == 0:
        # fewer KV heads than ranks: each rank keeps the one its query heads read
        group = num_q_heads // num_heads
        head = (rank * (num_q_heads // world_size)) // group
        return head, head + 1
    raise ValueError(f"tensor_parallel_size={world_size} does not divide the {num_heads} {what} heads of "
                     f"{node.name}" + ("" if what == "query" else
                                       " (nor is it a multiple of them, which would replicate KV heads)"))


def _attention_site(att, rank, world_size, columns, rows, caches):
    q, k, v, k_cache, v_cache = att.args[:5]
    nh = int(q.meta["val"].shape[1])
    if nh % world_size:
        raise ValueError(f"tensor_parallel_size={world_size} does not divide the {nh} query heads of {att.name}")
    seen = set()
    for arg, what in ((q, "query"), (k, "key"), (v, "value")):
        heads = int(arg.meta["val"].shape[1])
        kept = _heads_kept(heads, nh, rank, world_size, what, att)
        linear, part = _producer(arg, att)
        if (linear, part) in seen:  # q, k, v cut out of one projection other than by split (slices, a view)
            raise ValueError(f"tensor parallel: the query, key and value of {att.name} come from one part of "
                             f"{linear.name}'s output; only a split of a fused projection is sharded so far")
        seen.add((linear, part))
        col = columns.setdefault(linear, _Column(linear, _parts(linear)))
        size, _, _ = col.parts[part]
        col.parts[part] = (size, heads, kept)
        if what != "query":
            caches[k_cache if what == "key" else v_cache] = kept
    consumer = _consumer(att)
    if consumer not in rows:
        rows.append(consumer)


_PER_HEAD_ARGS = {12: "sinks", 13: "alibi_slopes"}  # orca::attention's [nh] arguments


def _shard_per_head_args(gm, rank, world_size, replicated):
    """Each sharded attention's per-query-head arguments (sink logits, ALiBi slopes) cut to the
    rank's query heads, as its q projection is."""
    for att in gm.graph.find_nodes(op="call_function", target=ATTENTION):
        if ("attention", int(att.meta.get("orca_layer", -1))) in replicated:
            continue
        nh = int(att.args[0].meta["val"].shape[1])  # values are refreshed later: still the whole model's
        per = nh // world_size
        for index, what in _PER_HEAD_ARGS.items():
            arg = att.args[index] if len(att.args) > index else None
            if arg is None:
                continue
            if arg.op != "get_attr" or tuple(arg.meta["val"].shape) != (nh,):
                raise ValueError(f"tensor parallel: the {what} of {att.name} ({arg.name}) is not a [{nh}] weight; "
                                 "only a per-head tensor read as is can be cut by heads")
            _replace_weight(gm, att, index, 0, [(rank * per, (rank + 1) * per)])


def _is_linear(node) -> bool:
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _LINEARS):
        return False
    _, w, _, _ = _LINEARS[node.target]
    wn = node.args[w] if len(node.args) > w else None
    return isinstance(wn, torch.fx.Node) and wn.op == "get_attr"


def _parts(linear) -> list:
    """A linear's output parts: one, or one per output of the ``split`` that reads it alone."""
    users = list(linear.users)
    if len(users) == 1 and users[0].target in (aten.split.Tensor, aten.split_with_sizes.default):
        sizes = [int(v.shape[-1]) for v in users[0].meta["val"]]
        return [(s, None, None) for s in sizes]
    return [(int(linear.meta["val"].shape[-1]), None, None)]


def _producer(node, att):
    """(the linear that produced ``node``, the part of its output), walking back through the
    ops between a projection and attention; the walk ends at linears, and at anything that is
    not a tensor derived from one (positions, the rotary tables, constants)."""
    found, part, seen, stack = set(), 0, set(), [node]
    while stack:
        n = stack.pop()
        if not isinstance(n, torch.fx.Node) or n in seen:
            continue
        seen.add(n)
        if _is_linear(n):
            found.add(n)
            continue
        if n.op != "call_function" or n.target not in _HEAD_OPS:
            continue
        if n.target is operator.getitem and isinstance(n.args[0], torch.fx.Node) and n.args[0].target in (
                aten.split.Tensor, aten.split_with_sizes.default) and _is_linear(n.args[0].args[0]):
            found.add(n.args[0].args[0])
            part = n.args[1]
            continue
        stack.extend(n.all_input_nodes)
    if len(found) != 1:
        raise ValueError(f"tensor parallel: cannot follow {node.name} of {att.name} back to one projection "
                         f"(found {sorted(f.name for f in found) or 'none'})")
    return found.pop(), part


def _consumer(att):
    """The linear reading ``att``'s output through views and reshapes alone."""
    n = att
    while True:
        users = list(n.users)
        if len(users) != 1:
            raise ValueError(f"tensor parallel: the output of {att.name} has {len(users)} readers; "
                             "expected one chain of views into the output projection")
        n = users[0]
        if _is_linear(n) and n.args[_LINEARS[n.target][0]] is not None:
            return n
        if n.op != "call_function" or n.target not in (aten.view.default, aten.reshape.default,
                                                        aten._unsafe_view.default, aten.transpose.int,
                                                        aten.clone.default, aten.contiguous.default):
            raise ValueError(f"tensor parallel: {att.name}'s output reaches {n.name} ({n.target}), "
                             "not the output projection")


def _mlp_sites(graph, rank, world_size, columns, rows, replicated=frozenset()):
    for node in list(graph.nodes):
        if not _is_linear(node) or node in columns or node in rows or ("mlp", _layer(node)) in replicated:
            continue
        x = node.args[_LINEARS[node.target][0]]
        leaves = _pointwise_leaves(x)
        if not leaves or any(leaf in columns or leaf in rows for leaf in leaves):
            continue
        inputs = {leaf.args[_LINEARS[leaf.target][0]] for leaf in leaves}
        if len(inputs) != 1:
            continue
        for leaf in leaves:
            size = int(leaf.meta["val"].shape[-1])
            if size % world_size:
                raise ValueError(f"tensor_parallel_size={world_size} does not divide the {size} output features "
                                 f"of {leaf.name}")
            per = size // world_size
            columns[leaf] = _Column(leaf, [(size, None, (rank * per, (rank + 1) * per))])
        rows.append(node)


def _pointwise_leaves(x):
    """The linears ``x`` is computed from through pointwise ops alone (and scalar constants), or
    None when anything else takes part."""
    leaves, seen, stack = set(), set(), [x]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if _is_linear(n):
            leaves.add(n)
            continue
        if not (isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in _POINTWISE):
            return None
        stack.extend(n.all_input_nodes)
    return leaves or None


# ---- rewriting -----------------------------------------------------------------------------------

def _shard_column(gm, col: _Column):
    node = col.node
    xi, wi, bi, in_out = _LINEARS[node.target]
    index = []  # the output features the rank keeps, over all parts
    start = 0
    for size, heads, kept in col.parts:
        if kept is None:
            raise ValueError(f"tensor parallel: part of {node.name}'s output feeds nothing the pass shards")
        width = size // heads if heads else 1
        index.extend(range(start + kept[0] * width, start + kept[1] * width))
        start += size
    ranges = _ranges(index)
    _replace_weight(gm, node, wi, 1 if in_out else 0, ranges)
    bias = node.args[bi] if len(node.args) > bi else None
    if isinstance(bias, torch.fx.Node) and bias.op == "get_attr":
        _replace_weight(gm, node, bi, 0, ranges)
    users = list(node.users)
    if len(col.parts) > 1:  # the split that reads it: each part's new size
        split = users[0]
        sizes = [(kept[1] - kept[0]) * (size // heads) for size, heads, kept in col.parts]
        if split.target is aten.split.Tensor and len(set(sizes)) == 1:
            split.args = (split.args[0], sizes[0], *split.args[2:])
        else:
            split.target = aten.split_with_sizes.default
            split.args = (split.args[0], sizes, *split.args[2:])


def _shard_row(gm, node, rank, world_size):
    xi, wi, bi, in_out = _LINEARS[node.target]
    size = int(node.args[xi].meta["val"].shape[-1])
    if size % world_size:
        raise ValueError(f"tensor_parallel_size={world_size} does not divide the {size} input features of {node.name}")
    per = size // world_size
    _replace_weight(gm, node, wi, 0 if in_out else 1, [(rank * per, (rank + 1) * per)])
    graph = gm.graph
    bias = node.args[bi] if len(node.args) > bi else None
    with graph.inserting_before(node):
        if node.target is aten.addmm.default:
            new = graph.call_function(aten.mm.default, (node.args[1], node.args[2]))
        else:
            new = graph.call_function(aten.linear.default, (node.args[0], node.args[1]))
    new.meta = dict(node.meta)
    with graph.inserting_after(new):
        reduced = graph.call_function(ALL_REDUCE, (new,))
    reduced.meta = dict(node.meta)
    result = reduced
    if bias is not None:  # added once, after the sum
        with graph.inserting_after(reduced):
            result = graph.call_function(aten.add.Tensor, (reduced, bias))
        result.meta = dict(node.meta)
    node.replace_all_uses_with(result)
    graph.erase_node(node)


def _ranges(index: list[int]) -> list[tuple[int, int]]:
    """Sorted indices as runs ``[(start, stop), ...]``."""
    out = []
    for i in index:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def _replace_weight(gm, node, arg_index, dim, ranges):
    """Point ``node``'s ``arg_index``-th argument (a ``get_attr``) at a new attribute holding the
    weight's slices ``ranges`` along ``dim``: the shard, registered on ``gm`` alone. Where it came
    from goes to ``gm.meta["orca_weight_slices"]``, so that a rank built on meta tensors reads just
    these slices from the checkpoint (``orca_compile/materialize.py``)."""
    attr = node.args[arg_index]
    weight = fetch_attr(gm, attr.target).detach()
    shard = torch.cat([weight.narrow(dim, a, b - a) for a, b in ranges], dim=dim).contiguous()
    name = "_tp_" + attr.target.replace(".", "_")
    while hasattr(gm, name):
        name += "_"
    gm.register_buffer(name, shard, persistent=False)
    gm.meta.setdefault("orca_weight_slices", {})[name] = (attr.target, dim, list(ranges))
    with gm.graph.inserting_before(node):
        new = gm.graph.get_attr(name)
    new.meta = dict(attr.meta)
    args = list(node.args)
    args[arg_index] = new
    node.args = tuple(args)
    if not attr.users:
        gm.graph.erase_node(attr)


def _refresh_values(gm, caches):
    """Every node's ``meta["val"]`` again, on fake tensors, from inputs whose KV caches hold the
    kept heads only; drops the weights no node reads any more (the unsharded originals)."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    mode = torch._guards.detect_fake_mode([p.meta["val"] for p in placeholders])
    for p, kept in caches.items():
        with mode:
            p.meta["val"] = p.meta["val"].narrow(2, 0, kept[1] - kept[0]).clone()
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    read = {n.target for n in gm.graph.find_nodes(op="get_attr")}
    for name, _ in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        if name not in read:
            owner, _, leaf = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, leaf)
    gm.recompile()
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*[p.meta["val"] for p in placeholders])
    except Exception as exc:  # a reshape that spells a head count out (OPT's view(-1, 4, 16)): not handled yet
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"tensor parallel: the sharded graph no longer fits its shapes ({first}); a reshape "
                         "that writes out a head or feature count is not rewritten yet") from None


def _postcondition(gm, rows):
    reduced = [n for n in gm.graph.find_nodes(op="call_function", target=ALL_REDUCE)]
    if len(reduced) != len(rows):
        raise AssertionError(f"tensor_parallel: {len(rows)} row-parallel linears but {len(reduced)} all-reduces")
    for n in reduced:
        src = n.args[0]
        if not (src.op == "call_function" and src.target in (aten.mm.default, aten.linear.default)):
            raise AssertionError(f"tensor_parallel: {n.name} does not follow a row-parallel linear")
