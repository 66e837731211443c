"""lynx on several GPUs, under diffusers' own context parallelism or plain data parallelism.

Sequence (context) parallelism is diffusers' (``ModelMixin.enable_parallelism``, diffusers >=
0.36): its hooks split each image's tokens over the ranks and its attention exchanges them with
Ulysses all-to-all or ring passes. lynx invents no scheme of its own: it sparsifies each token's
activation on its own, so a rank's shard gets exactly the rows the unsharded model would, only
fewer of them (smaller M). The collectives trace into the compiled graph as functional
collectives, which the lynx passes leave alone, so ``fullgraph=True`` holds.

Data parallelism needs nothing from lynx: each ``torchrun`` rank compiles its own model and
takes its own prompts (``benchmarks/generate_parallel.py``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

MODES = ("ulysses", "ring")


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group ``torchrun`` describes: NCCL with one GPU per local rank where
    GPUs are visible, else gloo on CPU. Returns ``(rank, world_size, device)``."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("init_distributed: RANK/WORLD_SIZE are unset; launch with torchrun --nproc-per-node=N")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), device


def _diffusers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The diffusers ``ModelMixin`` in ``model``: itself, or one it wraps (``DiffusersSample``)."""
    try:
        from diffusers import ModelMixin
    except ImportError:
        raise ValueError("context parallelism comes from diffusers, which is not installed (pip install diffusers)") from None
    for module in model.modules():
        if isinstance(module, ModelMixin):
            return module
    raise ValueError(f"context_parallel: {type(model).__name__} is not (and wraps no) diffusers model; "
                     "lynx's built-in models run data-parallel only")


@contextlib.contextmanager
def _cpu_accelerator_count() -> Iterator[None]:
    """diffusers picks each rank's device as ``rank % torch.accelerator.device_count()``, which
    divides by zero on a CPU-only (gloo) group; count the CPU as the one device there."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count


def _keep_output_gather_in_graph() -> None:
    """diffusers gathers the sharded output with ``funcol.all_gather_tensor``, whose reshuffle
    helper ``_maybe_view_chunk_cat`` torch 2.11 keeps in ``torch._utils``: a module Dynamo does
    not trace into, so the gather would end the graph (and ``fullgraph=True`` fail) for every
    backend. The helper is plain view / chunk / cat, so it may sit in the graph as one call."""
    import torch.distributed._functional_collectives as functional_collectives

    helper = getattr(functional_collectives, "_maybe_view_chunk_cat", None)
    if helper is not None and helper.__module__ == "torch._utils":
        torch._dynamo.allow_in_graph(helper)


def context_parallel(model: torch.nn.Module, degree: int | None = None, mode: str = "ulysses") -> torch.nn.Module:
    """Shard ``model``'s tokens over ``degree`` ranks (default: the whole process group) with
    diffusers' context parallelism, then compile it as usual: ``torch.compile(model,
    backend="lynx")``. ``mode`` is ``"ulysses"`` (all-to-all over heads; any attention backend) or
    ``"ring"`` (needs an attention backend that returns the log-sum-exp, such as
    ``"_native_cudnn"`` or ``"flash"``). Returns ``model``, changed in place; bad settings raise
    ``ValueError`` here rather than inside the first forward."""
    if mode not in MODES:
        raise ValueError(f"context_parallel: mode must be one of {MODES}, got {mode!r}")
    if not dist.is_initialized():
        raise RuntimeError("context_parallel: torch.distributed is not initialized (see init_distributed)")
    target = _diffusers_model(model)
    if getattr(target, "_cp_plan", None) is None:
        raise ValueError(f"context_parallel: diffusers has no context-parallel plan for {type(target).__name__} "
                         "(Flux, Wan, QwenImage, LTX and others have one)")
    degree = dist.get_world_size() if degree is None else degree
    if degree < 1 or dist.get_world_size() % degree:
        raise ValueError(f"context_parallel: degree {degree} does not divide the world size {dist.get_world_size()}")
    heads = getattr(target.config, "num_attention_heads", None)
    if mode == "ulysses" and heads is not None and heads % degree:
        raise ValueError(f"context_parallel: Ulysses spreads attention heads over ranks; "
                         f"{heads} heads do not split {degree} ways")
    from diffusers import ContextParallelConfig
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    if mode == "ring" and _AttentionBackendRegistry.get_active_backend()[0] == AttentionBackendName.NATIVE:
        backends = {getattr(getattr(m, "processor", None), "_attention_backend", None) for m in target.modules()}
        if backends <= {None, AttentionBackendName.NATIVE}:
            raise ValueError("context_parallel: ring attention needs an attention backend that returns the log-sum-exp; "
                             "call model.set_attention_backend('_native_cudnn') (or 'flash') first")
    with _cpu_accelerator_count():
        target.enable_parallelism(config=ContextParallelConfig(**{f"{mode}_degree": degree}))
    _keep_output_gather_in_graph()
    return model


__all__ = ["MODES", "context_parallel", "init_distributed"]
