"""Fitting one layer's LoRA factors: a bounded sample of its input rows and a reduced-rank ridge fit.

Per layer, on a random training split of the sampled rows, the LoRA product ``A^T B^T``
(``lora_down`` A (r, K), ``lora_up`` B (N, r)) is fitted to the residual
``R = X W^T - s * S(X) W^T`` by reduced-rank ridge regression, the exact rank-r minimiser of
``||X A^T B^T - R||^2`` for ridge-regularised X^T X:

    C = (X^T X + lam I)^-1 X^T R          full-rank ridge solution (K, N)
    V = top-r right singular vectors of X C (the fitted outputs), (N, r)
    A = (C V)^T, B = V

Why: per ridge tried it is one linear solve and one symmetric eigendecomposition at most
min(K, N) square (``reduced_rank_fits``), deterministic, and it is the optimum that gradient
descent on the same loss could only approach. The ridge matters: with a few thousand rows and K
up to 4.6k, an unregularised fit chases noise (on dit-s-2's fc2 its held-out error was worse
than norm alone), so it is picked per layer from ``RIDGES`` on a validation fifth of the
training rows. The residual is not exactly linear in X, so ``steps`` Adam iterations on the same
loss can follow; default 0, as they did not lower the held-out error in our runs. Errors are
relative output errors ``||Y - Y'|| / ||Y||`` (Y the dense output, bias included) on the
held-out rows.

Precision: X^T X, X^T R, the solves and the eigendecompositions are float64, since the ridge can
be small against the largest eigenvalues of X^T X (activation outliers: on ``tests/test_fit.py``'s
problem the same fit in float32 is off by up to 1e-3 at small ridges); the products with the
fitted factors are float32, as the factors are stored.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import LynxConfig
from .metrics import relative_error
from .ops import sparse_linear_reference

RIDGES = (1e-2, 1e-1, 1.0)
"""Ridge strengths tried per layer when ``calibrate(ridge=None)``, relative to mean(diag(x^T x))."""

_NEGLIGIBLE_SINGULAR_VALUE = 1e-6
"""Singular values below this fraction of the largest carry under 1e-12 of the fitted output's
energy, and their vectors are not resolved by a float64 Gram matrix: they get zero factors."""

_SINGULAR = 1e-13
"""x^T x + ridge with its smallest eigenvalue below this fraction of the largest is singular in float64."""


class Reservoir:
    """A uniform sample of at most ``capacity`` of all the rows ever added (Algorithm R, batched)."""

    def __init__(self, capacity: int, generator: torch.Generator):
        self.capacity, self.generator = capacity, generator
        self.rows: Tensor | None = None
        self.filled = self.seen = 0

    def add(self, rows: Tensor) -> None:
        rows = rows.detach().reshape(-1, rows.shape[-1])
        if self.rows is None:
            self.rows = rows.new_empty(self.capacity, rows.shape[-1])
        take = min(self.capacity - self.filled, rows.shape[0])
        self.rows[self.filled : self.filled + take] = rows[:take]
        self.filled += take
        self.seen += take
        rest = rows[take:]
        if rest.shape[0]:
            # Row j (0-based over all rows seen) replaces a random slot with probability capacity / (j + 1).
            index = torch.arange(self.seen, self.seen + rest.shape[0], dtype=torch.float64)
            draw = (torch.rand(rest.shape[0], generator=self.generator, dtype=torch.float64) * (index + 1)).long()
            accepted = (draw < self.capacity).nonzero().squeeze(1)
            slots = draw[accepted]
            # Sequential Algorithm R lets the later of two rows drawn for one slot win.
            slots, last = _last_per_slot(slots)
            self.rows[slots.to(self.rows.device)] = rest[accepted[last].to(rest.device)]
            self.seen += rest.shape[0]

    def sample(self) -> Tensor | None:
        """The kept rows; None when the layer saw none."""
        return None if self.rows is None else self.rows[: self.filled]


def _last_per_slot(slots: Tensor) -> tuple[Tensor, Tensor]:
    unique, inverse = torch.unique(slots, return_inverse=True)
    last = torch.full((unique.numel(),), -1, dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(slots.numel()), reduce="amax"
    )
    return unique, last


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """MKL's multithreaded float64 eigensolver spin-waits on busy cores: on a shared 2-core machine
    a 384 x 384 ``eigh`` took 2-5 s on two threads and 0.04 s on one (1536 x 1536: 36 s against
    3 s). At the sizes calibration solves, one thread loses little where cores are idle."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    with _one_cpu_thread(matrix.device):
        return torch.linalg.eigh(matrix)


@dataclass(frozen=True)
class NormalEquations:
    """``x^T x`` (K, K) and ``x^T R`` (K, N) in float64: all the closed-form fit needs from the
    rows, and additive over blocks of rows (a fit on more rows reuses a fit's sums)."""

    gram: Tensor
    cross: Tensor

    @classmethod
    def of(cls, x: Tensor, residual: Tensor) -> NormalEquations:
        x64 = x.double()
        return cls(x64.t() @ x64, x64.t() @ residual.double())

    def __add__(self, other: NormalEquations) -> NormalEquations:
        return NormalEquations(self.gram + other.gram, self.cross + other.cross)


def fit_lora(x: Tensor, residual: Tensor, rank: int, ridge: float) -> tuple[Tensor, Tensor]:
    """(lora_down (r, K), lora_up (N, r)) minimising ||x A^T B^T - residual||^2 + ridge, closed form.

    ``ridge`` is relative to the mean diagonal of x^T x: it keeps the solve well posed when there
    are fewer rows than features, and stops the fit from chasing noise in rare directions.
    """
    return next(reduced_rank_fits(NormalEquations.of(x, residual), rank, [ridge]))


def reduced_rank_fits(normal: NormalEquations, rank: int, ridges: Iterable[float]) -> Iterator[tuple[Tensor, Tensor]]:
    """``fit_lora`` for several ridges, with every eigendecomposition at most ``min(K, N)`` square.

    K <= N: one eigendecomposition of x^T x serves every ridge, and the fitted outputs' subspace
    comes from a K x K one. K > N: a Cholesky solve per ridge, and an N x N eigendecomposition.
    """
    in_features, out_features = normal.cross.shape
    ridge_unit = normal.gram.diagonal().mean().clamp_min(1e-30)  # mean eigenvalue of x^T x
    if in_features > out_features:
        identity = torch.eye(in_features, dtype=normal.gram.dtype, device=normal.gram.device)
        for ridge in ridges:
            try:
                factor = torch.linalg.cholesky(normal.gram + ridge * ridge_unit * identity)
            except torch.linalg.LinAlgError:
                raise _singular(ridge) from None
            coef = torch.cholesky_solve(normal.cross, factor)  # ridge solution C (K, N)
            # (x C)^T (x C) = C^T x^T x C: its top eigenvectors are the rank-r output subspace
            # that keeps most of the fitted output.
            _, vectors = _eigh(coef.t() @ (normal.gram @ coef))
            top = vectors[:, -rank:].flip(1)
            yield (coef @ top).t().float().contiguous(), top.float().contiguous()
        return
    evals, evecs = _eigh(normal.gram)
    evals = evals.clamp_min(0)
    projected = evecs.t() @ normal.cross  # x^T R in the eigenbasis of x^T x
    for ridge in ridges:
        regularised = evals + ridge * ridge_unit
        if regularised[0] <= _SINGULAR * regularised[-1]:
            raise _singular(ridge)
        coef = projected / regularised.unsqueeze(1)  # ridge solution C, eigenbasis
        # x C and the (K, N) matrix sqrt(evals) C have the same Gram matrix, so the same right
        # singular vectors: the rank-r output subspace that keeps most of the fitted output.
        top = top_right_singular_vectors(evals.sqrt().unsqueeze(1) * coef, rank)
        yield (evecs @ (coef @ top)).t().float().contiguous(), top.float().contiguous()


def _singular(ridge: float) -> ValueError:
    return ValueError(f"fit_lora: x^T x + ridge is singular at ridge={ridge:g} (fewer rows than features, "
                      "or features that are always zero); use a ridge > 0")


def top_right_singular_vectors(matrix: Tensor, rank: int) -> Tensor:
    """(N, rank): the right singular vectors of ``matrix`` (K, N) with the largest singular values.

    From the eigendecomposition of the smaller of its two Gram matrices, ``min(K, N)`` square,
    instead of an SVD of the whole matrix. Vectors of negligible singular values come out zero.
    """
    rows, cols = matrix.shape
    if cols <= rows:
        _, vectors = _eigh(matrix.t() @ matrix)  # ascending eigenvalues
        return vectors[:, -rank:].flip(1)
    evals, left = _eigh(matrix @ matrix.t())
    singular = evals[-rank:].flip(0).clamp_min(0).sqrt()
    left = left[:, -rank:].flip(1)
    resolved = singular > _NEGLIGIBLE_SINGULAR_VALUE * singular[0]
    inverse = torch.where(resolved, 1 / singular.where(resolved, 1), 0)
    return (matrix.t() @ left) * inverse  # v_i = M^T u_i / s_i


def refine(x: Tensor, residual: Tensor, down: Tensor, up: Tensor, steps: int, lr: float) -> tuple[Tensor, Tensor]:
    """A few full-batch Adam steps on the mean squared residual, from the closed-form factors."""
    down, up = down.clone().requires_grad_(True), up.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([down, up], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = ((x @ down.t()) @ up.t() - residual).pow(2).mean()
            loss.backward()
            optimizer.step()
    return down.detach(), up.detach()


@dataclass(frozen=True)
class LayerFit:
    """One layer's fitted LoRA factors and their errors on held-out rows."""

    rank: int
    """Rank of the fitted factors (the requested rank, capped by K, N and the training rows)."""
    ridge: float
    """Ridge strength of the fit, relative to mean(diag(x^T x)) (chosen per layer by default)."""
    rows_train: int
    rows_heldout: int
    error_none: float
    """Relative output error on held-out rows of plain N:M sparsity."""
    error_norm: float
    """... with norm compensation (``Compensation.layer_sensitivity``)."""
    error_lora: float
    """... with norm compensation and the fitted LoRA."""
    lora_down: Tensor
    """(rank, in_features), fp32."""
    lora_up: Tensor
    """(out_features, rank), fp32."""


def fit_layer(
    rows: Tensor, weight: Tensor, bias: Tensor | None, config: LynxConfig, *, rank: int, holdout: float,
    ridge: float | None, steps: int, lr: float, generator: torch.Generator,
) -> LayerFit:
    """Fit LoRA factors for the linear layer ``(weight, bias)`` on its sampled input ``rows``
    under ``config``'s pattern, and measure the errors on the held-out ``holdout`` fraction."""
    # Fitting runs in fp32 (fp64 for the solve) whatever the model dtype: bf16 rows are exact in fp32.
    x = rows.float()
    weight = weight.detach().to(x.device, torch.float32)
    bias = None if bias is None else bias.detach().to(x.device, torch.float32)
    out_features, in_features = weight.shape
    order = torch.randperm(x.shape[0], generator=generator).to(x.device)
    n_heldout = max(1, round(holdout * x.shape[0]))
    train, heldout = x[order[n_heldout:]], x[order[:n_heldout]]

    def sparse(x: Tensor, norm: bool, down: Tensor | None = None, up: Tensor | None = None, bias=bias) -> Tensor:
        return sparse_linear_reference(x, weight, bias, config.n, config.m, norm, config.eps, down, up)

    residual = train @ weight.t() - sparse(train, True, bias=None)
    r = min(rank, in_features, out_features, train.shape[0])
    if ridge is None:
        # Pick the ridge on a validation part of the training rows (never the held-out ones).
        n_val = max(1, train.shape[0] // 5)
        fitting = NormalEquations.of(train[n_val:], residual[n_val:])
        fits = reduced_rank_fits(fitting, r, RIDGES)
        val_errors = [relative_error(train[:n_val] @ d.t() @ u.t(), residual[:n_val]) for d, u in fits]
        ridge = RIDGES[min(range(len(RIDGES)), key=val_errors.__getitem__)]
        normal = fitting + NormalEquations.of(train[:n_val], residual[:n_val])
    else:
        normal = NormalEquations.of(train, residual)
    down, up = next(reduced_rank_fits(normal, r, [ridge]))
    if steps:
        down, up = refine(train, residual, down, up, steps, lr)
    reference = torch.nn.functional.linear(heldout, weight, bias)
    return LayerFit(
        rank=r, ridge=ridge, rows_train=train.shape[0], rows_heldout=heldout.shape[0],
        error_none=relative_error(sparse(heldout, False), reference),
        error_norm=relative_error(sparse(heldout, True), reference),
        error_lora=relative_error(sparse(heldout, True, down, up), reference),
        lora_down=down.cpu(), lora_up=up.cpu(),
    )


__all__ = ["RIDGES", "LayerFit", "NormalEquations", "Reservoir", "fit_layer", "fit_lora", "reduced_rank_fits", "refine",
           "top_right_singular_vectors"]
