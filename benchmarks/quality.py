"""Quality of lynx sparsity variants on the trained DiTs: ``--model digits`` (``checkpoints/dit_digits.pt``,
8x8 digits, class-conditional) or ``--model photos`` (``checkpoints/dit_photos.pt``, 32x32 crops of
real photographs, unconditional). One code path serves both; the digit classifier is the digits'.

One script, past the usual size: every variant shares the trained model, the data split and the report.

    python benchmarks/quality.py                                # digits, full settings (CPU: a few minutes)
    python benchmarks/quality.py --quick                        # small settings, as tests/test_quality.py runs it
    python benchmarks/quality.py --model photos --device cuda --photos .gpu/photos.npz
    python benchmarks/quality.py --model photos --quick         # cheap settings for the photo model on a CPU

Variants, all on the same layers (those lynx selects with the default config: attention qkv,
MLP fc1 / fc2 of every block):

* dense;
* weight 2:4: magnitude pruning of W, 2 of every 4 weights along K per output row (the
  RT-Lynx paper's baseline: what sparse tensor cores run with offline-pruned weights);
* activation N:M (lynx), per token, with ``compensation`` none / norm / norm + LoRA (LoRA
  factors from ``lynx_compile.calibrate`` on training images; "pending" when unavailable);
* activation 2:4 + norm (+ LoRA) with a dense budget ("B=0.3"): ``LynxConfig(sensitivity=...,
  dense_flop_budget=0.3)``, i.e. the layers that calibration measured most sensitive (on
  training images) stay dense, up to 30% of the selected layers' FLOPs (``DENSE_FLOP_BUDGET``);
  ranked by each layer's own error, or ("by model error") by the whole model's error with that
  layer alone sparse (``Compensation.model_sensitivity``, also measured on training images);
* FP8: every linear in e4m3, dense and with activation 2:4 + norm (+ LoRA).

Activation variants run through ``torch.compile`` with ``LynxBackend(config, inductor=False)``:
exactly the function the lynx-compiled model computes, without Inductor's compile time.

Metrics (every variant sees the same inputs, noise, timesteps and seeds):

* layer error: ``||Y' - Y|| / ||Y||`` of each selected layer on the dense model's own inputs
  to that layer (captured with hooks over a timestep sweep); mean and worst layer. Isolates
  each layer's approximation from the error that propagates through depth;
* per timestep of the sweep: eps error, the relative error of the whole model's noise prediction
  vs dense, and the denoising loss (epsilon MSE) on the held-out probe images; eps error is
  reported as the mean over the sweep;
* held-out loss: epsilon MSE on the test split (fixed draws), and its change vs dense;
* PSNR / SSIM of deterministic DDIM samples vs the dense samples from the same noise (over all
  colour channels for the photos);
* digit accuracy (digits only): a logistic-regression classifier trained on the real training
  digits, applied to the samples, scored against the requested labels;
* per selected layer: excess kurtosis of its inputs and weight, and the energy share 2:4 keeps.

Writes ``results/quality-<device>.{json,md}`` and ``results/quality-samples.png`` (rows = variants)
for the digits, ``results/quality-<device>-photos.{json,md}`` and ``results/quality-samples-photos.png``
for the photos (``-quick`` before the suffix with ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx.experimental._config
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import photos  # noqa: E402
from train_dit import CHECKPOINT, PHOTO_CHECKPOINT, RESULTS, SCHEDULE, heldout_loss, load_checkpoint, load_digits_split  # noqa: E402

from lynx_compile import LynxBackend, LynxConfig, Role, explain  # noqa: E402
from lynx_compile.calibrate import calibrate  # noqa: E402
from lynx_compile.config import DEFAULT_SPARSE_ROLES  # noqa: E402
from lynx_compile.diffusion import NoiseSchedule, ddim_sample  # noqa: E402
from lynx_compile.kernels import KERNELS_OFF_VARIABLE  # noqa: E402
from lynx_compile.metrics import relative_error  # noqa: E402
from lynx_compile.ops import e4m3_linear, keep_mask, pack_lora, quantize_weight_e4m3  # noqa: E402
from lynx_compile.tools.results import write_json  # noqa: E402


@dataclass(frozen=True)
class Settings:
    probe_images: int = 32
    """Held-out images noised at each sweep timestep for the layer and eps errors."""
    sweep: tuple[int, ...] = (50, 200, 400, 600, 800, 950)
    heldout_images: int | None = None
    """Held-out images in the denoising loss (None: the whole test split: 360 digits, 546 photo crops)."""
    heldout_draws: int = 2
    """(timestep, noise) draws per held-out image for the denoising loss."""
    samples_per_class: int = 5
    """DDIM samples per class label (the photo model has one class)."""
    ddim_steps: int = 25
    guidance_scale: float = 2.0
    calibration_batches: int = 8
    calibration_batch: int = 64
    """Noised training images per calibration batch."""
    lora_rank: int = 32
    sensitivity: bool = True
    """Also measure each layer alone (``single_layer_sensitivity``)."""
    seed: int = 0


QUICK = Settings(probe_images=8, sweep=(100, 500, 900), heldout_images=120, heldout_draws=1, samples_per_class=1,
                 ddim_steps=8, calibration_batches=2, sensitivity=False)
PHOTO_SETTINGS = Settings(samples_per_class=16, guidance_scale=1.0)
"""Unconditional model: guidance 1.0 is the plain model (one evaluation per step)."""
PHOTO_QUICK = Settings(probe_images=2, sweep=(100, 300, 500, 700, 900), heldout_images=8, heldout_draws=1,
                       samples_per_class=2, ddim_steps=4, guidance_scale=1.0, calibration_batches=2, calibration_batch=4,
                       sensitivity=False)
"""Still five timesteps, on a handful of images: the photo model's 256 tokens per image through the reference
sparse op cost seconds per forward on a CPU."""


@dataclass(frozen=True)
class QualityModel:
    """What differs between the trained models; everything else is one code path."""

    title: str
    checkpoint: Path
    settings: Settings
    quick: Settings
    results_suffix: str
    """Appended to the result file names: "" keeps the digits' original names."""
    ssim_window: int
    ssim_sigma: float
    digit_classifier: bool


MODELS = {
    "digits": QualityModel("the digits DiT", CHECKPOINT, Settings(), QUICK, "", 5, 1.0, True),
    # Wang et al.'s 11x11 Gaussian window (sigma 1.5), as on natural images.
    "photos": QualityModel("the photo DiT", PHOTO_CHECKPOINT, PHOTO_SETTINGS, PHOTO_QUICK, "-photos", 11, 1.5, False),
}


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str
    """``dense``, ``weight`` (pruned W), ``activation`` (lynx) or ``fp8`` (every linear on FP8 dense)."""
    pattern: str = "2:4"
    compensation: str = "none"
    dense_flop_budget: float | None = None
    """``LynxConfig.dense_flop_budget`` with the calibrated ``sensitivity`` (activation variants)."""
    ranking: str = "layer"
    """What ranks the layers for the budget: ``layer`` (each layer's own output error,
    ``Compensation.layer_sensitivity``) or ``model`` (the whole model's error with that layer alone
    sparse, ``Compensation.model_sensitivity``), both measured by calibration on training images."""
    precision: str = "native"
    """``LynxConfig.precision``: "fp8" runs every linear in e4m3 (the sparse ones on the e4m3 sparse op)."""
    extra_roles: frozenset[Role] = frozenset()
    """Roles made sparse on top of the paper's (``LynxConfig.sparse_roles``), e.g. the attention output projection."""

    @property
    def needs_calibration(self) -> bool:
        return self.compensation == "lora" or self.dense_flop_budget is not None


DENSE_FLOP_BUDGET = 0.3
"""Chosen on the digits model from the calibration sensitivities (training images), not from held-out results:
calibration ranks the two attention qkv layers (relative error 0.45, 0.34 with norm
compensation) clearly above the rest (<= 0.27); together they are 6/22 = 27% of the selected
layers' FLOPs, so a budget of 0.3 keeps exactly them dense and 73% of the FLOPs sparse."""


VARIANTS = (
    Variant("dense", "dense"),
    Variant("weight 2:4", "weight"),
    Variant("act 2:4", "activation", "2:4", "none"),
    Variant("act 2:4 + norm", "activation", "2:4", "norm"),
    Variant("act 2:4 + norm + LoRA", "activation", "2:4", "lora"),
    Variant("act 2:4 + norm, + attn_out", "activation", "2:4", "norm", extra_roles=frozenset({Role.ATTN_OUT})),
    Variant("act 4:8 + norm", "activation", "4:8", "norm"),
    Variant("act 1:4 + norm", "activation", "1:4", "norm"),
    Variant(f"act 2:4 + norm, B={DENSE_FLOP_BUDGET:g}", "activation", "2:4", "norm", DENSE_FLOP_BUDGET),
    Variant(f"act 2:4 + norm + LoRA, B={DENSE_FLOP_BUDGET:g}", "activation", "2:4", "lora", DENSE_FLOP_BUDGET),
    Variant(f"act 2:4 + norm, B={DENSE_FLOP_BUDGET:g} by model error", "activation", "2:4", "norm", DENSE_FLOP_BUDGET, "model"),
    Variant(f"act 2:4 + norm + LoRA, B={DENSE_FLOP_BUDGET:g} by model error", "activation", "2:4", "lora", DENSE_FLOP_BUDGET,
            ranking="model"),
    Variant("fp8 dense", "fp8", precision="fp8"),
    Variant("fp8 act 2:4 + norm", "activation", "2:4", "norm", precision="fp8"),
    Variant("fp8 act 2:4 + norm + LoRA", "activation", "2:4", "lora", precision="fp8"),
)


def psnr(images: Tensor, reference: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [-1, 1], on the [0, 1] scale (data range 1)."""
    mse = ((images - reference) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-12))


def mean_psnr(images: Tensor, reference: Tensor) -> float:
    """The mean of the per-image PSNRs, each capped at 100 dB (identical images)."""
    return psnr(images, reference).clamp(max=100).mean().item()


def ssim(images: Tensor, reference: Tensor, window: int = 5, sigma: float = 1.0) -> Tensor:
    """Per-image SSIM (Wang et al. 2004) of (B, C, H, W) images in [-1, 1], on the [0, 1] scale.

    Valid positions only (no padding, whose zeros would read as structure); a colour image's SSIM
    is the mean over its channels (as ``skimage.metrics.structural_similarity`` with ``channel_axis``).
    The usual 11x11 window is wider than an 8x8 digit, hence the default 5x5 (sigma 1).
    """
    c1, c2 = 0.01**2, 0.03**2
    a, b = (images.double() + 1) / 2, (reference.double() + 1) / 2
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    channels = a.shape[1]
    kernel = (torch.outer(g, g) / g.sum() ** 2)[None, None].expand(channels, 1, window, window).to(a.device)

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(x, kernel, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(1)


def classifier_features(images: Tensor):
    """[-1, 1] images -> (B, 64) numpy features in [0, 1] (unit scale: lbfgs converges in 2x fewer steps)."""
    return ((images.clamp(-1, 1) + 1) / 2).flatten(1).cpu().numpy()


class Harness:
    """Everything the variants share: model, data, selected layers, probe inputs, the dense layer inputs."""

    def __init__(self, settings: Settings, device: str, checkpoint: Path | None = None, model: str = "digits",
                 photo_source: str | Path | None = None):
        """``model``: a key of ``MODELS`` (which data, which metrics); ``checkpoint``: its file (default: the
        shipped one); ``photo_source``: an export of ``photos.py`` to read the photos from."""
        self.settings, self.device, self.spec = settings, torch.device(device), MODELS[model]
        self.model = load_checkpoint(checkpoint or self.spec.checkpoint, self.device)
        self.schedule = NoiseSchedule.named(SCHEDULE)
        self.data = load_digits_split(self.device) if model == "digits" else photos.load_photo_split(self.device, photo_source)
        self.null_class = self.model.config.num_classes
        gen = torch.Generator().manual_seed(settings.seed)
        x = self.data["x_test"][: settings.probe_images]
        # A copy, not a view of the split: Dynamo guards on a view's base, and the next call's labels have none.
        y = self.data["y_test"][: settings.probe_images].clone()
        # One probe batch per sweep timestep, with noise fixed once for all variants.
        self.probes, self.probe_noise = [], []
        for t in settings.sweep:
            noise = torch.randn(x.shape, generator=gen).to(x)
            t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=self.device)
            self.probes.append((self.schedule.add_noise(x, noise, t_batch), t_batch, y))
            self.probe_noise.append(noise)
        classes = self.model.config.num_classes
        self.sample_labels = torch.arange(classes, device=self.device).repeat_interleave(settings.samples_per_class)
        self.sample_noise = torch.randn((self.sample_labels.shape[0], *x.shape[1:]), generator=gen).to(self.device)
        self.report = explain(self.model, *self.probes[0], config=self.base_config())
        modules = dict(self.model.named_modules())
        self.layers: dict[str, nn.Linear] = {d.name: modules[d.name] for d in self.report.sparse}
        self.layer_inputs = self._capture_layer_inputs()
        self.classifier_test_accuracy: float | None = None
        self.classifier = self._train_classifier() if self.spec.digit_classifier else None

    @staticmethod
    def base_config(**fields: Any) -> LynxConfig:
        # The lynx defaults (min_features=256 included) select qkv, fc1 and fc2 of both models as
        # they are. speed_guard is a speed policy of the GPU kernels: off, so that the selection,
        # and hence the numbers, are the same on every device.
        return LynxConfig(**{"speed_guard": False, **fields})

    @torch.no_grad()
    def _capture_layer_inputs(self) -> dict[str, Tensor]:
        captured: dict[str, list[Tensor]] = {name: [] for name in self.layers}
        handles = [
            module.register_forward_pre_hook(lambda module, inputs, name=name: captured[name].append(inputs[0].detach()))
            for name, module in self.layers.items()
        ]
        try:
            for probe in self.probes:
                self.model(*probe)
        finally:
            for handle in handles:
                handle.remove()
        return {name: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]) for name, xs in captured.items()}

    def _train_classifier(self):
        """Logistic regression on the training digits; sets ``classifier_test_accuracy``."""
        from sklearn.linear_model import LogisticRegression
        from threadpoolctl import threadpool_limits

        classifier = LogisticRegression(max_iter=5000)
        # One BLAS thread: on a busy 2-core machine the threaded fit of this 1437 x 64 problem
        # takes 15 s instead of 0.1 s.
        with threadpool_limits(1):
            classifier.fit(classifier_features(self.data["x_train"]), self.data["y_train"].cpu().numpy())
        self.classifier_test_accuracy = float(
            classifier.score(classifier_features(self.data["x_test"]), self.data["y_test"].cpu().numpy())
        )
        return classifier

    def calibration_batches(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        s = self.settings
        return calibration_batches(self.data, self.schedule, s.calibration_batches, s.calibration_batch, s.seed + 1)


def calibration_batches(data: dict[str, Tensor], schedule: NoiseSchedule, count: int, size: int,
                        seed: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``count`` batches of ``size`` noised *training* images at random timesteps, as (x_t, t, y): the test split
    stays unseen by the LoRA fit and the sensitivities."""
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = data["x_train"], data["y_train"]
    device = x_train.device
    batches = []
    for _ in range(count):
        idx = torch.randint(0, x_train.shape[0], (size,), generator=gen).to(device)
        t = torch.randint(0, schedule.steps, (size,), generator=gen).to(device)
        noise = torch.randn((size, *x_train.shape[1:]), generator=gen).to(device)
        batches.append((schedule.add_noise(x_train[idx], noise, t), t, y_train[idx]))
    return batches


def lora_state(harness: Harness) -> tuple[Any, str | None]:
    """(calibrated LoRA factors, None) or (None, why the LoRA variant is pending)."""
    try:
        compensation = calibrate(harness.model, harness.calibration_batches(), harness.base_config(),
                                 rank=harness.settings.lora_rank, progress=False)
    except Exception as err:  # noqa: BLE001 - a broken calibrator must not hide the other variants
        return None, f"pending (calibration failed: {type(err).__name__}: {err})"
    return compensation, None


class VariantModel:
    """One variant as (a forward function, a per-layer function on captured inputs)."""

    def __init__(self, harness: Harness, variant: Variant, lora: Any = None, only: str | None = None):
        """``only``: sparsify just this one of the selected layers (the sensitivity ablation)."""
        self.variant = variant
        model = harness.model
        layers = [only] if only is not None else list(harness.layers)
        if variant.kind == "weight":
            n, m = (int(v) for v in variant.pattern.split(":"))
            model = copy.deepcopy(model)
            pruned = dict(model.named_modules())
            with torch.no_grad():
                for name in layers:
                    weight = pruned[name].weight
                    # keep_mask works along the last dim: for W (N, K) that is per output row, along K.
                    weight.mul_(keep_mask(weight, n, m))
            self.pruned = {name: pruned[name] for name in layers}
        self.config = None
        if variant.kind == "fp8":
            # Every linear on FP8 dense: lynx at precision "fp8" with no layer sparse.
            self.config = harness.base_config(precision="fp8", sparse_roles=frozenset())
            self.backend = LynxBackend(self.config, inductor=False, warn=False)
            model = torch.compile(model, backend=self.backend, dynamic=True)
        if variant.kind == "activation":
            self.config = harness.base_config(
                pattern=variant.pattern, compensation=variant.compensation, precision=variant.precision,
                compensation_state=dict(lora) if variant.compensation == "lora" else None,
                include=None if only is None else f"^{re.escape(only)}$",
                **({"sparse_roles": DEFAULT_SPARSE_ROLES | variant.extra_roles} if variant.extra_roles else {}),
                **({} if variant.dense_flop_budget is None else
                   {"sensitivity": (lora.layer_sensitivity if variant.ranking == "layer"
                                    else lora.model_sensitivity(variant.compensation)),
                    "dense_flop_budget": variant.dense_flop_budget}),
            )
            self.backend = LynxBackend(self.config, inductor=False)
            # Dynamic shapes: one trace serves the probe, held-out and sampling batch sizes.
            model = torch.compile(model, backend=self.backend, dynamic=True)
        self.forward: Callable[..., Tensor] = model

    def check_precision(self) -> None:
        """An FP8 row whose layers all stayed in their dtype would read as FP8 quality: refuse it."""
        if self.variant.precision != "fp8" or any(layer.precision == "e4m3" for layer in self.backend.report.layers):
            return
        reasons = sorted({layer.reason for layer in self.backend.report.layers})
        raise RuntimeError(f"{self.variant.name}: no layer runs in e4m3 ({'; '.join(reasons)[:300]})")

    def dense_layers(self) -> set[str]:
        """Selected layers that lynx kept dense for sensitivity (known once the model has run)."""
        if self.variant.kind != "activation":
            return set()
        return {d.name for d in self.backend.report.dense if d.reason.startswith("sensitivity")}

    def layer_output(self, name: str, layer: nn.Linear, x: Tensor) -> Tensor:
        if self.variant.kind == "weight":
            return self.pruned[name](x)
        fp8 = self.variant.precision == "fp8"
        if self.variant.kind == "activation" and name not in self.dense_layers():
            c = self.config
            down, up = (t.to(x.device) for t in c.compensation_state[name]) if c.compensation == "lora" else (None, None)
            if not fp8:
                return torch.ops.lynx.sparse_linear(x, layer.weight, layer.bias, c.n, c.m, c.norm_compensation, c.eps, down, up)
            weight = layer.weight
            if down is not None:
                weight, down = pack_lora(layer.weight, down.to(x.dtype), up.to(x.dtype))
            return torch.ops.lynx.sparse_linear_e4m3(x, *quantize_weight_e4m3(weight), layer.bias, c.n, c.m,
                                                     c.norm_compensation, c.eps, down)
        if fp8:
            return e4m3_linear(x, *quantize_weight_e4m3(layer.weight), layer.bias)
        return layer(x)


@torch.no_grad()
def evaluate(harness: Harness, variant_model: VariantModel, dense: dict[str, Any] | None) -> dict[str, Any]:
    s = harness.settings
    eps = [variant_model.forward(*probe) for probe in harness.probes]  # first: compiles, so lynx has decided
    variant_model.check_precision()
    inputs = harness.layer_inputs
    layer_errors = {
        name: relative_error(variant_model.layer_output(name, layer, inputs[name]), layer(inputs[name]))
        for name, layer in harness.layers.items()
    }
    heldout = slice(0, s.heldout_images)
    loss = heldout_loss(variant_model.forward, harness.schedule, harness.data["x_test"][heldout],
                        harness.data["y_test"][heldout], draws=s.heldout_draws)
    samples = ddim_sample(variant_model.forward, harness.schedule, harness.sample_noise, harness.sample_labels,
                          steps=s.ddim_steps, guidance_scale=s.guidance_scale, null_class=harness.null_class)
    result: dict[str, Any] = {
        "layer_error_mean": sum(layer_errors.values()) / len(layer_errors),
        "layer_error_worst": max(layer_errors.values()),
        "layer_errors": layer_errors,
        "heldout_loss": loss,
        # The denoising loss on the held-out probe images at each sweep timestep.
        "heldout_loss_by_t": {str(t): F.mse_loss(e, noise).item()
                              for t, e, noise in zip(s.sweep, eps, harness.probe_noise)},
        "eps": eps,
        "samples": samples,
    }
    if harness.classifier is not None:
        predicted = harness.classifier.predict(classifier_features(samples))
        result["digit_accuracy"] = float((torch.from_numpy(predicted) == harness.sample_labels.cpu()).float().mean())
    if dense is not None:
        eps_errors = [relative_error(e, d) for e, d in zip(eps, dense["eps"])]
        spec = harness.spec
        result |= {
            "eps_error_mean": sum(eps_errors) / len(eps_errors),
            "eps_error_by_t": dict(zip(map(str, s.sweep), eps_errors)),
            "heldout_loss_change_pct": 100 * (loss / dense["heldout_loss"] - 1),
            "psnr_db": mean_psnr(samples, dense["samples"]),
            "ssim": ssim(samples, dense["samples"], spec.ssim_window, spec.ssim_sigma).mean().item(),
        }
    return result


@torch.no_grad()
def single_layer_sensitivity(harness: Harness) -> dict[str, dict[str, float]]:
    """End-to-end eps error (mean over the sweep) with only one layer sparsified, per layer and
    per 2:4 method: shows which layers the whole-model differences come from."""
    dense_eps = [harness.model(*probe) for probe in harness.probes]
    methods = [v for v in VARIANTS if v.name in ("weight 2:4", "act 2:4 + norm")]
    sensitivity = {}
    for name in harness.layers:
        sensitivity[name] = {}
        for variant in methods:
            forward = VariantModel(harness, variant, only=name).forward
            errors = [relative_error(forward(*probe), dense) for probe, dense in zip(harness.probes, dense_eps)]
            sensitivity[name][variant.name] = sum(errors) / len(errors)
        torch._dynamo.reset()
    return sensitivity


def run(settings: Settings, device: str = "cpu", variants: tuple[Variant, ...] = VARIANTS,
        checkpoint: Path | None = None, progress: bool = True, model: str = "digits",
        photo_source: str | Path | None = None) -> dict[str, Any]:
    """Metrics of ``variants`` on ``model`` (a key of ``MODELS``; ``checkpoint`` defaults to its shipped file;
    dense is always measured first: the others are compared with it), plus the ``eps`` and ``samples``
    tensors (left out of the JSON) for the grid."""
    # Without duck sizing, a batch that happens to equal the image side (8 probe digits of 8x8) is
    # not tied to it, so each variant compiles once for every batch size instead of twice.
    with torch.fx.experimental._config.patch(use_duck_shape=False):
        return _run(settings, device, variants, checkpoint, progress, model, photo_source)


def _run(settings: Settings, device: str, variants: tuple[Variant, ...], checkpoint: Path | None, progress: bool,
         model: str, photo_source: str | Path | None) -> dict[str, Any]:
    started = time.time()
    harness = Harness(settings, device, checkpoint, model, photo_source)
    wants_lora = any(v.needs_calibration for v in variants)
    lora, lora_pending = lora_state(harness) if wants_lora else (None, None)
    results: dict[str, dict[str, Any]] = {}
    pending: dict[str, str] = {}
    variants = (VARIANTS[0],) + tuple(v for v in variants if v.kind != "dense")
    # A fresh backend per variant means a fresh Dynamo cache entry per (variant, input shape).
    with torch._dynamo.config.patch(recompile_limit=1 << 20, accumulated_recompile_limit=1 << 20):
        for variant in variants:
            if variant.needs_calibration and lora is None:
                pending[variant.name] = lora_pending
                continue
            if progress:
                print(f"[quality] {variant.name} ...", flush=True)
            variant_model = VariantModel(harness, variant, lora)
            results[variant.name] = evaluate(harness, variant_model, results.get("dense"))
            if variant.kind == "activation":
                report = variant_model.backend.report
                compiled_sparse = {d.name for d in report.sparse if d.role not in variant.extra_roles}
                kept_dense = variant_model.dense_layers()
                extra = {d.name for d in report.sparse if d.role in variant.extra_roles}
                if (compiled_sparse != set(harness.layers) - kept_dense or (kept_dense and variant.dense_flop_budget is None)
                        or bool(extra) != bool(variant.extra_roles)):
                    raise RuntimeError(
                        f"{variant.name}: lynx sparsified {sorted(compiled_sparse)}, expected {sorted(harness.layers)}")
                if variant.dense_flop_budget is not None:
                    flops = {name: layer.in_features * layer.out_features for name, layer in harness.layers.items()}
                    results[variant.name] |= {
                        "dense_layers": sorted(kept_dense),
                        "sparse_flop_share": sum(flops[n] for n in compiled_sparse) / sum(flops.values()),
                    }
            torch._dynamo.reset()
        sensitivity = single_layer_sensitivity(harness) if settings.sensitivity else None
    statistics = layer_statistics(harness)
    return {
        "model": model,
        "num_classes": harness.model.config.num_classes,
        "settings": asdict(settings),
        "device": device,
        "layers": list(harness.layers),
        "classifier_test_accuracy": harness.classifier_test_accuracy,
        "lora_rank": settings.lora_rank if lora is not None else None,
        "variants": results,
        "pending": pending,
        "single_layer_eps_error": sensitivity,
        "layer_statistics": statistics,
        "seconds": time.time() - started,
    }


TABLE_COLUMNS = (
    ("layer err mean", "layer_error_mean", "{:.4f}"),
    ("layer err worst", "layer_error_worst", "{:.4f}"),
    ("eps err", "eps_error_mean", "{:.4f}"),
    ("held-out loss", "heldout_loss", "{:.5f}"),
    ("loss vs dense", "heldout_loss_change_pct", "{:+.2f}%"),
    ("PSNR dB", "psnr_db", "{:.2f}"),
    ("SSIM", "ssim", "{:.4f}"),
    ("digit acc", "digit_accuracy", "{:.1%}"),
)


def kept_energy_share(values: Tensor) -> float:
    """||S(v)||^2 / ||v||^2 for the 2:4 top-|v| selection along the last dim (per row, summed over rows)."""
    kept = torch.where(keep_mask(values, 2, 4), values, torch.zeros_like(values))
    return (kept.double().square().sum() / values.double().square().sum()).item()


def excess_kurtosis(values: Tensor) -> float:
    """E[(v - mean)^4] / var^2 - 3 over all entries: 0 for a Gaussian, large for heavy tails and outliers."""
    v = values.double().flatten()
    centred = v - v.mean()
    return (centred.pow(4).mean() / centred.square().mean().square() - 3).item()


def layer_statistics(harness: Harness) -> dict[str, dict[str, float]]:
    """Per selected layer, of its dense inputs on the probe batches (each token's K features) and of its weight
    (each output row's K features): excess kurtosis, and the energy share that 2:4 keeps, which says why
    activations tolerate what weights do not."""
    return {name: {"input_kurtosis": excess_kurtosis(harness.layer_inputs[name]),
                   "input_2of4_energy_kept": kept_energy_share(harness.layer_inputs[name]),
                   "weight_kurtosis": excess_kurtosis(layer.weight),
                   "weight_2of4_energy_kept": kept_energy_share(layer.weight)}
            for name, layer in harness.layers.items()}


def table(output: dict[str, Any], tablefmt: str = "github") -> str:
    from tabulate import tabulate

    # A column no variant has (digit accuracy on the photos) is left out.
    columns = [c for c in TABLE_COLUMNS if any(c[1] in metrics for metrics in output["variants"].values())]
    rows = []
    for variant in VARIANTS:
        if variant.name not in output["variants"] and variant.name not in output["pending"]:
            continue
        if variant.name in output["pending"]:
            rows.append([variant.name, output["pending"][variant.name]] + [""] * (len(columns) - 1))
            continue
        metrics = output["variants"][variant.name]
        rows.append([variant.name] + [fmt.format(metrics[key]) if key in metrics else "-" for _, key, fmt in columns])
    headers = ["variant"] + [title for title, _, _ in columns]
    return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)


def timestep_table(output: dict[str, Any], key: str, fmt: str, tablefmt: str = "github") -> str:
    """One row per variant, one column per sweep timestep, of the per-timestep metric ``key``."""
    from tabulate import tabulate

    sweep = [str(t) for t in output["settings"]["sweep"]]
    rows = [[name, *(fmt.format(metrics[key][t]) for t in sweep)]
            for name, metrics in ((v.name, output["variants"].get(v.name)) for v in VARIANTS)
            if metrics is not None and key in metrics]
    return tabulate(rows, headers=["variant", *(f"t={t}" for t in sweep)], tablefmt=tablefmt, disable_numparse=True)


def findings(output: dict[str, Any]) -> dict[str, Any]:
    """The quality claims (the paper's ordering, the loss budget), checked on these numbers, whichever way they come out."""
    v = output["variants"]
    weight, naive, norm = v["weight 2:4"], v["act 2:4"], v["act 2:4 + norm"]
    return {
        "activation_2of4_norm_beats_weight_2of4_layer_error": norm["layer_error_mean"] < weight["layer_error_mean"],
        "activation_2of4_naive_beats_weight_2of4_layer_error": naive["layer_error_mean"] < weight["layer_error_mean"],
        "activation_2of4_norm_beats_weight_2of4_eps_error": norm["eps_error_mean"] < weight["eps_error_mean"],
        "activation_2of4_norm_beats_weight_2of4_heldout_loss": norm["heldout_loss"] < weight["heldout_loss"],
        "norm_compensation_beats_naive_layer_error": norm["layer_error_mean"] < naive["layer_error_mean"],
        "norm_compensation_beats_naive_eps_error": norm["eps_error_mean"] < naive["eps_error_mean"],
        "activation_2of4_norm_heldout_loss_change_pct": norm["heldout_loss_change_pct"],
        "activation_2of4_norm_heldout_loss_within_3pct": abs(norm["heldout_loss_change_pct"]) <= 3.0,
    } | {
        f"{budget_key(name)}_{what}": value
        for name in budget_variant_names(output)
        for what, value in (
            ("dense_layers", v[name]["dense_layers"]),
            ("sparse_flop_share", v[name]["sparse_flop_share"]),
            ("heldout_loss_change_pct", v[name]["heldout_loss_change_pct"]),
            ("heldout_loss_within_3pct", abs(v[name]["heldout_loss_change_pct"]) <= 3.0),
            ("beats_weight_2of4_heldout_loss", v[name]["heldout_loss"] < weight["heldout_loss"]),
        )
    } | fp8_findings(v) | ordering_findings(v) | plain_default_findings(v)


ORDERING = ("weight 2:4", "act 2:4", "act 2:4 + norm", "act 2:4 + norm + LoRA")
"""The ordering of end-to-end noise-prediction error the RT-Lynx paper reports, worst first."""


def ordering_findings(v: dict[str, Any]) -> dict[str, Any]:
    """Whether eps error falls along ``ORDERING`` (each measured neighbour pair), with the errors themselves."""
    present = [name for name in ORDERING if name in v]
    pairs = {f"{a} > {b}": v[a]["eps_error_mean"] > v[b]["eps_error_mean"] for a, b in zip(present, present[1:])}
    return {"eps_error_ordering": {name: v[name]["eps_error_mean"] for name in present},
            "eps_error_ordering_pairs": pairs,
            "eps_error_ordering_holds": all(pairs.values()),
            "eps_error_ordering_complete": len(present) == len(ORDERING)}


PLAIN_DEFAULT = "act 2:4 + norm"
"""lynx's plain default: norm compensation on every layer of the paper's roles, at every sampling step."""


def plain_default_findings(v: dict[str, Any]) -> dict[str, Any]:
    default = v[PLAIN_DEFAULT]
    return {"plain_default_heldout_loss_ratio": default["heldout_loss"] / v["dense"]["heldout_loss"],
            "plain_default_psnr_db": default["psnr_db"],
            "plain_default_ssim": default["ssim"]}


FP8_LOSS_RATIO_BOUND = 1.2


def fp8_findings(v: dict[str, Any]) -> dict[str, Any]:
    """FP8 against the same variant in the model's dtype: held-out loss ratios, and the LoRA one against its bound."""
    pairs = {"dense": ("fp8 dense", "dense"), "activation_2of4_norm": ("fp8 act 2:4 + norm", "act 2:4 + norm"),
             "activation_2of4_norm_lora": ("fp8 act 2:4 + norm + LoRA", "act 2:4 + norm + LoRA")}
    found = {f"fp8_{key}_heldout_loss_ratio": v[fp8]["heldout_loss"] / v[native]["heldout_loss"]
             for key, (fp8, native) in pairs.items() if fp8 in v and native in v}
    if "fp8_activation_2of4_norm_lora_heldout_loss_ratio" in found:
        found["fp8_activation_2of4_norm_lora_within_bound"] = (
            found["fp8_activation_2of4_norm_lora_heldout_loss_ratio"] <= FP8_LOSS_RATIO_BOUND)
    return found


def budget_variant_names(output: dict[str, Any]) -> list[str]:
    return [v.name for v in VARIANTS if v.dense_flop_budget is not None and v.name in output["variants"]]


def budget_key(name: str) -> str:
    """ "act 2:4 + norm + LoRA, B=0.3" -> "activation_2of4_norm_lora_budget" (a findings key prefix);
    "..., B=0.3 by model error" -> "..._budget_by_model_error"."""
    lora = "_lora" if "LoRA" in name else ""
    return f"activation_2of4_norm{lora}_budget" + ("_by_model_error" if "model error" in name else "")


def findings_text(found: dict[str, Any]) -> str:
    """The findings as sentences, for the results file a reader opens first."""

    def holds(key: str) -> str:
        return "yes" if found[key] else "NO"

    errors = found["eps_error_ordering"]
    failed = [pair for pair, ok in found["eps_error_ordering_pairs"].items() if not ok]
    lines = [
        f"- noise-prediction error falls in the order {' > '.join(errors)} "
        f"({' > '.join(f'{e:.4f}' for e in errors.values())}): "
        + ("holds" if found["eps_error_ordering_holds"] else f"does NOT hold (fails at {'; '.join(failed)})")
        + ("" if found["eps_error_ordering_complete"] else " (not every variant of the ordering was measured)"),
        f"- the plain default ({PLAIN_DEFAULT} on every selected layer at every step): held-out loss "
        f"{found['plain_default_heldout_loss_ratio']:.3f}x dense, samples {found['plain_default_psnr_db']:.2f} dB PSNR "
        f"and SSIM {found['plain_default_ssim']:.4f} against the dense samples from the same noise",
        "- activation 2:4 + norm has lower mean per-layer error than weight 2:4: "
        f"{holds('activation_2of4_norm_beats_weight_2of4_layer_error')}",
        "- activation 2:4 + norm has lower end-to-end noise-prediction error than weight 2:4: "
        f"{holds('activation_2of4_norm_beats_weight_2of4_eps_error')}",
        "- activation 2:4 + norm has lower held-out loss than weight 2:4: "
        f"{holds('activation_2of4_norm_beats_weight_2of4_heldout_loss')}",
        "- norm compensation lowers the mean per-layer error of activation 2:4: "
        f"{holds('norm_compensation_beats_naive_layer_error')}",
        "- norm compensation lowers the noise-prediction error of activation 2:4: "
        f"{holds('norm_compensation_beats_naive_eps_error')}",
        f"- held-out loss of activation 2:4 + norm vs dense: {found['activation_2of4_norm_heldout_loss_change_pct']:+.2f}% "
        f"(within 3%: {holds('activation_2of4_norm_heldout_loss_within_3pct')})",
    ]
    for name in (v.name for v in VARIANTS if v.dense_flop_budget is not None):
        key = budget_key(name)
        if f"{key}_dense_layers" not in found:
            continue
        lines.append(
            f"- {name} (dense: {', '.join(found[f'{key}_dense_layers']) or 'none'}; "
            f"{found[f'{key}_sparse_flop_share']:.0%} of the selected layers' FLOPs sparse): held-out loss vs dense "
            f"{found[f'{key}_heldout_loss_change_pct']:+.2f}% (within 3%: {holds(f'{key}_heldout_loss_within_3pct')}; "
            f"lower than weight 2:4: {holds(f'{key}_beats_weight_2of4_heldout_loss')})"
        )
    for key, what in (("dense", "dense"), ("activation_2of4_norm", "act 2:4 + norm"),
                      ("activation_2of4_norm_lora", "act 2:4 + norm + LoRA")):
        if f"fp8_{key}_heldout_loss_ratio" in found:
            lines.append(f"- held-out loss of FP8 {what} over {what} in the model's dtype: "
                         f"{found[f'fp8_{key}_heldout_loss_ratio']:.3f}x")
    if "fp8_activation_2of4_norm_lora_within_bound" in found:
        lines[-1] += f" (within {FP8_LOSS_RATIO_BOUND:g}x: {holds('fp8_activation_2of4_norm_lora_within_bound')})"
    return "\n".join(lines)


def label_font(size: int = 14):
    """A scalable font for the grid labels (Pillow's bundled one), or the fixed bitmap font where FreeType is missing."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def sample_grid(output: dict[str, Any], path: Path, columns: int = 20) -> None:
    """Rows = variants (labelled), columns = the same seeds / labels for every row.

    Digits: dark ink on white, 6x; colour photos as they are, 2x. The label column is as wide as the
    longest label."""
    from PIL import Image, ImageDraw

    names = [name for name in (v.name for v in VARIANTS) if name in output["variants"]]
    first = output["variants"][names[0]]["samples"]
    channels, side = first.shape[1], first.shape[-1]
    per_class, classes = output["settings"]["samples_per_class"], output["num_classes"]
    # Columns cycle through the classes (a few seeds each) so a row of digits reads 0..9 in order.
    order = [c * per_class + k for k in range(per_class) for c in range(classes)][:columns]
    zoom = 6 if side <= 16 else 2
    cell, gap, pad = side * zoom, 2, 8
    font = label_font()
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    boxes = [measure.textbbox((0, 0), name, font=font) for name in names]
    label_width = max(box[2] for box in boxes) + 2 * pad
    row = max(cell, max(box[3] for box in boxes) + 2 * pad)
    mode = "L" if channels == 1 else "RGB"
    white = 255 if mode == "L" else (255, 255, 255)
    image = Image.new(mode, (label_width + len(order) * (cell + gap), len(names) * (row + gap) + gap), color=white)
    draw = ImageDraw.Draw(image)
    for index, (name, box) in enumerate(zip(names, boxes)):
        top = gap + index * (row + gap)
        draw.text((pad, top + (row - box[3]) // 2), name, fill=0 if mode == "L" else (0, 0, 0), font=font)
        samples = output["variants"][name]["samples"].clamp(-1, 1)
        for col, sample_index in enumerate(order):
            sample = samples[sample_index]
            if mode == "L":
                # Dark ink on white, as the digits are usually shown (the data has ink = +1).
                pixels = ((1 - sample[0]) * 127.5).round().byte().cpu().numpy()
            else:
                pixels = ((sample + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
            tile = Image.fromarray(pixels).resize((cell, cell), Image.NEAREST)
            image.paste(tile, (label_width + col * (cell + gap), top + (row - cell) // 2))
    image.save(path)


def json_ready(output: dict[str, Any]) -> dict[str, Any]:
    strip = ("eps", "samples")
    out = dict(output)
    out["variants"] = {name: {k: v for k, v in m.items() if k not in strip} for name, m in output["variants"].items()}
    return out


def result_stem(model: str, device: str, quick: bool) -> str:
    """``quality-cpu`` (digits), ``quality-cuda-photos``, ``quality-cpu-photos-quick``..."""
    return f"quality-{torch.device(device).type}{MODELS[model].results_suffix}{'-quick' if quick else ''}"


def grid_name(model: str, quick: bool) -> str:
    """``quality-samples.png`` (digits), ``quality-samples-photos.png``..."""
    return f"quality-samples{MODELS[model].results_suffix}{'-quick' if quick else ''}.png"


def markdown(output: dict[str, Any], payload: dict[str, Any], table_text: str, findings_lines: str) -> str:
    from tabulate import tabulate

    spec = MODELS[output["model"]]
    summary = (
        f"# Quality of lynx variants on {spec.title} ({payload['device_name']}, {payload['date']})\n\n"
        f"`{payload['command']}`, torch {payload['torch']}, checkpoint `{payload['checkpoint']}`, "
        f"settings `{json.dumps(output['settings'])}`, sparse layers: {', '.join(output['layers'])}.\n\n"
        f"{table_text}\n\n## Findings\n\n{findings_lines}\n"
        "\n## Per timestep\n\nNoise-prediction error relative to dense, on the held-out probe images noised to t:\n\n"
        + timestep_table(output, "eps_error_by_t", "{:.4f}")
        + "\n\nDenoising loss (epsilon MSE) on the same held-out probe images at t:\n\n"
        + timestep_table(output, "heldout_loss_by_t", "{:.5f}") + "\n"
    )
    if output["single_layer_eps_error"]:
        rows = [[name, *(f"{e:.4f}" for e in errors.values())] for name, errors in output["single_layer_eps_error"].items()]
        methods = list(next(iter(output["single_layer_eps_error"].values())))
        summary += (
            "\n## One layer at a time\n\nEnd-to-end eps error (mean over the sweep) with only that layer sparsified:\n\n"
            + tabulate(rows, headers=["layer", *methods], tablefmt="github", disable_numparse=True) + "\n"
        )
    stats = output["layer_statistics"]
    columns = next(iter(stats.values()))
    summary += (
        "\n## Layer inputs and weights\n\nPer selected layer: excess kurtosis, and the share of the energy (sum of squares) "
        "that 2:4 keeps, of the dense inputs on the probe batches (per token) and of the weight (per output row):\n\n"
        + tabulate([[name, *(f"{value:.3f}" for value in values.values())] for name, values in stats.items()],
                   headers=["layer", *columns], tablefmt="github", disable_numparse=True) + "\n"
    )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="digits")
    parser.add_argument("--checkpoint", help="the model's checkpoint (default: the shipped one of --model)")
    parser.add_argument("--photos", metavar="NPZ", help="read the photos from this export of photos.py (default: the packages)")
    parser.add_argument("--quick", action="store_true", help="small settings (seconds on CPU for the digits)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-save", action="store_true", help="print the table only")
    args = parser.parse_args()
    # The model runs in float32, which the GPU kernels do not take: with them switched off every sparse layer runs
    # the reference op, on any device, so the figures measure the sparsity, the same on CPU and GPU.
    os.environ.setdefault(KERNELS_OFF_VARIABLE, "off")
    if args.device == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    spec = MODELS[args.model]
    output = run(spec.quick if args.quick else spec.settings, args.device, checkpoint=args.checkpoint, model=args.model,
                 photo_source=args.photos)
    found = findings(output)
    table_text, findings_lines = table(output), findings_text(found)
    print(table_text)
    print(findings_lines)
    if args.no_save:
        return
    checkpoint = Path(args.checkpoint or spec.checkpoint).resolve()
    root = CHECKPOINT.parents[2]
    payload = {
        "command": " ".join(["python benchmarks/quality.py", *sys.argv[1:]]),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device_name": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
        "quick": args.quick,
        "checkpoint": str(checkpoint.relative_to(root) if checkpoint.is_relative_to(root) else checkpoint),
        "findings": found,
        "table": table_text,
        **json_ready(output),
    }
    json_path = write_json(payload, RESULTS / f"{result_stem(args.model, args.device, args.quick)}.json")
    json_path.with_suffix(".md").write_text(markdown(output, payload, table_text, findings_lines))
    grid_path = RESULTS / grid_name(args.model, args.quick)
    sample_grid(output, grid_path)
    print(f"wrote {json_path} and {grid_path}")


if __name__ == "__main__":
    main()
