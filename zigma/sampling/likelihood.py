"""Negative log-likelihood (bits per dimension) of data under a ``Transport``'s probability-flow ODE."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from zigma.sampling.integrators import OdeMethod, check_finite_state, check_num_steps, ode_solve
from zigma.sampling.model_calls import ModelCaller, ModelFn, batch_time, time_dtype
from zigma.transport import Transport, parse_choice


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


class _AugmentedField:
    """Right-hand side of the augmented ODE d(x, delta)/dt = (v(x, t), div v(x, t)), v the model's velocity."""

    def __init__(self, caller: ModelCaller, transport: Transport, probes: Tensor | None):
        self.caller = caller
        self.transport = transport
        self.probes = probes  # (K, B, *S) Rademacher probes, or None for the exact divergence

    def __call__(self, t: Tensor, state: tuple[Tensor, Tensor], step: int) -> tuple[Tensor, Tensor]:
        x = state[0]
        tb = batch_time(t, x)
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            v = self.transport.velocity_from_output(self.caller(x, tb, step), x, tb)
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
        x1: data (B, *S). method, num_steps, atol, rtol: as in ``zigma.sampling.Sampler.sample_ode``.
        exact_divergence_max_dim: largest D that uses the exact divergence. num_probes, seed: Hutchinson settings.
        **cond: conditioning for the model.
    Returns: a ``LikelihoodResult`` (bpd, logp, x0, nfe).
    Raises:
        ValueError: for an unknown method, num_steps < 2 or num_probes < 1.
        RuntimeError: when called under ``torch.inference_mode`` (the divergence needs autograd).
        FloatingPointError: for a non-finite model output.
    """
    method = parse_choice(OdeMethod, method, argument="method")
    check_num_steps(num_steps)
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
    caller = ModelCaller(model_fn, cond, f"nll_bits_per_dim({method.value})")
    field = _AugmentedField(caller, transport, probes)
    times = torch.linspace(t_start, t_end, num_steps, dtype=time_dtype(x1), device=x1.device)
    state0 = (x1.detach(), torch.zeros(x1.shape[0], dtype=x1.dtype, device=x1.device))
    (xs, deltas), step = ode_solve(field, state0, times, method, atol=atol, rtol=rtol)
    x0, delta = xs[-1], deltas[-1]
    check_finite_state(x0, caller.where, step, t_end)
    logp = transport.prior_logp(x0) + delta
    return LikelihoodResult(bpd=-logp / (dim * math.log(2)), logp=logp, x0=x0, nfe=caller.nfe)
