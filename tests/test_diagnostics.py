"""diagnostics.py: one LynxWarning per cause when a compiled graph runs fewer layers sparse than expected."""

import warnings

import pytest
import torch
import torch.nn as nn
from conftest import D

import lynx_compile
from lynx_compile import LayerDecision, LynxConfig, LynxWarning, diagnostics
from lynx_compile.diagnostics import graph_warnings


@pytest.fixture(autouse=True)
def fresh_causes(monkeypatch):
    monkeypatch.setattr(diagnostics, "_warned", set())


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D), nn.LayerNorm(D)).eval()


def compile_and_run(model, x, config=None):
    """LynxWarnings of compiling ``model`` and running it once (every warning recorded, none filtered)."""
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.compile(model, backend=lynx_compile.LynxBackend(config, inductor=False))(x)
    return [str(w.message) for w in caught if issubclass(w.category, LynxWarning)]


def test_a_2d_input_warns_that_layers_read_as_conditioning():
    (message,) = compile_and_run(mlp(), torch.randn(8, D))
    assert message.startswith("lynx: no tensor of a compiled graph has a token dimension (2-D input")
    assert "per-sample conditioning" in message and "include=" in message and "lynx_compile.explain(" in message
    # Once per cause: the same model compiled again (a new graph of the same cause) stays quiet.
    assert compile_and_run(mlp(), torch.randn(8, D)) == []
    # include= is the way out: the 2-D layers it names run sparse.
    assert compile_and_run(mlp(), torch.randn(8, D), LynxConfig(include="^[13]$")) == []


def test_an_include_that_matches_nothing_warns_with_the_names_it_missed():
    (message,) = compile_and_run(mlp(), torch.randn(2, 8, D), LynxConfig(include="blocks.mlp"))
    assert message.startswith("lynx: include='blocks.mlp' matches none of the 2 linear layers of a compiled graph (e.g. '1')")


def test_a_graph_break_that_demotes_layers_warns_once():
    torch.manual_seed(0)
    model = mlp()

    def forward(x):
        h = model[2](model[1](model[0](x)))
        print("lynx test: a graph break")
        return model[4](model[3](h))

    messages = compile_and_run(forward, torch.randn(2, 8, D))
    assert len(messages) == 1 and messages[0].startswith("lynx: linear layers next to a graph break stay dense (e.g. '3': ")
    assert "fullgraph=True" in messages[0]


def test_graphs_with_sparse_layers_and_explain_stay_quiet():
    assert compile_and_run(mlp(), torch.randn(2, 8, D)) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", LynxWarning)
        report = lynx_compile.explain(mlp(), torch.randn(8, D))
    assert not report.sparse


def test_a_graph_without_sparse_layers_lists_the_reasons():
    layers = [LayerDecision("a", 256, 1024, 8, "mlp_up", "dense", "256 -> 1024 is below min_features=512"),
              LayerDecision("b", 1024, 256, 8, "mlp_down", "dense", "256 -> 1024 is below min_features=512"),
              LayerDecision("c", 256, 8, 8, "final", "dense", "final projection to the model output")]
    ((key, message),) = graph_warnings(layers, LynxConfig(min_features=512), has_token_dim=True).items()
    assert message.startswith("lynx: none of the 3 linear layers of a compiled graph runs sparse "
                              "(2x 256 -> 1024 is below min_features=512; 1x final projection to the model output)")
    assert graph_warnings(layers[:0], LynxConfig(), has_token_dim=True) == {}
    layers[0].decision = "sparse"
    assert graph_warnings(layers, LynxConfig(), has_token_dim=True) == {}
