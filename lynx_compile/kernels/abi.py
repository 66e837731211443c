"""The C ABI of the kernel library, read from ``cuda/lynx_api.h``: its constants, and ctypes declarations of its
entry points made from the header's own declarations, so the signatures are written once, in C."""

from __future__ import annotations

import ctypes
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path


def _default_src_dir() -> Path:
    """``cuda/`` ships inside an installed wheel as ``lynx_compile/cuda``; a checkout has it at the top."""
    package = Path(__file__).resolve().parent.parent
    packaged = package / "cuda"
    return packaged if packaged.is_dir() else package.parent / "cuda"


SRC_DIR = Path(os.environ.get("LYNX_COMPILE_CUDA_SRC") or _default_src_dir())
HEADER = "lynx_api.h"


@dataclass(frozen=True)
class Function:
    name: str
    restype: str
    argtypes: tuple[str, ...]


@dataclass(frozen=True)
class Header:
    constants: dict[str, int]
    structs: dict[str, tuple[tuple[str, str], ...]]
    """Struct name -> its (C type, field name) pairs, in order."""
    functions: dict[str, Function]


_CONSTANT = re.compile(r"^#define\s+(LYNX_\w+)\s+(-?\d+)\s*$", re.M)
_STRUCT = re.compile(r"^typedef struct (\w+) \{([^}]*)\} \1;", re.M)
_FIELD = re.compile(r"^\s*([\w\s*]+?)\s*\b(\w+);\s*$", re.M)
_FUNCTION = re.compile(r"^LYNX_API\s+([\w\s*]+?)\s*\b(lynx_\w+)\s*\(([^)]*)\)\s*;", re.M)
_ARGUMENT = re.compile(r"^([\w\s*]+?)\s*\b\w+$")


def _type(spelling: str) -> str:
    """One spelling per C type: single spaces, ``*`` against the type."""
    return re.sub(r"\s*\*", "*", " ".join(spelling.split()))


def parse_header(text: str) -> Header:
    text = re.sub(r"//[^\n]*", "", text)
    constants = {name: int(value) for name, value in _CONSTANT.findall(text)}
    structs = {name: tuple((_type(ctype), field) for ctype, field in _FIELD.findall(body))
               for name, body in _STRUCT.findall(text)}
    functions = {}
    for restype, name, args in _FUNCTION.findall(text):
        argtypes = []
        for arg in args.split(","):
            arg = " ".join(arg.split())
            if arg in ("", "void"):
                continue
            match = _ARGUMENT.match(arg)
            if match is None:
                raise ValueError(f"{HEADER}: cannot read argument {arg!r} of {name}")
            argtypes.append(_type(match.group(1)))
        functions[name] = Function(name, _type(restype), tuple(argtypes))
    return Header(constants, structs, functions)


@functools.cache
def header() -> Header:
    """The ABI as ``cuda/lynx_api.h`` declares it (read once)."""
    return parse_header((SRC_DIR / HEADER).read_text())


_SCALARS = {
    "void": None,
    "int": ctypes.c_int,
    "long long": ctypes.c_longlong,
    "size_t": ctypes.c_size_t,
    "float": ctypes.c_float,
    "const char*": ctypes.c_char_p,
    "cudaStream_t": ctypes.c_void_p,
}


@functools.cache
def structure(name: str) -> type[ctypes.Structure]:
    """The ctypes class of one of the header's structs."""
    fields = [(field, ctype(spelling)) for spelling, field in header().structs[name]]
    return type(name, (ctypes.Structure,), {"_fields_": fields})


def ctype(spelling: str):
    """The ctypes type of a C type spelled as in the header."""
    if spelling in _SCALARS:
        return _SCALARS[spelling]
    if spelling.endswith("*"):
        pointee = spelling[:-1].removeprefix("const ")
        return ctypes.POINTER(structure(pointee)) if pointee in header().structs else ctypes.c_void_p
    raise ValueError(f"{HEADER}: no ctypes type for {spelling!r}")


def open_library(path: Path) -> ctypes.CDLL:
    """Load the kernel library, declare every entry point of the header and check the ABI version."""
    lib = ctypes.CDLL(str(path))
    expected, found = header().constants["LYNX_ABI_VERSION"], lib.lynx_abi_version()  # int() -> int in every version
    if found != expected:
        raise RuntimeError(f"{path} has ABI version {found}, {HEADER} declares {expected} (a stale LYNX_COMPILE_LIB?)")
    for function in header().functions.values():
        entry = getattr(lib, function.name)
        entry.restype = ctype(function.restype)
        entry.argtypes = [ctype(spelling) for spelling in function.argtypes]
    return lib


def check(lib: ctypes.CDLL, status: int, what: str) -> None:
    """Raise on a non-zero return code of an entry point, with the library's message for it."""
    if status != 0:
        raise RuntimeError(f"lynx {what} failed with code {status}: {lib.lynx_status_string(status).decode()}")
