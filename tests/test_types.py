"""types.py: the string enums compare, print, format and serialise as their plain values."""

import json

from lynx_compile import CompensationMode, Decision, LayerDecision, Report, Role
from lynx_compile.config import DEFAULT_SPARSE_ROLES


def test_enums_read_as_their_plain_values():
    assert Role.ATTN_QKV == "attn_qkv" and "sparse" == Decision.SPARSE
    assert str(Role.MLP_DOWN) == f"{Role.MLP_DOWN}" == "mlp_down"
    assert repr(CompensationMode.LORA) == "'lora'"
    assert json.dumps({"role": Role.GRAPH_BREAK, "decision": Decision.DENSE}) == '{"role": "graph_break", "decision": "dense"}'
    assert DEFAULT_SPARSE_ROLES == {"attn_qkv", "mlp_up", "mlp_down"}


def test_every_role_has_a_reason_to_stay_dense():
    assert Role.CONDITIONING.dense_reason.startswith("per-sample conditioning")
    assert Role.MLP_UP.dense_reason == "role mlp_up not in sparse_roles"
    assert all(role.dense_reason for role in Role)


def test_reports_serialise_the_plain_values():
    layer = LayerDecision("blocks.0.mlp.fc1", 256, 1024, 12, Role.MLP_UP, Decision.SPARSE, "reference path (cpu)",
                          "2:4", CompensationMode.NORM)
    payload = json.loads(Report(layers=[layer], graphs=1).to_json())
    assert payload["layers"][0] | {"flops": None} == {
        "name": "blocks.0.mlp.fc1", "in_features": 256, "out_features": 1024, "tokens": 12, "role": "mlp_up",
        "decision": "sparse", "reason": "reference path (cpu)", "pattern": "2:4", "compensation": "norm", "graph": 0,
        "error": None, "precision": None, "producer": None, "flops": None,
    }
    assert "mlp_up" in Report(layers=[layer], graphs=1).table()
