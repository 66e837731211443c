"""The tensor-core probe's generated source: every variant's MMA is well formed, and ptxas keeps the
MMAs pipelined (a serialised MMA would make the probe time a slower path than real kernels get)."""

import importlib
import re
import shutil
import subprocess
import sys

import pytest
from conftest import BENCHMARKS

sys.path.insert(0, str(BENCHMARKS))
ceiling = importlib.import_module("tensor_core_ceiling")

MMA = re.compile(r"wgmma\.mma_async(\.sp)?\.sync\.aligned\.m64n(\d+)k(\d+)\.f32\.(\w+)\.(\w+) \{([^}]*)\}, ([^;]*);")


def test_variants_cover_both_loops_and_every_a_source():
    vs = ceiling.variants()
    assert len({v.name for v in vs}) == len(vs)
    for dtype in ("bf16", "e4m3"):
        assert {(v.fed, v.a_source) for v in vs if v.sparse and v.dtype == dtype} == {
            (False, "smem"), (False, "registers"), (True, "smem"), (True, "registers"), (True, "global")}
    for v in vs:
        assert v.accumulators <= 128, v.name  # more does not fit next to the operands
        assert v.smem_bytes <= 227 * 1024, v.name


def test_only_e4m3_names_carry_the_type():
    # bf16 names stay those of the results files whose rows have no type.
    bf16 = ceiling.variants(("bf16",))
    assert {v.dtype for v in bf16} == {"bf16"} and len(bf16) == 28
    assert {"sparse_smem_n128_wg1", "dense_registers_n256_wg2", "sparse_global_n128_wg2_m128_fed"} <= {v.name for v in bf16}
    e4m3 = ceiling.variants(("e4m3",))
    assert [v.name for v in e4m3] == ["e4m3_" + v.name for v in bf16]
    assert ceiling.variants() == bf16 + e4m3


def test_dtypes_option():
    assert ceiling.parse_dtypes("bf16,e4m3") == ("bf16", "e4m3")
    assert ceiling.parse_dtypes(" e4m3 ") == ("e4m3",)
    for bad in ("fp8", "", "bf16,e5m2"):
        with pytest.raises(ValueError):
            ceiling.parse_dtypes(bad)


@pytest.mark.parametrize("variant", ceiling.variants(), ids=lambda v: v.name)
def test_each_mma_names_its_operands(variant):
    src = ceiling.source([variant])
    mmas = MMA.findall(src)
    per_loop_trip = variant.k_per_loop_trip // variant.k_per_instruction * variant.m_subtiles
    assert len(mmas) == per_loop_trip * (2 if variant.fed else 1)  # the fed loop is unrolled by two stages
    for sp, n, k, atype, btype, regs, rest in mmas:
        assert bool(sp) == variant.sparse and int(n) == variant.n and int(k) == variant.k_per_instruction
        assert atype == btype == variant.dtype
        assert len(regs.split(",")) == variant.n // 2
        ops = [o.strip() for o in re.sub(r"\{[^}]*\}", "A", rest).split(",")]
        # A (descriptor or register block), B descriptor, [metadata, selector 0], scale-d, scale-a, scale-b,
        # then bf16's transposes (none for A in registers); FP8 has none.
        sparse_ops = [ops[2], "0"] if variant.sparse else []
        scales = ["p", "1", "1"]
        transposes = [] if variant.dtype == "e4m3" else ["0"] if variant.a_source != "smem" else ["0", "0"]
        assert ops[2:] == sparse_ops + scales + transposes, rest


def test_e4m3_shapes_halve_the_bytes_per_mac():
    for sparse in (False, True):
        for n in (128, 256):
            bf16 = ceiling.Variant(sparse, "smem", n, 2)
            e4m3 = ceiling.Variant(sparse, "smem", n, 2, dtype="e4m3")
            assert e4m3.k_per_instruction == 2 * bf16.k_per_instruction == (64 if sparse else 32)
            # The same bytes per instruction, twice the K: half the bytes per MAC.
            assert e4m3.bare_b_bytes * 2 == bf16.bare_b_bytes == n * 128 * 2
            # A is laid out in whole 128-byte swizzle rows: a sparse e4m3 A stores 64 bytes of each.
            assert bf16.bare_a_bytes == (8192 if sparse else 16384)
            assert e4m3.bare_a_bytes == 8192
    # A 128-byte swizzle row holds 64 bf16 and 128 e4m3: the next row block starts at 64 and 128 columns.
    assert ceiling._k_offset(32, 128, 1) == 2 and ceiling._k_offset(64, 128, 1) == 4
    assert ceiling._k_offset(128, 128, 1) == ceiling._k_offset(64, 128, 2) == 128 * 128 // 16
    assert ceiling._k_offset(130, 256, 1) == (256 * 128 + 2) // 16


def test_e4m3_bare_loop_walks_one_swizzle_row():
    # 128 logical K of e4m3 is one 128-byte row: the B descriptor steps 32 bytes (dense) or 64 (sparse).
    for sparse, b_steps, a_steps in ((False, ["0", "2", "4", "6"], ["0", "2", "4", "6"]), (True, ["0", "4"], ["0", "2"])):
        src = ceiling.source([ceiling.Variant(sparse, "smem", 128, 1, dtype="e4m3")])
        assert re.findall(r'"l"\(desc_b \+ (\d+)\)', src) == b_steps
        assert re.findall(r'"l"\(desc_a \+ (\d+)\)', src) == a_steps
        assert "fill_operands(smem, " in src and ", true);" in src


def test_stage_fill_matches_the_operand_sizes():
    v = ceiling.Variant(True, "smem", 128, 2, True, 128)
    # 256x128 tile, K 64: B 128 x 64 bf16, A 256 x 32 kept bf16, metadata 2 bits per kept value.
    assert v.fill_bytes == {"b": 16384, "a": 16384, "meta": 2048}
    assert ceiling.Variant(True, "registers", 256, 2, True, 64).fill_bytes == {"b": 32768}
    # e4m3: a stage is one swizzle row deep, 128 K, the same bytes of B and A; the metadata doubles
    # (twice the kept values) and fills every thread's register of each instruction's block.
    e = ceiling.Variant(True, "smem", 128, 2, True, 128, "e4m3")
    assert e.k_per_stage == 128 and e.steps_per_stage == 2
    assert e.fill_bytes == {"b": 16384, "a": 16384, "meta": 4096}
    assert e.fill_bytes["meta"] == e.stage_bytes - e.stage_meta_offset
    assert e.stage_bytes == v.stage_bytes
    assert ceiling.Variant(False, "smem", 256, 2, True, 64, "e4m3").steps_per_stage == 4
    # Both count the same logical FLOPs per SM per byte-identical stage, twice for e4m3.
    assert ceiling.flops_per_group(e, 1) == 2 * ceiling.flops_per_group(v, 1)


def _row(family, dtype, sparse, a_source, n, tflops, tile=None):
    row = {"family": family, "sparse": sparse, "a_source": a_source, "n": n, "tile": tile, "tflops": tflops}
    if dtype is not None:
        row["dtype"] = dtype
    return row


def test_over_dense_is_within_the_type():
    rows = [
        _row("bare", None, False, "smem", 128, 900.0),  # a row without a type is bf16
        _row("bare", "bf16", False, "registers", 128, 1000.0),
        _row("bare", "bf16", True, "smem", 128, 1500.0),
        _row("bare", "e4m3", False, "smem", 128, 1800.0),
        _row("bare", "e4m3", False, "registers", 128, 2000.0),
        _row("bare", "e4m3", True, "registers", 128, 3000.0),
        _row("bare", "e4m3", True, "smem", 256, 2600.0),
        _row("bare", "e4m3", False, "smem", 256, 2000.0),
        _row("fed", "e4m3", False, "smem", 128, 1200.0, "256x128"),
        _row("fed", "e4m3", True, "smem", 128, 1800.0, "256x128"),
        _row("fed", "bf16", False, "smem", 128, 600.0, "256x128"),
    ]
    ceiling.add_over_dense(rows)
    assert [r["over_dense"] for r in rows] == pytest.approx([0.9, 1.0, 1.5, 0.9, 1.0, 1.5, 1.3, 1.0, 1.0, 1.5, 1.0])
    summary = ceiling.summarise(rows)
    assert summary["bare"]["best_over_best_dense"] == pytest.approx(
        {"dense_smem": 0.9, "dense_registers": 1.0, "sparse_smem": 1.5,
         "e4m3_dense_smem": 1.0, "e4m3_dense_registers": 1.0, "e4m3_sparse_registers": 1.5, "e4m3_sparse_smem": 1.3})
    assert summary["fed"]["best_tflops"] == {"e4m3_dense_smem": 1200.0, "e4m3_sparse_smem": 1800.0, "dense_smem": 600.0}
    assert summary["fed"]["best_over_best_dense"]["e4m3_sparse_smem"] == pytest.approx(1.5)


def test_spills_read_from_ptxas():
    log = """ptxas info    : Function properties for dense_smem_n128_wg1
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 90 registers, used 1 barriers
ptxas info    : Function properties for e4m3_sparse_registers_n256_wg2
    8 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
"""
    assert ceiling.spills(log) == ["e4m3_sparse_registers_n256_wg2"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (no GPU needed)")
def test_builds_without_serialised_mma(tmp_path):
    # build() refuses ptxas's serialisation warnings and spills itself; one variant of each kind keeps it short.
    kinds = {}
    for v in ceiling.variants():
        kinds.setdefault((v.fed, v.sparse, v.a_source, v.dtype), v)
    exe = ceiling.build(list(kinds.values()), tmp_path, shutil.which("nvcc"))
    assert exe.exists()
    log = (tmp_path / "ptxas.log").read_text()
    for v in kinds.values():
        assert f"Function properties for {v.name}\n" in log, v.name
    if shutil.which("cuobjdump"):
        sass = subprocess.run(["cuobjdump", "--dump-sass", str(exe)], capture_output=True, text=True).stdout
        assert "QGMMA.SP.64x" in sass and ".F32.E4M3.E4M3" in sass
