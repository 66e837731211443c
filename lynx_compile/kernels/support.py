"""What the CUDA kernels can take (GPU, pattern, dtype, layer shape), by the limits ``cuda/lynx_api.h`` declares;
answered without the library, building nothing."""

from __future__ import annotations

import torch

from . import abi

DTYPES = (torch.bfloat16, torch.float16)


def cuda_ok() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - a broken CUDA setup means no CUDA here
        return False


def device_reason(device: torch.device) -> str | None:
    """Why the kernels cannot run on this CUDA device (None: they can)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    compiled_for = abi.header().constants["LYNX_COMPUTE_CAPABILITY"]
    if major * 10 + minor != compiled_for:
        return f"sm_{major}{minor} GPU: no sm_{compiled_for} kernel"
    return None


def layer_reason(dtype: torch.dtype, in_features: int, out_features: int, n: int, m: int) -> str | None:
    """Why the kernels cannot take a layer of this pattern, dtype and shape (None: they can)."""
    if (n, m) != (2, 4):
        return f"kernel does 2:4 only, got {n}:{m}"
    if dtype not in DTYPES:
        return f"kernel takes bf16/fp16 only, got {str(dtype).replace('torch.', '')}"
    constants = abi.header().constants
    if in_features % constants["LYNX_K_MULTIPLE"] != 0:
        return f"in_features {in_features} not a multiple of {constants['LYNX_K_MULTIPLE']}"
    if out_features % constants["LYNX_N_MULTIPLE"] != 0:
        return f"out_features {out_features} not a multiple of {constants['LYNX_N_MULTIPLE']}"
    return None


def e4m3_reason(in_features: int, lora_rank: int = 0) -> str | None:
    """Why the e4m3 kernels cannot take a layer the 16-bit ones can (None: they can): the e4m3 sparsify pass holds a
    whole row, folded LoRA columns included, in registers, and each e4m3 row must start 16-byte aligned."""
    constants = abi.header().constants
    columns = -(-(in_features + 2 * lora_rank) // 128) * 128
    if columns > constants["LYNX_WHOLE_ROW_MAX_K"]:
        return f"e4m3 sparsify holds whole rows: {in_features + 2 * lora_rank} columns > {constants['LYNX_WHOLE_ROW_MAX_K']}"
    if lora_rank % 16 or (in_features // 2 + lora_rank) % 16:
        return f"e4m3 rows of {in_features // 2 + lora_rank} bytes (LoRA rank {lora_rank}) are not 16-byte aligned"
    return None

