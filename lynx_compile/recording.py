"""Recording a model's forward inputs while an ordinary sampling loop runs, as calibration batches.

``lynx_compile.calibrate`` wants forward-call arguments of the model at the timesteps it will serve. Rather than
writing hooks, wrap the sampling loop the model already runs (a diffusers pipeline around its ``transformer``, the
built-in ``lynx_compile.diffusion.ddim_sample``, or any loop):

    with ForwardRecorder(pipe.transformer, max_batches=16) as recorder:
        pipe(prompt, num_inference_steps=28)
    comp = lynx_compile.calibrate(pipe.transformer, recorder.on("cuda"))

Memory is bounded: at most ``max_batches`` calls are kept, a uniform sample of every call the loop made (so the kept
steps spread over the whole run, whatever its length), copied to ``device`` (the CPU by default, so that GPU memory
stays as the loop left it).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def _copy(value: Any, device: torch.device | str | None) -> Any:
    """``value`` with every tensor detached and copied (to ``device`` if given), through tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return value.to(device, copy=True) if device is not None else value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_copy(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _copy(v, device) for k, v in value.items()}
    return value


class ForwardRecorder:
    """Keeps a uniform reservoir of at most ``max_batches`` of ``module``'s forward calls while the context is open.

    ``batches``: the kept calls as ``(args, kwargs)``, in call order, on ``device``; ``calls``: how many calls the
    context saw. ``progress`` shows a counter (tqdm, when installed) of calls seen and kept.
    """

    def __init__(self, module: nn.Module, max_batches: int = 16, device: torch.device | str | None = "cpu",
                 seed: int = 0, progress: bool = True):
        if not isinstance(module, nn.Module):
            raise ValueError(f"ForwardRecorder: module must be an nn.Module, got {type(module).__name__}")
        if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
            raise ValueError(f"ForwardRecorder: max_batches must be an int >= 1, got {max_batches!r}")
        self.module = getattr(module, "_orig_mod", module)  # a torch.compile'd module: hook the original
        self.max_batches = max_batches
        self.device = device
        self.calls = 0
        self._kept: list[tuple[int, tuple, dict]] = []  # (call index, args, kwargs)
        self._random = random.Random(seed)
        self._progress = progress
        self._bar: Any = None
        self._handle: Any = None

    @property
    def batches(self) -> list[tuple[tuple, dict]]:
        return [(args, kwargs) for _, args, kwargs in sorted(self._kept, key=lambda kept: kept[0])]

    def on(self, device: torch.device | str) -> Iterator[tuple[tuple, dict]]:
        """The kept calls moved to ``device`` one at a time, as ``calibrate`` reads them."""
        for args, kwargs in self.batches:
            yield _copy(args, device), _copy(kwargs, device)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        index = self.calls
        self.calls += 1
        # Reservoir sampling: the i-th call replaces a kept one with probability max_batches / (i + 1).
        slot = index if index < self.max_batches else self._random.randrange(index + 1)
        if slot < self.max_batches:
            kept = (index, _copy(args, self.device), _copy(kwargs, self.device))
            if index < self.max_batches:
                self._kept.append(kept)
            else:
                self._kept[slot] = kept
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(kept=len(self._kept), refresh=False)

    def __enter__(self) -> ForwardRecorder:
        if self._progress:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(desc=f"lynx record: {type(self.module).__name__} calls", unit="call")
            except ImportError:
                self._bar = None
        self._handle = self.module.register_forward_pre_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()
        if self._bar is not None:
            self._bar.close()
