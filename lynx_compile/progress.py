"""Progress bars for long runs, when tqdm is installed (it is an optional dependency)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def progress(iterable: Iterable, enabled: bool = True, **tqdm_kwargs: Any) -> Iterable:
    """``iterable`` wrapped in a tqdm bar, or as it is when disabled or tqdm is missing."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **tqdm_kwargs)
