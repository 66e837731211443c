"""CPU-side checks of lynx_compile.kernels: importing is cheap and safe, and reasons are given."""

from __future__ import annotations

import torch

from lynx_compile import kernels


def test_import_and_available_on_cpu():
    if torch.cuda.is_available():
        return  # covered by tests/test_kernels_cuda.py
    assert kernels.available() is False
    assert kernels._lib is None  # importing/asking never built anything


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
    monkeypatch.setattr(kernels, "_cuda_ok", lambda: True)
    dev = torch.device("cuda")
    assert "float32" in kernels.unsupported_reason(dev, torch.float32, 1152, 3456, 2, 4)
    assert "1000" in kernels.unsupported_reason(dev, torch.bfloat16, 1000, 3456, 2, 4)
    assert "2:4" in kernels.unsupported_reason(dev, torch.bfloat16, 1152, 3456, 1, 4)
    assert "out_features" in kernels.unsupported_reason(dev, torch.float16, 1152, 3457, 2, 4)


def test_metadata_bytes():
    assert kernels.metadata_bytes(1, 64) == 64 * 128 // 8
    assert kernels.metadata_bytes(4096, 1152) == 4096 * 1152 // 8


def test_two_processes_building_at_once_share_one_build(tmp_path):
    """The cache is written under a file lock with an atomic rename: concurrent first uses of
    the kernels (two workers starting together) build once and both load the same library."""
    import subprocess
    import sys
    import textwrap

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
