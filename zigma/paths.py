"""Interpolation paths xt = alpha_t x1 + sigma_t x0 (t = 0 noise, t = 1 data; see :mod:`zigma.transport`).

A path (``LinearPath``, ``GVPPath``, ``VPPath``; SiT's ``ICPlan``, ``GVPCPlan``, ``VPCPlan`` in ``path.py``) knows
``alpha_t``, ``sigma_t`` and their derivatives, converts velocity, score and noise into each other, and gives the SDE
diffusion coefficient w_t of a ``DiffusionForm``.
"""

from __future__ import annotations

import math
from enum import Enum

import torch
from torch import Tensor

from zigma.choices import parse_choice

__all__ = ["DiffusionForm", "GVPPath", "LinearPath", "Path", "VPPath", "expand_t_like_x"]


class DiffusionForm(Enum):
    """Form of the SDE diffusion coefficient w_t (SiT Table 2 and ``path.py::compute_diffusion``)."""

    CONSTANT = "constant"  # norm
    SBDM = "SBDM"  # norm * g2_t (matches score-based diffusion; infinite at t = 0 on Linear/GVP)
    SIGMA = "sigma"  # norm * sigma_t
    LINEAR = "linear"  # norm * (1 - t)
    DECREASING = "decreasing"  # 0.25 * (norm * cos(pi t) + 1)^2
    INCREASING_DECREASING = "increasing-decreasing"  # norm * sin(pi t)^2


def expand_t_like_x(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample time (B,) to (B, 1, ..., 1) so it broadcasts against x (B, *S)."""
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


class Path:
    """An interpolation path xt = alpha_t x1 + sigma_t x0: alpha_0 = 0 (VP: ~0), sigma_0 = 1, alpha_1 = 1, sigma_1 = 0.

    Subclasses define ``compute_alpha_t`` and ``compute_sigma_t`` and, where the generic quotients are unstable, the
    two ratios. Every method below works elementwise; ``t`` arguments of the conversion methods are (B,) and the
    field arguments (B, *S).

    Derivation (SiT Eq. 9; all expectations given xt = x): from x = alpha E[x1] + sigma E[x0] and
    v = d_alpha E[x1] + d_sigma E[x0] = (d_alpha / alpha) x + (d_sigma - (d_alpha / alpha) sigma) E[x0], and
    E[x0] = -sigma s, we get v = f + g2 s with f = (d_alpha / alpha) x and
    g2 = (d_alpha / alpha) sigma^2 - sigma d_sigma.
    """

    name: str = "path"
    # True when alpha, sigma, d_alpha, d_sigma are finite on all of [0, 1] (Linear, GVP). VP's d_sigma_t diverges at
    # t = 1, so VP never integrates or trains up to t = 1 (SiT ``check_interval``).
    regular_at_ends: bool = True

    def compute_alpha_t(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Data coefficient and its derivative: (alpha_t, d_alpha_t), both shaped like t."""
        raise NotImplementedError

    def compute_sigma_t(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Noise coefficient and its derivative: (sigma_t, d_sigma_t), both shaped like t."""
        raise NotImplementedError

    def compute_d_alpha_alpha_ratio_t(self, t: Tensor) -> Tensor:
        """d_alpha_t / alpha_t, shaped like t (infinite at t = 0 where alpha_0 = 0)."""
        alpha_t, d_alpha_t = self.compute_alpha_t(t)
        return d_alpha_t / alpha_t

    def compute_alpha_d_alpha_ratio_t(self, t: Tensor) -> Tensor:
        """alpha_t / d_alpha_t, shaped like t; finite at t = 0, which lets velocity -> score work there."""
        alpha_t, d_alpha_t = self.compute_alpha_t(t)
        return alpha_t / d_alpha_t

    def compute_drift(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Split the probability-flow velocity as v = f + g2 * score.

        Args:
            x: xt (B, *S); t: (B,).
        Returns: (f, g2) with f = (d_alpha_t / alpha_t) x of shape (B, *S) and
            g2 = (d_alpha_t / alpha_t) sigma_t^2 - sigma_t d_sigma_t of shape (B, 1, ..., 1).
            (SiT's ``compute_drift`` returns (-f, g2); g2 is the SBDM diffusion, "beta_t" in SiT Table 2.)
        """
        t = expand_t_like_x(t, x)
        return self.compute_d_alpha_alpha_ratio_t(t) * x, self.compute_g2_t(t)

    def compute_g2_t(self, t: Tensor) -> Tensor:
        """g2_t = (d_alpha_t / alpha_t) sigma_t^2 - sigma_t d_sigma_t, shaped like t (the score's factor in v)."""
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        return self.compute_d_alpha_alpha_ratio_t(t) * sigma_t**2 - sigma_t * d_sigma_t

    def compute_diffusion(self, t: Tensor, form: DiffusionForm | str, norm: float = 1.0) -> Tensor:
        """SDE diffusion coefficient w_t for the sampler x <- x + (v + w_t s) dt + sqrt(2 w_t) dW (SiT Eq. 4).

        Args:
            t: times of any shape; form: a ``DiffusionForm`` or its name; norm: its magnitude.
        Returns: w_t shaped like t. Only the chosen form is evaluated.
        """
        form = parse_choice(DiffusionForm, form, argument="diffusion_form")
        if form is DiffusionForm.CONSTANT:
            return torch.full_like(t, norm)
        if form is DiffusionForm.SBDM:
            return norm * self.compute_g2_t(t)
        if form is DiffusionForm.SIGMA:
            return norm * self.compute_sigma_t(t)[0]
        if form is DiffusionForm.LINEAR:
            return norm * (1 - t)
        if form is DiffusionForm.DECREASING:
            return 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2
        return norm * torch.sin(math.pi * t) ** 2  # DiffusionForm.INCREASING_DECREASING

    def plan(self, t: Tensor, x0: Tensor, x1: Tensor) -> tuple[Tensor, Tensor]:
        """Point and target on the path: xt = alpha_t x1 + sigma_t x0, ut = d_alpha_t x1 + d_sigma_t x0.

        Args:
            t: (B,) in [0, 1]; x0: noise (B, *S); x1: data (B, *S).
        Returns: (xt, ut), both (B, *S).
        """
        t = expand_t_like_x(t, x1)
        alpha_t, d_alpha_t = self.compute_alpha_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        return alpha_t * x1 + sigma_t * x0, d_alpha_t * x1 + d_sigma_t * x0

    # Conversions. velocity -> score/noise use alpha / d_alpha (finite at t = 0); score/noise -> velocity use
    # d_alpha / alpha (infinite at t = 0 on Linear/GVP, which is why those predictions sample on [eps, 1 - eps]).

    def get_score_from_velocity(self, velocity: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """Score s = (r v - x) / (sigma_t^2 - r d_sigma_t sigma_t) with r = alpha_t / d_alpha_t; (B, *S)."""
        t = expand_t_like_x(t, x)
        r = self.compute_alpha_d_alpha_ratio_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        return (r * velocity - x) / (sigma_t**2 - r * d_sigma_t * sigma_t)

    def get_noise_from_velocity(self, velocity: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """Noise eps = (r v - x) / (r d_sigma_t - sigma_t), r = alpha_t / d_alpha_t; (B, *S) from (B, *S), (B,)."""
        t = expand_t_like_x(t, x)
        r = self.compute_alpha_d_alpha_ratio_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        return (r * velocity - x) / (r * d_sigma_t - sigma_t)

    def get_velocity_from_score(self, score: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """Velocity v = f + g2 s (see ``compute_drift``); (B, *S) from (B, *S), (B,)."""
        f, g2 = self.compute_drift(x, t)
        return f + g2 * score

    def get_velocity_from_noise(self, noise: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """Velocity v = (d_alpha_t / alpha_t) x + (d_sigma_t - (d_alpha_t / alpha_t) sigma_t) eps; (B, *S)."""
        t = expand_t_like_x(t, x)
        q = self.compute_d_alpha_alpha_ratio_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        return q * x + (d_sigma_t - q * sigma_t) * noise

    def get_score_from_noise(self, noise: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """Score s = -eps / sigma_t; (B, *S). ``x`` is unused and kept for a uniform signature."""
        return -noise / self.compute_sigma_t(expand_t_like_x(t, x))[0]

    def get_noise_from_score(self, score: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """Noise eps = -sigma_t s; (B, *S). ``x`` is unused and kept for a uniform signature."""
        return -self.compute_sigma_t(expand_t_like_x(t, x))[0] * score

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearPath(Path):
    """Linear interpolant (SiT ``ICPlan``): alpha_t = t, sigma_t = 1 - t, ut = x1 - x0."""

    name = "Linear"

    def compute_alpha_t(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return t, torch.ones_like(t)

    def compute_sigma_t(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return 1 - t, -torch.ones_like(t)

    def compute_d_alpha_alpha_ratio_t(self, t: Tensor) -> Tensor:
        return 1 / t

    def compute_alpha_d_alpha_ratio_t(self, t: Tensor) -> Tensor:
        return t


class GVPPath(Path):
    """Generalised variance-preserving path (SiT ``GVPCPlan``): alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2)."""

    name = "GVP"

    def compute_alpha_t(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2)

    def compute_sigma_t(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.cos(t * math.pi / 2), -math.pi / 2 * torch.sin(t * math.pi / 2)

    def compute_d_alpha_alpha_ratio_t(self, t: Tensor) -> Tensor:
        return math.pi / (2 * torch.tan(t * math.pi / 2))

    def compute_alpha_d_alpha_ratio_t(self, t: Tensor) -> Tensor:
        return 2 / math.pi * torch.tan(t * math.pi / 2)


class VPPath(Path):
    """Variance-preserving path (SiT ``VPCPlan``, Song et al. 2021 VP-SDE with time reversed, t = 1 data).

    log alpha_t = -1/4 (1 - t)^2 (sigma_max - sigma_min) - 1/2 (1 - t) sigma_min, sigma_t = sqrt(1 - alpha_t^2),
    d log alpha_t / dt = beta_t / 2 with beta_t = sigma_min + (1 - t)(sigma_max - sigma_min).
    alpha_0 = exp(-5.025) ~ 6.6e-3 with the defaults, so t = 0 is noise only up to that factor (as upstream).
    """

    name = "VP"
    regular_at_ends = False  # d_sigma_t = -alpha_t d_alpha_t / sigma_t diverges at t = 1

    def __init__(self, sigma_min: float = 0.1, sigma_max: float = 20.0):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def _log_mean_coeff(self, t: Tensor) -> Tensor:
        return -0.25 * (1 - t) ** 2 * (self.sigma_max - self.sigma_min) - 0.5 * (1 - t) * self.sigma_min

    def _half_beta(self, t: Tensor) -> Tensor:
        """d log alpha_t / dt = beta_t / 2."""
        return 0.5 * (1 - t) * (self.sigma_max - self.sigma_min) + 0.5 * self.sigma_min

    def compute_alpha_t(self, t: Tensor) -> tuple[Tensor, Tensor]:
        alpha_t = torch.exp(self._log_mean_coeff(t))
        return alpha_t, alpha_t * self._half_beta(t)

    def compute_sigma_t(self, t: Tensor) -> tuple[Tensor, Tensor]:
        alpha_sq = torch.exp(2 * self._log_mean_coeff(t))
        sigma_t = torch.sqrt(1 - alpha_sq)
        return sigma_t, -alpha_sq * self._half_beta(t) / sigma_t

    def compute_d_alpha_alpha_ratio_t(self, t: Tensor) -> Tensor:
        return self._half_beta(t)

    def compute_alpha_d_alpha_ratio_t(self, t: Tensor) -> Tensor:
        return 1 / self._half_beta(t)

    def compute_g2_t(self, t: Tensor) -> Tensor:
        """g2_t = beta_t / 2: the generic formula simplified with alpha_t^2 + sigma_t^2 = 1."""
        return self._half_beta(t)

    def __repr__(self) -> str:
        return f"VPPath(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"
