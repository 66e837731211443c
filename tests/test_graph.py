"""passes/graph.py: qualified names and the graph breaks around a graph."""

import torch
import torch.nn as nn

from lynx_compile.passes.graph import GraphBreaks, graph_breaks, qualified_name


def test_qualified_names_match_named_modules():
    assert qualified_name("L['self']._modules['blocks']._modules['11']._modules['mlp']._modules['fc2']") == "blocks.11.mlp.fc2"
    assert qualified_name("L['self'].transformer_blocks[3].ff.net[2]") == "transformer_blocks.3.ff.net.2"
    assert qualified_name("L['self']._orig_mod.blocks[0].attn.qkv") == "blocks.0.attn.qkv"


def test_a_graph_traced_outside_dynamo_borders_on_no_graph_break():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(8, 8), nn.GELU()))
    assert graph_breaks(gm) == GraphBreaks(inputs=False, outputs=False)
