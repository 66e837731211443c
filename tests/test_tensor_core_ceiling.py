"""The tensor-core probe's generated source: every variant's MMA is well formed, and ptxas keeps the
MMAs pipelined (a serialised MMA would make the probe time a slower path than real kernels get)."""

import importlib
import re
import shutil
import sys

import pytest
from conftest import BENCHMARKS

sys.path.insert(0, str(BENCHMARKS))
ceiling = importlib.import_module("tensor_core_ceiling")


def test_variants_cover_both_loops_and_every_a_source():
    vs = ceiling.variants()
    assert len({v.name for v in vs}) == len(vs)
    assert {(v.fed, v.a_source) for v in vs if v.sparse} == {
        (False, "smem"), (False, "registers"), (True, "smem"), (True, "registers"), (True, "global")}
    for v in vs:
        assert v.accumulators <= 128, v.name  # more does not fit next to the operands
        assert v.smem_bytes <= 227 * 1024, v.name


@pytest.mark.parametrize("variant", ceiling.variants(), ids=lambda v: v.name)
def test_each_mma_names_its_operands(variant):
    src = ceiling.source([variant])
    mmas = re.findall(r"wgmma\.mma_async(\.sp)?\.sync\.aligned\.m64n(\d+)k(\d+)\.f32\.bf16\.bf16 \{([^}]*)\}", src)
    group_k = ceiling.K_PER_STAGE if variant.fed else ceiling.K_PER_GROUP
    per_loop_trip = group_k // variant.k_per_instruction * variant.m_subtiles
    assert len(mmas) == per_loop_trip * (2 if variant.fed else 1)  # the fed loop is unrolled by two stages
    for sp, n, k, regs in mmas:
        assert bool(sp) == variant.sparse and int(n) == variant.n and int(k) == variant.k_per_instruction
        assert len(regs.split(",")) == variant.n // 2


def test_stage_fill_matches_the_operand_sizes():
    v = ceiling.Variant(True, "smem", 128, 2, True, 128)
    # 256x128 tile, K 64: B 128 x 64 bf16, A 256 x 32 kept bf16, metadata 2 bits per kept value.
    assert v.fill_bytes == {"b": 16384, "a": 16384, "meta": 2048}
    assert ceiling.Variant(True, "registers", 256, 2, True, 64).fill_bytes == {"b": 32768}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (no GPU needed)")
def test_builds_without_serialised_mma(tmp_path):
    # build() refuses ptxas's serialisation warnings itself; one variant of each kind keeps it short.
    kinds = {}
    for v in ceiling.variants():
        kinds.setdefault((v.fed, v.sparse, v.a_source), v)
    exe = ceiling.build(list(kinds.values()), tmp_path, shutil.which("nvcc"))
    assert exe.exists()
