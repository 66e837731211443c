"""passes/normalize_linears.py: every spelling of a linear layer becomes one F.linear, then one sparse op."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import D, masked_reference, relative_error

import lynx_compile


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
