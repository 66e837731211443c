import os
from pathlib import Path

# One intra-op thread per process: two xdist workers already share CI's 2 cores, and the
# distributed tests add ranks; more threads only spin-wait on each other. Set before torch
# starts, and inherited by the processes the tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lynx_compile.metrics import relative_error  # noqa: E402, F401  (the tests' one error measure)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case torch came in before this file

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def sparse_kernels_or_skip():
    """``lynx_compile.kernels``, or a skip where its CUDA kernels cannot run (no GPU, not sm_90,
    or the library did not build)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from lynx_compile import kernels

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU")
    if not kernels.load():
        pytest.skip(f"CUDA kernels unavailable: {kernels.load_error()}")
    return kernels


SLOWEST_FILES = ("test_diffusers.py", "test_parallel.py", "test_kernels.py", "test_backend.py", "test_quality.py",
                 "test_steps.py", "test_photos.py", "test_dump.py", "test_calibrate.py", "test_bench.py")
"""The files that take longest on CPU, longest first. pytest-xdist (``--dist loadfile``) hands out
whole files in collection order, so these start first and the workers finish close together."""


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module", autouse=True)
def fresh_dynamo():
    """Every test file starts from empty Dynamo caches, whichever files ran before it in this
    process (an xdist worker runs an arbitrary share of them). Otherwise a code object that
    earlier files compiled recompile_limit times (all DiTs share DiT.forward) runs eagerly for
    the next backend, silently, and that backend sees no graph."""
    torch._dynamo.reset()


def masked_reference(x: torch.Tensor, n: int, m: int, norm: bool, eps: float = 1e-12) -> torch.Tensor:
    """s * x~ computed independently of lynx_compile.ops: stable argsort instead of pairwise ranks."""
    groups = x.reshape(*x.shape[:-1], x.shape[-1] // m, m)
    order = torch.argsort(groups.abs(), dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :n], True)
    kept = (groups * keep).reshape(x.shape)
    if not norm:
        return kept
    x32, k32 = x.double(), kept.double()
    scale = (x32.pow(2).sum(-1, keepdim=True) / (k32.pow(2).sum(-1, keepdim=True) + eps)).sqrt()
    return (k32 * scale).to(x.dtype)


D = 256
"""Width of the hand-written test blocks: the smallest that ``LynxConfig.min_features`` lets run sparse."""


class Block(nn.Module):
    """One DiT-style block with every role the selector knows (the passes' tests)."""

    def __init__(self, d=D, heads=4, attention=F.scaled_dot_product_attention):
        super().__init__()
        self.heads, self.attention = heads, attention
        self.t_in = nn.Linear(64, d)
        self.adaLN = nn.Linear(d, 2 * d)
        self.embed = nn.Linear(32, d)
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.head = nn.Linear(d, 8)

    def forward(self, tokens, t):
        c = self.t_in(t)
        shift, scale = self.adaLN(F.silu(c)).chunk(2, dim=-1)
        x = self.embed(tokens)
        h = self.norm(x) * (1 + scale[:, None]) + shift[:, None]
        b, n, d = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = self.attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(a)
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x)), approximate="tanh"))
        return self.head(self.norm(x))


def block_inputs(batch=2, tokens=6):
    """(tokens (batch, tokens, 32), timestep features (batch, 64)) for ``Block``."""
    torch.manual_seed(0)
    return torch.randn(batch, tokens, 32), torch.randn(batch, 64)


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    return Block().eval()

