"""The lynx graph passes, in the order they run.

Each pass is a plain function ``pass_(gm, ctx)`` in its own module, whose docstring opens with
what it matches and what it replaces it with.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.fx as fx

from .fuse_producers import fuse_producers
from .graph import PassContext
from .normalize_linears import normalize_linears
from .quantize_dense_linears import quantize_dense_linears
from .select_linears import select_linears
from .sparsify_linears import sparsify_linears

PIPELINE = [normalize_linears, select_linears, sparsify_linears, quantize_dense_linears, fuse_producers]

DUMP_DIR_ENV = "LYNX_DUMP_DIR"
"""When set, every compiled graph is written there before and after each pass."""


def run_pipeline(gm: fx.GraphModule, ctx: PassContext, dump_dir: str | os.PathLike | None = None) -> None:
    dump_dir = dump_dir or os.environ.get(DUMP_DIR_ENV)
    folder = None
    if dump_dir:
        folder = Path(dump_dir) / f"graph{ctx.graph_index:02d}"
        folder.mkdir(parents=True, exist_ok=True)
    for i, pass_ in enumerate(PIPELINE):
        if folder is not None:
            (folder / f"{i:02d}-{pass_.__name__}-before.py").write_text(gm.print_readable(print_output=False))
        pass_(gm, ctx)
        gm.graph.lint()
        gm.recompile()
        if folder is not None:
            (folder / f"{i:02d}-{pass_.__name__}-after.py").write_text(gm.print_readable(print_output=False))


__all__ = ["PIPELINE", "PassContext", "run_pipeline"]
