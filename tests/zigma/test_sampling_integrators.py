"""The path-agnostic solvers of ``zigma.sampling.integrators`` on analytic fields: no path, transport or model."""

from __future__ import annotations

import math

import pytest
import torch

from zigma.sampling.integrators import OdeMethod, SdeMethod, ode_solve, sde_solve


def decay(t: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
    """dy/dt = -t y, solved by y(t) = y(0) exp(-t^2 / 2)."""
    return -t * y


@pytest.mark.parametrize(("method", "tol"), [(OdeMethod.RK4, 1e-7), (OdeMethod.DOPRI5, 1e-7), (OdeMethod.HEUN, 1e-3)])
def test_ode_solve_matches_the_closed_form_both_ways(method, tol):
    y0 = torch.linspace(-2, 2, 5, dtype=torch.float64)
    times = torch.linspace(0, 1.5, 31, dtype=torch.float64)
    states, _ = ode_solve(decay, y0, times, method, atol=1e-10, rtol=1e-10)
    exact = y0 * torch.exp(-(times**2) / 2)[:, None]  # (31, 5)
    assert states.shape == (31, 5)
    torch.testing.assert_close(states, exact, rtol=0, atol=tol)
    back, _ = ode_solve(decay, states[-1], times.flip(0), method, atol=1e-10, rtol=1e-10)  # integrate 1.5 -> 0
    torch.testing.assert_close(back[-1], y0, rtol=0, atol=tol)


def test_ode_solve_takes_a_tuple_state_and_reports_the_steps():
    def field(t, state, step):  # (y, integral of y): y = exp(-t), integral = 1 - exp(-t)
        seen.append(step)
        return -state[0], state[0]

    seen: list[int] = []
    times = torch.linspace(0, 2, 41, dtype=torch.float64)
    state0 = (torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    (ys, integrals), last = ode_solve(field, state0, times, OdeMethod.RK4)
    torch.testing.assert_close(ys[-1], torch.full_like(ys[-1], math.exp(-2)), rtol=0, atol=1e-7)
    torch.testing.assert_close(integrals[-1], torch.full_like(ys[-1], 1 - math.exp(-2)), rtol=0, atol=1e-7)
    assert last == 39 and seen == [s for s in range(40) for _ in range(4)]  # 40 steps, 4 evaluations each


def test_sde_solve_without_noise_is_the_deterministic_scheme():
    x0 = torch.tensor([1.0, -3.0], dtype=torch.float64)
    times = torch.linspace(0, 1, 11, dtype=torch.float64).tolist()
    h = times[1] - times[0]
    no_noise = lambda t: 0.0  # noqa: E731
    euler, _ = sde_solve(lambda x, t, i: -x, no_noise, x0, times, SdeMethod.EULER)
    heun, _ = sde_solve(lambda x, t, i: -x, no_noise, x0, times, SdeMethod.HEUN)
    torch.testing.assert_close(euler, x0 * (1 - h) ** 10)
    torch.testing.assert_close(heun, x0 * (1 - h + h**2 / 2) ** 10)


@pytest.mark.parametrize("method", list(SdeMethod))
def test_sde_solve_adds_sqrt_2_w_h_gaussian_increments(method):
    """Zero drift: x_T = x0 + sum_i sqrt(2 w(t_i) h) z_i with the z_i drawn in order from the generator."""
    times = torch.linspace(0.0, 0.5, 6, dtype=torch.float64).tolist()
    h = times[1] - times[0]
    w = lambda t: 1.0 + t  # noqa: E731
    x0 = torch.zeros(3, 4)
    x, states = sde_solve(lambda x, t, i: torch.zeros_like(x), w, x0, times, method,
                          generator=torch.Generator().manual_seed(7), keep_states=True)  # fmt: skip
    gen = torch.Generator().manual_seed(7)
    expected = x0.clone()
    for t in times[:-1]:
        expected = expected + math.sqrt(2 * w(t) * h) * torch.randn(x0.shape, generator=gen)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    assert len(states) == 6 and states[0] is x0 and states[-1] is x


def test_heun_skips_the_drift_at_the_end_only_when_told():
    times = torch.linspace(0, 1, 5, dtype=torch.float64).tolist()
    calls: list[float] = []

    def drift(x, t, step):
        calls.append(t)
        return -x

    sde_solve(drift, lambda t: 0.0, torch.ones(2), times, SdeMethod.HEUN)
    assert len(calls) == 8 and calls[-1] == 1.0
    calls.clear()
    sde_solve(drift, lambda t: 0.0, torch.ones(2), times, SdeMethod.HEUN, drift_at_end=False)
    assert len(calls) == 7 and max(calls) < 1.0


def test_sde_solve_names_the_step_of_a_non_finite_state():
    times = torch.linspace(0, 1, 5, dtype=torch.float64).tolist()
    blow_up = lambda x, t, step: torch.full_like(x, float("inf")) if step == 2 else x  # noqa: E731
    with pytest.raises(FloatingPointError, match=r"^my solve: .*step 2, t=0\.75$"):
        sde_solve(blow_up, lambda t: 0.0, torch.ones(2), times, SdeMethod.EULER, where="my solve")
