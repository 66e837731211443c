"""lynx under diffusers' context parallelism (sequence-sharded over 2 gloo processes on CPU, NCCL
on 2 GPUs), and the data-parallel generation example.

The ranks run in spawned processes. What a test compares them with (the unsharded model, one
process) runs in the test's own process while they work: on a 2-core machine the ranks leave
room for it, and Inductor's kernel cache lets whichever process compiles a kernel first serve
the others."""

import contextlib
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as _functional_collectives
import torch.multiprocessing as mp
from conftest import BENCHMARKS, relative_error, sparse_kernels_or_skip

import lynx_compile
from lynx_compile.parallel import context_parallel
from lynx_compile.tools.workloads import diffusers_workload

pytest.importorskip("diffusers")

WORLD = 2
# A tiny Flux: an MMDiT with a text and an image stream (dual blocks) and joint single blocks.
TINY_FLUX = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=64,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                 axes_dims_rope=(16, 24, 24))
# Wide enough that every selected GPU linear runs the sparse kernels (K, N >= 256).
GPU_FLUX = dict(TINY_FLUX, attention_head_dim=128, num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=64,
                axes_dims_rope=(16, 56, 56))
# Every layer of the tiny Flux is a candidate; the GPU run keeps layers the speed guard would leave dense.
LYNX_OPTIONS = {"cpu": dict(min_features=0), "cuda": dict(min_features=0, speed_guard=False)}
GATHERS = ("this-torch", "torch-2.11-gather")


def _lynx(device: torch.device) -> lynx_compile.LynxBackend:
    """lynx's passes, then Inductor on the GPU only: on CPU these tests check sharding, graphs and recompiles, which
    Dynamo and the passes decide, and Inductor's compile of three Flux graphs at once was most of their time on two
    cores (test_diffusers compiles the same model with Inductor)."""
    config = lynx_compile.LynxConfig(**LYNX_OPTIONS[device.type])
    return lynx_compile.LynxBackend(config, inductor=device.type == "cuda")


def _join(rank: int, init_file: str, device: torch.device) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=WORLD)


def _run_ranks(tmp_path: Path, fn: Callable, *args: Any, alongside: Callable[[], Any] = lambda: None) -> tuple[Any, list]:
    """``fn(rank, init_file, out_dir, *args)`` on every rank, and ``alongside()`` here meanwhile:
    its result and what each rank saved to ``rank<N>.pt``."""
    ranks = mp.start_processes(fn, args=(str(tmp_path / "init"), str(tmp_path), *args), nprocs=WORLD, join=False)
    try:
        local = alongside()
    finally:
        while not ranks.join():  # raises, with the rank's traceback, if a rank failed
            pass
    # The ranks' results are this test's own files; they hold lynx's enums, hence no weights_only.
    return local, [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def _gather_helper_as_in_torch_2_11() -> None:
    """Give funcol's output-gather helper a function of torch/_utils.py, where torch 2.11 keeps
    it and whose functions Dynamo does not trace into."""
    namespace = {"current": _functional_collectives._maybe_view_chunk_cat}
    source = "def _maybe_view_chunk_cat(res, group_size, gather_dim):\n    return current(res, group_size, gather_dim)\n"
    exec(compile(source, torch._utils.__file__, "exec"), namespace)
    namespace["_maybe_view_chunk_cat"].__module__ = "torch._utils"
    _functional_collectives._maybe_view_chunk_cat = namespace["_maybe_view_chunk_cat"]


def _flux(device: torch.device, mode: str, batches: tuple[int, int]) -> tuple[torch.nn.Module, list[dict]]:
    """The tiny Flux, with the same weights in every process, and its inputs at two batch sizes,
    resolutions and text lengths."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    workload = diffusers_workload("FluxTransformer2DModel", GPU_FLUX if device.type == "cuda" else TINY_FLUX,
                                  batch=batches[0], text_tokens=8, dtype=dtype, device=device)
    if mode == "ring":
        workload.model.model.set_attention_backend("_native_cudnn")  # ring needs its log-sum-exp
    return workload.model, [workload.kwargs, workload.make_inputs(batches[1], resolution=128, text_tokens=12)[1]]


def _constant_floats():
    """Trace the model's Python floats (norm eps, RoPE theta, nn.Embedding's norm_type) as
    constants. Under dynamic=True Dynamo makes them symbols, Inductor specialises them again,
    and Dynamo then traces the whole model a second time, in every process here; with
    collectives in the graph, which keep AOTAutograd's cache away, that was most of each rank's
    time. These tests are about sharding and dealing out prompts; test_diffusers and
    test_backend compile these model classes with the floats symbolic."""
    return torch._dynamo.config.patch(specialize_float=True)


def _unsharded(device: torch.device, mode: str, batches: tuple[int, int]) -> dict:
    torch._dynamo.reset()  # other tests compiled DiffusersSample.forward in this process
    model, shapes = _flux(device, mode, batches)
    backend = _lynx(device)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=True)
    with torch.no_grad(), _constant_floats():
        outputs = [compiled(**kwargs).cpu() for kwargs in shapes]
    return {"outputs": outputs, "sparse": sorted(layer.name for layer in backend.report.sparse)}


def _sharded(device: torch.device, mode: str, batches: tuple[int, int]) -> dict:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, shapes = _flux(device, mode, batches)
    backend, traced_ops = _lynx(device), set()

    def recording(gm, example_inputs, **kwargs):
        traced_ops.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return backend(gm, example_inputs, **kwargs)

    compiled = torch.compile(context_parallel(model, mode=mode), backend=recording, fullgraph=True, dynamic=True)
    with torch.no_grad(), _constant_floats():
        outputs = [compiled(**kwargs).cpu() for kwargs in shapes]
    return {"outputs": outputs, "sparse": sorted(layer.name for layer in backend.report.sparse),
            "graphs": backend.report.graphs, "frames": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "collectives": sorted(op for op in traced_ops if "_c10d_functional" in op)}


def _sharded_ranks(rank: int, init_file: str, out_dir: str, device_type: str, mode: str, batches: tuple[int, int],
                   gathers: tuple[str, ...]) -> None:
    """One rank's sharded runs, one per output-gather layout, in order: the torch 2.11 layout
    replaces this torch's for the rest of the process."""
    device = torch.device(f"cuda:{rank}") if device_type == "cuda" else torch.device("cpu")
    _join(rank, init_file, device)
    try:
        runs = {}
        for gather in gathers:
            if gather == "torch-2.11-gather":
                _gather_helper_as_in_torch_2_11()
            runs[gather] = _sharded(device, mode, batches)
        torch.save(runs, Path(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _sharded_vs_unsharded(tmp_path: Path, device: torch.device, mode: str, gathers: tuple[str, ...]) -> tuple[dict, list]:
    batches = (2, 3)
    return _run_ranks(tmp_path, _sharded_ranks, device.type, mode, batches, gathers,
                      alongside=lambda: _unsharded(device, mode, batches))


def _check_sharded(unsharded: dict, results: list[dict], tolerance: float) -> None:
    for rank, result in enumerate(results):
        # The output is gathered back to the full sequence.
        assert [o.shape for o in result["outputs"]] == [r.shape for r in unsharded["outputs"]], rank
        errors = [relative_error(o, r) for o, r in zip(result["outputs"], unsharded["outputs"])]
        assert max(errors) < tolerance, (rank, errors)
        assert result["graphs"] == 1 and result["frames"] == 1 and result["graph_breaks"] == 0, result
        assert result["sparse"] == unsharded["sparse"] and result["sparse"], (rank, result["sparse"], unsharded["sparse"])
        assert result["collectives"], "the sequence exchange should be inside the compiled graph"


@pytest.fixture(scope="module")
def ulysses_on_cpu(tmp_path_factory):
    """Both output-gather layouts on the same two ranks: one process start and one unsharded
    reference for the two tests below."""
    return _sharded_vs_unsharded(tmp_path_factory.mktemp("ulysses"), torch.device("cpu"), "ulysses", GATHERS)


@pytest.mark.parametrize("gather", GATHERS)
def test_ulysses_sharded_flux_matches_unsharded_on_cpu(ulysses_on_cpu, gather):
    """Two gloo ranks, each with half of the tokens: the same output as one process with all of
    them, the same sparse layers, one graph, and no recompile when batch, resolution and text
    length change; also with the output gather laid out as in torch 2.11 (the GPU image's)."""
    unsharded, results = ulysses_on_cpu
    # Sharded attention sums in another order: a near-tie inside one 2:4 group downstream can then keep the
    # other value, which moves the output by about 2e-5. A sharding mistake moves it by far more.
    _check_sharded(unsharded, [runs[gather] for runs in results], tolerance=1e-4)


def _roles(report) -> dict:
    return {layer.name: (layer.role, layer.decision) for layer in report.layers}


def _unsharded_roles() -> dict:
    torch._dynamo.reset()
    torch.manual_seed(0)
    workload = diffusers_workload("FluxTransformer2DModel", TINY_FLUX, batch=2, text_tokens=8)
    return _roles(lynx_compile.explain(workload.model, **workload.kwargs, config=lynx_compile.LynxConfig(**LYNX_OPTIONS["cpu"])))


def _ring_roles(rank: int, init_file: str, out_dir: str) -> None:
    _join(rank, init_file, torch.device("cpu"))
    try:
        model, shapes = _flux(torch.device("cpu"), "ring", (2, 3))
        backend = lynx_compile.LynxBackend(lynx_compile.LynxConfig(**LYNX_OPTIONS["cpu"]), inductor=False)
        compiled = torch.compile(context_parallel(model, mode="ring"), backend=backend, fullgraph=True, dynamic=True)
        with torch.no_grad(), pytest.raises(NotImplementedError, match="_scaled_dot_product_cudnn_attention"):
            compiled(**shapes[0])  # compiled (the passes ran), but cuDNN has no CPU kernel
        torch.save(_roles(backend.report), Path(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ring_attention_graph_gets_the_unsharded_roles(tmp_path):
    """Ring attention merges partial outputs by log-sum-exp (a sigmoid among them) and gathers
    k/v through collectives: the output projection must still read as attention output (dense),
    not as an MLP's down projection, and the final layer as final. Traced on CPU: cuDNN, which
    ring needs, then has no CPU kernel to run."""
    unsharded, ring = _run_ranks(tmp_path, _ring_roles, alongside=_unsharded_roles)
    for roles in ring:
        assert roles == unsharded


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_sharded_flux_matches_unsharded_on_two_gpus(tmp_path, mode):
    if torch.cuda.device_count() < WORLD:
        pytest.skip(f"needs {WORLD} GPUs")
    sparse_kernels_or_skip()
    unsharded, results = _sharded_vs_unsharded(tmp_path, torch.device("cuda:0"), mode, GATHERS[:1])
    # bf16 attention over exchanged shards sums in another order than the unsharded run.
    _check_sharded(unsharded, [runs[GATHERS[0]] for runs in results], tolerance=2e-2)


@contextlib.contextmanager
def _one_process_group(init_file: Path):
    """A one-process gloo group, for the argument checks."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_context_parallel_rejects_what_it_cannot_shard(tmp_path):
    flux = diffusers_workload("FluxTransformer2DModel", TINY_FLUX).model
    with pytest.raises(RuntimeError, match="not initialized"):
        context_parallel(flux)
    sd3 = diffusers_workload("SD3Transformer2DModel", dict(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                                           attention_head_dim=64, num_attention_heads=2,
                                                           joint_attention_dim=32, caption_projection_dim=128,
                                                           pooled_projection_dim=16, out_channels=4)).model
    with _one_process_group(tmp_path / "init"):
        with pytest.raises(ValueError, match="mode must be"):
            context_parallel(flux, mode="tensor")
        with pytest.raises(ValueError, match="no context-parallel plan for SD3Transformer2DModel"):
            context_parallel(sd3)
        with pytest.raises(ValueError, match="wraps no"):
            context_parallel(lynx_compile.models.build("mmdit-tiny"))
        with pytest.raises(ValueError, match="does not divide"):
            context_parallel(flux, degree=2)
        with pytest.raises(ValueError, match="log-sum-exp"):
            context_parallel(flux, mode="ring")


def _generate_parallel():
    sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module("generate_parallel")


def _generation():
    """Five prompts, three steps, through lynx's passes without Inductor: the split of the prompts is under test
    (test_generate_parallel_runs_under_torchrun runs the documented command, Inductor included)."""
    backend = lynx_compile.LynxBackend(inductor=False)
    with _constant_floats():
        return _generate_parallel().generate(labels=list(range(5)), steps=3, backend=backend)


def _one_process_generation():
    torch._dynamo.reset()
    return _generation()


def _generate(rank: int, init_file: str, out_dir: str) -> None:
    _join(rank, init_file, torch.device("cpu"))
    try:
        result = _generation()
        torch.save(result, Path(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_data_parallel_generation_matches_one_process(tmp_path):
    """Prompts split over 2 ranks give the images one process gives: each prompt's noise comes
    from its own seed, and lynx sparsifies each token on its own."""
    single, results = _run_ranks(tmp_path, _generate, alongside=_one_process_generation)
    for result in results:  # every rank ends with all images, in prompt order
        assert result["labels"] == list(range(5))
        torch.testing.assert_close(result["images"], single["images"], atol=1e-4, rtol=0)
    assert results[0]["per_rank"] == [3, 2]


def test_generate_parallel_runs_under_torchrun(tmp_path):
    """The documented command: torchrun, init_distributed (gloo without GPUs), one PNG from rank 0."""
    import subprocess

    out = tmp_path / "row.png"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(BENCHMARKS / "generate_parallel.py"), "--labels", "3", "1", "4", "--steps", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "rank 0: 2 prompts" in run.stdout and "rank 1: 1 prompts" in run.stdout
    from PIL import Image

    assert Image.open(out).size[0] > Image.open(out).size[1]  # one row of three digits
