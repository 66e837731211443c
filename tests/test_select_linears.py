"""passes/select_linears.py: which layers run sparse, and the reason recorded for each that does not."""

import torch
import torch.nn as nn
from conftest import D, block_inputs

import lynx_compile
from lynx_compile import LynxConfig, Role


def test_include_exclude_and_roles_override_the_default(block):
    inputs = block_inputs()
    only = lynx_compile.explain(block, *inputs, config=LynxConfig(include=r"^(proj|fc1)$"))
    assert {l.name for l in only.sparse} == {"proj", "fc1"}
    assert {l.reason for l in only.dense} == {"not matched by include"}
    excluded = lynx_compile.explain(block, *inputs, config=LynxConfig(exclude=r"fc"))
    assert {l.name for l in excluded.sparse} == {"qkv"}
    roles = lynx_compile.explain(block, *inputs, config=LynxConfig(sparse_roles={"attn_out"}))
    assert {l.name for l in roles.sparse} == {"proj"}


def test_a_role_left_out_of_sparse_roles_gives_its_reason(block):
    report = lynx_compile.explain(block, *block_inputs(), config=LynxConfig(sparse_roles={Role.MLP_UP}))
    reasons = {layer.name: layer.reason for layer in report.dense}
    assert reasons["proj"] == Role.ATTN_OUT.dense_reason == "attention output projection: outside RT-Lynx's sparse set"
    assert reasons["qkv"] == "role attn_qkv not in sparse_roles"
    assert reasons["head"] == "final projection to the model output"


def test_small_layers_stay_dense_with_a_reason(block):
    report = lynx_compile.explain(block, *block_inputs(), config=LynxConfig(min_features=512))
    assert not report.sparse
    fc1 = next(l for l in report.layers if l.name == "fc1")
    assert fc1.reason == "256 -> 1024 is below min_features=512"


def test_dtypes_without_a_sparse_path_stay_dense_with_a_reason():
    model = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D)).eval()
    report = lynx_compile.explain(model.double(), torch.randn(2, 4, D, dtype=torch.float64))
    assert [l.decision for l in report.layers] == ["dense", "dense"]
    assert report.layers[0].reason.startswith("dtype torch.float64")
