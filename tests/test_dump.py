"""lynx-dump on tiny models: files written, table printed, one-line errors."""

import json

import pytest

from lynx_compile import dump


def test_dump_writes_graphs_table_summary_and_drawing(tmp_path, capsys):
    out = tmp_path / "dump"
    assert dump.main(["dit-s-2", "--quick", "--out", str(out), "--svg"]) == 0
    printed = capsys.readouterr().out
    assert "blocks.0.mlp.fc2" in printed and "6 of 14 linear layers sparse" in printed
    assert "recompiles when the batch changes (dynamic=True): 0" in printed
    passes = sorted(p.name for p in (out / "graphs").rglob("*.py"))
    assert passes[0].startswith("00-normalize_linears") and passes[-1].startswith("02-sparsify_linears")
    layers = json.loads((out / "layers.json").read_text())["layers"]
    assert {l["decision"] for l in layers} == {"sparse", "dense"}
    assert "sparse GFLOP" in (out / "layers.txt").read_text()
    dot = next(out.glob("graph*.dot")).read_text()
    assert "fillcolor=orange" in dot


def test_config_options_mirror_lynx_config(tmp_path, capsys):
    assert dump.main(["mmdit-tiny", "--quick", "--out", str(tmp_path), "--pattern", "1:4", "--exclude", "single", "--min-features", "0"]) == 0
    layers = json.loads((tmp_path / "layers.json").read_text())["layers"]
    sparse = [l for l in layers if l["decision"] == "sparse"]
    assert sparse and all(l["pattern"] == "1:4" and "single" not in l["name"] for l in sparse)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["no-such-model"], "unknown model 'no-such-model'"),
        (["dit-s-2", "--pattern", "5:4"], "LynxConfig.pattern"),
        (["dit-s-2", "--compensation", "lowrank"], "LynxConfig.compensation"),
        (["no_such_module:factory"], "cannot load factory"),
    ],
)
def test_bad_input_is_a_one_line_error(argv, message, capsys, tmp_path):
    assert dump.main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lynx-dump: error:") and message in err and "\n" not in err


def test_diffusers_class_with_config(tmp_path, capsys):
    pytest.importorskip("diffusers")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"num_attention_heads": 2, "attention_head_dim": 64, "in_channels": 4, "num_layers": 1,
                                  "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 10}))
    assert dump.main(["DiTTransformer2DModel", "--config", str(config), "--batch", "2", "--min-features", "0", "--out", str(tmp_path / "d")]) == 0
    assert "model.transformer_blocks.0.ff.net.2" in capsys.readouterr().out
