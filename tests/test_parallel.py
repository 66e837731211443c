"""lynx under diffusers' context parallelism (sequence-sharded over 2 gloo processes on CPU, NCCL
on 2 GPUs), and the data-parallel generation example."""

import contextlib
import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as _functional_collectives
import torch.multiprocessing as mp
from conftest import BENCHMARKS, relative_error, sparse_kernels_or_skip

import lynx_compile
from lynx_compile.parallel import context_parallel
from lynx_compile.workloads import diffusers_workload

pytest.importorskip("diffusers")

WORLD = 2
# A tiny Flux: an MMDiT with a text and an image stream (dual blocks) and joint single blocks.
TINY_FLUX = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=64,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                 axes_dims_rope=(16, 24, 24))
# Wide enough that every selected GPU linear runs the sparse kernels (K, N >= 256).
GPU_FLUX = dict(TINY_FLUX, attention_head_dim=128, num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=64,
                axes_dims_rope=(16, 56, 56))


def _join(rank: int, init_file: str, device: torch.device) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=WORLD)


def _gather_helper_as_in_torch_2_11() -> None:
    """Give funcol's output-gather helper a function of torch/_utils.py, where torch 2.11 keeps
    it and whose functions Dynamo does not trace into."""
    namespace = {"current": _functional_collectives._maybe_view_chunk_cat}
    source = "def _maybe_view_chunk_cat(res, group_size, gather_dim):\n    return current(res, group_size, gather_dim)\n"
    exec(compile(source, torch._utils.__file__, "exec"), namespace)
    namespace["_maybe_view_chunk_cat"].__module__ = "torch._utils"
    _functional_collectives._maybe_view_chunk_cat = namespace["_maybe_view_chunk_cat"]


def _sharded_vs_unsharded(rank: int, init_file: str, out_dir: str, device_type: str, mode: str, batches: tuple[int, int],
                          torch_2_11_gather: bool = False) -> None:
    device = torch.device(f"cuda:{rank}") if device_type == "cuda" else torch.device("cpu")
    if torch_2_11_gather:
        _gather_helper_as_in_torch_2_11()
    _join(rank, init_file, device)
    try:
        from torch._dynamo.utils import counters

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        config = dict(min_features=0, speed_guard=False)
        torch.manual_seed(0)
        workload = diffusers_workload("FluxTransformer2DModel", GPU_FLUX if device.type == "cuda" else TINY_FLUX,
                                      batch=batches[0], text_tokens=8, dtype=dtype, device=device)
        shapes = [workload.kwargs, workload.make_inputs(batches[1], resolution=128, text_tokens=12)[1]]  # new size, text
        if mode == "ring":
            workload.model.model.set_attention_backend("_native_cudnn")
        results = {}
        with torch.no_grad():
            unsharded = lynx_compile.backend(**config)
            model = torch.compile(workload.model, backend=unsharded, fullgraph=True, dynamic=True)
            references = [model(**kwargs) for kwargs in shapes]
            torch._dynamo.reset()
            counters.clear()
            sharded, traced_ops = lynx_compile.backend(**config), set()

            def recording(gm, example_inputs, **kwargs):
                traced_ops.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
                return sharded(gm, example_inputs, **kwargs)

            model = torch.compile(context_parallel(workload.model, mode=mode), backend=recording, fullgraph=True, dynamic=True)
            outputs = [model(**kwargs) for kwargs in shapes]
        results["errors"] = [relative_error(o, r) for o, r in zip(outputs, references)]
        results["shapes"] = [tuple(o.shape) == tuple(r.shape) for o, r in zip(outputs, references)]
        results["sparse"] = sorted(layer.name for layer in sharded.report.sparse)
        results["unsharded_sparse"] = sorted(layer.name for layer in unsharded.report.sparse)
        results["graphs"] = sharded.report.graphs
        results["frames"] = counters["stats"]["unique_graphs"]
        results["graph_breaks"] = sum(counters["graph_break"].values())
        results["collectives"] = sorted(op for op in traced_ops if "_c10d_functional" in op)
        torch.save(results, Path(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _ring_roles(rank: int, init_file: str, out_dir: str) -> None:
    _join(rank, init_file, torch.device("cpu"))
    try:
        config = lynx_compile.LynxConfig(min_features=0, speed_guard=False)
        torch.manual_seed(0)
        workload = diffusers_workload("FluxTransformer2DModel", TINY_FLUX, batch=2, text_tokens=8)
        roles = lambda report: {layer.name: (layer.role, layer.decision) for layer in report.layers}
        unsharded = roles(lynx_compile.explain(workload.model, **workload.kwargs, config=config))
        workload.model.model.set_attention_backend("_native_cudnn")  # ring needs its log-sum-exp
        backend = lynx_compile.LynxBackend(config, inductor=False)
        model = torch.compile(context_parallel(workload.model, mode="ring"), backend=backend, fullgraph=True, dynamic=True)
        with torch.no_grad(), pytest.raises(NotImplementedError, match="_scaled_dot_product_cudnn_attention"):
            model(**workload.kwargs)  # compiled (the passes ran), but cuDNN has no CPU kernel
        torch.save({"unsharded": unsharded, "ring": roles(backend.report)}, Path(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path: Path, fn, *args) -> list[dict]:
    mp.spawn(fn, args=(str(tmp_path / "init"), str(tmp_path), *args), nprocs=WORLD)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]


def _check_sharded(results: list[dict], tolerance: float) -> None:
    for rank, result in enumerate(results):
        assert all(result["shapes"]), rank  # the output is gathered back to the full sequence
        assert max(result["errors"]) < tolerance, (rank, result["errors"])
        assert result["graphs"] == 1 and result["frames"] == 1 and result["graph_breaks"] == 0, result
        assert result["sparse"] == result["unsharded_sparse"] and result["sparse"], (rank, result)
        assert result["collectives"], "the sequence exchange should be inside the compiled graph"


@pytest.mark.parametrize("torch_2_11_gather", [False, True], ids=["this-torch", "torch-2.11-gather"])
def test_ulysses_sharded_flux_matches_unsharded_on_cpu(tmp_path, torch_2_11_gather):
    """Two gloo ranks, each with half of the tokens: the same output as one process with all of
    them, the same sparse layers, one graph, and no recompile when batch, resolution and text
    length change; also with the output gather laid out as in torch 2.11 (the GPU image's)."""
    results = _spawn(tmp_path, _sharded_vs_unsharded, "cpu", "ulysses", (2, 3), torch_2_11_gather)
    _check_sharded(results, tolerance=1e-5)


def test_ring_attention_graph_gets_the_unsharded_roles(tmp_path):
    """Ring attention merges partial outputs by log-sum-exp (a sigmoid among them) and gathers
    k/v through collectives: the output projection must still read as attention output (dense),
    not as an MLP's down projection, and the final layer as final. Traced on CPU: cuDNN, which
    ring needs, then has no CPU kernel to run."""
    for result in _spawn(tmp_path, _ring_roles):
        assert result["ring"] == result["unsharded"]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_sharded_flux_matches_unsharded_on_two_gpus(tmp_path, mode):
    if torch.cuda.device_count() < WORLD:
        pytest.skip(f"needs {WORLD} GPUs")
    sparse_kernels_or_skip()
    # bf16 attention over exchanged shards sums in another order than the unsharded run.
    _check_sharded(_spawn(tmp_path, _sharded_vs_unsharded, "cuda", mode, (2, 3)), tolerance=2e-2)


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




def _generate(rank: int, init_file: str, out_dir: str) -> None:
    _join(rank, init_file, torch.device("cpu"))
    try:
        sys.path.insert(0, str(BENCHMARKS))
        generate = importlib.import_module("generate_parallel")
        torch.save(generate.generate(labels=list(range(5)), steps=3, backend="lynx"), Path(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_data_parallel_generation_matches_one_process(tmp_path):
    """Prompts split over 2 ranks give the images one process gives: each prompt's noise comes
    from its own seed, and lynx sparsifies each token on its own."""
    results = _spawn(tmp_path, _generate)
    sys.path.insert(0, str(BENCHMARKS))
    generate = importlib.import_module("generate_parallel")
    single = generate.generate(labels=list(range(5)), steps=3, backend="lynx")
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
