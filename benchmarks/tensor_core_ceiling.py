"""How fast can Hopper's tensor cores run the 2:4 sparse MMA at all? (GPU, sm_90a, needs ``nvcc``)

One file, past the usual size: the CUDA source it generates and the harness that times it change together.

    python benchmarks/tensor_core_ceiling.py

``benchmarks/gemm.py`` times whole GEMMs. This probe times the instruction underneath them, to say
how far any sparse GEMM on this GPU can get above dense and what would limit it. Two loops:

* **bare**: every SM runs one block of 1-3 warpgroups, each issuing ``wgmma`` back to back on
  operands that stay in shared memory (A optionally in registers), with no loads, no epilogue and
  nothing else on the SM. No kernel built from the instruction can beat this rate.
* **fed**: the same MMAs in a warp-specialised mainloop (a producer warpgroup refills a 4-deep ring
  of K stages one 128-byte swizzle row deep with bulk copies from an L2-resident buffer behind full/empty barriers, two
  consumer warpgroups), for a 256x128 and a 128x256 tile. It has no cluster multicast, so where it
  falls short of the bare rate, L2 bandwidth is part of why (``ncu`` shows which).

Instructions, fp32 accumulate, bf16 in (``--dtypes bf16``):
* ``dense``: ``wgmma.mma_async`` m64nNk16, A and B from shared memory (what cuBLAS runs);
* ``dense, A in registers``;
* ``sparse``: ``wgmma.mma_async.sp`` m64nNk32 with 2:4 metadata, A (compressed) and B from shared
  memory (what the lynx GEMM, built on CUTLASS, runs);
* ``sparse, A in registers``: fixed register values, the best case of a fused prologue that selects
  the activation straight into the MMA's registers and pays nothing for it;
* ``sparse, A loaded from L2 to registers`` (fed only): each consumer thread loads its dense slice of
  x per instruction and feeds half of it, the fused prologue's traffic without its selection arithmetic.

and the same five in FP8 e4m3 (``--dtypes e4m3``; names start ``e4m3_``; the default runs both):
dense ``wgmma.mma_async`` m64nNk32 and sparse ``wgmma.mma_async.sp`` m64nNk64, the instructions of the
e4m3 sparse GEMM (CUTLASS's sm90 sparse FP8 collective, 128-deep K tiles). An e4m3 instruction does
twice the K of its bf16 counterpart on the same bytes (32 of stored A per row, 64 of B for sparse), so
the shared-memory layout is the same and the bytes per MAC are half. FP8 takes no transpose: both
operands are K-major, as here. The 2:4 metadata register of the k64 instruction covers 32 K of one
row per thread, so all 128 threads supply metadata and the sparsity selector is 0 (bf16's k32 uses
half the threads, picked by the selector). A fed stage, one swizzle row, is 64 K deep in bf16 and 128
in e4m3: the same bytes. The bare loop commits every 128 K in both, as a 128-deep mainloop stage does:
2 sparse e4m3 instructions a commit where bf16 has 4. Each row's ``over dense`` is against dense of its
own type, so the e4m3 rows give the most the e4m3 sparse GEMM can gain over an FP8 dense GEMM.

N is the instruction's N (128 or 256): A bytes per MAC fall as 1/N, B bytes per MAC do not.
Throughput counts logical FLOPs (2 M N K, the pruned zeros included), so ``sparse`` over ``dense``
is the speedup a 2:4 kernel shows. Each variant runs several times, interleaved with the others,
and the median is kept. The SM clock each ran at is read inside the kernel (``clock64`` over
``globaltimer``): the sparse MMA draws more power, and the clock drops.

The CUDA source is generated here (an MMA names up to 128 accumulator registers) and built with
``nvcc`` into a standalone program; it is a measuring probe, not one of the lynx kernels in
``cuda/``. Writes ``benchmarks/results/tensor-core-ceiling-<gpu>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

K_PER_GROUP = 128  # logical K between commits in the bare loop, as in a 128-deep mainloop stage
STAGES = 4
SWIZZLE_ROW_BYTES = 128  # the 128-byte swizzle: K-major rows of 128 bytes, 8-row atoms of 1 KB
META_BYTES_PER_WGMMA = 512  # one 32-bit metadata register per thread of the warpgroup
ELEMENT_BYTES = {"bf16": 2, "e4m3": 1}
DTYPES = tuple(ELEMENT_BYTES)
# The device function that makes one 32-bit word of operand values of each type (in the PRELUDE).
OPERAND_WORD = {"bf16": "bf16_pair", "e4m3": "e4m3_quad"}


def stage_k(dtype: str) -> int:
    """Logical K of a fed stage: one 128-byte swizzle row (64 bf16, 128 e4m3)."""
    return SWIZZLE_ROW_BYTES // ELEMENT_BYTES[dtype]


@dataclass(frozen=True)
class Variant:
    """One probe kernel.

    ``fed`` False is the bare loop: operands sit in shared memory and nothing refills them. ``fed``
    True adds a producer warpgroup that refills a ``STAGES``-deep ring of ``k_per_stage``-deep stages with
    bulk copies from an L2-resident buffer, behind full/empty barriers, as a GEMM mainloop does
    (without cluster multicast, so L2 bandwidth takes part).
    ``a_source`` is where the MMA's A comes from: ``"smem"``, ``"registers"`` (fixed values; for a
    fused prologue, the best case where producing them costs nothing), or ``"global"`` (each consumer
    thread loads its dense 32-byte slice of x, 16 bf16 or 32 e4m3, from L2 per instruction and feeds half of it, the
    fused prologue's traffic without its selection arithmetic).
    ``dtype`` is the operand type, ``"bf16"`` or ``"e4m3"``; only e4m3 names carry it, so that bf16
    names stay those of the results files whose rows have no type.
    """

    sparse: bool
    a_source: str
    n: int
    warpgroups: int
    fed: bool = False
    m_per_warpgroup: int = 64
    dtype: str = "bf16"

    @property
    def name(self) -> str:
        kind = f"{'sparse' if self.sparse else 'dense'}_{self.a_source}_n{self.n}_wg{self.warpgroups}"
        kind = f"{kind}_m{self.m_per_warpgroup}_fed" if self.fed else kind
        return kind if self.dtype == "bf16" else f"{self.dtype}_{kind}"

    @property
    def label(self) -> str:
        where = {"smem": "", "registers": ", A in registers", "global": ", A loaded from L2 to registers"}[self.a_source]
        return ("sparse" if self.sparse else "dense") + where

    @property
    def element_bytes(self) -> int:
        return ELEMENT_BYTES[self.dtype]

    @property
    def operand_word(self) -> str:
        return OPERAND_WORD[self.dtype]

    @property
    def k_per_instruction(self) -> int:
        """Every variant's instruction reads 32 bytes of stored A per row: K 16 / 32 (sparse) for bf16,
        32 / 64 for e4m3."""
        return 32 * self.a_packing // self.element_bytes

    @property
    def k_per_stage(self) -> int:
        return stage_k(self.dtype)

    @property
    def k_per_loop_trip(self) -> int:
        return self.k_per_stage if self.fed else K_PER_GROUP

    @property
    def a_packing(self) -> int:
        """Logical K columns per stored column of A: a 2:4 operand stores half."""
        return 2 if self.sparse else 1

    @property
    def m_subtiles(self) -> int:
        return self.m_per_warpgroup // 64

    @property
    def steps_per_stage(self) -> int:
        return self.k_per_stage // self.k_per_instruction

    @property
    def a_registers(self) -> int:
        """32-bit A registers a consumer thread holds per fed stage: 4 per instruction."""
        return self.m_subtiles * self.steps_per_stage * 4

    @property
    def accumulators(self) -> int:
        return self.m_subtiles * self.n // 2  # fp32 per thread: m_per_warpgroup x N over 128 threads

    @property
    def tile(self) -> str:
        return f"{self.m_per_warpgroup * self.warpgroups}x{self.n}"

    # Bare loop: B is N x 128 values (bf16: two 64-wide column blocks of N 128-byte rows; e4m3: one
    # block), A per warpgroup is 64 rows x 128 logical K, of which a 2:4 operand stores half.
    @property
    def bare_b_bytes(self) -> int:
        return self.n * K_PER_GROUP * self.element_bytes

    @property
    def bare_a_bytes(self) -> int:
        # Whole 128-byte swizzle rows: the descriptor strides rows by 128 bytes even where a stored row
        # is shorter (a 2:4 e4m3 A stores 64 bytes of its 128 logical K).
        stored_row_bytes = K_PER_GROUP // self.a_packing * self.element_bytes
        return 64 * -(-stored_row_bytes // SWIZZLE_ROW_BYTES) * SWIZZLE_ROW_BYTES

    # Fed pipeline, per stage: A rows are 128-byte swizzle rows (a 2:4 A uses the first 64 bytes of
    # each), metadata one block per instruction, B N rows.
    @property
    def m_tile(self) -> int:
        return self.m_per_warpgroup * self.warpgroups

    @property
    def stage_a_offset(self) -> int:
        return self.n * SWIZZLE_ROW_BYTES

    @property
    def stage_meta_offset(self) -> int:
        return self.stage_a_offset + self.m_tile * SWIZZLE_ROW_BYTES

    @property
    def stage_bytes(self) -> int:
        meta = self.m_tile // 64 * self.steps_per_stage * META_BYTES_PER_WGMMA if self.sparse else 0
        return self.stage_meta_offset + meta

    @property
    def fill_bytes(self) -> dict[str, int]:
        """Bytes a GEMM brings into shared memory per stage (B, then A and its metadata if they come that way)."""
        parts = {"b": self.n * self.k_per_stage * self.element_bytes}
        if self.a_source == "smem":
            parts["a"] = self.m_tile * self.k_per_stage * self.element_bytes // self.a_packing
            if self.sparse:
                # 2 bits per kept value. bf16 fills half of each instruction's metadata block (half the
                # threads supply it), e4m3 all of it.
                parts["meta"] = self.m_tile * self.k_per_stage // 8
        return parts

    @property
    def smem_bytes(self) -> int:
        if not self.fed:
            return self.bare_b_bytes + self.warpgroups * self.bare_a_bytes
        return STAGES * self.stage_bytes + 2 * STAGES * 8  # the ring, then its full and empty barriers

    @property
    def threads(self) -> int:
        return 128 * (self.warpgroups + self.fed)


def variants(dtypes: tuple[str, ...] | list[str] = DTYPES) -> list[Variant]:
    out = []
    for dtype in dtypes:
        bare = [Variant(sparse, a, n, wg, dtype=dtype)
                for n in (128, 256) for wg in (1, 2, 3) for sparse in (False, True) for a in ("smem", "registers")
                if not (n == 256 and wg == 3)]  # 3 x 128 accumulators do not fit the register file
        fed = [Variant(sparse, a, n, 2, True, m, dtype)
               for (m, n) in ((128, 128), (64, 256))
               for sparse, a in ((False, "smem"), (True, "smem"), (True, "registers"), (True, "global"))]
        out += bare + fed
    return out


def parse_dtypes(text: str) -> tuple[str, ...]:
    dtypes = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [t for t in dtypes if t not in ELEMENT_BYTES]
    if unknown or not dtypes:
        raise ValueError(f"--dtypes takes a comma-separated subset of {', '.join(DTYPES)}, not {text!r}")
    return dtypes


def _wgmma(v: Variant, acc0: int, a_expr: str | list[str], b_expr: str, meta_expr: str | None, indent: str) -> str:
    """One wgmma as an asm statement: accumulators d[acc0:acc0 + N/2], A a descriptor or 4 registers, B a descriptor."""
    acc = v.n // 2
    regs = ", ".join(f"%{i}" for i in range(acc))
    in_registers = isinstance(a_expr, list)
    nxt = acc  # operand numbering after the accumulators: A, B descriptor, [metadata]
    if in_registers:
        a_op = "{" + ", ".join(f"%{nxt + i}" for i in range(4)) + "}"
        nxt += 4
    else:
        a_op = f"%{nxt}"
        nxt += 1
    b_op = f"%{nxt}"
    nxt += 1
    # Metadata register, then sparsity selector 0: for bf16 (k32) half the threads supply metadata and
    # the selector says which half; for e4m3 (k64) every thread does, and 0 is the only selector allowed.
    sp = f" %{nxt}, 0," if v.sparse else ""
    # scale-a, scale-b, then for bf16 [trans-a,] trans-b (0: K-major); FP8 has no transpose operands.
    if v.dtype != "bf16":
        trans = "1, 1"
    else:
        trans = "1, 1, 0" if in_registers else "1, 1, 0, 0"
    opcode = (f"wgmma.mma_async{'.sp' if v.sparse else ''}.sync.aligned.m64n{v.n}k{v.k_per_instruction}"
              f".f32.{v.dtype}.{v.dtype}")
    outs = ", ".join(f'"+f"(d[{acc0 + i}])' for i in range(acc))
    a_in = ", ".join(f'"r"({r})' for r in a_expr) if in_registers else f'"l"({a_expr})'
    ins = [a_in, f'"l"({b_expr})'] + ([f'"r"({meta_expr})'] if v.sparse else [])
    return (f'{indent}asm volatile("{{ .reg .pred p; setp.ne.b32 p, 1, 0; {opcode} {{{regs}}}, {a_op}, {b_op},{sp} p, {trans}; }}"\n'
            f"{indent}    : {outs}\n{indent}    : {', '.join(ins)});\n")


def _k_offset(k_stored: int, rows: int, element_bytes: int = 2) -> int:
    """Descriptor offset (16-byte units) of stored column k_stored of a K-major operand of ``rows`` rows,
    kept as blocks of 128-byte swizzle rows (64 bf16 or 128 e4m3 columns to a block)."""
    block, within = divmod(k_stored, SWIZZLE_ROW_BYTES // element_bytes)
    return (block * rows * SWIZZLE_ROW_BYTES + within * element_bytes) >> 4


def _bare_kernel(v: Variant) -> str:
    if v.a_source == "registers":
        a_setup = ("  unsigned a_regs[8];\n"
                   f"  for (int i = 0; i < 8; ++i) a_regs[i] = {v.operand_word}(threadIdx.x * 8 + i);\n")
    else:
        a_setup = f"  const unsigned long long desc_a = smem_desc(base + {v.bare_b_bytes} + (threadIdx.x / 128) * {v.bare_a_bytes});\n"
    body = ""
    for step in range(K_PER_GROUP // v.k_per_instruction):
        k0 = step * v.k_per_instruction
        a = ([f"a_regs[{(step * 4 + i) % 8}]" for i in range(4)] if v.a_source == "registers"
             else f"desc_a + {_k_offset(k0 // v.a_packing, 64, v.element_bytes)}")
        body += _wgmma(v, 0, a, f"desc_b + {_k_offset(k0, v.n, v.element_bytes)}", "meta" if v.sparse else None, "    ")
    return f"""
extern "C" __global__ void __launch_bounds__({v.threads}, 1)
{v.name}(long long groups, unsigned long long* timing, float* sink, const uint4* l2_buffer) {{
  extern __shared__ __align__(1024) unsigned char smem[];
  fill_operands(smem, {v.smem_bytes}, {_e4m3_flag(v)});
  const unsigned base = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const unsigned long long desc_b = smem_desc(base);
{a_setup}{_metadata_setup(v)}  float d[{v.accumulators}];
  for (int i = 0; i < {v.accumulators}; ++i) d[i] = 0.f;
  const unsigned long long clock0 = clock64(), time0 = global_ns();
  for (long long g = 0; g < groups; ++g) {{
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
{body}    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
  }}
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
  const unsigned long long clock1 = clock64(), time1 = global_ns();
  if (threadIdx.x == 0) {{ timing[2 * blockIdx.x] = clock1 - clock0; timing[2 * blockIdx.x + 1] = time1 - time0; }}
{_keep_alive(v)}}}
"""


def _e4m3_flag(v: Variant) -> str:
    return "true" if v.dtype == "e4m3" else "false"


def _metadata_setup(v: Variant) -> str:
    if not v.sparse:
        return ""
    # Every nibble a valid 2:4 code (two distinct kept positions, ascending), varied across threads.
    # A nibble covers 4 logical values whatever their type, so the same word serves bf16 and e4m3.
    return "  const unsigned meta = (threadIdx.x & 1) ? 0xE4D8C94Eu : 0x4E9C8DE4u;\n"


def _keep_alive(v: Variant) -> str:
    return (f"  float s = 0.f;\n  for (int i = 0; i < {v.accumulators}; ++i) s += d[i];\n"
            "  if (s == 1234.5f) sink[threadIdx.x] = s;  // keeps the accumulators live\n")


def _fed_consumer_group(v: Variant, buf: int) -> str:
    """One stage's worth of a consumer warpgroup: wait for the stage, issue its MMAs from A buffer
    ``buf`` (when A is in registers), prefetch the next stage's A into the other buffer, release the
    previous stage."""
    ind = "      "
    out = f"{ind}bar_wait(full_bar + stage * 8, phase);\n"
    out += f"{ind}const unsigned stage_base = base + stage * {v.stage_bytes};\n"
    steps, n_regs = v.steps_per_stage, v.a_registers
    if v.sparse and v.a_source == "smem":
        for j in range(v.m_subtiles):
            for k in range(steps):
                blk = f"(consumer * {v.m_subtiles} + {j}) * {steps} + {k}"
                out += (f"{ind}const unsigned meta_{j}_{k} = ld_shared_u32(stage_base + {v.stage_meta_offset} + "
                        f"({blk}) * {META_BYTES_PER_WGMMA} + (threadIdx.x % 128) * 4);\n")
    out += f'{ind}asm volatile("wgmma.fence.sync.aligned;" ::: "memory");\n'
    for j in range(v.m_subtiles):
        for k in range(steps):
            k0 = k * v.k_per_instruction
            if v.a_source == "smem":
                rows = f"(consumer * {v.m_per_warpgroup} + {64 * j})"
                a = f"smem_desc(stage_base + {v.stage_a_offset} + {rows} * {SWIZZLE_ROW_BYTES}) + {_k_offset(k0 // v.a_packing, 64, v.element_bytes)}"
            else:
                # Fixed registers need no second buffer: nothing rewrites them under an MMA in flight.
                a = [f"a{buf if v.a_source == 'global' else 0}[{(j * steps + k) * 4 + i}]" for i in range(4)]
            b = f"smem_desc(stage_base) + {_k_offset(k0, v.n, v.element_bytes)}"
            meta = (f"meta_{j}_{k}" if v.a_source == "smem" else "meta") if v.sparse else None
            out += _wgmma(v, j * v.n // 2, a, b, meta, ind)
    out += f'{ind}asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");\n'
    if v.a_source == "global":
        # The next stage's dense slices: 2 x 16 bytes per instruction, issued before the wait so
        # their latency hides behind this stage's MMAs.
        out += f"{ind}uint4 next[{n_regs // 2}];\n"
        out += (f"{ind}for (int i = 0; i < {n_regs // 2}; ++i) next[i] = ld_l2(l2_buffer + "
                f"((g + 1) * {n_regs // 2 * v.warpgroups * 128} + (threadIdx.x - 128) * {n_regs // 2} + i) % l2_vectors);\n")
    out += f'{ind}asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");\n'
    out += f"{ind}if (g > 0 && threadIdx.x % 128 == 0) bar_arrive(empty_bar + ((stage + {STAGES - 1}) % {STAGES}) * 8);\n"
    if v.a_source == "global":
        # Half the loaded values become the next A (the selection would keep 2 of 4); the rest are
        # folded in so that every load is used.
        other = 1 - buf
        out += (f"{ind}for (int i = 0; i < {n_regs // 4}; ++i) {{ a{other}[4 * i] = next[2 * i].x ^ next[2 * i + 1].x; "
                f"a{other}[4 * i + 1] = next[2 * i].y ^ next[2 * i + 1].y; a{other}[4 * i + 2] = next[2 * i].z ^ next[2 * i + 1].z; "
                f"a{other}[4 * i + 3] = next[2 * i].w ^ next[2 * i + 1].w; }}\n")
    out += f"{ind}++g; if (++stage == {STAGES}) {{ stage = 0; phase ^= 1; }}\n"
    return out


def _fed_kernel(v: Variant) -> str:
    n_regs = v.a_registers
    a_setup = ""
    if v.a_source != "smem":
        # Through an opaque move, so that ptxas keeps them in registers instead of recomputing them
        # between MMAs (which serialises the MMAs).
        a_setup = (f"    unsigned a0[{n_regs}];\n    for (int i = 0; i < {n_regs}; ++i) "
                   f'asm volatile("mov.b32 %0, %1;" : "=r"(a0[i]) : "r"({v.operand_word}(threadIdx.x * 64 + i)));\n')
    if v.a_source == "global":
        a_setup += f"    unsigned a1[{n_regs}];\n"
    produce = "".join(
        f"        bulk_copy(stage_base + {off}, l2_buffer, ((blockIdx.x * {STAGES} + stage) * {v.stage_bytes} + {off}) / 16 % l2_vectors, {nbytes}, full_bar + stage * 8);\n"
        for off, nbytes in _fill_regions(v))
    producer = f"""    if (threadIdx.x == 0) {{
      unsigned stage = 0, phase = 0;
      for (long long g = 0; g < groups; ++g) {{
        bar_wait(empty_bar + stage * 8, phase ^ 1);
        const unsigned stage_base = base + stage * {v.stage_bytes};
        bar_arrive_expect_tx(full_bar + stage * 8, {sum(v.fill_bytes.values())});
{produce}        if (++stage == {STAGES}) {{ stage = 0; phase ^= 1; }}
      }}
    }}"""
    return f"""
extern "C" __global__ void __launch_bounds__({v.threads}, 1)
{v.name}(long long groups, unsigned long long* timing, float* sink, const uint4* l2_buffer) {{
  extern __shared__ __align__(1024) unsigned char smem[];
  fill_operands(smem, {STAGES * v.stage_bytes}, {_e4m3_flag(v)});
  const unsigned base = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const unsigned full_bar = base + {STAGES * v.stage_bytes}, empty_bar = full_bar + {STAGES * 8};
  const long long l2_vectors = L2_BUFFER_BYTES / 16;
  if (threadIdx.x == 0) {{
    for (int s = 0; s < {STAGES}; ++s) {{ bar_init(full_bar + 8 * s, 1); bar_init(empty_bar + 8 * s, {v.warpgroups}); }}
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }}
  __syncthreads();
  if (threadIdx.x < 128) {{
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
{producer}
  }} else {{
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
{"    const int consumer = threadIdx.x / 128 - 1;" + chr(10) if v.a_source == "smem" else ""}{a_setup}{_metadata_setup(v).replace("  const", "    const") if v.a_source != "smem" else ""}    float d[{v.accumulators}];
    for (int i = 0; i < {v.accumulators}; ++i) d[i] = 0.f;
    const unsigned long long clock0 = clock64(), time0 = global_ns();
    unsigned stage = 0, phase = 0;
    for (long long g = 0; g < groups;) {{
      {{
{_fed_consumer_group(v, 0)}      }}
      {{
{_fed_consumer_group(v, 1)}      }}
    }}
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    const unsigned long long clock1 = clock64(), time1 = global_ns();
    if (threadIdx.x == 128) {{ timing[2 * blockIdx.x] = clock1 - clock0; timing[2 * blockIdx.x + 1] = time1 - time0; }}
  {_keep_alive(v).replace(chr(10) + "  ", chr(10) + "    ")}  }}
}}
"""


def _fill_regions(v: Variant) -> list[tuple[int, int]]:
    """(offset in the stage, bytes) of each part a producer writes per stage."""
    where = {"b": 0, "a": v.stage_a_offset, "meta": v.stage_meta_offset}
    return [(where[part], nbytes) for part, nbytes in v.fill_bytes.items()]


PRELUDE = r"""
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <algorithm>
#include <cuda_runtime.h>

#define CHECK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
  fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); exit(1); } } while (0)

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t; asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t)); return t;
}

// K-major, 128-byte swizzle; 8-row atoms 1 KB apart (stride byte offset), leading byte offset unused.
__device__ __forceinline__ unsigned long long smem_desc(unsigned addr) {
  return ((addr & 0x3FFFFu) >> 4) | (1ull << 16) | ((1024ull >> 4) << 32) | (1ull << 62);
}

// bf16 values in [1, 2) with varied mantissas: zeros would let the tensor cores idle on power.
__device__ __forceinline__ unsigned bf16_pair(unsigned i) {
  unsigned h = i * 2654435761u;
  return 0x3F803F80u | ((h >> 9) & 0x007F0000u) | ((h >> 25) & 0x7Fu);
}

// e4m3 values in [1, 2) (exponent 7, the bias) with varied mantissas, four to a word.
__device__ __forceinline__ unsigned e4m3_quad(unsigned i) {
  unsigned h = i * 2654435761u;
  return 0x38383838u | ((h >> 8) & 0x07070707u);
}

__device__ __forceinline__ unsigned operand_word(unsigned i, bool e4m3) { return e4m3 ? e4m3_quad(i) : bf16_pair(i); }

// Big enough that bulk copies and the fused-prologue loads hit distinct lines, small enough for L2.
#define L2_BUFFER_BYTES (16ll << 20)

__device__ __forceinline__ void bar_init(unsigned bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void bar_arrive(unsigned bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void bar_arrive_expect_tx(unsigned bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bar_wait(unsigned bar, unsigned parity) {
  unsigned done;
  do {
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  } while (!done);
}
__device__ __forceinline__ void bulk_copy(unsigned dst, const uint4* buffer, long long vector, unsigned bytes, unsigned bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(dst), "l"(buffer + vector), "r"(bytes), "r"(bar) : "memory");
}
__device__ __forceinline__ unsigned ld_shared_u32(unsigned addr) {
  unsigned v; asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr) : "memory"); return v;
}
__device__ __forceinline__ uint4 ld_l2(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.b32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ void fill_operands(unsigned char* smem, int bytes, bool e4m3) {
  for (int i = threadIdx.x; i < bytes / 4; i += blockDim.x) reinterpret_cast<unsigned*>(smem)[i] = operand_word(i, e4m3);
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  __syncthreads();
}
"""


def _host(vs: list[Variant]) -> str:
    table = ",\n".join(f'  {{"{v.name}", (const void*){v.name}, {v.threads}, {v.smem_bytes}, {_e4m3_flag(v)}}}' for v in vs)
    return f"""
struct Entry {{ const char* name; const void* fn; int threads; int smem; bool e4m3; }};
static const Entry kEntries[] = {{
{table}
}};

__global__ void fill_buffer(uint4* p, long long n, bool e4m3) {{
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    p[i] = make_uint4(operand_word(4 * i, e4m3), operand_word(4 * i + 1, e4m3), operand_word(4 * i + 2, e4m3),
                      operand_word(4 * i + 3, e4m3));
}}

int main(int argc, char** argv) {{
  // argv[1]: variant name, argv[2]: groups (stages) per warpgroup. Prints one JSON line.
  if (argc != 3) {{ fprintf(stderr, "usage: %s VARIANT GROUPS\\n", argv[0]); return 2; }}
  const Entry* e = nullptr;
  for (const Entry& c : kEntries) if (!strcmp(c.name, argv[1])) e = &c;
  if (!e) {{ fprintf(stderr, "unknown variant %s\\n", argv[1]); return 2; }}
  long long groups = atoll(argv[2]) / 2 * 2;  // the fed loops run stages in pairs
  cudaDeviceProp prop; CHECK(cudaGetDeviceProperties(&prop, 0));
  const int blocks = prop.multiProcessorCount;
  CHECK(cudaFuncSetAttribute(e->fn, cudaFuncAttributeMaxDynamicSharedMemorySize, e->smem));
  unsigned long long* timing; float* sink; uint4* buffer;
  const long long slack = 1 << 20;  // a copy that starts near the end may run past it
  CHECK(cudaMalloc(&timing, 16 * blocks)); CHECK(cudaMalloc(&sink, 4 * 1024));
  CHECK(cudaMalloc(&buffer, L2_BUFFER_BYTES + slack));
  fill_buffer<<<1024, 256>>>(buffer, (L2_BUFFER_BYTES + slack) / 16, e->e4m3);
  cudaEvent_t t0, t1; CHECK(cudaEventCreate(&t0)); CHECK(cudaEventCreate(&t1));
  long long warm = groups / 20 * 2 + 2;
  void* args_warm[] = {{&warm, &timing, &sink, &buffer}};
  CHECK(cudaLaunchKernel(e->fn, blocks, e->threads, args_warm, e->smem, 0));
  void* args[] = {{&groups, &timing, &sink, &buffer}};
  CHECK(cudaEventRecord(t0));
  CHECK(cudaLaunchKernel(e->fn, blocks, e->threads, args, e->smem, 0));
  CHECK(cudaEventRecord(t1));
  CHECK(cudaEventSynchronize(t1));
  CHECK(cudaGetLastError());
  float ms; CHECK(cudaEventElapsedTime(&ms, t0, t1));
  std::vector<unsigned long long> h(2 * blocks);
  CHECK(cudaMemcpy(h.data(), timing, 16 * blocks, cudaMemcpyDeviceToHost));
  double mhz = 0; for (int b = 0; b < blocks; ++b) mhz += double(h[2 * b]) / double(h[2 * b + 1]) * 1e3 / blocks;
  printf("{{\\"ms\\": %.6f, \\"groups\\": %lld, \\"sms\\": %d, \\"clock_mhz\\": %.1f}}\\n", ms, groups, blocks, mhz);
  return 0;
}}
"""


def source(vs: list[Variant]) -> str:
    return PRELUDE + "".join(_fed_kernel(v) if v.fed else _bare_kernel(v) for v in vs) + _host(vs)


def build(vs: list[Variant], workdir: Path, nvcc: str) -> Path:
    src, exe = workdir / "tensor_core_ceiling.cu", workdir / "tensor_core_ceiling"
    src.write_text(source(vs))
    cmd = [nvcc, "-O3", "-DNDEBUG", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a",
           "-Xptxas", "-v", str(src), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed:\n{log}")
    # ptxas serialises wgmma (warning C7510) when it cannot keep the accumulators in place: then the
    # probe would time a slower path than a real kernel gets, so refuse.
    if "C7510" in log or "serializ" in log.lower():
        raise RuntimeError(f"ptxas serialised wgmma:\n{log}")
    # Likewise a spilled accumulator or A register would add local-memory traffic no real kernel has.
    spilled = spills(log)
    if spilled:
        raise RuntimeError(f"ptxas spilled registers in {', '.join(spilled)}:\n{log}")
    (workdir / "ptxas.log").write_text(log)
    return exe


def spills(ptxas_log: str) -> list[str]:
    """The functions that ``-Xptxas -v`` reports with spill stores or loads."""
    found = re.findall(r"Function properties for (\S+)\s+\d+ bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                       ptxas_log)
    return [name for name, stores, loads in found if int(stores) or int(loads)]


def flops_per_group(v: Variant, sms: int) -> float:
    """Logical FLOPs of one loop trip (a K_PER_GROUP group of the bare loop, a stage of the fed one) over all SMs."""
    if not v.fed:
        return 2.0 * 64 * v.n * K_PER_GROUP * v.warpgroups * sms
    return 2.0 * v.m_tile * v.n * v.k_per_stage * sms


def family(v: Variant) -> str:
    return "fed" if v.fed else "bare"


def add_over_dense(rows: list[dict]) -> None:
    """Each row against the best dense row of its family and operand type with the same instruction N
    (bare) or tile (fed): FP8 sparse over FP8 dense, bf16 over bf16. Rows without ``dtype`` are bf16."""
    for r in rows:
        peers = [q["tflops"] for q in rows if q["family"] == r["family"] and not q["sparse"] and q["n"] == r["n"]
                 and q["tile"] == r["tile"] and q.get("dtype", "bf16") == r.get("dtype", "bf16")]
        r["over_dense"] = r["tflops"] / max(peers) if peers else None


def summarise(rows: list[dict]) -> dict:
    """Per family, the best rate of each instruction (``sparse_smem``, ...; e4m3 ones prefixed ``e4m3_``)
    and its ratio to the best dense one of the same type."""
    def name(dtype: str, kind: str) -> str:
        return kind if dtype == "bf16" else f"{dtype}_{kind}"

    summary = {}
    for fam in dict.fromkeys(r["family"] for r in rows):
        best: dict[tuple[str, str], float] = {}  # (dtype, instruction) -> TFLOP/s
        for r in rows:
            if r["family"] == fam:
                key = (r.get("dtype", "bf16"), ("sparse" if r["sparse"] else "dense") + "_" + r["a_source"])
                best[key] = max(best.get(key, 0.0), r["tflops"])
        dense: dict[str, float] = {}
        for (dtype, kind), t in best.items():
            if kind.startswith("dense"):
                dense[dtype] = max(dense.get(dtype, 0.0), t)
        summary[fam] = {"best_tflops": {name(*k): t for k, t in best.items()},
                        "best_over_best_dense": {name(*k): t / dense[k[0]] for k, t in best.items() if k[0] in dense}}
    return summary


def table(rows: list[dict]) -> str:
    from tabulate import tabulate

    def ratio(r: dict) -> str:
        return "" if r["over_dense"] is None else f"{r['over_dense']:.2f}x"

    return tabulate([[r["family"], r.get("dtype", "bf16"), r["label"], r["tile"] or f"N={r['n']}", r["warpgroups"],
                      f"{r['tflops']:.0f}", f"{r['clock_mhz_median']:.0f}", f"{r['flop_per_clock_per_sm']:.0f}", ratio(r)]
                     for r in rows],
                    headers=["loop", "type", "instruction", "tile", "consumer warpgroups", "TFLOP/s (logical)", "SM MHz",
                             "FLOP/clk/SM", "over dense (same type)"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", type=float, default=150.0, help="target length of one timed run")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each variant, interleaved")
    ap.add_argument("--build-only", action="store_true", help="generate and compile, then stop (no GPU needed)")
    ap.add_argument("--keep", default=None, help="directory to keep the generated source and binary in")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/tensor-core-ceiling-<gpu>.json)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help=f"operand types to probe, comma-separated (default {','.join(DTYPES)})")
    args = ap.parse_args()
    try:
        dtypes = parse_dtypes(args.dtypes)
    except ValueError as e:
        ap.error(str(e))

    nvcc = os.environ.get("NVCC") or shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    vs = variants(dtypes)
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lynx-tc-ceiling-"))
    workdir.mkdir(parents=True, exist_ok=True)
    exe = build(vs, workdir, nvcc)
    print(f"built {exe}", flush=True)
    if args.build_only:
        return

    from lynx_compile.tools.results import environment, slug, write_json

    def run(v: Variant, groups: int) -> dict:
        out = subprocess.run([str(exe), v.name, str(groups)], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"{v.name} failed: {out.stderr}")
        return json.loads(out.stdout)

    # Size each variant's run to about --ms from a short calibration run.
    groups = {}
    for v in vs:
        probe = run(v, 2000)
        groups[v] = max(2000, int(2000 * args.ms / max(probe["ms"], 1e-3)))
    samples: dict[Variant, list[dict]] = {v: [] for v in vs}
    for _ in range(args.repeats):
        for v in vs:
            samples[v].append(run(v, groups[v]))

    rows = []
    for v in vs:
        ms = statistics.median(s["ms"] for s in samples[v])
        sms, trips = samples[v][0]["sms"], samples[v][0]["groups"]
        tflops = flops_per_group(v, sms) * trips / (ms * 1e-3) / 1e12
        mhz = statistics.median(s["clock_mhz"] for s in samples[v])
        rows.append({
            "variant": v.name, "family": family(v), "label": v.label, "dtype": v.dtype, "sparse": v.sparse,
            "a_source": v.a_source, "n": v.n, "warpgroups": v.warpgroups, "tile": v.tile if v.fed else None,
            "fill_bytes_per_stage": v.fill_bytes if v.fed else None, "k_per_loop_trip": v.k_per_loop_trip, "loop_trips": trips,
            "ms_median": ms, "ms_all": [s["ms"] for s in samples[v]], "tflops": tflops,
            "clock_mhz_median": mhz, "flop_per_clock_per_sm": tflops * 1e12 / (mhz * 1e6) / sms,
        })
    add_over_dense(rows)
    print(table(rows))
    summary = summarise(rows)
    for fam, s in summary.items():
        print(f"\n{fam}: best over best dense of the same type: "
              + ", ".join(f"{k} {t:.2f}x" for k, t in s["best_over_best_dense"].items() if "sparse" in k))
    env = environment("cuda")
    path = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"tensor-core-ceiling-{slug(env['device'])}.json"
    write_json({"environment": env, "nvcc": subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1],
                "k_per_group": K_PER_GROUP, "k_per_stage": stage_k("bf16"), "stages": STAGES, "repeats": args.repeats,
                "dtypes": list(dtypes), "k_per_stage_by_dtype": {d: stage_k(d) for d in dtypes},
                "summary": summary, "rows": rows}, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
