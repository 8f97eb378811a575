"""Continuous long-term memory of the ∞-former (Martins, Marinho & Martins 2022, "∞-former: Infinite Memory
Transformer", arXiv 2109.00301): Gaussian RBF basis, ridge regression, continuous Gaussian attention, unbounded
memory update and sticky memories. Decoder-agnostic: nothing here knows about layers, caches or states.

Notation: N basis functions, M samples of the old signal, L vectors per block,
D model width, H heads, Dh head width, Q queries.

* Signal (paper §3.1). Vectors ``X`` (L, D) placed at positions ``t_i`` in [0, 1] are represented as the continuous
  signal ``X(t) = B^T psi(t)``, with ``psi_j(t) = N(t; c_j, w_j^2)`` the normalised Gaussian pdf, centres ``c_j`` on
  ``linspace(0, 1, N / |S|)`` crossed with every width in ``S`` (:func:`basis_grid`).
* Ridge regression (§3.1, multivariate ridge regression): ``B = (F F^T + lambda I)^-1 F X`` with ``F = [psi(t_1) ...
  psi(t_L)]`` (N, L). Written ``B = G^T X`` with the fit matrix ``G = F^T (F F^T + lambda I)^-1`` (L, N), which depends
  on the configuration only: :func:`fit_matrix` builds it once in float64 with a Cholesky solve (never an explicit
  inverse), the caller casts it. Zero padding (as in the official code): the regression also sees ``L // 2`` zero
  vectors on each side of [0, 1] at the same spacing, and only the rows of the real points are kept; the edge basis
  functions are then determined by the data instead of by the ridge penalty alone.
* Continuous attention (§3.1; §2 for continuous attention): keys and values from the coefficients, ``K = B W_K``,
  ``V = B W_V``; per head and query ``s = q K^T / sqrt(Dh)``, ``mu = sigmoid(w_mu . s)``, ``sigma^2 =
  softplus(w_sigma . s)`` clamped from below; the density ``N(t; mu, sigma^2)`` gives ``r_j = E[psi_j] = N(mu;
  c_j, w_j^2 + sigma^2)`` in closed form (:func:`expected_basis`, integral over the whole real line as in the official
  code) and the context ``V^T r``. Gradients by autograd through the closed form (the same as the paper's
  exponential-family Jacobian).
* Unbounded memory (§3.2): the old signal is sampled at ``M`` points ``u_k = k / M``, the samples are placed at
  ``tau k / M`` (contracted into [0, tau]), the ``L`` new vectors at ``tau + (1 - tau) j / L``, and the signal is
  refitted (:meth:`ContinuousMemory.update`). The old coefficients enter detached: no gradient flows into them.
* Sticky memories (§3.3): the old signal is sampled where the queries attended. The attention mass of every query's
  Gaussian over ``D`` equal bins of [0, 1] is accumulated (:func:`bin_mass`); the samples are taken at the quantiles
  ``k / M`` of that histogram (:func:`histogram_quantiles`, inverse of the piecewise-linear CDF) instead of drawing
  bins at random as the official code does: deterministic, lower variance, and a flat histogram gives exactly the
  uniform samples ``k / M``.
* KL regulariser: ``KL(N(mu, sigma^2) || N(mu_0, sigma_0^2))`` (:func:`gaussian_kl`), the mu term optional.

Precision: the regression matrices are built in float64 and cast; the closed form and the refits run in float32 also
under bf16 autocast (the widths are ~0.01, so ``t - c_j`` needs more than bf16's 8 bits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from longctx.layers.kept import KeepsTables

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def exp_normal(x: Tensor) -> Tensor:
    """exp(x), with 0 where it would fall below ``e^floor``, half a unit of ``x`` above the log of the dtype's smallest
    normal number (about 2e-38 in float32).

    The Gaussians here reach far below that (``exp(-200)`` ten widths from a centre). PyTorch's vectorised CPU exp
    takes a slow path when an input lies under its normal range (measured: about 60x slower per element), and the
    subnormal results slow down the products that read them. Values this small are far below what any result can
    resolve, so they are exactly 0, and every other value is the same exp of the same argument.
    """
    floor = math.log(torch.finfo(x.dtype).tiny) + 0.5
    return torch.exp(x.clamp_min(floor)).masked_fill_(x < floor, 0.0)


# --------------------------------------------------------------------------------------------------------------------
# basis and regression (float64 construction)


def basis_grid(n_basis: int, widths: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Centres and widths (N,) float64: every width of ``widths`` crossed with the centres ``linspace(0, 1, N / |S|)``
    (width-major order: the first N / |S| functions have the first width)."""
    if n_basis < 1 or not widths or n_basis % len(widths):
        raise ValueError(f"n_basis ({n_basis}) must be a positive multiple of the number of widths ({len(widths)})")
    grid = torch.linspace(0.0, 1.0, n_basis // len(widths), dtype=torch.float64)  # (N / |S|,)
    sigmas, centres = torch.meshgrid(torch.tensor(list(widths), dtype=torch.float64), grid, indexing="ij")
    return centres.flatten(), sigmas.flatten()  # (N,), (N,)


def evaluate_basis(t: Tensor, centres: Tensor, widths: Tensor) -> Tensor:
    """psi(t): the normalised Gaussian pdfs at positions ``t`` (...,) -> (..., N), in the dtype of ``t``.

    Values under the dtype's smallest normal number (pdfs many widths from their centre; :func:`exp_normal`) are 0:
    they are far below anything the results can resolve, and subnormal operands slow down the matrix products that
    read them (the sticky update samples the signal through this matrix; 2 % of its entries were subnormal).
    """
    z = (t[..., None] - centres.to(t.dtype)) / widths.to(t.dtype)  # (..., N)
    psi = exp_normal(-0.5 * z * z - _LOG_SQRT_2PI) / widths.to(t.dtype)
    return psi.masked_fill_(psi < torch.finfo(psi.dtype).tiny, 0.0)


def padding_positions(n: int) -> tuple[Tensor, Tensor]:
    """The zero-padding points of a fit on ``n`` points: ``n // 2`` on each side of [0, 1] at spacing ``1 / n``.

    Left ``-(i - 1/2) / n``, right ``1 + (i - 1/2) / n`` for i = 1 .. n // 2 (float64). For the plain fit of ``n``
    points at ``(i - 1/2) / n`` this is the official ``linspace(-0.5 + 1/(2n), 1.5 - 1/(2n), 2n)``.
    """
    offsets = (torch.arange(1, n // 2 + 1, dtype=torch.float64) - 0.5) / n  # (n // 2,)
    return -offsets.flip(0), 1.0 + offsets


def fit_matrix(positions: Tensor, centres: Tensor, widths: Tensor, ridge: float, pad: bool = True) -> Tensor:
    """The ridge-regression fit matrix ``G`` (P, N) float64 for points at ``positions`` (P,): ``B = G^T X``.

    ``G^T = (F F^T + ridge I)^-1 F`` is computed with a Cholesky factorisation of the (symmetric positive definite)
    regularised Gram matrix, in float64. With ``pad`` the regression also fits zero vectors at
    :func:`padding_positions` (the official code's zero padding) and only the rows of ``positions`` are returned.
    """
    positions = positions.to(torch.float64)
    n_points, n_left = positions.numel(), 0
    if pad:
        left, right = padding_positions(n_points)
        n_left = left.numel()
        positions = torch.cat([left, positions, right])  # (P + 2 (P // 2),)
    design = evaluate_basis(positions, centres.double(), widths.double()).T  # F: (N, P')
    gram = design @ design.T + ridge * torch.eye(design.shape[0], dtype=torch.float64)  # (N, N), SPD for ridge > 0
    factor = torch.linalg.cholesky(gram)
    g_t = torch.cholesky_solve(design, factor)  # (N, P'): (F F^T + ridge I)^-1 F
    return g_t.T[n_left : n_left + n_points].contiguous()  # (P, N)


def block_positions(n: int) -> Tensor:
    """Positions ``(i - 1/2) / n`` (n,) float64 of a block fitted alone on [0, 1]."""
    return (torch.arange(1, n + 1, dtype=torch.float64) - 0.5) / n


def update_positions(n_samples: int, n_new: int, tau: float) -> tuple[Tensor, Tensor]:
    """Positions after an update: old samples at ``tau k / M`` (k = 1..M), new vectors at ``tau + (1 - tau) j / L``."""
    old = tau * torch.arange(1, n_samples + 1, dtype=torch.float64) / n_samples  # (M,)
    new = tau + (1.0 - tau) * torch.arange(1, n_new + 1, dtype=torch.float64) / n_new  # (L,)
    return old, new


# --------------------------------------------------------------------------------------------------------------------
# continuous attention maths


def expected_basis(mu: Tensor, sigma_sq: Tensor, centres: Tensor, widths: Tensor) -> Tensor:
    """r_j = E_{t ~ N(mu, sigma^2)}[psi_j(t)] = N(mu; c_j, w_j^2 + sigma^2), closed form over the real line.

    mu, sigma_sq (...,) -> (..., N), in the dtype of ``mu`` (call it in float32 or float64).
    """
    var = widths.to(mu.dtype) ** 2 + sigma_sq[..., None]  # (..., N)
    diff = mu[..., None] - centres.to(mu.dtype)  # (..., N)
    return torch.exp(-0.5 * diff * diff / var - 0.5 * torch.log(var) - _LOG_SQRT_2PI)


def gaussian_kl(mu: Tensor, sigma_sq: Tensor, sigma_0: float, mu_0: float | None = None) -> Tensor:
    """KL(N(mu, sigma^2) || N(mu_0, sigma_0^2)) elementwise; without ``mu_0`` the mean term is left out (official)."""
    ratio = sigma_sq / sigma_0**2
    kl = 0.5 * (ratio - torch.log(ratio) - 1.0)
    if mu_0 is not None:
        kl = kl + 0.5 * (mu - mu_0) ** 2 / sigma_0**2
    return kl


def bin_mass(mu: Tensor, sigma: Tensor, n_bins: int) -> Tensor:
    """Mass of N(mu, sigma^2) in each of ``n_bins`` equal bins of [0, 1]: mu, sigma (...,) -> (..., n_bins).

    ``Phi((e_{j+1} - mu) / sigma) - Phi((e_j - mu) / sigma)`` for the edges ``e_j = j / n_bins``; mass outside [0, 1]
    is not counted. Computed in the dtype of ``mu`` (float32 or float64).
    """
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=mu.dtype, device=mu.device)  # (D + 1,)
    cdf = torch.special.ndtr((edges - mu[..., None]) / sigma[..., None])  # (..., D + 1)
    return (cdf[..., 1:] - cdf[..., :-1]).clamp_min(0.0)


def attended_mass(mu: Tensor, sigma: Tensor, n_bins: int, mask: Tensor | None = None) -> Tensor:
    """The sticky histogram of a group of queries: :func:`bin_mass` summed over heads and queries.

    mu, sigma (B, H, Q) float32 or float64, mask (B, 1, Q) bool (None: every query) -> (B, n_bins). With ``z_j =
    (e_j - mu) / (sigma sqrt 2)`` the mass of bin j is ``(erf(z_{j+1}) - erf(z_j)) / 2``; the edges are one fused
    multiply-add per query and edge, the sum over the queries one matrix-vector product. About a quarter of the time
    of :func:`bin_mass` and a masked sum (measured, 4 heads x 1,024 queries, 128 bins, one thread: 0.9 against 3.9
    ms), for float32 rounding of the same order: each query's masses carry a few ulps of 1 (the erf values), so the
    sum of Q queries is within about ``Q eps`` of the float64 masses.
    """
    B, H, Q = mu.shape
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=mu.dtype, device=mu.device)  # (D + 1,)
    scale = torch.reciprocal(sigma * math.sqrt(2.0))  # (B, H, Q)
    erf = torch.addcmul((-mu * scale)[..., None], edges, scale[..., None]).erf_()  # (B, H, Q, D + 1)
    per_query = (erf[..., 1:] - erf[..., :-1]).view(B, H * Q, n_bins)  # twice each query's mass in each bin
    if mask is None:
        total = per_query.sum(1)  # (B, D)
    else:
        weights = mask.to(mu.dtype).expand(B, H, Q).reshape(B, 1, H * Q)
        total = torch.matmul(weights, per_query)[:, 0]  # (B, D)
    return (0.5 * total).clamp_min(0.0)


def histogram_quantiles(mass: Tensor, n_samples: int) -> Tensor:
    """Positions (B, M) at the quantiles ``k / M`` (k = 1..M) of the histograms ``mass`` (B, D) over [0, 1].

    The density is constant inside each bin, so the CDF is piecewise linear and its inverse is exact and continuous
    in the masses (chunking the queries that built the histogram moves the samples only by rounding). A flat
    histogram gives ``k / M`` exactly; an all-zero histogram is treated as flat. Positions are sorted.
    """
    B, D = mass.shape
    mass = mass.to(torch.float32 if mass.device.type == "mps" else torch.float64)  # MPS has no float64
    total = mass.sum(-1, keepdim=True)  # (B, 1)
    mass = torch.where(total > 0, mass, torch.ones_like(mass))
    cdf = torch.cat([mass.new_zeros(B, 1), torch.cumsum(mass, -1)], -1)  # (B, D + 1)
    cdf = cdf / cdf[:, -1:]
    levels = torch.arange(1, n_samples + 1, dtype=mass.dtype, device=mass.device) / n_samples  # (M,)
    levels = levels.expand(B, -1).contiguous()  # (B, M)
    upper = torch.searchsorted(cdf, levels).clamp(1, D)  # (B, M): first edge with cdf >= level
    lo, hi = cdf.gather(1, upper - 1), cdf.gather(1, upper)  # (B, M)
    frac = ((levels - lo) / (hi - lo).clamp_min(torch.finfo(mass.dtype).tiny)).clamp(0.0, 1.0)
    return (upper - 1 + frac) / D  # (B, M) float64 (float32 on MPS)


# --------------------------------------------------------------------------------------------------------------------
# the memory: constants and updates


class ContinuousMemory(nn.Module):
    """Regression constants of one configuration and the fit/update of coefficients; holds no recurrent state.

    Buffers (non-persistent, float32, built in float64): basis ``centres``/``widths`` (N,), ``fit_block`` (L, N) for
    the first block alone, ``fit_old`` (M, N) and ``fit_new`` (L, N) for an update (the two row blocks of the
    official ``G_inf``), ``sample_basis`` (M, N) = psi(k / M), and ``contract`` (N, N) = ``fit_old^T psi(k / M)``: the
    whole non-sticky contraction as one matrix, so an update costs N^2 D + L N D instead of (2 M + L) N D; and the
    grid's ``grid_centres`` (N / |S|,) and ``grid_widths`` (|S|,) for :meth:`expectation`.
    """

    def __init__(
        self,
        n_basis: int,
        widths: Sequence[float],
        ridge: float,
        tau: float,
        n_samples: int,
        block: int,
        pad: bool = True,
    ) -> None:
        super().__init__()
        self.n_basis, self.tau, self.n_samples, self.block = n_basis, tau, n_samples, block
        self.n_widths = len(widths)
        centres, sigmas = basis_grid(n_basis, widths)
        fit_block = fit_matrix(block_positions(block), centres, sigmas, ridge, pad)  # (L, N)
        old, new = update_positions(n_samples, block, tau)
        fit_update = fit_matrix(torch.cat([old, new]), centres, sigmas, ridge, pad)  # (M + L, N)
        uniform = torch.arange(1, n_samples + 1, dtype=torch.float64) / n_samples  # u_k = k / M
        sample_basis = evaluate_basis(uniform, centres, sigmas)  # (M, N)
        constants = {
            "centres": centres,
            "widths": sigmas,
            "fit_block": fit_block,
            "fit_old": fit_update[:n_samples],
            "fit_new": fit_update[n_samples:],
            "sample_basis": sample_basis,
            "contract": fit_update[:n_samples].T @ sample_basis,  # (N, N)
            "grid_centres": centres[: n_basis // self.n_widths],  # (G,): the centres of one width
            "grid_widths": sigmas[:: n_basis // self.n_widths],  # (S,): the widths
        }
        for name, value in constants.items():  # float32 subnormals zeroed, as in evaluate_basis
            value = value.to(torch.float32)
            self.register_buffer(
                name, value.masked_fill_(value.abs() < torch.finfo(value.dtype).tiny, 0.0), persistent=False
            )

    def fit(self, x: Tensor) -> Tensor:
        """Coefficients (B, N, D) of a first block x (B, L, D) placed alone on [0, 1]; float32 (or float64)."""
        wide = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            return torch.matmul(self.fit_block.T.to(wide), x.to(wide))  # (N, L) @ (B, L, D)

    def update(self, coeffs: Tensor, x: Tensor, samples: Tensor | None = None) -> Tensor:
        """Contract the signal of ``coeffs`` (B, N, D) into [0, tau], append the block x (B, L, D), refit.

        ``samples`` (B, M): where to sample the old signal (sticky memories); None = the uniform ``k / M``. The old
        coefficients are detached: the new coefficients depend on the parameters through ``x`` only. Computed in
        float32 (float64 for float64 inputs), also under autocast. The sum of :meth:`contracted` and :meth:`appended`,
        which a caller with several blocks at hand uses apart (all blocks' terms in one product).
        """
        return self.contracted(coeffs, samples) + self.appended(x)

    def appended(self, x: Tensor) -> Tensor:
        """The new block's part of an update: ``fit_new^T x`` for blocks x (..., L, D) -> (..., N, D) float32 (or
        float64)."""
        wide = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            return torch.matmul(self.fit_new.T.to(wide), x.to(wide))

    def contracted(self, coeffs: Tensor, samples: Tensor | None = None) -> Tensor:
        """The old signal's part of an update: ``coeffs`` (B, N, D) detached, sampled at ``samples`` (B, M) (None: the
        uniform ``k / M``) and fitted in [0, tau] -> (B, N, D) float32 (or float64)."""
        wide = torch.promote_types(coeffs.dtype, torch.float32)
        with torch.autocast(coeffs.device.type, enabled=False):
            old = coeffs.detach().to(wide)
            if samples is None:
                return torch.matmul(self.contract.to(wide), old)  # (N, N) @ (B, N, D)
            psi = evaluate_basis(samples.to(wide), self.centres, self.widths)  # (B, M, N)
            old_values = torch.matmul(psi, old)  # (B, M, D): the old signal at the samples
            return torch.matmul(self.fit_old.T.to(wide), old_values)

    def signal(self, coeffs: Tensor, t: Tensor) -> Tensor:
        """The signal X(t) = B^T psi(t): coeffs (B, N, D), t (B, P) or (P,) -> (B, P, D)."""
        return torch.matmul(evaluate_basis(t.to(coeffs.dtype), self.centres, self.widths), coeffs)

    def expectation(self, mu: Tensor, sigma_sq: Tensor) -> Tensor:
        """:func:`expected_basis` with this memory's basis: (...,) -> (..., N), in the dtype of ``mu``.

        Uses the grid structure (|S| widths x N / |S| centres, width-major) and a hand-written backward, see
        :class:`_GridExpectation`: the same values as :func:`expected_basis`, about half the time with its gradient.
        """
        centres, widths_sq = self.grid_centres.to(mu.dtype), self.grid_widths.to(mu.dtype).square()
        if not torch.is_grad_enabled():  # inference: the forward alone, without the autograd function's overhead
            return _grid_expectation(mu, sigma_sq, centres, widths_sq)[0].flatten(-2)
        return _GridExpectation.apply(mu, sigma_sq, centres, widths_sq)


def _grid_expectation(
    mu: Tensor, sigma_sq: Tensor, centres: Tensor, widths_sq: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The forward of :class:`_GridExpectation`: r (..., S, G) and the ``diff`` (..., G) and ``var`` (..., S) that its
    backward needs. ``centres`` (G,) and ``widths_sq`` (S,): the grid's centres and squared widths."""
    var = sigma_sq[..., None] + widths_sq  # (..., S)
    diff = mu[..., None] - centres  # (..., G) with G = N / S
    scale = torch.reciprocal(var).mul_(-0.5)  # (..., S): -1 / (2 v)
    shift = torch.log(var * (2 * math.pi)).mul_(-0.5)  # (..., S): -log sqrt(2 pi v)
    r = torch.addcmul(shift[..., :, None], diff.square()[..., None, :], scale[..., :, None])  # (..., S, G)
    return r.exp_(), diff, var


class _GridExpectation(torch.autograd.Function):
    """r = E_{N(mu, sigma^2)}[psi] for a grid basis, with an analytic backward.

    With ``d_c = mu - c`` and ``v_s = w_s^2 + sigma^2`` (|S| values per query), ``r_sc = exp(-d_c^2 / (2 v_s) - log
    sqrt(2 pi v_s))``: one fused multiply-add and one exp over (..., S, G), the centres innermost. Backward
    with ``gr = grad * r``: ``dmu = -sum_s (sum_c gr_sc d_c) / v_s`` and ``dsigma^2 = sum_s (sum_c gr_sc d_c^2) /
    (2 v_s^2) - (sum_c gr_sc) / (2 v_s)``: three reductions over the contiguous centre axis (the last one as a
    matrix-vector product). Autograd through the broadcasting closed form instead spends most of its time in
    broadcast reductions.
    """

    @staticmethod
    def forward(ctx, mu: Tensor, sigma_sq: Tensor, centres: Tensor, widths_sq: Tensor) -> Tensor:  # type: ignore[override]
        r, diff, var = _grid_expectation(mu, sigma_sq, centres, widths_sq)
        ctx.save_for_backward(r, diff, var)
        return r.flatten(-2)  # (..., N)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        r, diff, var = ctx.saved_tensors
        gr = grad.reshape(r.shape) * r  # (..., S, G)
        s0 = gr.sum(-1)  # (..., S): sums over centres
        grd = gr.mul_(diff[..., None, :])  # gr is not needed any more
        s1 = grd.sum(-1)
        s2 = torch.matmul(grd, diff[..., :, None]).squeeze(-1)
        grad_mu = -(s1 / var).sum(-1)
        grad_var = (0.5 * s2 / (var * var) - 0.5 * s0 / var).sum(-1)
        return grad_mu, grad_var, None, None


# --------------------------------------------------------------------------------------------------------------------
# continuous attention over the coefficients


def _project_coefficients_first(n_queries: int, n_basis: int, d_model: int, n_head: int) -> bool:
    """Whether ``V = B W_V`` then ``r V`` (N D^2 + Q N D) is cheaper than ``(r B) W_V`` (H Q N D + Q D^2)."""
    return (
        n_basis * d_model * d_model + n_queries * n_basis * d_model
        <= n_queries * d_model * d_model + n_head * n_queries * n_basis * d_model
    )


class ContinuousAttention(KeepsTables):
    """Gaussian continuous attention of per-head queries over a memory's coefficients (one layer's parameters).

    Parameters: ``key``/``value`` = W_K, W_V (D -> D, no bias), ``mu``/``sigma`` = w_mu, w_sigma (N -> 1, no bias,
    shared by the heads), all with PyTorch's default initialisation as in the official code. The keys ``K = B W_K``
    enter only through ``w . s`` and are never formed (see :meth:`density`).
    """

    def __init__(self, d_model: int, n_head: int, n_basis: int, min_var: float) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.min_var = n_head, d_model // n_head, min_var
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.mu = nn.Linear(n_basis, 1, bias=False)
        self.sigma = nn.Linear(n_basis, 1, bias=False)

    def _kept_directions(self, coeffs: Tensor) -> Tensor:
        """:meth:`_directions` of a version of the memory, kept between inference calls once a second call reads it:
        between two refits every token reads the same coefficients (the state's tensor itself), so one token of
        decoding needs them once; an evaluation segment, whose versions are new in every call, keeps nothing."""
        weights = [self.key.weight, self.mu.weight, self.sigma.weight]
        return self.kept("directions", weights, [coeffs], lambda: self._directions(coeffs), on_return=True)

    def _kept_context(self, r: Tensor, coeffs: Tensor, dtype: torch.dtype) -> Tensor:
        """:meth:`context` without autograd, always as ``r V`` with the values ``V = B W_V`` of this version (N D^2
        multiply-adds), kept once a second call reads the version. Made or kept, the same products in the same
        order: a result never depends on what an earlier call left behind."""

        def values() -> Tensor:
            with torch.autocast(coeffs.device.type, enabled=False):
                return self._values(coeffs.to(dtype), self.value.weight.to(dtype))  # (B, H, N, Dh)

        kept = self.kept(f"values_{dtype}", [self.value.weight], [coeffs], values, on_return=True)
        return torch.matmul(r.to(dtype), kept)  # (B, H, Q, Dh)

    def _directions(self, coeffs: Tensor) -> Tensor:
        """(B, N, D) -> ``W_K,h^T B^T w / sqrt(Dh)`` for w = w_mu, w_sigma: (B, H, Dh, 2) float32 (the scores' scale
        taken into the directions, so that a query's two logits are its dot products with them)."""
        B = coeffs.shape[0]
        weight = torch.cat([self.mu.weight, self.sigma.weight]).float()  # (2, N): w_mu, w_sigma
        summary = torch.matmul(weight, coeffs.float())  # (B, 2, D): B^T w for both
        directions = F.linear(summary, self.key.weight.float()).view(B, 2, self.n_head, self.head_dim)
        return directions.permute(0, 2, 3, 1).div(math.sqrt(self.head_dim))  # (B, H, Dh, 2)

    def _values(self, coeffs: Tensor, weight: Tensor) -> Tensor:
        """V = B W_V per head: coeffs (B, N, D), W_V (D, D) -> (B, H, N, Dh)."""
        B, N, _ = coeffs.shape
        return F.linear(coeffs, weight).view(B, N, self.n_head, self.head_dim).transpose(1, 2)

    def density(
        self, q: Tensor, coeffs: Tensor | Sequence[Tensor], version: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """mu = sigmoid(w_mu . s), sigma^2 = max(softplus(w_sigma . s), min_var) with s = q K^T / sqrt(Dh), K = B W_K.

        q (B, H, Q, Dh), coeffs (B, N, D) -> 2 x (B, H, Q) float32. The scores s (B, H, Q, N) are never formed:
        ``w . s = q . (W_K,h^T B^T w) / sqrt(Dh)`` (the products are linear), so the two logits need one (B, 2, D)
        summary of the coefficients per version instead of an N-wide score row per query. Same values and gradients
        as the paper's order (up to rounding), at Q Dh instead of Q N Dh + N D^2 multiply-adds per head. Float32 also
        under autocast: mu is a position with a resolution of ~1 / N, and sigma^2 reaches 1e-6.

        Several versions at once: ``coeffs`` a sequence of G versions (B, N, D) and ``version`` (B, Q) int64 the one
        each query reads (a negative index reads version 0, for queries the caller leaves out). The logits of every
        query against every version are one (B, H, Q, Dh) x (Dh, 2G) product, of which each query keeps its own.
        """
        versions = [coeffs] if isinstance(coeffs, Tensor) else list(coeffs)
        B, H, Q, Dh = q.shape
        with torch.autocast(q.device.type, enabled=False):
            keep = not torch.is_grad_enabled()
            directions = [self._kept_directions(c) if keep else self._directions(c) for c in versions]
            directions = directions[0] if len(directions) == 1 else torch.cat(directions, -1)  # (B, H, Dh, 2G)
            logits = torch.matmul(q.float(), directions)  # (B, H, Q, 2G)
            if len(versions) > 1:
                assert version is not None, "several versions need the version of each query"
                index = version.clamp_min(0)[:, None, :, None, None].expand(B, H, Q, 1, 2)
                logits = logits.view(B, H, Q, len(versions), 2).gather(3, index).squeeze(3)  # (B, H, Q, 2)
            mu_logit, sigma_logit = logits.unbind(-1)
            return torch.sigmoid(mu_logit), F.softplus(sigma_logit).clamp_min(self.min_var)

    def context(self, r: Tensor, coeffs: Tensor, dtype: torch.dtype) -> Tensor:
        """c = V^T r with V = B W_V: r (B, H, Q, N), coeffs (B, N, D) -> (B, H, Q, Dh) in ``dtype``."""
        if torch.is_grad_enabled():
            return self._context(r, coeffs, dtype)
        return self._kept_context(r, coeffs, dtype)

    def _context(self, r: Tensor, coeffs: Tensor, dtype: torch.dtype) -> Tensor:
        """:meth:`context` for this call alone, in the cheaper order of the products."""
        B, H, Q, N = r.shape
        D = coeffs.shape[-1]
        Dh = D // H
        r, coeffs = r.to(dtype), coeffs.to(dtype)
        if _project_coefficients_first(Q, N, D, H):
            return torch.matmul(r, self._values(coeffs, self.value.weight.to(dtype)))  # (B, H, Q, Dh)
        mixed = torch.matmul(r.reshape(B, H * Q, N), coeffs).view(B, H, Q, D)  # r^T B per head and query
        weight = self.value.weight.to(dtype).view(H, Dh, D)
        return torch.matmul(mixed, weight.transpose(-1, -2))  # (B, H, Q, Dh)

    def forward(self, q: Tensor, coeffs: Tensor, memory: ContinuousMemory) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, H, Q, Dh), coeffs (B, N, D) -> context (B, H, Q, Dh) in q's dtype, mu and sigma^2 (B, H, Q) fp32."""
        mu, sigma_sq = self.density(q, coeffs)
        with torch.autocast(q.device.type, enabled=False):
            r = memory.expectation(mu, sigma_sq)  # (B, H, Q, N) float32
        return self.context(r, coeffs, q.dtype), mu, sigma_sq
