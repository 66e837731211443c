"""lynx-dump on tiny models: files written, table printed, one-line errors, drawings that Graphviz can read."""

import json
import os
import re
import shutil
import subprocess

import pytest
import torch
import torch.fx as fx

from lynx_compile.tools import dump


def test_dump_writes_graphs_table_summary_and_drawing(tmp_path, capsys):
    out = tmp_path / "dump"
    assert dump.main(["dit-s-2", "--quick", "--out", str(out), "--svg"]) == 0
    printed = capsys.readouterr().out
    assert "blocks.0.mlp.fc2" in printed and "6 of 14 linear layers sparse" in printed
    assert "recompiles when the batch changes (dynamic=True): 0" in printed
    passes = sorted(p.name for p in (out / "graphs").rglob("*.py"))
    assert passes[0].startswith("00-normalize_linears") and passes[-1].startswith("04-fuse_producers")
    layers = json.loads((out / "layers.json").read_text())["layers"]
    assert {l["decision"] for l in layers} == {"sparse", "dense"}
    assert "sparse GFLOP" in (out / "layers.txt").read_text()
    dot = next(out.glob("graph*.dot")).read_text()
    assert "fillcolor=orange" in dot


def test_config_options_mirror_lynx_config(tmp_path, capsys):
    argv = ["mmdit-tiny", "--quick", "--out", str(tmp_path), "--pattern", "1:4", "--exclude", "single", "--min-features", "0"]
    assert dump.main(argv) == 0
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
        (["dit-s-2", "--diffusers-config", "nope.json"], "does not apply to the built-in model 'dit-s-2'"),
        (["DiTTransformer2DModel", "--diffusers-config", "nope.json"], "cannot read diffusers config nope.json"),
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
    argv = ["DiTTransformer2DModel", "--diffusers-config", str(config), "--batch", "2", "--min-features", "0",
            "--out", str(tmp_path / "d")]
    assert dump.main(argv) == 0
    assert "model.transformer_blocks.0.ff.net.2" in capsys.readouterr().out


_DOT_STRING = r'"(?:[^"\\\n]|\\.)*"'
_DOT_LINE = re.compile(rf"  {_DOT_STRING} \[label={_DOT_STRING}, fillcolor=\w+\];|  {_DOT_STRING} -> {_DOT_STRING};")


def _graph_with_targets(names):
    """A graph calling one function per name, each function's __name__ set to that name."""
    graph = fx.Graph()
    value = graph.placeholder("x")
    for name in names:
        fn = lambda x: x
        fn.__name__ = name
        value = graph.call_function(fn, (value,))
    graph.output(value)
    return fx.GraphModule(torch.nn.Module(), graph)


def test_dot_is_valid_for_any_label(tmp_path):
    # Backslashes and quotes at and around the cut of long labels, a raw newline, and a node name
    # as long as a whole label (a cut at 80 characters would split the name/target line break).
    names = ["a" * n + "\\" + '"' * 3 + "b" * 5 for n in range(30, 45)] + ['say "hi"\nand\\', "\\" * 60, "c" * 79]
    dot = dump.to_dot(_graph_with_targets(names), 'model "quoted" \\')
    lines = dot.splitlines()
    assert re.fullmatch(rf"digraph {_DOT_STRING} {{", lines[0]) and lines[-1] == "}"
    for line in lines[2:-1]:
        assert _DOT_LINE.fullmatch(line), line
    labels = re.findall(r'label="((?:[^"\\]|\\.)*)"', dot)
    assert any(label.endswith("\\n" + "a" * 36 + "\\\\...") for label in labels)  # the cut falls on a backslash
    assert any(label.endswith("\\n" + "a" * 33 + "\\\\" + '\\"' * 3 + "...") for label in labels)
    if shutil.which("dot"):
        (tmp_path / "g.dot").write_text(dot)
        subprocess.run(["dot", "-Tsvg", str(tmp_path / "g.dot"), "-o", str(tmp_path / "g.svg")], check=True)


def test_drawing_without_graphviz_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "no-graphviz-here"))
    gm = _graph_with_targets(["relu"])
    assert [p.name for p in dump.draw([gm, gm], tmp_path, "m")] == ["graph00.dot", "graph01.dot"]
    assert capsys.readouterr().err.strip() == "graph00.dot, graph01.dot written; install Graphviz for SVG"
    assert not list(tmp_path.glob("*.svg"))


def mlp():
    """A ``module:factory`` model for the tests of what comes after the trace: one small graph."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(256), torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
    return model, (torch.randn(2, 8, 256),)


def test_failing_graphviz_fails_the_dump_with_its_message(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "bin" / "dot"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'Error: syntax error in line 3' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert dump.main([f"{__name__}:mlp", "--out", str(tmp_path / "d"), "--svg"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lynx-dump: error: Graphviz (dot) failed on ")
    assert "graph00.dot with exit code 1: Error: syntax error in line 3" in err[-1]
