"""lynx-compile: online N:M activation sparsity for diffusion transformers, as a torch.compile backend.

``torch.compile(model, backend="lynx")`` works without importing this package (entry point).
"""

from . import ops  # noqa: F401  (registers torch.ops.lynx.*)
from .backend import LynxBackend, backend, explain
from .calibrate import Compensation, calibrate
from .config import LynxConfig
from .diagnostics import LynxWarning
from .fp8 import E4M3Linear, convert_to_fp8
from .recording import ForwardRecorder
from .report import LayerDecision, Report
from .steps import StepSchedule, dense_forward, measure_step_costs
from .types import CompensationMode, Decision, Precision, Role

__all__ = [
    "Compensation", "CompensationMode", "Decision", "E4M3Linear", "ForwardRecorder", "LayerDecision", "LynxBackend", "LynxConfig",
    "LynxWarning", "Precision", "Report", "Role", "StepSchedule", "backend", "calibrate", "convert_to_fp8", "dense_forward",
    "explain", "measure_step_costs",
]
__version__ = "0.1.0"
