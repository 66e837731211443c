"""A model's linear layers converted to hold their weights in e4m3, so that ``precision="fp8"`` holds one copy.

Compiled at ``precision="fp8"`` as it is, a model keeps its 16-bit weights, and the compiled graph holds an e4m3 copy
of each. After ``convert_to_fp8(model)`` its linear layers hold the e4m3 weights and their scales themselves, the
16-bit ones are gone, and the lynx passes hand those same tensors to the FP8 GEMMs (sparse or dense); a layer with a
folded LoRA still gets a widened copy. Eagerly, a converted layer runs FP8 dense (``lynx::e4m3_linear``).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from . import ops

FEATURE_MULTIPLE = 16
"""In and out features of a converted layer are multiples of this (``torch._scaled_mm``'s operand dims)."""


class E4M3Linear(nn.Module):
    """``nn.Linear`` with an e4m3 weight (N, K) and fp32 per-output-channel ``weight_scale`` (N,), made by
    :func:`convert_to_fp8`; the bias stays in the model's dtype."""

    def __init__(self, weight: Tensor, weight_scale: Tensor, bias: Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # Parameters, not buffers: a frozen e4m3 weight is still the layer's weight to every tool that lists them.
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(weight_scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> E4M3Linear:
        weight, scale = ops.quantize_weight_e4m3(linear.weight)
        return cls(weight, scale, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.lynx.e4m3_linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def convert_to_fp8(model: nn.Module, include: str | None = None) -> list[str]:
    """Replace, in place, every ``nn.Linear`` of ``model`` with bf16/fp16 weights and in/out features multiples of 16
    (and, with ``include``, a qualified name matching that regex) by an :class:`E4M3Linear`. Returns the names
    converted.

    Call it after the model has its device and dtype (a later ``model.to(dtype)`` would cast the e4m3 weights too),
    and after any ``lynx_compile.calibrate`` (which reads ``nn.Linear`` layers); then ``torch.compile(model,
    backend="lynx")``: the converted layers run in e4m3 whatever ``LynxConfig.precision``.
    """
    converted = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            qualified = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear) or isinstance(child, E4M3Linear):
                continue
            if child.weight.dtype not in (torch.bfloat16, torch.float16):
                continue
            if child.in_features % FEATURE_MULTIPLE or child.out_features % FEATURE_MULTIPLE:
                continue
            if include is not None and not re.search(include, qualified):
                continue
            setattr(module, child_name, E4M3Linear.from_linear(child))
            converted.append(qualified)
    return converted
