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
