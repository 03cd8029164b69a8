"""Stochastic-interpolant transport: paths, prediction targets, time sampling and the training loss.

Conventions (SiT, Ma et al. 2024, arXiv 2401.08740, Eq. 1-4), used by every module of this package:

- ``t`` lies in [0, 1]; **t = 0 is noise** ``x0 ~ N(0, I)`` and **t = 1 is data** ``x1``. This is the opposite of
  rectified-flow/SD3 time.
- ``xt = alpha_t * x1 + sigma_t * x0`` and its time derivative ``ut = d_alpha_t * x1 + d_sigma_t * x0``.
- The network sees ``t`` as a ``(B,)`` tensor in [0, 1] (ZigMa multiplies it by 1000 in its timestep embedder).
- A model predicts one of three fields, all functions of ``(xt, t)``:
  velocity ``v = E[ut | xt]``; score ``s = grad log p_t(xt) = -E[x0 | xt] / sigma_t``; noise ``eps = E[x0 | xt]``.

Layering follows SiT's ``transport/`` package (STYLE.md §1.2). A path (:mod:`zigma.paths`: ``LinearPath``,
``GVPPath``, ``VPPath``; SiT's ``ICPlan``, ``GVPCPlan``, ``VPCPlan`` in ``path.py``) knows ``alpha_t``, ``sigma_t``
and converts velocity, score and noise into each other. ``Transport`` holds time sampling and the loss.
``zigma.sampling`` holds the integrators and takes any callable ``model_fn(x, t, **cond)``. ``create_transport`` alone
maps user strings to the enums below (:func:`zigma.choices.parse_choice`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum

import torch
from torch import Tensor

from zigma.choices import parse_choice
from zigma.paths import DiffusionForm, GVPPath, LinearPath, Path, VPPath, expand_t_like_x

__all__ = [
    "DiffusionForm",
    "GVPPath",
    "LinearPath",
    "LossWeight",
    "Path",
    "PathType",
    "Prediction",
    "TimeDistribution",
    "Transport",
    "VPPath",
    "create_transport",
    "default_eps",
    "expand_t_like_x",
    "mean_flat",
    "parse_choice",
]


class PathType(Enum):
    """Interpolation path between noise (t = 0) and data (t = 1)."""

    LINEAR = "Linear"  # alpha_t = t, sigma_t = 1 - t
    GVP = "GVP"  # alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2)
    VP = "VP"  # variance-preserving SDE path (score-based diffusion, Song et al. 2021)


class Prediction(Enum):
    """What the network outputs."""

    VELOCITY = "velocity"  # E[ut | xt]
    SCORE = "score"  # grad log p_t(xt)
    NOISE = "noise"  # E[x0 | xt]


class LossWeight(Enum):
    """Loss weighting for score and noise predictions (SiT ``WeightType``); velocity prediction is never weighted."""

    NONE = "none"  # 1
    VELOCITY = "velocity"  # (g2_t / sigma_t)^2
    LIKELIHOOD = "likelihood"  # g2_t / sigma_t^2


class TimeDistribution(Enum):
    """How training times are drawn on the training interval [t0, t1] (``Transport.sample_time``)."""

    UNIFORM = "uniform"  # u ~ U[0, 1] (SiT)
    # u = sigmoid(m + s n), n ~ N(0, 1): Esser et al. 2024 (SD3, arXiv 2403.03206, Eq. 19), whose "lognorm(0, 1)" was
    # their best rectified-flow choice; with m = 0 it is symmetric about t = 1/2, so SD3's reversed time (t = 0 is
    # data there) gives the same draws; a positive m puts more training near the data end (t = 1) here
    LOGIT_NORMAL = "logit_normal"


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every non-batch dimension: (B, *S) -> (B,). Works for images (B, C, H, W) and video (B, T, C, H, W)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


# ---------------------------------------------------------------------------------------------------------------------
# Transport: time interval, time sampling, training loss, output conversion.
# ---------------------------------------------------------------------------------------------------------------------


_PATHS: dict[PathType, type[Path]] = {PathType.LINEAR: LinearPath, PathType.GVP: GVPPath, PathType.VP: VPPath}


def default_eps(path_type: PathType, prediction: Prediction) -> tuple[float, float]:
    """Upstream (SiT ``create_transport``) defaults for (train_eps, sample_eps).

    VP: (1e-5, 1e-3). Linear/GVP with score or noise prediction: (1e-3, 1e-3). Linear/GVP velocity: (0, 0), since the
    velocity is finite on all of [0, 1].
    """
    if path_type is PathType.VP:
        return 1e-5, 1e-3
    if prediction is not Prediction.VELOCITY:
        return 1e-3, 1e-3
    return 0.0, 0.0


class Transport:
    """Training objective and time interval of one (path, prediction, loss weight) choice.

    Build it with ``create_transport``; the constructor takes enums only.

    Args:
        path_type: the interpolation path.
        prediction: what the model outputs.
        loss_weight: weighting of the score/noise losses; must be ``LossWeight.NONE`` for velocity prediction.
        train_eps: margin kept away from the singular ends of [0, 1] when training (see ``check_interval``).
        sample_eps: the same margin for sampling and likelihood.
        time_distribution: how ``sample_time`` draws training times on the training interval.
        logit_normal_mean, logit_normal_std: m and s of ``TimeDistribution.LOGIT_NORMAL`` (SD3: 0 and 1).
    """

    def __init__(
        self,
        *,
        path_type: PathType,
        prediction: Prediction,
        loss_weight: LossWeight,
        train_eps: float,
        sample_eps: float,
        time_distribution: TimeDistribution = TimeDistribution.UNIFORM,
        logit_normal_mean: float = 0.0,
        logit_normal_std: float = 1.0,
    ):
        if not (isinstance(logit_normal_mean, (int, float)) and math.isfinite(logit_normal_mean)):
            raise ValueError(f"logit_normal_mean={logit_normal_mean!r} must be a finite number")
        if not (isinstance(logit_normal_std, (int, float)) and 0 < logit_normal_std < math.inf):
            raise ValueError(f"logit_normal_std={logit_normal_std!r} must be a number > 0")
        for name, eps in (("train_eps", train_eps), ("sample_eps", sample_eps)):
            if not (isinstance(eps, (int, float)) and 0 <= eps < 0.5):
                raise ValueError(f"{name}={eps!r} must be a number in [0, 0.5)")
        if prediction is Prediction.VELOCITY and loss_weight is not LossWeight.NONE:
            raise ValueError(
                f"loss_weight={loss_weight.value!r} has no effect with prediction='velocity' (the velocity loss is "
                "never weighted); use loss_weight=None, or prediction='score' or 'noise'"
            )
        self.path_type = path_type
        self.prediction = prediction
        self.loss_weight = loss_weight
        self.train_eps = float(train_eps)
        self.sample_eps = float(sample_eps)
        self.time_distribution = time_distribution
        self.logit_normal_mean = float(logit_normal_mean)
        self.logit_normal_std = float(logit_normal_std)
        self.path: Path = _PATHS[path_type]()

    def __repr__(self) -> str:
        return (
            f"Transport(path_type={self.path_type.value!r}, prediction={self.prediction.value!r}, "
            f"loss_weight={self.loss_weight.value!r}, train_eps={self.train_eps}, sample_eps={self.sample_eps}, "
            f"time_distribution={self.time_distribution.value!r}{self._logit_normal_repr()})"
        )

    def _logit_normal_repr(self) -> str:
        if self.time_distribution is not TimeDistribution.LOGIT_NORMAL:
            return ""
        return f", logit_normal_mean={self.logit_normal_mean}, logit_normal_std={self.logit_normal_std}"

    def check_interval(
        self,
        *,
        sde: bool = False,
        sampling: bool = False,
        reverse: bool = False,
        diffusion_form: DiffusionForm | str | None = None,
        last_step_size: float = 0.0,
    ) -> tuple[float, float]:
        """Time interval [t0, t1] for training, ODE/SDE sampling or likelihood (SiT ``Transport.check_interval``).

        With eps = sample_eps if ``sampling`` else train_eps, and t1_end = 1 - last_step_size for an SDE with a last
        step, else 1 - eps:

        - VP (not regular at t = 1): t0 = 0, t1 = t1_end.
        - Linear/GVP with score/noise prediction, or any SDE: t0 = eps if (SDE with SBDM diffusion) or score/noise
          prediction else 0; t1 = t1_end.
        - Linear/GVP velocity ODE or training: [0, 1].

        Args:
            sde: the interval of an SDE sampler. sampling: use sample_eps instead of train_eps.
            reverse: return (t1, t0), the interval of a data -> noise integration. (SiT returns (1 - t0, 1 - t1),
                which for VP starts at the singular t = 1; we simply swap the ends.)
            diffusion_form: the SDE diffusion form (only SBDM changes t0). last_step_size: SDE last-step size.
        Returns: (t0, t1) as Python floats; t0 < t1 unless ``reverse``.
        """
        if diffusion_form is not None:
            diffusion_form = parse_choice(DiffusionForm, diffusion_form, argument="diffusion_form")
        eps = self.sample_eps if sampling else self.train_eps
        t0, t1 = 0.0, 1.0
        t1_end = 1.0 - last_step_size if (sde and last_step_size > 0) else 1.0 - eps
        if not self.path.regular_at_ends:
            t1 = t1_end
        elif self.prediction is not Prediction.VELOCITY or sde:
            needs_t0 = (sde and diffusion_form is DiffusionForm.SBDM) or self.prediction is not Prediction.VELOCITY
            t0 = eps if needs_t0 else 0.0
            t1 = t1_end
        return (t1, t0) if reverse else (t0, t1)

    def sample_time(
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Training times t = t0 + u (t1 - t0) on the training interval [t0, t1] of ``check_interval``, with
        u ~ U[0, 1] or, for ``TimeDistribution.LOGIT_NORMAL``, u = sigmoid(m + s n), n ~ N(0, 1); (batch_size,) in
        ``dtype``."""
        t0, t1 = self.check_interval()
        if self.time_distribution is TimeDistribution.LOGIT_NORMAL:
            n = torch.randn(batch_size, device=device, dtype=dtype, generator=generator)
            u = torch.sigmoid(n * self.logit_normal_std + self.logit_normal_mean)
        else:
            u = torch.rand(batch_size, device=device, dtype=dtype, generator=generator)
        return u * (t1 - t0) + t0

    def prior_logp(self, z: Tensor) -> Tensor:
        """log N(z; 0, I) summed over the non-batch dims: -D/2 log(2 pi) - |z|^2 / 2; (B,) from z (B, *S)."""
        dim = z[0].numel()
        return -0.5 * dim * math.log(2 * math.pi) - 0.5 * z.flatten(1).pow(2).sum(dim=1)

    def velocity_from_output(self, output: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """Convert a model output (B, *S) at (x (B, *S), t (B,)) to a velocity (B, *S) according to ``prediction``."""
        if self.prediction is Prediction.VELOCITY:
            return output
        if self.prediction is Prediction.SCORE:
            return self.path.get_velocity_from_score(output, x, t)
        return self.path.get_velocity_from_noise(output, x, t)

    def score_from_output(self, output: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """Convert a model output (B, *S) at (x (B, *S), t (B,)) to a score (B, *S) according to ``prediction``."""
        if self.prediction is Prediction.VELOCITY:
            return self.path.get_score_from_velocity(output, x, t)
        if self.prediction is Prediction.SCORE:
            return output
        return self.path.get_score_from_noise(output, x, t)

    def loss_weight_t(self, x: Tensor, t: Tensor) -> Tensor:
        """Loss weight (B, 1, ..., 1): 1, (g2_t / sigma_t)^2 ("velocity") or g2_t / sigma_t^2 ("likelihood")."""
        if self.loss_weight is LossWeight.NONE:
            return torch.ones_like(expand_t_like_x(t, x))
        _, g2 = self.path.compute_drift(x, t)
        sigma_t = self.path.compute_sigma_t(expand_t_like_x(t, x))[0]
        if self.loss_weight is LossWeight.VELOCITY:
            return (g2 / sigma_t) ** 2
        return g2 / sigma_t**2

    def training_losses(
        self,
        model_fn: Callable[..., Tensor],
        x1: Tensor,
        *,
        t: Tensor | float | None = None,
        x0: Tensor | None = None,
        generator: torch.Generator | None = None,
        **cond,
    ) -> dict[str, Tensor]:
        """Per-sample loss of ``model_fn`` on data ``x1`` (SiT ``Transport.training_losses``).

        velocity: loss = mean_flat((v - ut)^2); noise: mean_flat(w_t (eps - x0)^2); score: mean_flat(w_t (sigma_t s +
        x0)^2), where w_t is ``loss_weight_t``.

        Args:
            model_fn: called once as ``model_fn(xt, t, **cond)`` with xt (B, *S) and t (B,); returns (B, *S).
            x1: data (B, *S), e.g. latents (B, C, H, W) or video latents (B, T, C, H, W).
            t: optional fixed times, (B,) or a float (for validation with fixed draws); default ``sample_time``.
            x0: optional fixed noise (B, *S); default N(0, I).
            generator: random generator for t and x0 when they are drawn here.
            **cond: conditioning passed to the model (e.g. ``y``, ``drop_cond``).
        Returns: dict with ``loss`` (B,), ``pred`` (model output), ``t`` (B,), ``x0``, ``xt``, ``ut`` (all (B, *S)).
            t is float32 (float64 if x1 is), whatever x1's dtype.
        Raises:
            ValueError: when t, x0 or the model output do not have the expected shape.
        """
        batch = x1.shape[0]
        t_dtype = torch.promote_types(x1.dtype, torch.float32)
        if t is None:
            t = self.sample_time(batch, device=x1.device, dtype=t_dtype, generator=generator)
        else:
            t = torch.as_tensor(t, device=x1.device, dtype=t_dtype)
            t = t.expand(batch) if t.ndim == 0 else t
            if t.shape != (batch,):
                raise ValueError(f"t must be a float or have shape ({batch},), got {tuple(t.shape)}")
        if x0 is None:
            x0 = torch.randn(x1.shape, device=x1.device, dtype=x1.dtype, generator=generator)
        elif x0.shape != x1.shape:
            raise ValueError(f"x0 must have x1's shape {tuple(x1.shape)}, got {tuple(x0.shape)}")
        xt, ut = self.path.plan(t, x0, x1)
        pred = model_fn(xt, t, **cond)
        if pred.shape != xt.shape:
            raise ValueError(f"model output has shape {tuple(pred.shape)}; expected the input's {tuple(xt.shape)}")
        if self.prediction is Prediction.VELOCITY:
            loss = mean_flat((pred - ut) ** 2)
        elif self.prediction is Prediction.NOISE:
            loss = mean_flat(self.loss_weight_t(xt, t) * (pred - x0) ** 2)
        else:
            sigma_t = self.path.compute_sigma_t(expand_t_like_x(t, xt))[0]
            loss = mean_flat(self.loss_weight_t(xt, t) * (sigma_t * pred + x0) ** 2)
        return {"loss": loss, "pred": pred, "t": t, "x0": x0, "xt": xt, "ut": ut}


def create_transport(
    path_type: PathType | str = "Linear",
    prediction: Prediction | str = "velocity",
    loss_weight: LossWeight | str | None = None,
    train_eps: float | None = None,
    sample_eps: float | None = None,
    time_distribution: TimeDistribution | str = "uniform",
    logit_normal_mean: float = 0.0,
    logit_normal_std: float = 1.0,
) -> Transport:
    """Build a ``Transport`` from user strings (SiT ``create_transport``, without its silent fallbacks).

    Args:
        path_type: "Linear", "GVP" or "VP" (case-insensitive).
        prediction: "velocity", "score" or "noise".
        loss_weight: None (= "none"), "velocity" or "likelihood"; only for score and noise prediction.
        train_eps, sample_eps: margins of ``Transport.check_interval``; each None takes ``default_eps``. Unlike
            SiT, values given here are always honoured (SiT resets them to 0 for Linear/GVP velocity and reads
            sample_eps's default from train_eps).
        time_distribution: "uniform" (SiT) or "logit_normal" (SD3), with ``logit_normal_mean`` and ``_std``.
    Returns: the Transport.
    Raises:
        ValueError: for an unknown name (listing the allowed values), a loss weight with velocity prediction, an
            eps outside [0, 0.5), or a logit-normal std <= 0.
    """
    path = parse_choice(PathType, path_type, argument="path_type")
    pred = parse_choice(Prediction, prediction, argument="prediction")
    weight = LossWeight.NONE if loss_weight is None else parse_choice(LossWeight, loss_weight, argument="loss_weight")
    default_train, default_sample = default_eps(path, pred)
    return Transport(
        path_type=path,
        prediction=pred,
        loss_weight=weight,
        train_eps=default_train if train_eps is None else train_eps,
        sample_eps=default_sample if sample_eps is None else sample_eps,
        time_distribution=parse_choice(TimeDistribution, time_distribution, argument="time_distribution"),
        logit_normal_mean=logit_normal_mean,
        logit_normal_std=logit_normal_std,
    )
