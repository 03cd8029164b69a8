"""Samplers for a ``Transport``: probability-flow ODE, SDE, classifier-free guidance and likelihood.

Time runs as in ``zigma.transport``: t = 0 is noise x0 ~ N(0, I), t = 1 is data, so sampling integrates 0 -> 1 and the
likelihood integrates 1 -> 0. Every sampler takes the network at call time as a plain callable
``model_fn(x, t, **cond)`` with x (B, *S) and t (B,), returning the transport's prediction (velocity, score or noise)
with x's shape, so the integrators are tested against analytic fields (SiT ``transport/integrators.py`` and
``Sampler``; STYLE.md §1.2).

Guarantees that SiT does not give: each model call is counted (``SampleResult.nfe``); the SDE calls the model once
per drift evaluation (SiT calls it twice, for the drift and the score); a non-finite model output raises
``FloatingPointError`` naming the step and t; every name is an enum parsed in one place.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor
from torchdiffeq import odeint

from zigma.transport import DiffusionForm, Transport, expand_t_like_x, parse_choice

__all__ = [
    "LastStep",
    "LikelihoodResult",
    "OdeMethod",
    "SampleResult",
    "Sampler",
    "SdeMethod",
    "classifier_free_guidance",
    "nll_bits_per_dim",
]

ModelFn = Callable[..., Tensor]


class OdeMethod(Enum):
    """ODE integrators (torchdiffeq). For dopri5 ``num_steps`` counts output points only; the others step on them."""

    DOPRI5 = "dopri5"  # adaptive Dormand-Prince 5(4), atol/rtol
    EULER = "euler"  # 1 model call per step
    HEUN = "heun"  # Heun's 2nd-order method (explicit trapezoid, torchdiffeq "heun2"): 2 calls per step
    MIDPOINT = "midpoint"  # 2 calls per step
    RK4 = "rk4"  # 3/8-rule Runge-Kutta (torchdiffeq "rk4"): 4 calls per step


_TORCHDIFFEQ_NAME = {
    OdeMethod.DOPRI5: "dopri5",
    OdeMethod.EULER: "euler",
    OdeMethod.HEUN: "heun2",
    OdeMethod.MIDPOINT: "midpoint",
    OdeMethod.RK4: "rk4",
}


class SdeMethod(Enum):
    """SDE integrators (SiT ``integrators.sde``)."""

    EULER = "Euler"  # Euler-Maruyama: 1 model call per step
    HEUN = "Heun"  # noise first, then a Heun (trapezoid) drift step: 2 model calls per step


class LastStep(Enum):
    """Final SDE step from t1 = 1 - last_step_size to t = 1 (``None`` means no last step)."""

    MEAN = "Mean"  # x + (v + w_t s) h: the noise-free mean of one more Euler-Maruyama step
    TWEEDIE = "Tweedie"  # E[x1 | xt] = (xt + sigma_t^2 s) / alpha_t
    EULER = "Euler"  # x + v h: one probability-flow Euler step


@dataclass(frozen=True)
class SampleResult:
    """Output of a sampler.

    Attributes:
        x: the final state (B, *S): data for sampling, noise for a reversed ODE.
        nfe: number of model calls.
        trajectory: (N, B, *S) states at ``times`` including the initial one, or None unless requested.
        times: (N,) times of ``trajectory`` (float32 or float64), or None unless requested.
    """

    x: Tensor
    nfe: int
    trajectory: Tensor | None = None
    times: Tensor | None = None


@dataclass(frozen=True)
class LikelihoodResult:
    """Output of ``nll_bits_per_dim``.

    Attributes:
        bpd: (B,) negative log-likelihood in bits per dimension, -logp / (D ln 2), D = numel of one sample.
        logp: (B,) log-density of x1 in nats, in the space the model works in (e.g. scaled latents).
        x0: (B, *S) the noise that the probability-flow ODE maps x1 to.
        nfe: number of model calls.
    """

    bpd: Tensor
    logp: Tensor
    x0: Tensor
    nfe: int


def _time_dtype(x: Tensor) -> torch.dtype:
    """Times are float32 (float64 for float64 states) even when x is half precision."""
    return torch.promote_types(x.dtype, torch.float32)


def _batch_time(t: Tensor | float, x: Tensor) -> Tensor:
    """A scalar time as a (B,) tensor on x's device."""
    t = torch.as_tensor(t, dtype=_time_dtype(x), device=x.device)
    return t.reshape(1).expand(x.shape[0]).contiguous()


def _check_num_steps(num_steps: int) -> None:
    if not (isinstance(num_steps, int) and num_steps >= 2):
        raise ValueError(f"num_steps={num_steps!r} must be an integer >= 2 (it counts time points, ends included)")


class _ModelCaller:
    """Calls ``model_fn(x, t, **cond)``, counts the calls and rejects wrong shapes and non-finite outputs."""

    def __init__(self, model_fn: ModelFn, cond: dict, where: str):
        self.model_fn = model_fn
        self.cond = cond
        self.where = where
        self.nfe = 0

    def __call__(self, x: Tensor, t: Tensor, step: int) -> Tensor:
        """Model output (B, *S) at x (B, *S), t (B,); ``step`` is only used in the error message."""
        out = self.model_fn(x, t, **self.cond)
        self.nfe += 1
        if out.shape != x.shape:
            raise ValueError(f"{self.where}: model output has shape {tuple(out.shape)}, expected {tuple(x.shape)}")
        if not bool(torch.isfinite(out).all()):
            raise FloatingPointError(
                f"{self.where}: model output is not finite at step {step}, t={float(t[0]):.6g} "
                f"(model evaluation {self.nfe})"
            )
        return out


def _odeint(func, state, times: Tensor, method: OdeMethod, atol: float, rtol: float):
    """torchdiffeq ``odeint`` over ``times``; dopri5 is told to land on the last time instead of stepping past it
    and interpolating back (torchdiffeq's default), so the model is never called outside the interval."""
    options = {"step_t": times[-1:]} if method is OdeMethod.DOPRI5 else None
    return odeint(func, state, times, method=_TORCHDIFFEQ_NAME[method], atol=atol, rtol=rtol, options=options)


def _check_finite_state(x: Tensor, where: str, step: int, t: float) -> None:
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"{where}: the state became non-finite at step {step}, t={t:.6g}")


class _StepCountingFunc:
    """Base of the torchdiffeq right-hand sides: torchdiffeq calls ``callback_step`` before every solver step, which
    gives the step index for error messages (dopri5: attempted steps, rejected ones included)."""

    def __init__(self, caller: _ModelCaller, transport: Transport):
        self.caller = caller
        self.transport = transport
        self.step = 0
        self._callbacks = 0

    def callback_step(self, t0: Tensor, y0: Tensor, dt: Tensor) -> None:
        self.step = self._callbacks
        self._callbacks += 1


class _OdeDrift(_StepCountingFunc):
    """dx/dt = v(x, t), the model output converted to a velocity."""

    def __call__(self, t: Tensor, x: Tensor) -> Tensor:
        tb = _batch_time(t, x)
        out = self.caller(x, tb, self.step)
        return self.transport.velocity_from_output(out, x, tb)


class Sampler:
    """Builds sampling functions for one ``Transport`` (SiT ``Sampler``).

    ``sample_ode`` and ``sample_sde`` validate their settings when called and return a function
    ``sample(x0, model_fn, **cond) -> SampleResult``; the network arrives at call time.

    Args:
        transport: fixes the path, the prediction type (outputs are converted to velocity/score) and the eps interval.
    """

    def __init__(self, transport: Transport):
        self.transport = transport

    def sample_ode(
        self,
        *,
        method: OdeMethod | str = "dopri5",
        num_steps: int = 50,
        atol: float = 1e-6,
        rtol: float = 1e-3,
        reverse: bool = False,
        return_trajectory: bool = False,
    ) -> Callable[..., SampleResult]:
        """Probability-flow ODE dx/dt = v(x, t) on ``linspace(t0, t1, num_steps)`` (SiT ``Sampler.sample_ode``).

        For fixed-step methods the grid is the step grid: num_steps = 16 means 15 steps, and euler never evaluates
        the model at t1. For dopri5 the grid only sets the output points; atol and rtol set the accuracy.

        Args:
            method: an ``OdeMethod`` name. num_steps: number of time points, ends included.
            atol, rtol: dopri5 tolerances (ignored by fixed-step methods).
            reverse: integrate data -> noise on (t1, t0) instead of noise -> data.
            return_trajectory: keep every grid state in ``SampleResult.trajectory``.
        Returns: ``sample(x0, model_fn, **cond)`` mapping x0 (B, *S) (noise; data if ``reverse``) to a SampleResult.
        Raises:
            ValueError: for an unknown method or num_steps < 2.
        """
        method = parse_choice(OdeMethod, method, argument="method")
        _check_num_steps(num_steps)
        t0, t1 = self.transport.check_interval(sampling=True, reverse=reverse)
        transport = self.transport

        def sample(x0: Tensor, model_fn: ModelFn, **cond) -> SampleResult:
            """Integrate x0 (B, *S) with ``model_fn(x, t, **cond)``; see ``Sampler.sample_ode``."""
            caller = _ModelCaller(model_fn, cond, f"sample_ode({method.value})")
            drift = _OdeDrift(caller, transport)
            times = torch.linspace(t0, t1, num_steps, dtype=_time_dtype(x0), device=x0.device)
            with torch.no_grad():
                traj = _odeint(drift, x0, times, method, atol, rtol)
            _check_finite_state(traj[-1], caller.where, drift.step, t1)
            if return_trajectory:
                return SampleResult(x=traj[-1], nfe=caller.nfe, trajectory=traj, times=times)
            return SampleResult(x=traj[-1], nfe=caller.nfe)

        return sample

    def sample_sde(
        self,
        *,
        method: SdeMethod | str = "Euler",
        diffusion_form: DiffusionForm | str = "sigma",
        diffusion_norm: float = 1.0,
        last_step: LastStep | str | None = "Mean",
        last_step_size: float = 0.04,
        num_steps: int = 250,
        return_trajectory: bool = False,
    ) -> Callable[..., SampleResult]:
        """Reverse-time SDE dx = (v + w_t s) dt + sqrt(2 w_t) dW on ``linspace(t0, t1, num_steps)`` plus a last step.

        SiT Eq. 4 / ``Sampler.sample_sde``: the step is x <- x + (v + w_t s) dt + sqrt(2 w_t dt) z, z ~ N(0, I), with
        v and s derived from one model call. t1 = 1 - last_step_size when there is a last step (see
        ``Transport.check_interval``); the last step then goes from t1 to 1. Heun skips its corrector on a final step
        that ends at t = 1, where the score is undefined on Linear/GVP (as EDM's Heun does at sigma = 0).
        Model calls: (num_steps - 1) per step for Euler, 2 (num_steps - 1) for Heun (minus one when the corrector is
        skipped), plus one for the last step.

        Args:
            method: an ``SdeMethod`` name. diffusion_form: a ``DiffusionForm`` name; diffusion_norm: its magnitude.
            last_step: a ``LastStep`` name or None. last_step_size: its size h in (0, 1) (ignored when None).
            num_steps: number of time points of the SDE grid, ends included.
            return_trajectory: keep the states at every grid time (and after the last step).
        Returns: ``sample(x0, model_fn, *, generator=None, **cond)`` mapping noise x0 (B, *S) to a SampleResult;
            ``generator`` drives the Brownian increments.
        Raises:
            ValueError: for an unknown name, num_steps < 2, a bad last_step_size or diffusion_norm, or a diffusion
                that is not finite on the grid (SBDM at t0 = 0 on Linear/GVP: create the transport with
                sample_eps > 0).
        """
        method = parse_choice(SdeMethod, method, argument="method")
        form = parse_choice(DiffusionForm, diffusion_form, argument="diffusion_form")
        last = None if last_step is None else parse_choice(LastStep, last_step, argument="last_step")
        _check_num_steps(num_steps)
        if not (isinstance(diffusion_norm, (int, float)) and math.isfinite(diffusion_norm) and diffusion_norm >= 0):
            raise ValueError(f"diffusion_norm={diffusion_norm!r} must be a finite number >= 0")
        if last is None:
            last_step_size = 0.0
        elif not (isinstance(last_step_size, (int, float)) and 0 < last_step_size < 1):
            raise ValueError(f"last_step_size={last_step_size!r} must be in (0, 1) when last_step={last.value!r}")
        transport = self.transport
        path = transport.path
        t0, t1 = transport.check_interval(sde=True, sampling=True, diffusion_form=form, last_step_size=last_step_size)
        if not t0 < t1:
            raise ValueError(f"sample_sde: empty interval [t0, t1] = [{t0}, {t1}]; reduce last_step_size or sample_eps")
        grid = torch.linspace(t0, t1, num_steps, dtype=torch.float64)
        w_grid = path.compute_diffusion(grid, form, float(diffusion_norm))
        if not bool(torch.isfinite(w_grid).all()):
            bad = float(grid[~torch.isfinite(w_grid)][0])
            raise ValueError(
                f"diffusion_form={form.value!r} is not finite at t={bad:.6g} on the {path.name} path; "
                f"create the transport with sample_eps > 0 (e.g. create_transport(..., sample_eps=1e-3)) "
                f"or choose another diffusion_form"
            )
        times = grid.tolist()
        dt = times[1] - times[0]
        where = f"sample_sde({method.value}, {form.value})"

        def w_at(t: float) -> float:
            return float(path.compute_diffusion(torch.tensor(t, dtype=torch.float64), form, float(diffusion_norm)))

        def sample(x0: Tensor, model_fn: ModelFn, *, generator: torch.Generator | None = None, **cond) -> SampleResult:
            """Integrate noise x0 (B, *S) with ``model_fn(x, t, **cond)``; see ``Sampler.sample_sde``."""
            caller = _ModelCaller(model_fn, cond, where)

            def velocity_and_score(x: Tensor, t: float, step: int) -> tuple[Tensor, Tensor]:
                tb = _batch_time(t, x)
                out = caller(x, tb, step)
                return transport.velocity_from_output(out, x, tb), transport.score_from_output(out, x, tb)

            def sde_drift(x: Tensor, t: float, step: int) -> Tensor:
                v, s = velocity_and_score(x, t, step)
                return v + w_at(t) * s

            def noise_like(x: Tensor) -> Tensor:
                return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

            x = x0
            states = [x0] if return_trajectory else None
            with torch.no_grad():
                for i, (t, t_next) in enumerate(itertools.pairwise(times)):
                    noise = math.sqrt(2 * w_at(t) * dt) * noise_like(x)
                    if method is SdeMethod.EULER:
                        x = x + sde_drift(x, t, i) * dt + noise
                    else:
                        x_hat = x + noise
                        k1 = sde_drift(x_hat, t, i)
                        if t_next >= 1.0:  # corrector would need the score at t = 1
                            x = x_hat + dt * k1
                        else:
                            k2 = sde_drift(x_hat + dt * k1, t_next, i)
                            x = x_hat + 0.5 * dt * (k1 + k2)
                    _check_finite_state(x, where, i, t_next)
                    if states is not None:
                        states.append(x)
                step = num_steps - 1
                if last is LastStep.MEAN:
                    x = x + sde_drift(x, t1, step) * last_step_size
                elif last is LastStep.EULER:
                    x = x + velocity_and_score(x, t1, step)[0] * last_step_size
                elif last is LastStep.TWEEDIE:
                    tt = expand_t_like_x(_batch_time(t1, x), x)
                    alpha_t, sigma_t = path.compute_alpha_t(tt)[0], path.compute_sigma_t(tt)[0]
                    x = (x + sigma_t**2 * velocity_and_score(x, t1, step)[1]) / alpha_t
                if last is not None:
                    _check_finite_state(x, where, step, 1.0)
                    if states is not None:
                        states.append(x)
            if states is None:
                return SampleResult(x=x, nfe=caller.nfe)
            out_times = [*times, 1.0] if last is not None else times
            return SampleResult(
                x=x,
                nfe=caller.nfe,
                trajectory=torch.stack(states),
                times=torch.tensor(out_times, dtype=_time_dtype(x0), device=x0.device),
            )

        return sample


def classifier_free_guidance(model_fn: ModelFn, scale: float) -> ModelFn:
    """Wrap ``model_fn`` with classifier-free guidance: out = out_u + scale (out_c - out_u) (Ho & Salimans 2022).

    For scale != 1 the returned function makes ONE batched call
    ``model_fn(cat[x, x], cat[t, t], y=cat[y, y], drop_cond=cat[zeros(B), ones(B)], **cond)``: the first half is
    conditional, the second uses the model's null class / null text (``drop_cond`` True). Guidance applies to every
    channel, and to the model's own prediction (velocity, score and noise are affine in each other at fixed (x, t),
    so guiding any of them guides the others identically). For scale == 1 it calls ``model_fn(x, t, y=y, **cond)``.

    Args:
        model_fn: ``model_fn(x, t, y=None, drop_cond=None, **cond)`` with x (B, *S), t (B,), y class ids (B,) or
            text features (B, N, d), drop_cond (B,) bool.
        scale: guidance scale w; 1 = conditional, 0 = unconditional.
    Returns: ``guided(x, t, y=None, **cond)`` returning (B, *S). Other keyword arguments are passed unchanged to the
        doubled batch, so they must not be per-sample tensors.
    Raises:
        ValueError: (when called) for scale != 1 without ``y`` or with a ``drop_cond`` of its own; (here) for a
            non-finite scale.
    """
    if not math.isfinite(scale):
        raise ValueError(f"scale={scale!r} must be a finite number")

    def guided(x: Tensor, t: Tensor, y: Tensor | None = None, **cond) -> Tensor:
        if scale == 1:
            return model_fn(x, t, y=y, **cond)
        if y is None:
            raise ValueError(f"classifier_free_guidance(scale={scale}) needs the condition y; got y=None")
        if "drop_cond" in cond:
            raise ValueError("classifier_free_guidance sets drop_cond itself; do not pass it")
        batch = x.shape[0]
        drop = torch.cat(
            [
                torch.zeros(batch, dtype=torch.bool, device=x.device),
                torch.ones(batch, dtype=torch.bool, device=x.device),
            ]
        )
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, y]), drop_cond=drop, **cond)
        out_c, out_u = out[:batch], out[batch:]
        return out_u + scale * (out_c - out_u)

    return guided


def _divergence_exact(v: Tensor, x: Tensor) -> Tensor:
    """sum_i d v_i / d x_i by one backward pass per dimension; (B,) from v, x (B, *S) (samples must not interact)."""
    v_flat = v.flatten(1)
    div = torch.zeros(x.shape[0], dtype=v.dtype, device=v.device)
    for i in range(v_flat.shape[1]):
        (grad,) = torch.autograd.grad(v_flat[:, i].sum(), x, retain_graph=True)
        div = div + grad.flatten(1)[:, i]
    return div


def _divergence_hutchinson(v: Tensor, x: Tensor, probes: Tensor) -> Tensor:
    """Hutchinson estimate mean_k e_k^T (dv/dx) e_k with Rademacher probes (K, B, *S); (B,)."""
    div = torch.zeros(x.shape[0], dtype=v.dtype, device=v.device)
    for e in probes:
        (grad,) = torch.autograd.grad((v * e).sum(), x, retain_graph=True)
        div = div + (grad * e).flatten(1).sum(dim=1)
    return div / probes.shape[0]


class _LikelihoodDrift(_StepCountingFunc):
    """Right-hand side of the augmented ODE d(x, delta)/dt = (v(x, t), div v(x, t))."""

    def __init__(self, caller: _ModelCaller, transport: Transport, probes: Tensor | None):
        super().__init__(caller, transport)
        self.probes = probes  # (K, B, *S) Rademacher probes, or None for the exact divergence

    def __call__(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x = state[0]
        tb = _batch_time(t, x)
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            v = self.transport.velocity_from_output(self.caller(x, tb, self.step), x, tb)
            if self.probes is None:
                div = _divergence_exact(v, x)
            else:
                div = _divergence_hutchinson(v, x, self.probes)
        return v.detach(), div.detach()


def nll_bits_per_dim(
    transport: Transport,
    model_fn: ModelFn,
    x1: Tensor,
    *,
    method: OdeMethod | str = "dopri5",
    num_steps: int = 50,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    exact_divergence_max_dim: int = 64,
    num_probes: int = 1,
    seed: int = 0,
    **cond,
) -> LikelihoodResult:
    """Negative log-likelihood of x1 by the probability-flow ODE (instantaneous change of variables, FFJORD Eq. 4).

    Integrates d x/dt = v(x, t), d delta/dt = div v(x, t) from t1 (data) down to t0 (noise) on the transport's
    sampling interval, with delta(t1) = 0, so delta(t0) = -int_{t0}^{t1} div v dt and
    log p(x1) = log N(x0; 0, I) - int_{t0}^{t1} div v(x_t, t) dt = prior_logp(x0) + delta(t0),
    bits/dim = -log p(x1) / (D ln 2). The divergence is exact (one backward pass per dimension) when
    D <= exact_divergence_max_dim, else Hutchinson's estimator with ``num_probes`` Rademacher probes drawn once per
    call from ``seed`` and kept fixed along the trajectory. The density is that of the model's own space (e.g. scaled
    VAE latents), without dequantisation. Samples must not interact inside the model (no batch statistics).

    Args:
        transport: gives the prediction type and the interval. model_fn: ``model_fn(x, t, **cond)``.
        x1: data (B, *S). method, num_steps, atol, rtol: as in ``Sampler.sample_ode``.
        exact_divergence_max_dim: largest D that uses the exact divergence. num_probes, seed: Hutchinson settings.
        **cond: conditioning for the model.
    Returns: a ``LikelihoodResult`` (bpd, logp, x0, nfe).
    Raises:
        ValueError: for an unknown method, num_steps < 2 or num_probes < 1.
        RuntimeError: when called under ``torch.inference_mode`` (the divergence needs autograd).
        FloatingPointError: for a non-finite model output.
    """
    method = parse_choice(OdeMethod, method, argument="method")
    _check_num_steps(num_steps)
    if not (isinstance(num_probes, int) and num_probes >= 1):
        raise ValueError(f"num_probes={num_probes!r} must be an integer >= 1")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("nll_bits_per_dim needs autograd for the divergence; call it outside torch.inference_mode")
    dim = x1[0].numel()
    probes = None
    if dim > exact_divergence_max_dim:
        gen = torch.Generator(device=x1.device).manual_seed(seed)
        bits = torch.randint(0, 2, (num_probes, *x1.shape), generator=gen, device=x1.device)
        probes = bits.to(x1.dtype) * 2 - 1
    t_start, t_end = transport.check_interval(sampling=True, reverse=True)
    caller = _ModelCaller(model_fn, cond, f"nll_bits_per_dim({method.value})")
    drift = _LikelihoodDrift(caller, transport, probes)
    times = torch.linspace(t_start, t_end, num_steps, dtype=_time_dtype(x1), device=x1.device)
    state0 = (x1.detach(), torch.zeros(x1.shape[0], dtype=x1.dtype, device=x1.device))
    xs, deltas = _odeint(drift, state0, times, method, atol, rtol)
    x0, delta = xs[-1], deltas[-1]
    _check_finite_state(x0, caller.where, drift.step, t_end)
    logp = transport.prior_logp(x0) + delta
    return LikelihoodResult(bpd=-logp / (dim * math.log(2)), logp=logp, x0=x0, nfe=caller.nfe)
