"""``lynx-dump``: what the lynx passes do to one model, written to a folder and printed.

Writes the FX graph before and after each pass (numbered in pipeline order), the per-layer table
(text and JSON), a summary (sparse share of linear FLOPs, graph breaks, recompiles when the
batch changes under ``dynamic=True``), and optionally a Graphviz drawing of the rewritten graph
with the lynx ops highlighted. The same graph dumps come out of any ``torch.compile`` run when
``LYNX_DUMP_DIR`` is set.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import torch.fx as fx

from .backend import LynxBackend, trace
from .workloads import (
    Workload,
    WorkloadError,
    add_config_arguments,
    add_workload_arguments,
    config_from_args,
    finish_workload_arguments,
    load_workload,
)


def to_dot(gm: fx.GraphModule, title: str) -> str:
    """Graphviz source of a graph: lynx ops filled orange, dense linears grey."""
    lines = [f'digraph "{title}" {{', "  rankdir=TB; node [shape=box, fontsize=10, style=filled, fillcolor=white];"]
    for node in gm.graph.nodes:
        target = str(node.target)
        label = f"{node.name}\\n{getattr(node.target, '__name__', target)}"[:80].replace('"', "'")
        color = "orange" if "lynx" in target else ("lightgrey" if "linear" in target else "white")
        lines.append(f'  "{node.name}" [label="{label}", fillcolor={color}];')
        for arg in node.all_input_nodes:
            lines.append(f'  "{arg.name}" -> "{node.name}";')
    lines.append("}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lynx-dump", description=__doc__.split("\n\n")[0])
    add_workload_arguments(parser)
    add_config_arguments(parser)
    parser.add_argument("--out", default="lynx-dump", help="output folder (default ./lynx-dump)")
    parser.add_argument("--svg", action="store_true", help="also draw the rewritten graph (graph.dot; graph.svg if Graphviz is installed)")
    args = parser.parse_args(argv)
    finish_workload_arguments(args)
    try:
        config = config_from_args(args)
        workload = load_workload(args)
    except (ValueError, WorkloadError) as err:
        print(f"lynx-dump: error: {err}", file=sys.stderr)
        return 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recorder = LynxBackend(config, inductor=False, dump_dir=str(out / "graphs"))
    report = trace(workload.model, workload.args, workload.kwargs, recorder)
    recompiles = recompiles_on_batch_change(workload, config)

    table = report.table(detailed=True)
    summary = f"{workload.name} ({workload.shape}, {args.dtype}, {args.device}): {report.summary()}"
    if recompiles is not None:
        summary += f"; recompiles when the batch changes (dynamic=True): {recompiles}"
    (out / "layers.txt").write_text(table + "\n")
    (out / "layers.json").write_text(report.to_json())
    (out / "summary.txt").write_text(summary + "\n" + "".join(f"graph break: {b}\n" for b in report.graph_breaks))
    if args.svg:
        for i, gm in enumerate(recorder.graph_modules):
            dot = out / f"graph{i:02d}.dot"
            dot.write_text(to_dot(gm, f"{workload.name} graph {i}"))
            if shutil.which("dot"):
                subprocess.run(["dot", "-Tsvg", str(dot), "-o", str(dot.with_suffix(".svg"))], check=False)
    print(table)
    print(summary)
    print(f"wrote {out}/", file=sys.stderr)
    return 0


def recompiles_on_batch_change(workload: Workload, config) -> int | None:
    """Graphs compiled beyond the first when a ``dynamic=True`` compile sees a second batch size."""
    if workload.make_inputs is None:
        return None
    recorder = LynxBackend(config, inductor=False)
    for batch in (workload.batch + 1, workload.batch + 2):
        args, kwargs = workload.make_inputs(batch)
        trace(workload.model, args, kwargs, recorder, dynamic=True)
    return recorder.report.graphs - 1


if __name__ == "__main__":
    sys.exit(main())
