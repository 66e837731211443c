"""lynx-compile: online N:M activation sparsity for diffusion transformers, as a torch.compile backend.

``torch.compile(model, backend="lynx")`` works without importing this package (entry point).
"""

from . import ops  # noqa: F401  (registers torch.ops.lynx.*)
from .backend import LynxBackend, backend, explain
from .calibrate import Compensation, calibrate
from .config import LynxConfig
from .diagnostics import LynxWarning
from .report import LayerDecision, Report
from .types import CompensationMode, Decision, Role

__all__ = [
    "Compensation", "CompensationMode", "Decision", "LayerDecision", "LynxBackend", "LynxConfig", "LynxWarning", "Report",
    "Role", "backend", "calibrate", "explain",
]
__version__ = "0.1.0"
