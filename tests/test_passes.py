"""The graph passes on small hand-written modules: every spelling of a linear, roles, fallbacks."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lynx_compile
from lynx_compile import LynxConfig
from lynx_compile.passes.graph import qualified_name

D = 256


class Block(nn.Module):
    """One DiT-style block with every role the selector knows."""

    def __init__(self, d=D, heads=4, attention=F.scaled_dot_product_attention):
        super().__init__()
        self.heads, self.attention = heads, attention
        self.t_in = nn.Linear(64, d)
        self.adaLN = nn.Linear(d, 2 * d)
        self.embed = nn.Linear(32, d)
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.head = nn.Linear(d, 8)

    def forward(self, tokens, t):
        c = self.t_in(t)
        shift, scale = self.adaLN(F.silu(c)).chunk(2, dim=-1)
        x = self.embed(tokens)
        h = self.norm(x) * (1 + scale[:, None]) + shift[:, None]
        b, n, d = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = self.attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(a)
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x)), approximate="tanh"))
        return self.head(self.norm(x))


def example(batch=2, tokens=6):
    torch.manual_seed(0)
    return torch.randn(batch, tokens, 32), torch.randn(batch, 64)


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    return Block().eval()


def decisions(report):
    return {layer.name: (layer.role, layer.decision) for layer in report.layers}


def _aten_attention(q, k, v):
    # What diffusers' "_native_cudnn" backend does, with the kernel that runs on CPU.
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]


@pytest.mark.parametrize("attention", ["sdpa", "aten kernel"])
def test_roles_are_read_from_structure(block, attention):
    if attention == "aten kernel":
        block = Block(attention=_aten_attention).eval()
        block.load_state_dict(Block().state_dict())
    report = lynx_compile.explain(block, *example())
    assert decisions(report) == {
        "t_in": ("conditioning", "dense"),
        "adaLN": ("conditioning", "dense"),
        "embed": ("embedder", "dense"),
        "qkv": ("attn_qkv", "sparse"),
        "proj": ("attn_out", "dense"),
        "fc1": ("mlp_up", "sparse"),
        "fc2": ("mlp_down", "sparse"),
        "head": ("final", "dense"),
    }
    assert all(layer.reason for layer in report.layers)
    assert report.graphs == 1 and not report.graph_breaks
    assert [layer.tokens for layer in report.layers if layer.name == "fc2"] == [12]


def test_include_exclude_and_roles_override_the_default(block):
    inputs = example()
    only = lynx_compile.explain(block, *inputs, config=LynxConfig(include=r"^(proj|fc1)$"))
    assert {l.name for l in only.sparse} == {"proj", "fc1"}
    assert {l.reason for l in only.dense} == {"not matched by include"}
    excluded = lynx_compile.explain(block, *inputs, config=LynxConfig(exclude=r"fc"))
    assert {l.name for l in excluded.sparse} == {"qkv"}
    roles = lynx_compile.explain(block, *inputs, config=LynxConfig(sparse_roles={"attn_out"}))
    assert {l.name for l in roles.sparse} == {"proj"}


def test_small_layers_stay_dense_with_a_reason(block):
    report = lynx_compile.explain(block, *example(), config=LynxConfig(min_features=512))
    assert not report.sparse
    fc1 = next(l for l in report.layers if l.name == "fc1")
    assert fc1.reason == "256 -> 1024 is below min_features=512"


class Spellings(nn.Module):
    """The same kind of layer written five ways, plus two that cannot be made sparse."""

    def __init__(self, d=D):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.w = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.b = nn.Parameter(torch.randn(d))
        self.v = nn.Parameter(torch.randn(d, d) / d**0.5)  # stored (in, out)
        self.odd = nn.Linear(d - 2, d)

    def forward(self, x):
        h = self.norm(x)
        a = F.gelu(h @ self.w.T + self.b)
        a = F.gelu(torch.addmm(self.b, a.reshape(-1, D), self.w.t()).view(x.shape))
        a = F.gelu(torch.matmul(a, self.w.transpose(0, 1)))
        a = F.gelu(a @ self.v)
        a = F.gelu(F.linear(a, a.new_ones(D, D)))  # not a constant weight
        a = F.gelu(self.odd(a[..., :-2]))  # K = 254: not a multiple of 4
        return self.norm(a) * 2


def test_every_spelling_becomes_one_sparse_op_and_matches_reference():
    torch.manual_seed(0)
    model = Spellings().eval()
    x = torch.randn(3, 5, D)
    backend = lynx_compile.backend(min_features=0, include=".*")
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(x)
    report = backend.report
    kinds = [(l.name, l.decision) for l in report.layers]
    assert kinds[:4] == [("w", "sparse"), ("w", "sparse"), ("w", "sparse"), ("v", "sparse")]
    assert report.layers[4].decision == "dense" and "not a constant" in report.layers[4].reason
    assert report.layers[5].name == "odd" and "not a multiple of 4" in report.layers[5].reason

    # Independent reference: mask every sparse layer's input by hand.
    from conftest import masked_reference, relative_error

    def sparse(a, w, b=None):
        return F.linear(masked_reference(a, 2, 4, True), w, b)

    with torch.no_grad():
        h = model.norm(x)
        a = F.gelu(sparse(h, model.w, model.b))
        a = F.gelu(sparse(a, model.w, model.b))
        a = F.gelu(sparse(a, model.w))
        a = F.gelu(sparse(a, model.v.t()))
        a = F.gelu(F.linear(a, a.new_ones(D, D)))
        a = F.gelu(model.odd(a[..., :-2]))
        expected = model.norm(a) * 2
    assert relative_error(out, expected) < 1e-5


def test_dtypes_without_a_sparse_path_stay_dense_with_a_reason():
    model = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D)).eval()
    report = lynx_compile.explain(model.double(), torch.randn(2, 4, D, dtype=torch.float64))
    assert [l.decision for l in report.layers] == ["dense", "dense"]
    assert report.layers[0].reason.startswith("dtype torch.float64")


def test_qualified_names_match_named_modules():
    assert qualified_name("L['self']._modules['blocks']._modules['11']._modules['mlp']._modules['fc2']") == "blocks.11.mlp.fc2"
    assert qualified_name("L['self'].transformer_blocks[3].ff.net[2]") == "transformer_blocks.3.ff.net.2"
    assert qualified_name("L['self']._orig_mod.blocks[0].attn.qkv") == "blocks.0.attn.qkv"
