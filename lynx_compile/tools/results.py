"""How benchmark figures are recorded: every result file names its device, torch version and date."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
from pathlib import Path
from typing import Any

import torch


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def environment(device: torch.device | str) -> dict[str, Any]:
    device = torch.device(device)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cuda": torch.version.cuda,
    }


def device_slug(device: torch.device | str) -> str:
    """``nvidia-h100-80gb-hbm3`` for a GPU, ``cpu`` otherwise: the suffix of result file names."""
    device = torch.device(device)
    return slug(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu"


def write_json(payload: dict, path: str | os.PathLike) -> Path:
    """Write a result as indented JSON, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    return path


__all__ = ["device_slug", "environment", "slug", "write_json"]
