"""lynx-bench in --quick mode on CPU: table, JSON, chart, progress lines, failing rows that do not abort the run."""

import json
import re

import pytest

from lynx_compile.tools import bench
from lynx_compile.tools.bench_output import Row, chart


def test_quick_bench_compares_backends_and_records_the_environment(tmp_path, capsys):
    rc = bench.main(["--quick", "--model", "dit-s-2", "--backends", "eager,inductor,lynx-norm,torchao-24-weight",
                     "--warmup", "1", "--repeat", "2", "--steps", "2", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    printed = captured.out
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

    # The model that ran is named as it ran: quick shrinks dit-s-2 to depth 2, hidden 256.
    assert result["model"] == "dit-s-2 (quick: depth 2, hidden 256)"
    assert result["model_overrides"] == {"depth": 2, "hidden": 256}
    assert printed.splitlines()[0].startswith("dit-s-2 (quick: depth 2, hidden 256) (256px, batch 2")
    # Progress reaches a log that is not a terminal: one line before and one after each backend.
    progress = [line for line in captured.err.splitlines() if line.startswith("[")]
    assert len(progress) == 8 and progress[0] == "[1/4] eager: compiling ..."
    assert re.fullmatch(r"\[1/4\] eager: \d+\.\d\d ms \(compiled in \d+\.\d s\)", progress[1])
    assert progress[-1].startswith("[4/4] torchao-24-weight: FAILED: ")


def test_chart_labels_every_bar_with_latency_and_speedup_and_marks_failures():
    pytest.importorskip("matplotlib")
    rows = [Row("inductor", latency_ms=10.0), Row("lynx-norm", latency_ms=8.0),
            Row("torchao-24-weight", status="failed", error="ModuleNotFoundError: No module named 'torchao'")]
    fig = chart(rows, "dit-xl-2 (quick: depth 2, hidden 256) (256px, batch 2) on cpu")
    ax = fig.axes[0]
    labels = [text.get_text() for text in ax.texts]
    assert labels == ["10.00 ms, 1.00x vs inductor", "8.00 ms, 1.25x vs inductor",
                      "FAILED: ModuleNotFoundError: No module named 'torchao'"]
    assert ax.get_title().startswith("dit-xl-2 (quick: depth 2, hidden 256)")
    # Without plain inductor, the reduce-overhead one is the baseline, and the labels name it.
    graphs = chart([Row("inductor-reduce-overhead", latency_ms=9.0), Row("lynx-norm-reduce-overhead", latency_ms=7.5)], "")
    assert [text.get_text() for text in graphs.axes[0].texts] == [
        "9.00 ms, 1.00x vs inductor-reduce-overhead", "7.50 ms, 1.20x vs inductor-reduce-overhead"]
    assert [tick.get_text() for tick in ax.get_yticklabels()] == ["inductor", "lynx-norm", "torchao-24-weight"]


def test_rounds_time_the_backends_interleaved_and_report_their_range(tmp_path, capsys):
    rc = bench.main(["--quick", "--model", "dit-s-2", "--backends", "eager,lynx-none", "--warmup", "0", "--repeat", "1",
                     "--rounds", "3", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert rc == 0
    rounds = [line.split(":")[0] for line in captured.err.splitlines() if line.startswith("round ")]
    assert rounds == ["round 1/3", "round 2/3", "round 3/3"]
    assert "latency ms (round range)" in captured.out
    result = json.loads(next(tmp_path.glob("bench-dit-s-2-quick-cpu.json")).read_text())
    assert result["rounds"] == 3
    for row in result["rows"]:
        assert len(row["round_latency_ms"]) == 3
        assert min(row["round_latency_ms"]) <= row["latency_ms"] <= max(row["round_latency_ms"])
    assert {r["backend"]: r["sparse_layers"] for r in result["rows"]} == {"eager": None, "lynx-none": "6/14"}


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--backends", "eager,nope"], "unknown backend(s) nope"),
        (["--rounds", "0"], "--rounds and --repeat must be >= 1"),
        (["--model", "dit-s-2", "--diffusers-config", "nope.json"], "does not apply to the built-in model 'dit-s-2'"),
    ],
)
def test_bad_input_is_a_one_line_error(argv, message, capsys):
    assert bench.main(["--quick", "--no-save", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lynx-bench: error: ") and message in err


def test_compensation_is_chosen_by_the_backend_names(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", "--compensation", "none"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --compensation none" in capsys.readouterr().err
