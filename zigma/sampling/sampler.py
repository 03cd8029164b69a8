"""The ``Sampler`` of a ``Transport``: probability-flow ODE and SDE sampling functions (SiT ``Sampler``).

Time runs as in ``zigma.transport``: t = 0 is noise x0 ~ N(0, I), t = 1 is data, so sampling integrates 0 -> 1. The
sampler turns the transport's prediction (velocity, score or noise) into the drift of the ODE or SDE and the path's
diffusion w_t; the path-agnostic solvers of ``zigma.sampling.integrators`` integrate them. The network arrives at
call time as a plain callable ``model_fn(x, t, **cond)`` with x (B, *S) and t (B,) (STYLE.md §1.2).

Guarantees that SiT does not give: each model call is counted (``SampleResult.nfe``); the SDE calls the model once
per drift evaluation (SiT calls it twice, for the drift and the score); a non-finite model output raises
``FloatingPointError`` naming the step and t; every name is an enum parsed in one place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from zigma.sampling.integrators import (
    OdeMethod,
    SdeMethod,
    check_finite_state,
    check_num_steps,
    ode_solve,
    sde_solve,
)
from zigma.sampling.model_calls import ModelCaller, ModelFn, batch_time, time_dtype
from zigma.transport import DiffusionForm, Transport, expand_t_like_x, parse_choice


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
        check_num_steps(num_steps)
        t0, t1 = self.transport.check_interval(sampling=True, reverse=reverse)
        transport = self.transport

        def sample(x0: Tensor, model_fn: ModelFn, **cond) -> SampleResult:
            """Integrate x0 (B, *S) with ``model_fn(x, t, **cond)``; see ``Sampler.sample_ode``."""
            caller = ModelCaller(model_fn, cond, f"sample_ode({method.value})")

            def velocity(t: Tensor, x: Tensor, step: int) -> Tensor:
                """dx/dt = v(x, t), the model output converted to a velocity."""
                tb = batch_time(t, x)
                return transport.velocity_from_output(caller(x, tb, step), x, tb)

            times = torch.linspace(t0, t1, num_steps, dtype=time_dtype(x0), device=x0.device)
            with torch.no_grad():
                traj, step = ode_solve(velocity, x0, times, method, atol=atol, rtol=rtol)
            check_finite_state(traj[-1], caller.where, step, t1)
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
        check_num_steps(num_steps)
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
        where = f"sample_sde({method.value}, {form.value})"

        def w_at(t: float) -> float:
            return float(path.compute_diffusion(torch.tensor(t, dtype=torch.float64), form, float(diffusion_norm)))

        def sample(x0: Tensor, model_fn: ModelFn, *, generator: torch.Generator | None = None, **cond) -> SampleResult:
            """Integrate noise x0 (B, *S) with ``model_fn(x, t, **cond)``; see ``Sampler.sample_sde``."""
            caller = ModelCaller(model_fn, cond, where)

            def velocity_and_score(x: Tensor, t: float, step: int) -> tuple[Tensor, Tensor]:
                tb = batch_time(t, x)
                out = caller(x, tb, step)
                return transport.velocity_from_output(out, x, tb), transport.score_from_output(out, x, tb)

            def sde_drift(x: Tensor, t: float, step: int) -> Tensor:
                v, s = velocity_and_score(x, t, step)
                return v + w_at(t) * s

            with torch.no_grad():
                x, states = sde_solve(sde_drift, w_at, x0, times, method, generator=generator,
                                      drift_at_end=t1 < 1.0,  # the score is undefined at t = 1 (Linear/GVP)
                                      keep_states=return_trajectory, where=where)  # fmt: skip
                step = num_steps - 1
                if last is LastStep.MEAN:
                    x = x + sde_drift(x, t1, step) * last_step_size
                elif last is LastStep.EULER:
                    x = x + velocity_and_score(x, t1, step)[0] * last_step_size
                elif last is LastStep.TWEEDIE:
                    tt = expand_t_like_x(batch_time(t1, x), x)
                    alpha_t, sigma_t = path.compute_alpha_t(tt)[0], path.compute_sigma_t(tt)[0]
                    x = (x + sigma_t**2 * velocity_and_score(x, t1, step)[1]) / alpha_t
                if last is not None:
                    check_finite_state(x, where, step, 1.0)
                    if states is not None:
                        states.append(x)
            if states is None:
                return SampleResult(x=x, nfe=caller.nfe)
            out_times = [*times, 1.0] if last is not None else times
            return SampleResult(
                x=x,
                nfe=caller.nfe,
                trajectory=torch.stack(states),
                times=torch.tensor(out_times, dtype=time_dtype(x0), device=x0.device),
            )

        return sample
