"""CPU-side checks of lynx_compile.kernels: importing and asking are cheap and safe, reasons are given, the C ABI
is declared once, and the library's host code (sizes, GEMM plans, status text) does what the tuning table says."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lynx_compile import kernels, ops
from lynx_compile.kernels import abi, compilation


def test_import_and_available_on_cpu():
    if torch.cuda.is_available():
        return  # covered by tests/test_kernels_cuda.py
    assert kernels.available() is False
    assert kernels.launch._lib is None  # importing/asking never built anything


def test_unsupported_reason_cpu_device():
    r = kernels.unsupported_reason(torch.device("cpu"), torch.bfloat16, 1152, 3456, 2, 4)
    assert isinstance(r, str) and "CUDA" in r


def test_unsupported_reason_cuda_without_gpu():
    if torch.cuda.is_available():
        return
    r = kernels.unsupported_reason(torch.device("cuda"), torch.bfloat16, 1152, 3456, 2, 4)
    assert isinstance(r, str) and r


def test_unsupported_reason_shapes_and_dtypes(monkeypatch):
    # Pretend a CUDA device exists so the shape/dtype checks are reached.
    monkeypatch.setattr(kernels.support, "cuda_ok", lambda: True)
    dev = torch.device("cuda")
    assert "float32" in kernels.unsupported_reason(dev, torch.float32, 1152, 3456, 2, 4)
    assert "1000" in kernels.unsupported_reason(dev, torch.bfloat16, 1000, 3456, 2, 4)
    assert "2:4" in kernels.unsupported_reason(dev, torch.bfloat16, 1152, 3456, 1, 4)
    assert "out_features" in kernels.unsupported_reason(dev, torch.float16, 1152, 3457, 2, 4)


def test_asking_builds_and_registers_nothing(monkeypatch):
    """On a machine that looks like it has an sm_90 GPU, available() and unsupported_reason() still only
    report what load() found: no build, no library, no kernel registration."""
    if torch.cuda.is_available():
        return
    calls = []
    monkeypatch.setattr(kernels.support, "cuda_ok", lambda: True)
    monkeypatch.setattr(kernels.support, "device_reason", lambda device: None)
    monkeypatch.setattr(compilation, "build", lambda *a, **k: calls.append("build"))
    monkeypatch.setattr(compilation, "build_torch_ops", lambda: calls.append("build_torch_ops"))
    monkeypatch.setattr(kernels.registry, "register", lambda path: calls.append("register"))
    assert kernels.available() is False
    reason = kernels.unsupported_reason(torch.device("cuda", 0), torch.bfloat16, 1152, 3456, 2, 4)
    assert reason.startswith("CUDA kernels not loaded")
    assert calls == [] and kernels.launch._lib is None


def _load_in_a_process(tmp_path, code: str, **variables: str) -> tuple[subprocess.CompletedProcess, Path]:
    """``code`` run in a fresh process whose ``nvcc`` only logs that it ran (to the returned path) and fails."""
    log = tmp_path / "nvcc.log"
    fake_nvcc = tmp_path / "nvcc"
    fake_nvcc.write_text(f"#!/bin/sh\necho ran >> {log}\nexit 1\n")
    fake_nvcc.chmod(0o755)
    env = {**os.environ, "NVCC": str(fake_nvcc), "LYNX_COMPILE_CACHE_DIR": str(tmp_path / "cache"), **variables}
    env.pop("LYNX_COMPILE_LIB", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300), log


def test_load_without_a_gpu_returns_false_without_nvcc(tmp_path):
    """load() on a machine with nvcc but no kernel GPU: False at once, with the reason, and nvcc never runs."""
    if torch.cuda.is_available():
        return
    code = ("import lynx_compile.kernels as k; print(k.load(), k.load(), k.available()); print(k.load_error()); "
            "print(k.torch_ops_error)")
    out, log = _load_in_a_process(tmp_path, code)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "False False False"
    assert "no CUDA device" in lines[1] and "no CUDA device" in lines[2]
    assert not log.exists() and not (tmp_path / "cache").exists()


def test_kernels_switched_off_load_nothing(tmp_path):
    """LYNX_COMPILE_KERNELS=off: load() is False with that reason on any machine, and nvcc never runs."""
    code = "import lynx_compile.kernels as k; print(k.load(), k.available()); print(k.load_error())"
    out, log = _load_in_a_process(tmp_path, code, LYNX_COMPILE_KERNELS="off")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["False False", "LYNX_COMPILE_KERNELS=off"]
    assert not log.exists()


def test_two_processes_building_at_once_share_one_build(tmp_path):
    """The cache is written under a file lock with an atomic rename: concurrent first uses of
    the kernels (two workers starting together) build once and both load the same library."""
    log = tmp_path / "nvcc.log"
    fake_nvcc = tmp_path / "nvcc"
    # Stands in for nvcc: slow enough that the two builds overlap, and it logs every link.
    fake_nvcc.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        out=""; prev=""
        for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done
        case " $* " in *" -shared "*) echo link >> {log};; esac
        sleep 1; echo built > "$out"
        """))
    fake_nvcc.chmod(0o755)
    cutlass = tmp_path / "cutlass"
    (cutlass / "include" / "cute").mkdir(parents=True)
    (cutlass / "include" / "cute" / "tensor.hpp").write_text("")
    env = {**__import__("os").environ, "NVCC": str(fake_nvcc), "CUTLASS_PATH": str(cutlass),
           "LYNX_COMPILE_CACHE_DIR": str(tmp_path / "cache"), "LYNX_COMPILE_JOBS": "2"}
    env.pop("LYNX_COMPILE_LIB", None)
    code = "import lynx_compile.kernels as k; print(k.build(verbose=False))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    paths = {out.strip() for out, _ in outputs}
    assert len(paths) == 1
    library = paths.pop()
    assert open(library).read() == "built\n"
    assert log.read_text().count("link") == 1, "the second process must wait for and reuse the first build"
    leftovers = [p.name for p in (tmp_path / "cache").rglob(".tmp-*")]
    assert not leftovers


# --- The C ABI: declared once in cuda/lynx_api.h ------------------------------------------------------------------

_DEFINITION = re.compile(r"^LYNX_API\s+[\w\s*]+?\b(lynx_\w+)\s*\(", re.M)


def test_the_header_declares_every_entry_point_the_sources_define():
    header = abi.header()
    defined = set()
    for source in abi.SRC_DIR.glob("*.cu"):
        text = source.read_text()
        assert 'extern "C"' not in text, f"{source.name}: entry points are declared in {abi.HEADER} (LYNX_API)"
        defined |= set(_DEFINITION.findall(text))
    assert defined == set(header.functions)
    assert {"LYNX_ABI_VERSION", "LYNX_COMPUTE_CAPABILITY", "LYNX_K_MULTIPLE", "LYNX_N_MULTIPLE"} <= set(header.constants)
    assert kernels.K_MULTIPLE == header.constants["LYNX_K_MULTIPLE"]
    assert kernels.N_MULTIPLE == header.constants["LYNX_N_MULTIPLE"]


def test_the_e4m3_amax_floor_is_one_value_in_the_header_and_the_reference():
    assert 2.0 ** abi.header().constants["LYNX_E4M3_MIN_AMAX_EXP2"] == ops.E4M3_SMALLEST_AMAX
    assert ops.E4M3_MAX / ops.E4M3_SMALLEST_AMAX < torch.finfo(torch.float32).max


def test_ctypes_declarations_come_from_the_header():
    header = abi.header()
    sparsify = header.functions["lynx_sparsify_2to4"]
    assert sparsify.restype == "int" and sparsify.argtypes[:3] == ("int", "const void*", "long long")
    assert sparsify.argtypes[-1] == "cudaStream_t"
    plan = abi.structure("LynxGemmPlan")
    assert [name for name, _ in plan._fields_] == ["config", "swizzle", "raster", "workspace_bytes"]
    for function in header.functions.values():  # every spelling has a ctypes type
        abi.ctype(function.restype)
        for spelling in function.argtypes:
            abi.ctype(spelling)
    assert abi.ctype("LynxGemmPlan*")._type_ is plan
    with pytest.raises(ValueError, match="no ctypes type"):
        abi.ctype("double")


def test_torch_ops_takes_its_entry_points_typed_by_the_header():
    text = (abi.SRC_DIR / "torch_ops.cpp").read_text()
    assert '#include "lynx_api.h"' in text
    resolved = set(re.findall(r"LYNX_RESOLVE\((lynx_\w+)\)", text))
    typed = set(re.findall(r"decltype\(&::(lynx_\w+)\)", text))
    assert resolved and resolved == typed <= set(abi.header().functions)


def _gen_configs():
    spec = importlib.util.spec_from_file_location("gen_configs", abi.SRC_DIR / "gen_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_gemm_sources_match_gen_configs():
    generated = _gen_configs().generate()
    for name, text in generated.items():
        assert (abi.SRC_DIR / name).read_text() == text, f"cuda/{name} is stale: run python cuda/gen_configs.py"
    assert {p.name for p in abi.SRC_DIR.glob("gemm_cfg_*.cu")} == {n for n in generated if n.startswith("gemm_cfg_")}


# --- The library's host code, built without the CUTLASS GEMMs ----------------------------------------------------

_STUB_CONFIGS = """\
#include "gemm_params.h"
// Stands in for the CUTLASS GEMMs: no run, and a workspace of sm_count bytes.
#define LYNX_CONFIG(NAME, IS_BF16)                                                                  \\
  int lynx_gemm_##NAME##_run(const LynxGemmParams&, cudaStream_t) { return LYNX_ERR_RUN; }        \\
  size_t lynx_gemm_##NAME##_ws(const LynxGemmParams& p) { return static_cast<size_t>(p.sm_count); }
#include "lynx_api.h"
#include "configs.inc"
"""


@pytest.fixture(scope="module")
def host_library(tmp_path_factory):
    """The kernel library's host code (api.cu, sparsify.cu) with stub GEMMs, built by nvcc where it is installed."""
    try:
        nvcc = compilation._nvcc()
    except RuntimeError:
        pytest.skip("nvcc not installed")
    out = tmp_path_factory.mktemp("host_library")
    (out / "stub_configs.cu").write_text(_STUB_CONFIGS)
    sources = [str(abi.SRC_DIR / "api.cu"), str(abi.SRC_DIR / "sparsify.cu"), str(out / "stub_configs.cu")]
    library = out / "liblynx_host.so"
    # The host code is under test and no kernel runs here, so the device code stops at PTX (no ptxas).
    flags = [flag.replace(",code=sm_", ",code=compute_") for flag in compilation.nvcc_flags()]
    res = subprocess.run([nvcc, *flags, f"-I{abi.SRC_DIR}", "-shared", "-cudart", "static",
                          *sources, "-o", str(library)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return library


def _plan(lib, dtype_bf16: bool, M: int, N: int, K: int, layer_k: int | None = None, sm_count: int = 132,
          e4m3: bool = False):
    plan = abi.structure("LynxGemmPlan")()
    constants = abi.header().constants
    gemm_type = constants[f"LYNX_GEMM_{'E4M3_' if e4m3 else ''}{'BF16' if dtype_bf16 else 'FP16'}"]
    status = lib.lynx_gemm_plan(gemm_type, M, N, K, layer_k or K, sm_count, ctypes.byref(plan))
    abi.check(lib, status, "GEMM plan")
    name = lib.lynx_config_name(plan.config).decode()
    return name, plan.swizzle, plan.raster, plan.workspace_bytes


def _open_copy(host_library, tmp_path, name):
    # A fresh copy is a fresh library instance: LYNX_GEMM_CONFIG is read on its first plan.
    copy = tmp_path / name
    shutil.copy(host_library, copy)
    return abi.open_library(copy)


def test_metadata_bytes(host_library, tmp_path):
    lib = _open_copy(host_library, tmp_path, "metadata.so")
    assert lib.lynx_metadata_bytes(1, 64) == 64 * 128 // 8
    assert lib.lynx_metadata_bytes(4096, 1152) == 4096 * 1152 // 8


def test_a_library_of_another_abi_version_is_refused(host_library, tmp_path, monkeypatch):
    real = abi.header()
    newer = abi.Header({**real.constants, "LYNX_ABI_VERSION": real.constants["LYNX_ABI_VERSION"] + 1}, real.structs,
                       real.functions)
    monkeypatch.setattr(abi, "header", lambda: newer)
    with pytest.raises(RuntimeError, match="has ABI version"):
        _open_copy(host_library, tmp_path, "stale.so")


def test_status_strings(host_library, tmp_path):
    lib = _open_copy(host_library, tmp_path, "status.so")
    assert lib.lynx_status_string(0) == b"success"
    assert b"argument" in lib.lynx_status_string(-1)
    assert lib.lynx_status_string(-1000 - 2) == b"out of memory"  # cudaErrorMemoryAllocation
    with pytest.raises(RuntimeError, match=r"lynx sparsify failed with code -1: bad argument"):
        abi.check(lib, lib.lynx_sparsify_2to4(1, None, 100, 4, 100, None, None, None, 1, 1e-6, None, 0, None, None), "sparsify")


def test_plans_follow_the_tuning_table_and_the_rule(host_library, tmp_path, monkeypatch):
    monkeypatch.delenv("LYNX_GEMM_CONFIG", raising=False)
    lib = _open_copy(host_library, tmp_path, "plans.so")
    gen = _gen_configs()
    for (M, N, K), (tile, swizzle, raster) in gen.TUNED.items():
        assert _plan(lib, True, M, N, K) == (f"bf16_{tile}", swizzle, raster, 132)
        assert _plan(lib, False, M, N, K, sm_count=114) == (f"fp16_{tile}", swizzle, raster, 114)
        e4m3_tile, e4m3_swizzle, e4m3_raster = gen.TUNED_E4M3.get((M, N, K), (tile, swizzle, raster))
        assert _plan(lib, True, M, N, K, e4m3=True)[:3] == (f"e4m3_bf16_{e4m3_tile}", e4m3_swizzle, e4m3_raster)
        assert _plan(lib, False, M, N, K, e4m3=True)[:3] == (f"e4m3_fp16_{e4m3_tile}", e4m3_swizzle, e4m3_raster)
    assert set(gen.TUNED_E4M3) <= set(gen.TUNED), "an e4m3 plan of a shape the shared table does not tune"
    # A folded LoRA's extra columns plan as the layer's own in_features.
    assert _plan(lib, True, 4096, 3456, 1152 + 128, layer_k=1152)[:3] == ("bf16_128x128_c1x2_pp", 1, 1)
    # The rule: fewer than 200 tiles of 256x128 from M = 1024 up take the 128x128 tile (ping-pong up to K = 2048).
    assert _plan(lib, True, 2048, 2048, 2048)[:3] == ("bf16_128x128_c1x2_pp", 1, 1)  # 8 x 16 = 128 tiles
    assert _plan(lib, True, 2048, 2048, 2112)[:3] == ("bf16_128x128_c1x2_coop", 1, 1)
    assert _plan(lib, False, 4096, 3200, 1024)[:3] == ("fp16_256x128_c2x1_coop", 1, 1)  # 16 x 25 = 400 tiles
    assert _plan(lib, True, 512, 1024, 1024)[:3] == ("bf16_256x128_c2x1_coop", 1, 1)  # M below 1024
    with pytest.raises(RuntimeError, match="bad argument"):
        _plan(lib, True, 64, 64, 0)


@pytest.mark.parametrize("override,bf16,fp16", [
    ("bf16_256x128_c1x2_coop", ("bf16_256x128_c1x2_coop", 1, 0), ("fp16_256x128_c1x2_coop", 1, 0)),
    ("128x128_c1x2_pp:4", ("bf16_128x128_c1x2_pp", 4, 0), ("fp16_128x128_c1x2_pp", 4, 0)),
    ("fp16_256x128_c2x1_coop:8:2", ("bf16_256x128_c2x1_coop", 8, 2), ("fp16_256x128_c2x1_coop", 8, 2)),
])
def test_lynx_gemm_config_forces_a_plan(host_library, tmp_path, monkeypatch, override, bf16, fp16):
    monkeypatch.setenv("LYNX_GEMM_CONFIG", override)
    lib = _open_copy(host_library, tmp_path, "override.so")
    assert _plan(lib, True, 4096, 3456, 1152)[:3] == bf16
    assert _plan(lib, False, 100, 64, 64)[:3] == fp16


def test_lynx_gemm_config_may_force_a_tile_of_the_e4m3_types_only(host_library, tmp_path, monkeypatch):
    tile = next(iter(_gen_configs().E4M3_TILES))
    monkeypatch.setenv("LYNX_GEMM_CONFIG", f"{tile}:2:1")
    lib = _open_copy(host_library, tmp_path, "e4m3_override.so")
    assert _plan(lib, True, 4096, 3456, 1152, e4m3=True)[:3] == (f"e4m3_bf16_{tile}", 2, 1)
    assert _plan(lib, False, 4096, 3456, 1152, e4m3=True)[:3] == (f"e4m3_fp16_{tile}", 2, 1)
    with pytest.raises(RuntimeError, match="no such GEMM configuration for this GEMM type"):
        _plan(lib, True, 4096, 3456, 1152)


@pytest.mark.parametrize("override", ["nonsense", "128x128_c1x2_pp:3", "128x128_c1x2_pp:1:5", "128x128_c1x2_pp:x",
                                      "128x128_c1x2_pp:1:1:1", ":1"])
def test_a_bad_lynx_gemm_config_is_a_clear_error(host_library, tmp_path, monkeypatch, override):
    monkeypatch.setenv("LYNX_GEMM_CONFIG", override)
    lib = _open_copy(host_library, tmp_path, "bad_override.so")
    with pytest.raises(RuntimeError, match="LYNX_GEMM_CONFIG is not <config>"):
        _plan(lib, True, 4096, 3456, 1152)
