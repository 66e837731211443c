"""passes/roles.py: the role of each linear layer, read from the graph's structure, also across graph breaks."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import Block, D, block_inputs

import lynx_compile


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
    report = lynx_compile.explain(block, *block_inputs())
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


class BrokenMLP(nn.Module):
    """An embedder of the model input, an MLP split by a graph break, and a final projection."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.embed, self.norm = nn.Linear(32, D), nn.LayerNorm(D)
        self.fc1, self.fc2, self.head = nn.Linear(D, 4 * D), nn.Linear(4 * D, D), nn.Linear(D, 8)

    def forward(self, x):
        h = self.fc1(self.norm(self.embed(x)))
        if self.how == "print":
            print("lynx test: a graph break")
        elif h.abs().max().item() > 1e30:  # .item() breaks the graph too
            h = h / 2
        h = self.fc2(F.gelu(h))
        return self.head(self.norm(h))


@pytest.mark.parametrize("how", ["print", "item"])
def test_layers_next_to_a_graph_break_say_so(how):
    torch.manual_seed(0)
    report = lynx_compile.explain(BrokenMLP(how).eval(), torch.randn(2, 6, 32))
    assert report.graphs == 2 and report.graph_breaks
    assert decisions(report) == {
        "embed": ("embedder", "dense"),  # reads the model's input: no graph break before it
        "fc1": ("graph_break", "dense"),
        "fc2": ("graph_break", "dense"),
        "head": ("final", "dense"),  # the model's output: no graph break after it
    }
    reasons = {layer.name: layer.reason for layer in report.layers}
    assert reasons["fc1"] == "output goes to a graph break"
    assert reasons["fc2"] == "input comes from a graph break"


class PrintingBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(D), nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x):
        h = self.fc1(self.norm(x))
        print("lynx test: a graph break inside a submodule")
        return x + self.fc2(F.gelu(h))


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.block, self.norm, self.head = nn.Linear(32, D), PrintingBlock(), nn.LayerNorm(D), nn.Linear(D, 8)

    def forward(self, x):
        h = self.block(self.embed(x))
        return self.head(self.norm(h))


def test_a_graph_break_inside_a_submodule_is_seen_from_both_sides():
    torch.manual_seed(0)
    report = lynx_compile.explain(Outer().eval(), torch.randn(2, 6, 32))
    # Dynamo compiles the submodule as a frame of its own, so its layers are named from it down.
    roles = {(layer.name, layer.role) for layer in report.layers}
    assert roles == {("embed", "embedder"), ("fc1", "graph_break"), ("fc2", "graph_break"), ("head", "final")}
