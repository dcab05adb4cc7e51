"""split_attention: each attention becomes one ``orca.attention`` over the paged KV cache.

Requires: ``flatten_tokens`` (q/k/v are ``[heads, T, head_dim]``).
Ensures: exactly one ``torch.ops.orca.attention`` per decoder layer, in layer order; no live
``scaled_dot_product_attention`` node and no live attention softmax (``is_attention_softmax``; a
router's or gate's softmax is not one and stays); new graph inputs ``slot_mapping``,
``query_start_loc``, ``seq_lens``, ``block_tables`` and ``k_cache_{i}``/``v_cache_{i}`` per layer.
HF's mask-building nodes are left dead for ``cleanup``.

Before / after (Llama layer 0)::

    sdpa: f32[4, T, 16] = aten.scaled_dot_product_attention(add_3, add_4, transpose_2, squeeze_3, scale=0.25, enable_gqa=True)
  ->
    transpose_8: f32[T, 4, 16] = aten.transpose.int(add_3, 0, 1)        # and k, v: [T, 2, 16]
    attention: f32[T, 4, 16] = orca.attention(transpose_8, transpose_9, transpose_10, k_cache_0,
        v_cache_0, slot_mapping, query_start_loc, seq_lens, block_tables, 0.25, 0, 0.0)
    transpose_11: f32[4, T, 16] = aten.transpose.int(attention, 0, 1)

What is matched: an SDPA node, or the eager chain ``matmul(q, k^T) [* scale] [softcap] [+ mask]
[cat sinks] [- max] -> softmax [-> cast] [-> drop the sink column] [-> dropout(p=0)] -> matmul(., v)``
(``bmm``/``baddbmm`` with head-merging views too: Bloom; a ``baddbmm`` bias must evaluate to ALiBi). HF's ``repeat_kv`` in front of k/v is
stripped, so the cache stores the model's KV heads only (GQA/MQA). The causal mask itself is not
pattern-matched: the mask subgraph is *evaluated* on a probe sequence and must equal causal or
causal-within-a-sliding-window; anything else (bidirectional, custom masks) is a ``ValueError``.
"""
from __future__ import annotations

import dataclasses
import math
import operator
import re

import torch
import torch.fx

from orca_compile.ops import ATTENTION
from orca_compile.passes.graph_utils import CASTS as _CASTS
from orca_compile.passes.graph_utils import clean_module_path, fetch_attr, new_symint
from orca_compile.passes.graph_utils import val as _val

aten = torch.ops.aten
_SOFTMAX = {aten.softmax.int, aten._softmax.default}
_NOOPS = _CASTS | {aten.alias.default, aten.clone.default, aten.contiguous.default}
METADATA_INPUTS = ("slot_mapping", "query_start_loc", "seq_lens", "block_tables")


@dataclasses.dataclass
class AttentionSite:
    """One matched attention, in the flattened graph's terms."""

    q: torch.fx.Node  # [nh, T, hd]
    k: torch.fx.Node  # [nkv, T, hd], repeat_kv stripped
    v: torch.fx.Node
    out: torch.fx.Node  # the node whose value the attention output replaces ([nh, T, hd])
    scale: float
    softcap: float
    mask: torch.fx.Node | None  # boolean or additive mask, or None
    is_causal: bool
    erase: list  # matched nodes, outputs first, erased once replaced
    module_path: str = ""
    sliding_window: int = 0
    sinks: torch.fx.Node | None = None  # per-head sink logits, any shape of nh elements
    bias: torch.fx.Node | None = None  # an additive term of the scores besides the mask (baddbmm's)
    alibi_slopes: torch.Tensor | None = None  # [nh] float64, found by evaluating the bias
    sink_scale: float = 1.0  # factors applied after the sink column joined the scores
    bias_scale: float = 1.0  # and after the bias joined them


class UnsupportedAttention(ValueError):
    pass


def split_attention(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    info = gm.meta["orca"]
    graph = gm.graph
    sites = find_attention_sites(gm)
    num_layers = getattr(info.config, "num_hidden_layers", len(sites))
    if len(sites) != num_layers:
        missing = sorted(_attention_modules(gm) - {s.module_path for s in sites})
        raise UnsupportedAttention(
            f"{info.model_class}: found {len(sites)} attention ops (SDPA or the eager softmax pattern) "
            f"for {num_layers} layers; no recognisable attention in "
            f"{', '.join(missing[:4]) or 'the layers'}{' ...' if len(missing) > 4 else ''}: "
            "orca-compile cannot split this attention form")
    probes = {}  # every layer usually shares one mask: evaluate it once per window hint
    for site in sites:
        site.sliding_window = _mask_window(gm, site, info, probes)
        if site.bias is not None:
            site.alibi_slopes = _alibi_slopes(gm, site, info, probes)
        if getattr(info, "positions_in_attention", False) and site.alibi_slopes is None:
            raise UnsupportedAttention(
                f"{info.model_class} takes no position_ids, but its attention in {site.module_path or site.out.name} "
                "has no ALiBi bias: nothing would tell its tokens' positions apart")

    inputs = _add_inputs(gm, sites)
    for i, site in enumerate(sites):
        with graph.inserting_before(site.out.next):
            q = _emit(graph, aten.transpose.int, (site.q, 0, 1), site.out)
            k = _emit(graph, aten.transpose.int, (site.k, 0, 1), site.out)
            v = _emit(graph, aten.transpose.int, (site.v, 0, 1), site.out)
            extra = _sinks_and_slopes(gm, site, i)
            attn = _emit(graph, ATTENTION, (
                q, k, v, inputs[f"k_cache_{i}"], inputs[f"v_cache_{i}"],
                *(inputs[name] for name in METADATA_INPUTS),
                float(site.scale), int(site.sliding_window), float(site.softcap), *extra), site.out)
            attn.meta["orca_layer"] = i
            out = _emit(graph, aten.transpose.int, (attn, 0, 1), site.out)
        site.out.replace_all_uses_with(out)
        for node in site.erase:
            if not node.users:
                graph.erase_node(node)
    _postcondition(gm, num_layers)
    gm.recompile()
    return gm


# -- matching -----------------------------------------------------------------------------------
def find_attention_sites(gm: torch.fx.GraphModule) -> list[AttentionSite]:
    """Every attention of the graph: SDPA nodes, and each softmax that *is* an attention's (over
    query-key scores, feeding a product with the values: ``is_attention_softmax``). Other softmaxes
    (a mixture-of-experts router's, a gate's) are not attention and are left alone; an attention
    softmax whose surroundings are not understood is refused, naming what was found."""
    info = gm.meta["orca"]
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        try:
            if node.target is aten.scaled_dot_product_attention.default:
                sites.append(_match_sdpa(node))
            elif node.target in _SOFTMAX and is_attention_softmax(node):
                sites.append(_match_eager(node))
        except UnsupportedAttention as exc:
            raise UnsupportedAttention(
                f"{info.model_class}: cannot split the attention at node {node.name!r} ({node.target}) "
                f"in {_module_path(node) or 'an unknown module'}: {exc}") from None
    for site in sites:
        site.module_path = _module_path(site.out)
    return sites


_MATMULS = {aten.matmul.default, aten.bmm.default}
_SCORE_MATMULS = _MATMULS | {aten.baddbmm.default}
# between an attention's softmax and its product with the values: casts, an inactive dropout,
# the slice that drops a sink's column, views that merge or split the batch and head dims
_PROBS_PASS = _NOOPS | {aten.dropout.default, aten.slice.Tensor}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def is_attention_softmax(softmax: torch.fx.Node) -> bool:
    """True for a softmax over query-key scores: its input comes (through elementwise ops, masks,
    scales, views, a sink column) from a product of two activations, ``q @ k^T``. That is what an
    attention is, whatever follows; a router's or gate's softmax is over a projection's logits (a
    linear of the hidden states, a product with a weight) and is left alone, even where its
    probabilities then multiply activations (a soft mixture of experts)."""
    frontier, seen = [softmax.args[0]], set()
    for _hop in range(12):  # breadth first: the scores are a few ops up, the mask's subgraph may be deep
        following = []
        for node in frontier:
            if not isinstance(node, torch.fx.Node) or node in seen or node.op != "call_function":
                continue
            seen.add(node)
            if node.target in _SCORE_MATMULS:
                if not any(_is_weight(a) for a in node.args[-2:]):
                    return True
                continue
            if node.target in (aten.linear.default, aten.embedding.default, aten.mm.default, aten.addmm.default):
                continue  # logits of a projection: a router or a classifier, not scores
            following.extend(node.all_input_nodes)
        frontier = following
    return False


def _is_weight(node) -> bool:
    """A parameter or buffer seen through views, transposes and casts."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and (
            node.target in _NOOPS | _VIEWS | {aten.transpose.int, aten.t.default, aten.permute.default}):
        node = node.args[0]
    return isinstance(node, torch.fx.Node) and node.op == "get_attr"


def _match_sdpa(node) -> AttentionSite:
    q, k, v = node.args[:3]
    names = ("attn_mask", "dropout_p", "is_causal")
    opts = dict(zip(names, node.args[3:]))
    opts.update({n: node.kwargs[n] for n in names if n in node.kwargs})
    if opts.get("dropout_p", 0.0):
        raise UnsupportedAttention(f"dropout_p={opts['dropout_p']} (put the model in eval mode)")
    _check_rank3(q, k, v)
    scale = node.kwargs.get("scale")
    if scale is None:
        scale = 1.0 / math.sqrt(_val(q).shape[-1])
    return AttentionSite(
        q=q, k=_strip_repeat_kv(k), v=_strip_repeat_kv(v), out=node, scale=scale, softcap=0.0,
        mask=opts.get("attn_mask"), is_causal=bool(opts.get("is_causal", False)), erase=[node])


def _match_eager(softmax) -> AttentionSite:
    """``matmul(q, k^T) [* scale] [softcap] [+ mask] [cat sinks] [- max] -> softmax [-> cast]
    [-> drop the sink column] [-> dropout(p=0)] -> matmul(., v)``; ``baddbmm(bias, q, k^T)``
    (Bloom: its bias is ALiBi's) and ``bmm`` stand for the matmuls, with head-merging views between."""
    if softmax.args[1] % _val(softmax).dim() != _val(softmax).dim() - 1:
        raise UnsupportedAttention("softmax is not over the last (key) dimension")
    chain = [softmax]
    keys = _val(softmax).shape[-1]
    # forward: casts, the sink column dropped, an inactive dropout, views, then the matmul with v
    node, dropped_sink = softmax, False
    while True:
        if len(node.users) != 1:
            raise UnsupportedAttention(f"{node.name} has {len(node.users)} users; expected one matmul with v")
        user = next(iter(node.users))
        if user.target in _CASTS or (user.target is aten.dropout.default and (user.args[1] == 0 or not user.args[2])):
            pass
        elif user.target in _VIEWS and _keeps_last_two(user):
            pass
        elif user.target is aten.slice.Tensor and not dropped_sink and _drops_last_column(user, keys):
            dropped_sink = True
        elif user.target in _MATMULS and user.args[0] is node:
            pv = user
            break
        else:
            raise UnsupportedAttention(f"softmax output reaches {user.target}, not a matmul with v")
        node = user
        chain.insert(0, node)
    # backward: [cast] [- max] [cat sinks] [+ mask] [softcap] [* scale] [view] matmul(q, k^T)
    node = softmax.args[0]
    mask, softcap, scale, sinks, bias = None, 0.0, 1.0, None, None
    sink_scale = bias_scale = 1.0
    while True:
        chain.append(node)
        if node.target in _CASTS:
            node = node.args[0]
        elif node.target is aten.sub.Tensor and _is_row_max(node.args[1], node.args[0]):
            chain.extend([node.args[1], node.args[1].args[0]] if node.args[1].target is operator.getitem else [node.args[1]])
            node = node.args[0]  # softmax(x - max(x)) = softmax(x)
        elif node.target is aten.cat.default and sinks is None and dropped_sink and _is_sink_cat(node):
            if softcap:
                raise UnsupportedAttention("a soft-cap applies to the sink logits too; the op caps the scores alone")
            sinks, sink_scale = node.args[0][1], scale  # what scaled the cat scaled the sink too
            node = node.args[0][0]
        elif node.target is aten.add.Tensor and mask is None and isinstance(node.args[1], torch.fx.Node):
            mask, node = node.args[1], node.args[0]
        elif node.target is aten.mul.Tensor and _is_tanh_softcap(node):
            softcap = _scalar(node.args[1])
            tanh = node.args[0]
            div = tanh.args[0]  # mul(tanh(div(x, c)), c)
            chain.extend([tanh, div])
            node = div.args[0]
        elif node.target in (aten.mul.Tensor, aten.div.Tensor) and _scalar(node.args[1]) is not None:
            factor = _scalar(node.args[1])
            scale *= factor if node.target is aten.mul.Tensor else 1.0 / factor
            node = node.args[0]
        elif node.target in _VIEWS and _keeps_last_two(node):
            node = node.args[0]
        elif node.target is aten.baddbmm.default:
            beta, alpha = node.kwargs.get("beta", 1.0), node.kwargs.get("alpha", 1.0)
            if beta not in (0, 1):
                raise UnsupportedAttention(f"baddbmm with beta={beta}: expected a bias added as is")
            bias = node.args[0] if beta else None
            if bias is not None and softcap:
                raise UnsupportedAttention("a soft-cap applies to the score bias too; the op adds the bias after it")
            bias_scale = scale  # what scaled baddbmm's result scaled its bias too
            scale *= alpha
            qk, (q, kt) = node, node.args[1:3]
            break
        elif node.target in _MATMULS:
            qk, (q, kt) = node, node.args
            break
        else:
            raise UnsupportedAttention(f"attention scores come from {node.target} ({node.name}), which is not recognised")
    if dropped_sink and sinks is None:
        raise UnsupportedAttention("the softmax's last column is dropped, but it is not a sink logit cat-ed to the scores")
    if kt.target is not aten.transpose.int or sorted(d % 3 for d in kt.args[1:]) != [1, 2]:
        raise UnsupportedAttention("the key operand of the score matmul is not a transpose of the last two dims")
    k = kt.args[0]
    v = pv.args[1]
    _check_rank3(q, k, v)
    return AttentionSite(q=q, k=_strip_repeat_kv(k), v=_strip_repeat_kv(v), out=pv, scale=scale,
                         softcap=softcap, mask=mask, is_causal=False, erase=list(dict.fromkeys([pv, *chain, qk, kt])),
                         sinks=sinks, bias=bias, sink_scale=sink_scale, bias_scale=bias_scale)


def _keeps_last_two(view) -> bool:
    """A view that only merges or splits the dims before the last two (heads and batch)."""
    before, after = _val(view.args[0]).shape, _val(view).shape
    return len(before) >= 2 and len(after) >= 2 and tuple(before[-2:]) == tuple(after[-2:])


def _drops_last_column(node, keys) -> bool:
    args = list(node.args) + [None] * (5 - len(node.args))
    _, dim, start, end, step = args[:5]
    rank = _val(node.args[0]).dim()
    return (dim or 0) % rank == rank - 1 and start in (None, 0) and step in (None, 1) and (
        end == -1 or end == keys - 1)


def _is_row_max(m, x) -> bool:
    """``max(x, -1, keepdim=True).values`` or ``amax(x, [-1], keepdim=True)``."""
    if not isinstance(m, torch.fx.Node):
        return False
    rank = _val(x).dim()
    if m.target is operator.getitem and m.args[1] == 0 and m.args[0].target is aten.max.dim:
        mx = m.args[0]
        return mx.args[0] is x and mx.args[1] % rank == rank - 1 and bool(mx.args[2] if len(mx.args) > 2 else False)
    if m.target is aten.amax.default:
        dims = m.args[1] if len(m.args) > 1 else []
        return m.args[0] is x and [d % rank for d in dims] == [rank - 1] and bool(m.args[2] if len(m.args) > 2 else False)
    return False


def _is_sink_cat(cat) -> bool:
    """``cat([scores, sinks], -1)`` with one extra column: the per-head sink logit (GPT-OSS)."""
    tensors, dim = cat.args[0], (cat.args[1] if len(cat.args) > 1 else 0)
    rank = _val(cat).dim()
    return len(tensors) == 2 and dim % rank == rank - 1 and _val(tensors[1]).shape[-1] == 1


def _sink_logits(node, num_heads):
    """The ``[nh]`` tensor a sink column was expanded from (through views, expands and casts)."""
    while node.op == "call_function" and node.target in _NOOPS | _VIEWS | {
            aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims}:
        node = node.args[0]
    shape = _val(node).shape
    if math.prod(shape) != num_heads:
        raise UnsupportedAttention(f"the sink logits {node.name} have shape {tuple(shape)}, not one per head "
                                   f"({num_heads})")
    return node


def _is_tanh_softcap(mul):
    t = mul.args[0]
    if not (isinstance(t, torch.fx.Node) and t.target is aten.tanh.default):
        return False
    d = t.args[0]
    if not (isinstance(d, torch.fx.Node) and d.target is aten.div.Tensor):
        return False
    return _scalar(d.args[1]) is not None and _scalar(d.args[1]) == _scalar(mul.args[1])


def _scalar(arg):
    """A Python number, or a 0-d ``aten.full`` constant; else None."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg)
    if isinstance(arg, torch.fx.Node) and arg.target is aten.full.default and list(arg.args[0]) == []:
        return float(arg.args[1])
    if isinstance(arg, torch.fx.Node) and arg.target in _NOOPS:
        return _scalar(arg.args[0])
    return None


def _strip_repeat_kv(node):
    """``reshape(expand(unsqueeze(x, 1), [nkv, rep, T, hd]), [nkv*rep, T, hd])`` -> x."""
    def skip(n):
        while isinstance(n, torch.fx.Node) and (n.target in _NOOPS or _is_full_slice(n)):
            n = n.args[0]
        return n

    r = skip(node)
    if r.target not in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        return node
    e = skip(r.args[0])
    if e.target is not aten.expand.default:
        return node
    u = skip(e.args[0])
    if u.target is not aten.unsqueeze.default or u.args[1] % 4 != 1:
        return node
    x = u.args[0]
    xs, es = _val(x).shape, _val(e).shape
    if len(xs) == 3 and len(es) == 4 and es[0] == xs[0] and es[2:] == xs[1:] and list(_val(node).shape) == [xs[0] * es[1], *xs[1:]]:
        return x
    return node


def _is_full_slice(n):
    if n.target is not aten.slice.Tensor:
        return False
    args = list(n.args) + [None] * (5 - len(n.args))
    _, dim, start, end, step = args[:5]
    size = _val(n.args[0]).shape[dim or 0]
    return (start in (None, 0)) and (step in (None, 1)) and (end is None or (isinstance(end, int) and end >= 2**62) or end == size)


def _check_rank3(q, k, v):
    for name, n in (("q", q), ("k", k), ("v", v)):
        if _val(n).dim() != 3:
            raise UnsupportedAttention(f"{name} has shape {tuple(_val(n).shape)}; expected [heads, T, head_dim]")


def _sinks_and_slopes(gm, site, layer) -> tuple:
    """The attention op's trailing ``(sinks, alibi_slopes)`` arguments, as nodes; ``()`` when the
    layer has neither, so plain attentions keep the short call."""
    if site.sinks is None and site.alibi_slopes is None:
        return ()
    graph = gm.graph
    num_heads = _val(site.q).shape[0]
    sinks = None
    if site.sinks is not None:
        root = _sink_logits(site.sinks, num_heads)
        sinks = _emit(graph, aten.reshape.default, (root, [num_heads]), site.out)
        if site.sink_scale != 1.0:
            sinks = _emit(graph, aten.mul.Tensor, (sinks, float(site.sink_scale)), site.out)
    slopes = None
    if site.alibi_slopes is not None:
        name = f"orca_alibi_slopes_{layer}"
        q = _val(site.q)
        device = q.device if q.device.type != "meta" else torch.device("cpu")  # a meta model: moved when materialised
        gm.register_buffer(name, site.alibi_slopes.to(q.dtype).to(device), persistent=False)
        slopes = graph.get_attr(name)
        fake_mode = torch._guards.detect_fake_mode([_val(site.q)])
        slopes.meta["val"] = fake_mode.from_tensor(getattr(gm, name))
    return sinks, slopes


# -- the mask, evaluated ------------------------------------------------------------------------
def _mask_window(gm, site: AttentionSite, info, probes) -> int:
    """0 if the mask is causal, w if causal within a window of w keys; else ValueError."""
    where = f"{info.model_class} attention in {site.module_path or site.out.name}"
    if site.mask is None:
        if site.is_causal:
            return 0
        raise UnsupportedAttention(f"{where} is bidirectional (no mask, is_causal=False): not a decoder")
    hints = [w for w in (_window_hint(info, site.module_path),) if w]
    probe_len = max([16] + [w + 2 for w in hints])
    key = (site.mask, probe_len)
    if key not in probes:
        probes[key] = _evaluate_mask(gm, site.mask, probe_len)
    allowed = probes[key]
    i = torch.arange(probe_len)[:, None]
    j = torch.arange(probe_len)[None, :]
    causal = j <= i
    if torch.equal(allowed, causal):
        return 0
    window = int(allowed[-1].sum())
    if 0 < window and torch.equal(allowed, causal & (i - j < window)):
        return window
    kind = "bidirectional (not a decoder)" if bool(allowed[0, -1]) else "neither causal nor a causal sliding window"
    raise UnsupportedAttention(f"{where}: the attention mask is {kind}")


def _window_hint(info, module_path):
    mod = info.module_paths.get(module_path)
    for source in (mod, info.config):
        w = getattr(source, "sliding_window", None) if source is not None else None
        if isinstance(w, int) and w > 0:
            return w
    return 0


def _alibi_slopes(gm, site, info, probes):
    """The per-head slopes of an additive score bias that is ALiBi (``slope_h * key_position`` plus
    anything constant along a query's row, which the softmax ignores), found by evaluating the
    bias on a probe sequence; None when the bias is zero; ``ValueError`` for any other bias."""
    n = 64  # long enough that a bias linear over a few keys only is not taken for ALiBi
    key = (site.bias, n)
    if key not in probes:
        probes[key] = _evaluate(gm, site.bias, n).to(torch.float64)
    value = probes[key]
    num_heads = _val(site.q).shape[0]
    while value.dim() < 3:
        value = value[None]
    value = value.reshape(-1, *value.shape[-2:])
    if value.shape[0] not in (1, num_heads) or value.shape[-1] != n:
        raise UnsupportedAttention(f"{info.model_class} attention in {site.module_path}: the score bias has shape "
                                   f"{tuple(value.shape)}, not [heads or 1, queries or 1, keys]")
    rel = value - value[..., :1]  # remove what is constant along each row
    slopes = rel[:, -1, -1] / (n - 1)
    fit = slopes[:, None, None] * torch.arange(n, dtype=torch.float64)
    # a few ulps of the largest value, in the bias's dtype or float32, whichever is coarser: models
    # compute ALiBi in float32 and cast it (Bloom: float32 slopes times float32 positions)
    eps = max(torch.finfo(_val(site.bias).dtype).eps, torch.finfo(torch.float32).eps)
    tol = 4 * eps * float(value.abs().amax()) + 1e-12
    if not torch.allclose(rel, fit.expand_as(rel), rtol=0, atol=float(tol)):
        raise UnsupportedAttention(f"{info.model_class} attention in {site.module_path}: the scores carry an additive "
                                   "bias that is not ALiBi's (linear in the key position, one slope per head)")
    if not bool(slopes.any()):
        return None
    return slopes.expand(num_heads).clone() * site.bias_scale


def _evaluate_mask(gm, mask, n):
    """Run the mask's subgraph on one probe sequence of n tokens -> bool [n, n] (True: may attend)."""
    value = _evaluate(gm, mask, n)
    while value.dim() > 2:  # [heads or 1, n, n]: one mask for all heads, or we cannot express it
        if not all(torch.equal(value[0], value[h]) for h in range(1, value.shape[0])):
            raise UnsupportedAttention("the attention mask differs between heads")
        value = value[0]
    value = value.expand(n, n)
    if value.dtype == torch.bool:
        return value
    return value > torch.finfo(value.dtype).min / 2


def _evaluate(gm, mask, n):
    """Run ``mask``'s subgraph (anything computed from the inputs and constants) on one probe
    sequence of n tokens, on the CPU."""
    cone, stack = set(), [mask]
    while stack:
        node = stack.pop()
        if node in cone:
            continue
        cone.add(node)
        stack.extend(node.all_input_nodes)
    graph = torch.fx.Graph()
    env = {}
    for node in gm.graph.nodes:
        if node in cone:
            env[node] = graph.node_copy(node, lambda x: env[x])
    graph.output(env[mask])
    inputs = {"input_ids": torch.zeros(n, dtype=torch.long), "position_ids": torch.arange(n)}
    args = [inputs[p.target] for p in graph.find_nodes(op="placeholder")]
    device = next(iter(gm.parameters()), torch.empty(0)).device
    root = gm
    if device.type == "meta":  # a model built from its config alone (the planner): no weights to read,
        # and the mask reads none of their values, only shapes and dtypes: zero-stride CPU stand-ins
        root, device = torch.nn.Module(), torch.device("cpu")
        for node in graph.find_nodes(op="get_attr"):
            t = fetch_attr(gm, node.target)
            stand_in = torch.zeros((), dtype=t.dtype).expand(t.shape) if isinstance(t, torch.Tensor) else t
            name = "_meta_" + node.target.replace(".", "_")
            setattr(root, name, stand_in)
            node.target = name
        for node in graph.nodes:  # factories (arange, full) that were told the model's device
            if node.kwargs.get("device") is not None and torch.device(node.kwargs["device"]).type == "meta":
                node.kwargs = {**node.kwargs, "device": device}
    return torch.fx.GraphModule(root, graph)(*[a.to(device) for a in args]).cpu()


# -- graph edits ----------------------------------------------------------------------------------
def _add_inputs(gm, sites):
    """Placeholders for the ragged metadata and each layer's KV cache, after the existing inputs."""
    graph = gm.graph
    info = gm.meta["orca"]
    fake_mode = torch._guards.detect_fake_mode([_val(n) for n in graph.find_nodes(op="placeholder")])
    shape_env = fake_mode.shape_env
    sym = {name: new_symint(shape_env, name, hint) for name, hint in
           (("num_seqs", 3), ("num_blocks", 64), ("max_blocks_per_seq", 5), ("block_size", 16))}
    info.symbols = {name: s.node.expr for name, s in sym.items()}
    tokens = _val(next(iter(graph.find_nodes(op="placeholder")))).shape[0]
    specs = {
        "slot_mapping": ((tokens,), torch.long),
        "query_start_loc": ((sym["num_seqs"] + 1,), torch.long),
        "seq_lens": ((sym["num_seqs"],), torch.long),
        "block_tables": ((sym["num_seqs"], sym["max_blocks_per_seq"]), torch.long),
    }
    for i, site in enumerate(sites):
        kv, vv = _val(site.k), _val(site.v)
        specs[f"k_cache_{i}"] = ((sym["num_blocks"], sym["block_size"], kv.shape[0], kv.shape[2]), kv.dtype)
        specs[f"v_cache_{i}"] = ((sym["num_blocks"], sym["block_size"], vv.shape[0], vv.shape[2]), vv.dtype)
    last = list(graph.find_nodes(op="placeholder"))[-1]
    device = _val(last).device
    out = {}
    for name, (shape, dtype) in specs.items():
        with graph.inserting_after(last):
            node = graph.placeholder(name)
        with fake_mode:
            node.meta["val"] = torch.empty(shape, dtype=dtype, device=device)
        out[name] = last = node
    return out


def _emit(graph, target, args, like):
    node = graph.call_function(target, args)
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    vals = torch.fx.node.map_arg(args, lambda n: n.meta["val"])
    fake_mode = torch._guards.detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    with fake_mode:
        node.meta["val"] = target(*vals)
    return node


def _module_path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [path for path, _cls in stack.values()]
    attn = [p for p in paths if re.search(r"attn|attention", p.split(".")[-1], re.I)]
    return clean_module_path((attn or paths or [""])[-1])


def _attention_modules(gm) -> set[str]:
    """Qualified names of the modules whose class is an attention (``...Attention``)."""
    out = set()
    for node in gm.graph.nodes:
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            name = getattr(cls, "__name__", str(cls))
            if name.endswith("Attention") or name.endswith("Attention'>"):
                out.add(clean_module_path(path))
    return out


def _postcondition(gm, num_layers):
    live = {n for n in gm.graph.nodes if n.op == "output"}
    for node in reversed(gm.graph.nodes):
        if any(u in live for u in node.users) or (node.op == "call_function" and node.is_impure()):
            live.add(node)
    attn = [n for n in gm.graph.nodes if n.target is ATTENTION]
    assert len(attn) == num_layers, f"split_attention: {len(attn)} orca.attention nodes for {num_layers} layers"
    for node in live:
        assert node.target is not aten.scaled_dot_product_attention.default and not (
            node.target in _SOFTMAX and is_attention_softmax(node)), \
            f"split_attention: {node.name} ({node.target}) is still live"
    gm.graph.lint()
