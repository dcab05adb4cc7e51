"""split_attention tells an attention's softmax from every other softmax (routers, gates)."""
import pytest
import torch

from orca_compile.passes.split_attention import UnsupportedAttention, find_attention_sites, is_attention_softmax

aten = torch.ops.aten
HEADS, DIM, EXPERTS = 2, 8, 4


class AttentionBesideRouters(torch.nn.Module):
    """One real attention, and three softmaxes that are not attention: a top-k router, a gate whose
    probabilities weight activations elementwise, and a soft mixture (probabilities @ activations)."""

    def __init__(self, broken=False):
        super().__init__()
        hidden = HEADS * DIM
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)
        self.router = torch.nn.Linear(hidden, EXPERTS)
        self.gate = torch.nn.Linear(hidden, hidden)
        self.mix = torch.nn.Linear(hidden, EXPERTS)
        self.broken = broken

    def forward(self, x):  # x: [T, hidden]
        t = x.shape[0]
        q, k, v = (y.view(t, HEADS, DIM).transpose(0, 1) for y in self.qkv(x).chunk(3, -1))
        scores = torch.matmul(q, k.transpose(1, 2)) * DIM**-0.5
        probs = torch.softmax(scores, dim=-1)
        if self.broken:  # an attention the matcher does not understand: it must be refused, not skipped
            probs = probs.pow(2)
        attn = torch.matmul(probs, v).transpose(0, 1).reshape(t, -1)
        weights, ids = torch.topk(torch.softmax(self.router(x), dim=-1), 2)
        gated = torch.softmax(self.gate(x), dim=-1) * x
        experts = torch.stack([x * (e + 1) for e in range(EXPERTS)], dim=1)  # [T, E, hidden]
        mixed = torch.matmul(torch.softmax(self.mix(x), dim=-1)[:, None, :], experts)[:, 0]
        return attn + gated + mixed + weights.sum() + ids.sum()


class _Info:
    model_class = "AttentionBesideRouters"


def _graph(broken=False):
    x = torch.randn(5, HEADS * DIM)
    gm = torch.export.export(AttentionBesideRouters(broken).eval(), (x,)).module()
    gm.meta["orca"] = _Info()
    return gm


def test_router_and_gate_softmaxes_are_not_attention():
    gm = _graph()
    softmaxes = [n for n in gm.graph.nodes if n.target in (aten.softmax.int, aten._softmax.default)]
    assert len(softmaxes) == 4
    assert [is_attention_softmax(n) for n in softmaxes] == [True, False, False, False]
    sites = find_attention_sites(gm)
    assert len(sites) == 1
    assert sites[0].out.target is aten.matmul.default and sites[0].scale == pytest.approx(DIM**-0.5)


def test_an_attention_in_an_unknown_form_is_refused_naming_it():
    with pytest.raises(UnsupportedAttention, match=r"softmax output reaches aten\.pow"):
        find_attention_sites(_graph(broken=True))


class SinksAndAlibi(torch.nn.Module):
    """An attention with a sink column and a baddbmm bias, each scaled again after it joined the
    scores (``after``); ``odd`` adds +2 on every odd key: not ALiBi."""

    def __init__(self, after=1.0, odd=False):
        super().__init__()
        hidden = HEADS * DIM
        self.embed = torch.nn.Embedding(32, hidden)
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)
        self.sinks = torch.nn.Parameter(torch.tensor([0.5, -1.0]))
        self.after, self.odd = after, odd

    def forward(self, input_ids, position_ids):
        x = self.embed(input_ids)
        t = x.shape[0]
        q, k, v = (y.view(t, HEADS, DIM).transpose(0, 1) for y in self.qkv(x).chunk(3, -1))
        keys = torch.arange(t, dtype=x.dtype)
        bias = torch.tensor([0.5, 0.25])[:, None, None] * keys + (2.0 * (keys % 2) if self.odd else 0.0)
        scores = torch.baddbmm(bias.expand(HEADS, 1, t), q, k.transpose(1, 2), alpha=DIM**-0.5)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        scores = scores + torch.zeros(t, t, dtype=x.dtype).masked_fill(~causal, float("-inf"))
        both = torch.cat([scores, self.sinks[:, None, None].expand(HEADS, t, 1)], dim=-1) * self.after
        probs = torch.softmax(both, dim=-1)[..., :-1]
        return torch.bmm(probs, v)


class _ProbeInfo:
    model_class = "SinksAndAlibi"
    module_paths = {}
    config = None


def _probe_graph(**kw):
    from torch.export import Dim

    ids, pos = torch.zeros(6, dtype=torch.long), torch.arange(6)
    t = Dim("T", min=2, max=256)
    gm = torch.export.export(SinksAndAlibi(**kw).eval(), (ids, pos),
                             dynamic_shapes=({0: t}, {0: t})).module()
    gm.meta["orca"] = _ProbeInfo()
    return gm


def test_a_scale_after_the_sink_and_bias_joined_the_scores_scales_them_too():
    from orca_compile.passes.split_attention import _alibi_slopes

    site, = find_attention_sites(_probe_graph(after=3.0))
    assert site.sinks is not None and site.sink_scale == 3.0  # the op gets 3 * sinks
    assert site.scale == pytest.approx(3.0 * DIM**-0.5)
    slopes = _alibi_slopes(site.out.graph.owning_module, site, _ProbeInfo(), {})
    torch.testing.assert_close(slopes, torch.tensor([1.5, 0.75], dtype=torch.float64))


def test_a_bias_that_is_not_alibi_is_refused():
    from orca_compile.passes.split_attention import _alibi_slopes

    site, = find_attention_sites(_probe_graph(odd=True))
    with pytest.raises(UnsupportedAttention, match="not ALiBi"):
        _alibi_slopes(site.out.graph.owning_module, site, _ProbeInfo(), {})


def test_a_family_without_position_ids_and_without_alibi_is_refused():
    """Bart's decoder takes no position_ids and makes its positions from arange(T): wrong for a
    flattened batch and for decode steps. Only ALiBi families may go without them."""
    import transformers

    import orca_compile

    config = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=2, decoder_attention_heads=2,
                                     encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64)
    model = transformers.BartForCausalLM(config).eval()
    with pytest.raises(ValueError, match="takes no position_ids"):
        orca_compile.compile(model)


def test_bloom_with_slopes_that_are_not_powers_of_two_equals_hf():
    """12 heads: Bloom's extra slopes are odd powers of 2^-0.5, irrational, rounded to float32 by HF
    (which also multiplies them by the key positions in float32). The tolerance, 1e-5, covers that
    float32 product (~6e-8 of slope * position, positions < 32) and Bloom's float32 softmax."""
    import transformers

    import orca_compile
    from orca_compile.runtime.batch import RaggedBatch
    from orca_compile.runtime.kv_cache import new_kv_cache
    from orca_compile.runtime.model_runner import run_graph

    torch.manual_seed(0)
    config = transformers.BloomConfig(hidden_size=96, n_layer=2, n_head=12, vocab_size=64)
    model = transformers.BloomForCausalLM(config).to(torch.float64).eval()
    cm = orca_compile.compile(model)
    slopes = next(t for name, t in cm.graph_module.named_buffers() if "alibi" in name)
    assert slopes.shape == (12,) and not torch.equal(slopes, 2.0 ** torch.log2(slopes).round())
    prompts = [torch.randint(0, 64, (n,)).tolist() for n in (5, 17, 9)]
    tables = [[0, 1], [2, 3, 4, 5, 6], [7, 8, 9]]
    batch = RaggedBatch.build(prompts, [0, 0, 0], tables, 4, all_logits=True)
    logits = run_graph(cm, batch, new_kv_cache(cm, 16, 4))
    qsl = batch.query_start_loc.tolist()
    with torch.no_grad():
        for r, p in enumerate(prompts):
            want = model(torch.tensor([p])).logits[0]
            torch.testing.assert_close(logits[qsl[r]:qsl[r + 1]], want, atol=1e-5, rtol=0)
