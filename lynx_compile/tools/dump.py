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

from ..backend import LynxBackend, trace
from ..config import LynxConfig
from . import cli
from .workloads import Workload

LABEL_PART_CHARS = 40
"""Characters of a node's name, and of its target, shown in a drawing before they are cut."""


class RenderError(RuntimeError):
    """Graphviz could not render a drawing."""


def _dot_string(text: str, limit: int | None = None) -> str:
    """``text`` as the inside of a quoted DOT string. Cut before escaping, so that the cut can
    never split an escape and leave a backslash in front of the closing quote."""
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def to_dot(gm: fx.GraphModule, title: str) -> str:
    """Graphviz source of a graph: lynx ops filled orange, dense linears grey."""
    lines = [f'digraph "{_dot_string(title)}" {{', "  rankdir=TB; node [shape=box, fontsize=10, style=filled, fillcolor=white];"]
    for node in gm.graph.nodes:
        target = str(node.target)
        name = _dot_string(node.name)
        shown_target = getattr(node.target, "__name__", target)
        label = f"{_dot_string(node.name, LABEL_PART_CHARS)}\\n{_dot_string(shown_target, LABEL_PART_CHARS)}"
        color = "orange" if "lynx" in target else ("lightgrey" if "linear" in target else "white")
        lines.append(f'  "{name}" [label="{label}", fillcolor={color}];')
        for arg in node.all_input_nodes:
            lines.append(f'  "{_dot_string(arg.name)}" -> "{name}";')
    lines.append("}")
    return "\n".join(lines)


def draw(graph_modules: list[fx.GraphModule], out: Path, title: str) -> list[Path]:
    """``graphNN.dot`` for every graph, rendered to ``graphNN.svg`` where Graphviz is installed
    (without it, stderr says so). Returns the .dot files; RenderError when Graphviz fails."""
    dots = []
    for i, gm in enumerate(graph_modules):
        dots.append(out / f"graph{i:02d}.dot")
        dots[-1].write_text(to_dot(gm, f"{title} graph {i}"))
    graphviz = shutil.which("dot")
    if graphviz is None:
        print(f"{', '.join(d.name for d in dots)} written; install Graphviz for SVG", file=sys.stderr)
        return dots
    for dot in dots:
        done = subprocess.run([graphviz, "-Tsvg", str(dot), "-o", str(dot.with_suffix(".svg"))], capture_output=True, text=True)
        if done.returncode != 0:
            message = " ".join((done.stderr or done.stdout).split()) or "no message"
            raise RenderError(f"Graphviz (dot) failed on {dot} with exit code {done.returncode}: {message}")
    return dots


def recompiles_on_batch_change(workload: Workload, config: LynxConfig) -> int | None:
    """Graphs compiled beyond the first when a ``dynamic=True`` compile sees a second batch size."""
    if workload.make_inputs is None:
        return None
    recorder = LynxBackend(config, inductor=False)
    for batch in (workload.batch + 1, workload.batch + 2):
        args, kwargs = workload.make_inputs(batch)
        trace(workload.model, args, kwargs, recorder, dynamic=True)
    return recorder.report.graphs - 1


def build_parser() -> argparse.ArgumentParser:
    parser = cli.make_parser("lynx-dump", __doc__)
    cli.add_workload_arguments(parser)
    cli.add_config_arguments(parser)
    group = parser.add_argument_group("output")
    group.add_argument("--out", default="lynx-dump", help="output folder")
    group.add_argument("--svg", action="store_true",
                       help="also draw the rewritten graphs: graphNN.dot, and graphNN.svg with Graphviz (dot) installed")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = cli.parse_args(build_parser(), argv)
    try:
        config = cli.config_from_args(args)
        workload = cli.workload_from_args(args)
    except ValueError as err:
        return cli.error("lynx-dump", err)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recorder = LynxBackend(config, inductor=False, dump_dir=str(out / "graphs"))
    report = trace(workload.model, workload.args, workload.kwargs, recorder)
    recompiles = recompiles_on_batch_change(workload, config)

    table = report.table(detailed=True)
    summary = f"{workload.label} ({workload.shape}, {args.dtype}, {args.device}): {report.summary()}"
    if recompiles is not None:
        summary += f"; recompiles when the batch changes (dynamic=True): {recompiles}"
    (out / "layers.txt").write_text(table + "\n")
    (out / "layers.json").write_text(report.to_json())
    (out / "summary.txt").write_text(summary + "\n" + "".join(f"graph break: {b}\n" for b in report.graph_breaks))
    print(table)
    print(summary)
    if args.svg:
        try:
            draw(recorder.graph_modules, out, workload.label)
        except RenderError as err:  # not bad input: exit 1
            return cli.error("lynx-dump", err, code=1)
    print(f"wrote {out}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
