"""Command-line setup shared by ``lynx-bench`` and ``lynx-dump``: the model and input options, one
option per ``LynxConfig`` field (generated from the dataclass, help from its field docstrings), and
bad input reported as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import inspect
import re
import sys
import textwrap
import types
import typing
from collections.abc import Mapping
from typing import Any

import torch

from .. import models
from ..compensation import Compensation
from ..config import LynxConfig
from .workloads import (
    DTYPES,
    QUICK_OVERRIDES,
    QUICK_SHAPES,
    QUICK_TEXT_TOKENS,
    SERVING,
    Workload,
    describe_overrides,
    load_workload,
)

COMPENSATION_FILE_FIELDS = ("compensation_state", "sensitivity")
"""``LynxConfig`` fields that hold Python objects: on the command line both come from one saved
``Compensation`` (``--compensation-file``)."""

NO_OPTION_FIELDS = {
    "step_schedule": "a lynx_compile.StepSchedule, set in code (lynx-bench builds one from --steps with --dense-steps "
                     "or --sparse-fraction)",
}
"""``LynxConfig`` fields no tool takes a generated option for, and why; a tool's own ``excluded`` reason replaces it."""

_CONFIG_DEST = "lynx_config_"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except None (the help of such an option says what happens
    without it) and the False of an on/off flag."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or (action.default is False and action.nargs == 0):
            return action.help
        return super()._get_help_string(action)


def plain(text: str) -> str:
    """Docstring text as terminal text: one line, without RST markup."""
    return " ".join(re.sub(r"``(.+?)``", r"\1", text).split())


def make_parser(prog: str, doc: str, note: str = "") -> argparse.ArgumentParser:
    """A parser described by a module docstring: its first paragraph above the options, the rest
    (and ``note``) below them."""
    summary, _, details = doc.strip().partition("\n\n")
    # No abbreviations: with one option per config field, a prefix can name another field than
    # meant (lynx-bench takes no --compensation, and it must not become --compensation-file).
    return argparse.ArgumentParser(prog=prog, description=plain(summary), epilog=plain(f"{details} {note}") or None,
                                   formatter_class=HelpFormatter, allow_abbrev=False)


def error(prog: str, err: BaseException | str, code: int = 2) -> int:
    """Print ``err`` as one line (``prog: error: ...``) to stderr; returns ``code`` (2: bad input)."""
    print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
    return code


# ---- model and inputs ---------------------------------------------------------------------------

def _family(family: str) -> str:
    return "dit-*" if family == "dit" else family


def _shapes(table: Mapping[str, tuple[int, int, bool]]) -> str:
    return "; ".join(f"{_family(family)}: batch {batch}{' x2 (CFG)' if cfg else ''} at {resolution}px"
                     for family, (batch, resolution, cfg) in table.items())


def _quick_sizes() -> str:
    return "; ".join(f"{_family(family)}: {describe_overrides(sizes)}" for family, sizes in QUICK_OVERRIDES.items())


def add_workload_arguments(parser: argparse.ArgumentParser, default_model: str | None = None) -> None:
    group = parser.add_argument_group(
        "model and inputs", f"Built-in models run at serving shapes unless told otherwise ({_shapes(SERVING)}).")
    model_help = f"built-in name ({', '.join(models.NAMES)}), module:factory, or a diffusers class such as DiTTransformer2DModel"
    if default_model is None:
        group.add_argument("model", help=model_help)
    else:
        group.add_argument("--model", default=default_model, help=model_help)
    group.add_argument("--diffusers-config", metavar="CONFIG.json",
                       help="diffusers config: required with a diffusers class; passed to a module:factory as "
                            "factory(config=dict), which must take 'config'; an error with a built-in model")
    group.add_argument("--batch", type=int, help="images per forward, before CFG doubling (default: the serving batch; "
                                                 "1 for a diffusers class)")
    group.add_argument("--resolution", type=int, help="image resolution in pixels (default: the serving resolution; "
                                                      "a diffusers class: its config's sample_size)")
    group.add_argument("--text-tokens", type=int, help="text tokens of PixArt, Flux and SD3 "
                                                       f"(default: the model's own; {QUICK_TEXT_TOKENS} with --quick)")
    group.add_argument("--cfg", action=argparse.BooleanOptionalAction, default=None,
                       help="classifier-free guidance, which doubles the batch (default: as the serving shape says)")
    group.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    group.add_argument("--quick", action="store_true",
                       help=f"small built-in models for CPU and CI: the same architectures at {_quick_sizes()}; "
                            f"inputs {_shapes(QUICK_SHAPES)}; {QUICK_TEXT_TOKENS} text tokens")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args`` plus the defaults that depend on other options (the dtype follows the device)."""
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if str(args.device).startswith("cuda") else "float32"
    return args


def workload_from_args(args: argparse.Namespace) -> Workload:
    """The workload the parsed ``add_workload_arguments`` options describe; WorkloadError if they do not fit together."""
    return load_workload(args.model, diffusers_config=args.diffusers_config, batch=args.batch, resolution=args.resolution,
                         text_tokens=args.text_tokens, cfg=args.cfg, dtype=DTYPES[args.dtype], device=args.device,
                         quick=args.quick)


# ---- LynxConfig -----------------------------------------------------------------------------------

def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (the string literal that follows it), as plain text."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source shipped: options keep their names and defaults
        return {}
    body = ast.parse(source).body[0].body
    docs = {}
    for statement, following in zip(body, body[1:]):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[statement.target.id] = plain(following.value.value)
    return docs


def _comma_set(text: str) -> frozenset[str]:
    return frozenset(item.strip() for item in text.split(",") if item.strip())


def _option_kind(hint: Any) -> str | None:
    """How a field type reads from the command line: 'bool', 'int', 'float', 'str', 'set', or None (a Python object)."""
    is_union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    members = [m for m in typing.get_args(hint) if m is not type(None)] if is_union else [hint]
    kinds = set()
    for member in members:
        origin = typing.get_origin(member) or member
        if origin is bool:
            kinds.add("bool")
        elif origin is int:
            kinds.add("int")
        elif origin is float:
            kinds.add("float")
        elif isinstance(origin, type) and issubclass(origin, str):  # str and string enums
            kinds.add("str")
        elif origin in (frozenset, set, tuple, list):
            kinds.add("set")
        else:
            kinds.add(None)
    return kinds.pop() if len(kinds) == 1 else None


def _enum_values(hint: Any) -> list[str]:
    """The values of the string enum inside a field type (a set of roles...), for the help text."""
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return [member.value for member in hint]
    for arg in typing.get_args(hint):
        found = _enum_values(arg)
        if found:
            return found
    return []


def _show_default(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, (frozenset, set, tuple, list)):
        return ",".join(sorted(str(v.value if isinstance(v, enum.Enum) else v) for v in value))
    return str(value)


def config_option_names(excluded: Mapping[str, str] | None = None) -> dict[str, str]:
    """``LynxConfig`` field -> the option that sets it, or ``"not settable: <reason>"`` for the excluded ones
    (``excluded`` and ``NO_OPTION_FIELDS``)."""
    excluded = {**NO_OPTION_FIELDS, **(excluded or {})}
    names = {}
    for f in dataclasses.fields(LynxConfig):
        if f.name in COMPENSATION_FILE_FIELDS:
            names[f.name] = "--compensation-file"
        elif f.name in excluded:
            names[f.name] = f"not settable: {excluded[f.name]}"
        else:
            names[f.name] = "--" + f.name.replace("_", "-")
    return names


def add_config_arguments(parser: argparse.ArgumentParser, excluded: Mapping[str, str] | None = None) -> None:
    """One option per ``LynxConfig`` field, except ``excluded`` (field -> why the tool sets it
    itself) and ``NO_OPTION_FIELDS``, and ``--compensation-file`` for the ``COMPENSATION_FILE_FIELDS``.

    Options that are not given leave the field at its ``LynxConfig`` default (or, with
    ``--compensation-file``, at the value calibration used)."""
    excluded = {**NO_OPTION_FIELDS, **(excluded or {})}
    group = parser.add_argument_group("lynx config (LynxConfig fields; an option not given keeps the field's default)")
    docs = field_docs(LynxConfig)
    hints = typing.get_type_hints(LynxConfig)
    for f in dataclasses.fields(LynxConfig):
        if f.name in excluded or f.name in COMPENSATION_FILE_FIELDS:
            continue
        kind = _option_kind(hints[f.name])
        if kind is None:
            raise TypeError(f"LynxConfig.{f.name}: no command-line form for {hints[f.name]}; "
                            "give it one in lynx_compile/tools/cli.py or exclude it with a reason")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        doc = docs.get(f.name, "")
        if kind == "set":
            values = _enum_values(hints[f.name])
            doc += f" Comma-separated{', from ' + ', '.join(values) if values else ''}."
        option: dict[str, Any] = dict(dest=_CONFIG_DEST + f.name, default=argparse.SUPPRESS,
                                      help=f"{doc} (default: {_show_default(default)})".strip().replace("%", "%%"))
        if kind == "bool":
            option["action"] = argparse.BooleanOptionalAction
        else:
            option["type"] = {"int": int, "float": float, "str": str, "set": _comma_set}[kind]
            option["metavar"] = "A,B,..." if kind == "set" else f.name.upper()
        group.add_argument("--" + f.name.replace("_", "-"), **option)
    group.add_argument("--compensation-file", metavar="PATH",
                       help=f"a Compensation saved by Compensation.save (see lynx_compile.calibrate): sets "
                            f"{' and '.join(COMPENSATION_FILE_FIELDS)} (its LoRA factors and measured per-layer errors) and, "
                            "unless given here, the layer selection it was calibrated with and compensation=lora")


def config_from_args(args: argparse.Namespace) -> LynxConfig:
    """The ``LynxConfig`` of the parsed ``add_config_arguments`` options; ValueError naming the bad field."""
    given = {key[len(_CONFIG_DEST):]: value for key, value in vars(args).items() if key.startswith(_CONFIG_DEST)}
    path = getattr(args, "compensation_file", None)
    if path is None:
        return LynxConfig(**given)
    try:
        compensation = Compensation.load(path)
    except Exception as err:  # any unreadable file (missing, not a Compensation, corrupt) is one line of bad input
        raise ValueError(f"cannot load --compensation-file {path}: {type(err).__name__}: {err}") from None
    return compensation.config(**given)
