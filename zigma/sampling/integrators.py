"""Path-agnostic integrators: the probability-flow ODE (torchdiffeq) and SDE (Euler-Maruyama, Heun) solvers.

They solve dy/dt = f(t, y) and dx = f(x, t) dt + sqrt(2 w(t)) dW for any callables f and w (SiT
``transport/integrators.py``) and know nothing of paths, transports or models: ``zigma.sampling.sampler`` builds f
and w from a ``Transport`` and a network, and the tests solve analytic fields with them.

Every field receives the index of the solver step it is evaluated for, so the caller can name the step in an error.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

import torch
from torch import Tensor
from torchdiffeq import odeint


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

    EULER = "Euler"  # Euler-Maruyama: 1 drift evaluation per step
    HEUN = "Heun"  # noise first, then a Heun (trapezoid) drift step: 2 drift evaluations per step


OdeField = Callable[[Tensor, Any, int], Any]  # f(t, y, step) -> dy/dt; y a tensor or a tuple of tensors
SdeDrift = Callable[[Tensor, float, int], Tensor]  # f(x, t, step) -> drift with x's shape
SdeDiffusion = Callable[[float], float]  # w(t) >= 0: the noise is sqrt(2 w(t) dt) z


def check_num_steps(num_steps: int) -> None:
    """Raises ValueError unless ``num_steps`` (time points of a grid, ends included) is an integer >= 2."""
    if not (isinstance(num_steps, int) and num_steps >= 2):
        raise ValueError(f"num_steps={num_steps!r} must be an integer >= 2 (it counts time points, ends included)")


def check_finite_state(x: Tensor, where: str, step: int, t: float) -> None:
    """Raises FloatingPointError naming ``where``, the step and t when the state x has a NaN or Inf."""
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"{where}: the state became non-finite at step {step}, t={t:.6g}")


class _StepCountingField:
    """torchdiffeq right-hand side f(t, y) around ``field(t, y, step)``: torchdiffeq calls ``callback_step`` before
    every solver step, which gives the step index (dopri5: attempted steps, rejected ones included)."""

    def __init__(self, field: OdeField):
        self.field = field
        self.step = 0
        self._callbacks = 0

    def __call__(self, t: Tensor, y):
        return self.field(t, y, self.step)

    def callback_step(self, t0: Tensor, y0, dt: Tensor) -> None:
        self.step = self._callbacks
        self._callbacks += 1


def ode_solve(
    field: OdeField, y0, times: Tensor, method: OdeMethod, *, atol: float = 1e-6, rtol: float = 1e-3
) -> tuple[Any, int]:
    """Solves dy/dt = field(t, y, step) from ``times[0]`` with torchdiffeq's ``odeint``.

    Fixed-step methods step on ``times``; dopri5 only reports at them (atol, rtol set its accuracy) and is told to land
    on the last time instead of stepping past it and interpolating back (torchdiffeq's default), so the field is never
    evaluated outside the interval.

    Args:
        field: ``field(t, y, step)`` with t a 0-d tensor, y like ``y0``; returns dy/dt like y.
        y0: the initial state, a tensor (B, *S) or a tuple of tensors.
        times: (N,) increasing or decreasing output times, ``times[0]`` the time of y0.
        method: an ``OdeMethod``. atol, rtol: dopri5 tolerances (ignored by fixed-step methods).
    Returns: (states, step): the states at ``times`` (N, B, *S) (a tuple of such for a tuple y0) and the index of the
        last solver step.
    """
    rhs = _StepCountingField(field)
    options = {"step_t": times[-1:]} if method is OdeMethod.DOPRI5 else None
    states = odeint(rhs, y0, times, method=_TORCHDIFFEQ_NAME[method], atol=atol, rtol=rtol, options=options)
    return states, rhs.step


def sde_solve(
    drift: SdeDrift,
    diffusion: SdeDiffusion,
    x0: Tensor,
    times: Sequence[float],
    method: SdeMethod,
    *,
    generator: torch.Generator | None = None,
    drift_at_end: bool = True,
    keep_states: bool = False,
    where: str = "sde_solve",
) -> tuple[Tensor, list[Tensor] | None]:
    """Solves dx = drift(x, t) dt + sqrt(2 w(t)) dW on a uniform grid (SiT ``integrators.sde``).

    With h = times[1] - times[0] and z ~ N(0, I) drawn from ``generator``, each step from t to t' is
    Euler-Maruyama: x <- x + drift(x, t) h + sqrt(2 w(t) h) z, or Heun: x^ = x + sqrt(2 w(t) h) z,
    k1 = drift(x^, t), k2 = drift(x^ + h k1, t'), x <- x^ + h (k1 + k2) / 2. Heun takes the Euler step x^ + h k1 on the
    last step when ``drift_at_end`` is False (a drift that is undefined at the end time, as a score at t = 1).

    Args:
        drift: ``drift(x, t, step)`` -> (B, *S). diffusion: ``w(t)`` >= 0 (a float).
        x0: the initial state (B, *S). times: the grid, ends included (at least 2 points, equally spaced).
        method: an ``SdeMethod``. generator: drives the Brownian increments.
        drift_at_end: whether Heun may evaluate the drift at ``times[-1]``.
        keep_states: also return the states at every grid time, x0 included.
        where: names the solve in the error for a non-finite state.
    Returns: (x, states): the state at ``times[-1]`` and the list of states (or None).
    Raises:
        FloatingPointError: when the state becomes non-finite, naming the step and t.
    """
    dt = times[1] - times[0]
    last = len(times) - 2
    x = x0
    states = [x0] if keep_states else None
    for i, (t, t_next) in enumerate(itertools.pairwise(times)):
        noise = math.sqrt(2 * diffusion(t) * dt) * torch.randn(
            x.shape, generator=generator, device=x.device, dtype=x.dtype
        )
        if method is SdeMethod.EULER:
            x = x + drift(x, t, i) * dt + noise
        else:
            x_hat = x + noise
            k1 = drift(x_hat, t, i)
            if i == last and not drift_at_end:
                x = x_hat + dt * k1
            else:
                k2 = drift(x_hat + dt * k1, t_next, i)
                x = x_hat + 0.5 * dt * (k1 + k2)
        check_finite_state(x, where, i, t_next)
        if states is not None:
            states.append(x)
    return x, states
