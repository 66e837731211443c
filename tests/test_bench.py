"""lynx-bench in --quick mode on CPU: table, JSON, failing rows that do not abort the run."""

import json

from lynx_compile import bench


def test_quick_bench_compares_backends_and_records_the_environment(tmp_path, capsys):
    rc = bench.main(["--quick", "--model", "dit-s-2", "--backends", "eager,inductor,lynx-norm,torchao-24-weight",
                     "--warmup", "1", "--repeat", "2", "--steps", "2", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert rc == 1, "torchao is not installed, so its row fails and the exit code says so"
    assert "vs inductor" in printed and "lynx-norm" in printed and "FAILED" in printed
    result = json.loads(next(tmp_path.glob("bench-dit-s-2-quick-cpu.json")).read_text())
    assert {"date", "torch", "device"} <= set(result)
    rows = {r["backend"]: r for r in result["rows"]}
    assert rows["inductor"]["status"] == rows["lynx-norm"]["status"] == "ok"
    assert rows["torchao-24-weight"]["status"] == "failed" and rows["torchao-24-weight"]["error"]
    assert rows["lynx-norm"]["sparse_layers"] == "6/14"
    assert 0 < rows["lynx-norm"]["rel_error"] < 0.5 and rows["inductor"]["rel_error"] < 1e-4
    assert rows["lynx-norm"]["sampling_s"] > 0


def test_unknown_backend_is_a_one_line_error(capsys):
    assert bench.main(["--quick", "--backends", "eager,nope", "--no-save"]) == 2
    assert capsys.readouterr().err.strip().startswith("lynx-bench: error: unknown backend(s) nope")
