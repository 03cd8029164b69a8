"""Samplers, guidance and likelihood of ``zigma.sampling`` against closed-form Gaussian answers.

Data x1 ~ N(mu, Sigma) with Sigma = Q diag(s^2) Q^T (Q a fixed random rotation) and noise x0 ~ N(0, I). On every path
xt ~ N(alpha_t mu, alpha_t^2 Sigma + sigma_t^2 I), so in the eigenbasis of Sigma each coordinate is an independent
1-D problem with V_t = alpha_t^2 s^2 + sigma_t^2 and, writing dev = xt - alpha_t mu,

    E[x0 | xt] = sigma_t dev / V_t          (the noise prediction)
    E[x1 | xt] = mu + alpha_t s^2 dev / V_t
    score      = -dev / V_t
    velocity   = d_alpha_t E[x1 | xt] + d_sigma_t E[x0 | xt] = d_alpha_t mu + (V_t' / 2 V_t) dev.

The probability-flow ODE of this velocity is solved by dev_t = sqrt(V_t / V_a) dev_a, which gives the exact flow map,
the exact likelihood and the exact output law of every SDE last step used below.
"""

from __future__ import annotations

import math

import pytest
import torch

from zigma.sampling import (
    LastStep,
    OdeMethod,
    Sampler,
    SdeMethod,
    classifier_free_guidance,
    nll_bits_per_dim,
)
from zigma.transport import DiffusionForm, Path, create_transport

PATHS = ["Linear", "GVP", "VP"]
PREDICTIONS = ["velocity", "score", "noise"]
N_SAMPLES = 16384  # >= 4096 as required; the SDE tests need this many to resolve a 5% variance error


class GaussianTarget:
    """Exact fields, flow map and densities of data N(mu, Q diag(s^2) Q^T) with noise N(0, I), in float64."""

    def __init__(self, mu: list[float], s: list[float], seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.mu = torch.tensor(mu, dtype=torch.float64)  # (D,)
        self.s2 = torch.tensor(s, dtype=torch.float64) ** 2  # (D,) eigenvalues of Sigma
        self.q = torch.linalg.qr(torch.randn(len(mu), len(mu), generator=gen, dtype=torch.float64))[0]  # (D, D)

    @property
    def dim(self) -> int:
        return self.mu.shape[0]

    def coeffs(self, path: Path, t: torch.Tensor | float) -> tuple[torch.Tensor, ...]:
        """alpha, d_alpha, sigma, d_sigma, V (eigen-coordinates), each (B, 1) or (B, D) for t (B,) or scalar."""
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
        a, da = path.compute_alpha_t(t)
        sg, dsg = path.compute_sigma_t(t)
        return a, da, sg, dsg, a**2 * self.s2 + sg**2

    def fields(self, path: Path, x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """velocity, score and noise at x (B, *S) (flattens to D), t (B,); returned in x's shape and dtype."""
        a, da, sg, dsg, var = self.coeffs(path, t)
        dev = (x.reshape(x.shape[0], -1).double() - a * self.mu) @ self.q  # (B, D), eigen-coordinates
        e_x0 = (sg * dev / var) @ self.q.T
        e_x1 = self.mu + (a * self.s2 * dev / var) @ self.q.T
        out = {"velocity": da * e_x1 + dsg * e_x0, "score": -(dev / var) @ self.q.T, "noise": e_x0}
        return {k: v.to(x.dtype).reshape(x.shape) for k, v in out.items()}

    def model(self, path: Path, prediction: str):
        """A ``model_fn(x, t, **cond)`` returning the exact ``prediction`` field; counts the t values it sees."""

        def model_fn(x, t, **cond):
            model_fn.times.append(t.clone())
            return self.fields(path, x, t)[prediction]

        model_fn.times = []
        return model_fn

    def flow_map(self, path: Path, x: torch.Tensor, ta: float, tb: float) -> torch.Tensor:
        """Exact probability-flow map from time ta to tb: alpha_b mu + Q diag(sqrt(V_b / V_a)) Q^T (x - alpha_a mu)."""
        a_a, *_, var_a = self.coeffs(path, ta)
        a_b, *_, var_b = self.coeffs(path, tb)
        dev = (x.reshape(x.shape[0], -1).double() - a_a * self.mu) @ self.q
        out = a_b * self.mu + (torch.sqrt(var_b / var_a) * dev) @ self.q.T
        return out.to(x.dtype).reshape(x.shape)

    def logp_model(self, path: Path, x1: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
        """log-density at x1 of N(0, I) pushed from t0 to t1 by the exact flow: log N(x0) + 1/2 sum log(V_0 / V_1)."""
        x0 = self.flow_map(path, x1, t1, t0).reshape(x1.shape[0], -1).double()
        var_0 = self.coeffs(path, t0)[-1]
        var_1 = self.coeffs(path, t1)[-1]
        log_det = 0.5 * torch.log(var_0 / var_1).sum()
        return -0.5 * self.dim * math.log(2 * math.pi) - 0.5 * x0.pow(2).sum(1) + log_det

    def marginal_sample(self, path: Path, t: float, n: int, seed: int) -> torch.Tensor:
        """n samples (float32) of xt ~ N(alpha_t mu, alpha_t^2 Sigma + sigma_t^2 I)."""
        a, _, _, _, var = self.coeffs(path, t)
        z = torch.randn(n, self.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return (a * self.mu + (torch.sqrt(var) * z) @ self.q.T).float()

    def linear_law(self, c: torch.Tensor, k: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance of c + Q diag(k) Q^T dev with dev ~ N(0, Q diag(var) Q^T): (c, Q diag(k^2 var) Q^T)."""
        return c.reshape(-1), self.q @ torch.diag((k**2 * var).reshape(-1)) @ self.q.T


@pytest.fixture(autouse=True)
def single_thread():
    """These tensors are tiny; intra-op threads only add overhead, and thrash when other processes share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TARGET = GaussianTarget(mu=[1.0, -0.5, 2.0], s=[0.5, 1.0, 1.5])


def noise(n: int = N_SAMPLES, dim: int = TARGET.dim, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def assert_gaussian_stats(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, bias: float, z: float = 5.0):
    """Sample mean and covariance of x (n, D) match (mean, cov) within z standard errors plus ``bias``.

    Compared in the eigenbasis of ``cov``, where the standard error of entry (i, j) is sqrt(v_i v_j (1 + d_ij) / n)
    and that of mean i is sqrt(v_i / n); ``bias`` (relative to sqrt(v_i) for means and sqrt(v_i v_j) for covariances)
    allows for the integrator's discretisation error.
    """
    n = x.shape[0]
    evals, evecs = torch.linalg.eigh(cov.double())
    y = (x.double() - mean.double()) @ evecs  # (n, D): mean 0, covariance diag(evals)
    scale = torch.sqrt(evals)
    mean_err = y.mean(0).abs() / scale
    cov_hat = torch.cov(y.T, correction=1)
    ref = torch.outer(scale, scale)
    cov_err = (cov_hat - torch.diag(evals)).abs() / ref
    se_cov = torch.sqrt((1 + torch.eye(len(evals), dtype=torch.float64)) / n)
    print(f"max mean error {mean_err.max():.4f} sd, max cov error {cov_err.max():.4f} (relative)")
    assert (mean_err <= z / math.sqrt(n) + bias).all(), f"mean error {mean_err} (in sd units)"
    assert (cov_err <= z * se_cov + bias).all(), f"covariance error\n{cov_err}"


# ---------------------------------------------------------------------------------------------------------------------
# ODE
# ---------------------------------------------------------------------------------------------------------------------

ODE_SETTINGS = {  # method: (num_steps, max |x - exact| / (1 + |exact|), model calls per step or None)
    "dopri5": (50, 1e-4, None),  # with rtol 1e-5; observed <= 1.4e-5
    "euler": (200, 2e-2, 1),  # first order; observed <= 1.4e-2
    "heun": (50, 5e-3, 2),  # observed <= 2.1e-3 (VP)
    "midpoint": (50, 2e-3, 2),  # observed <= 5.8e-4
    "rk4": (20, 2e-4, 4),  # observed <= 2.8e-5
}


@pytest.mark.parametrize("method", list(ODE_SETTINGS))
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("path_type", PATHS)
def test_sample_ode_matches_exact_flow(path_type, prediction, method):
    transport = create_transport(path_type, prediction)
    num_steps, tol, calls_per_step = ODE_SETTINGS[method]
    atol, rtol = (1e-6, 1e-5) if method == "dopri5" else (1e-6, 1e-3)
    t0, t1 = transport.check_interval(sampling=True)
    x0 = noise(4096)
    result = Sampler(transport).sample_ode(method=method, num_steps=num_steps, atol=atol, rtol=rtol)(
        x0, TARGET.model(transport.path, prediction)
    )
    expected = TARGET.flow_map(transport.path, x0, t0, t1)
    err = ((result.x - expected).abs() / (1 + expected.abs())).max().item()
    print(f"{path_type}/{prediction}/{method}: max error {err:.2e}, nfe {result.nfe}")
    assert err < tol
    # the law of the samples: N(0, I) pushed to t1, i.e. the data law up to the eps margin
    a0, *_, var0 = TARGET.coeffs(transport.path, t0)
    a1, *_, var1 = TARGET.coeffs(transport.path, t1)
    k = torch.sqrt(var1 / var0)
    c = a1 * TARGET.mu - (k * (a0 * TARGET.mu) @ TARGET.q) @ TARGET.q.T
    assert_gaussian_stats(result.x, *TARGET.linear_law(c, k, torch.ones_like(var0)), bias=2 * tol)
    if calls_per_step is not None:
        assert result.nfe == calls_per_step * (num_steps - 1)
    assert result.trajectory is None


def test_sample_ode_upstream_defaults_reach_data_law():
    """dopri5, atol 1e-6, rtol 1e-3, 50 points (upstream's in-training evaluation) on the default transport."""
    x0 = noise()
    result = Sampler(create_transport()).sample_ode()(x0, TARGET.model(create_transport().path, "velocity"))
    cov = TARGET.q @ torch.diag(TARGET.s2) @ TARGET.q.T
    assert_gaussian_stats(result.x, TARGET.mu, cov, bias=0.05)  # rtol 1e-3 on an RMS norm is a loose solve


def test_sample_ode_euler_16_points_is_15_calls_never_at_t1():
    transport = create_transport()
    model_fn = TARGET.model(transport.path, "velocity")
    result = Sampler(transport).sample_ode(method="euler", num_steps=16)(noise(8), model_fn)
    assert result.nfe == 15
    seen = torch.stack([t[0] for t in model_fn.times])
    torch.testing.assert_close(seen, torch.linspace(0, 1, 16)[:-1])
    assert all(t.shape == (8,) for t in model_fn.times)


def test_sample_ode_trajectory_follows_exact_flow():
    transport = create_transport("GVP")
    x0 = noise(256)
    sample = Sampler(transport).sample_ode(method="rk4", num_steps=11, return_trajectory=True)
    result = sample(x0, TARGET.model(transport.path, "velocity"))
    assert result.trajectory.shape == (11, 256, TARGET.dim)
    torch.testing.assert_close(result.times, torch.linspace(0, 1, 11))
    torch.testing.assert_close(result.trajectory[0], x0)
    torch.testing.assert_close(result.trajectory[-1], result.x)
    for t, state in zip(result.times.tolist(), result.trajectory):
        torch.testing.assert_close(state, TARGET.flow_map(transport.path, x0, 0.0, t), atol=2e-3, rtol=0)


@pytest.mark.parametrize("path_type", PATHS)
def test_sample_ode_reverse_recovers_noise(path_type):
    transport = create_transport(path_type)
    model_fn = TARGET.model(transport.path, "velocity")
    sampler = Sampler(transport)
    x0 = noise(1024)
    x1 = sampler.sample_ode(atol=1e-7, rtol=1e-6)(x0, model_fn).x
    back = sampler.sample_ode(atol=1e-7, rtol=1e-6, reverse=True, return_trajectory=True)(x1, model_fn)
    assert back.times[0] > back.times[-1]  # integrates data -> noise
    torch.testing.assert_close(back.x, x0, atol=1e-4, rtol=0)


def test_sample_ode_image_shaped_input():
    transport = create_transport()
    x0 = noise(64, dim=4).reshape(64, 1, 2, 2)
    target = GaussianTarget(mu=[0.5, -1.0, 0.0, 1.0], s=[1.0, 0.5, 2.0, 0.3], seed=1)
    result = Sampler(transport).sample_ode(method="heun", num_steps=30)(x0, target.model(transport.path, "velocity"))
    assert result.x.shape == (64, 1, 2, 2)
    torch.testing.assert_close(result.x, target.flow_map(transport.path, x0, 0.0, 1.0), atol=5e-3, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# SDE
# ---------------------------------------------------------------------------------------------------------------------


def sde_expected_law(transport, t1: float, last_step: str | None, h: float, w1: float):
    """Law after the last step, given the exact marginal N(alpha_1 mu, V_1) at t1: each last step is affine in dev.

    None: x; Euler: x + h v; Mean: x + h (v + w s); Tweedie: E[x1 | x] (see the module docstring for v, s, E[x1|x]).
    """
    a, da, sg, dsg, var = TARGET.coeffs(transport.path, t1)
    rate = (a * da * TARGET.s2 + sg * dsg) / var  # V' / 2V: dv/d(dev)
    mu_rot = TARGET.mu @ TARGET.q
    if last_step is None:
        c, k = a * mu_rot, torch.ones_like(var)
    elif last_step == "Euler":
        c, k = (a + h * da) * mu_rot, 1 + h * rate
    elif last_step == "Mean":
        c, k = (a + h * da) * mu_rot, 1 + h * (rate - w1 / var)
    else:
        c, k = mu_rot.expand_as(var), a * TARGET.s2 / var
    mean, cov = TARGET.linear_law(c @ TARGET.q.T, k, var)
    return mean, cov


def run_sde(transport, prediction="velocity", *, seed=0, n=N_SAMPLES, **settings):
    sample = Sampler(transport).sample_sde(**settings)
    t0, _ = transport.check_interval(
        sde=True,
        sampling=True,
        diffusion_form=settings.get("diffusion_form", "sigma"),
        last_step_size=settings.get("last_step_size", 0.04) if settings.get("last_step", "Mean") else 0.0,
    )
    x0 = TARGET.marginal_sample(transport.path, t0, n, seed)  # N(0, I) on Linear/GVP at t0 = 0
    return sample(x0, TARGET.model(transport.path, prediction), generator=torch.Generator().manual_seed(seed + 1))


@pytest.mark.parametrize("form", [f.value for f in DiffusionForm])
@pytest.mark.parametrize("method", [m.value for m in SdeMethod])
def test_sample_sde_every_method_and_diffusion_reaches_data(method, form):
    transport = create_transport(sample_eps=1e-3)  # SBDM needs t0 > 0 on the Linear path
    result = run_sde(transport, method=method, diffusion_form=form, num_steps=250)
    mean, cov = sde_expected_law(
        transport,
        0.96,
        "Mean",
        0.04,
        float(transport.path.compute_diffusion(torch.tensor(0.96, dtype=torch.float64), DiffusionForm(form))),
    )
    assert_gaussian_stats(result.x, mean, cov, bias=0.02)
    assert result.nfe == (1 if method == "Euler" else 2) * 249 + 1


@pytest.mark.parametrize("last_step", [*[s.value for s in LastStep], None])
def test_sample_sde_every_last_step(last_step):
    transport = create_transport()
    result = run_sde(transport, method="Euler", diffusion_form="sigma", last_step=last_step, num_steps=250)
    t1 = 0.96 if last_step else 1.0
    w1 = 1 - t1  # sigma form: w_t = sigma_t
    if last_step is None:  # t1 = 1: data law itself
        mean, cov = TARGET.mu, TARGET.q @ torch.diag(TARGET.s2) @ TARGET.q.T
    else:
        mean, cov = sde_expected_law(transport, t1, last_step, 0.04, w1)
    assert_gaussian_stats(result.x, mean, cov, bias=0.02)
    assert result.nfe == 249 + (last_step is not None)


@pytest.mark.parametrize(
    ("path_type", "prediction", "method"),
    [
        ("GVP", "velocity", "Heun"),
        ("VP", "velocity", "Euler"),
        ("Linear", "score", "Euler"),
        ("Linear", "noise", "Heun"),
        ("VP", "noise", "Euler"),
        ("GVP", "score", "Euler"),
    ],
)
def test_sample_sde_paths_and_predictions(path_type, prediction, method):
    transport = create_transport(path_type, prediction, sample_eps=1e-3)
    result = run_sde(transport, prediction, method=method, diffusion_form="SBDM", last_step="Tweedie")
    _, t1 = transport.check_interval(sde=True, sampling=True, diffusion_form=DiffusionForm.SBDM, last_step_size=0.04)
    assert_gaussian_stats(result.x, *sde_expected_law(transport, t1, "Tweedie", 0.04, 0.0), bias=0.02)


def test_sample_sde_heun_without_last_step_skips_corrector_at_t1():
    transport = create_transport("GVP")  # score undefined at t = 1
    model_fn = TARGET.model(transport.path, "velocity")
    result = Sampler(transport).sample_sde(method="Heun", last_step=None, num_steps=10)(noise(64), model_fn)
    assert result.nfe == 2 * 9 - 1
    assert max(float(t.max()) for t in model_fn.times) < 1.0
    assert torch.isfinite(result.x).all()


def test_sample_sde_seeded_and_trajectory():
    transport = create_transport()
    sample = Sampler(transport).sample_sde(num_steps=20, return_trajectory=True)
    model_fn = TARGET.model(transport.path, "velocity")
    x0 = noise(32)
    first = sample(x0, model_fn, generator=torch.Generator().manual_seed(3))
    again = sample(x0, model_fn, generator=torch.Generator().manual_seed(3))
    other = sample(x0, model_fn, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(first.x, again.x)
    assert not torch.allclose(first.x, other.x)
    assert first.trajectory.shape == (21, 32, TARGET.dim)  # 20 grid points + the last step
    torch.testing.assert_close(first.times[[0, -2, -1]], torch.tensor([0.0, 0.96, 1.0]))
    torch.testing.assert_close(first.trajectory[-1], first.x)


def test_sample_sde_without_diffusion_is_the_probability_flow_ode():
    """w_t = 0: Euler-Maruyama is the Euler ODE step for step, and Heun is second order (error << dt)."""
    transport = create_transport("GVP")
    model_fn = TARGET.model(transport.path, "velocity")
    x0 = noise(512)
    sampler = Sampler(transport)
    em = sampler.sample_sde(diffusion_form="constant", diffusion_norm=0.0, last_step=None, num_steps=21)(x0, model_fn)
    ode = sampler.sample_ode(method="euler", num_steps=21)(x0, model_fn)
    torch.testing.assert_close(em.x, ode.x)
    heun = sampler.sample_sde(
        method="Heun",
        diffusion_form="constant",
        diffusion_norm=0.0,
        last_step="Euler",
        last_step_size=1e-3,
        num_steps=21,
    )(x0, model_fn)
    err = (heun.x - TARGET.flow_map(transport.path, x0, 0.0, 1.0)).abs().max().item()
    assert err < 5e-3, err  # dt = 0.05; a first-order scheme is off by ~1e-2


def test_sample_sde_sbdm_with_zero_eps_raises():
    with pytest.raises(ValueError, match="sample_eps"):
        Sampler(create_transport()).sample_sde(diffusion_form="SBDM")


# ---------------------------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------------------------------------------------


class RecordingConditionalModel:
    """out = x * t + cond_term, where cond_term is f(y) for kept rows and a fixed null value for dropped rows."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y=None, drop_cond=None, **cond):
        self.calls.append({"batch": x.shape[0], "y": y, "drop_cond": drop_cond, "cond": cond})
        y_term = y.float().reshape(y.shape[0], -1).mean(1) if y is not None else torch.zeros(x.shape[0])
        if drop_cond is not None:
            y_term = torch.where(drop_cond, torch.full_like(y_term, -7.0), y_term)
        return x * t.reshape(-1, *([1] * (x.ndim - 1))) + y_term.reshape(-1, *([1] * (x.ndim - 1)))

    def conditional(self, x, t, y):
        return self(x, t, y=y, drop_cond=torch.zeros(x.shape[0], dtype=torch.bool))

    def unconditional(self, x, t, y):
        return self(x, t, y=y, drop_cond=torch.ones(x.shape[0], dtype=torch.bool))


@pytest.mark.parametrize("y_kind", ["labels", "text"])
def test_classifier_free_guidance_scales(y_kind):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 2, 2, generator=gen)  # all channels guided
    t = torch.rand(4, generator=gen)
    y = torch.tensor([0, 3, 1, 2]) if y_kind == "labels" else torch.randn(4, 5, 8, generator=gen)
    model = RecordingConditionalModel()
    v_c, v_u = model.conditional(x, t, y), model.unconditional(x, t, y)

    model.calls.clear()
    torch.testing.assert_close(classifier_free_guidance(model, 1.0)(x, t, y=y, extra="kept"), v_c)
    assert model.calls[0]["batch"] == 4 and model.calls[0]["drop_cond"] is None
    assert model.calls[0]["cond"] == {"extra": "kept"}

    model.calls.clear()
    torch.testing.assert_close(classifier_free_guidance(model, 0.0)(x, t, y=y), v_u)
    torch.testing.assert_close(classifier_free_guidance(model, 2.0)(x, t, y=y), v_u + 2.0 * (v_c - v_u))
    assert len(model.calls) == 2  # one batched call per guided evaluation
    call = model.calls[-1]
    assert call["batch"] == 8
    torch.testing.assert_close(call["y"], torch.cat([y, y]))
    assert call["drop_cond"].dtype == torch.bool
    assert call["drop_cond"].tolist() == [False] * 4 + [True] * 4


def test_classifier_free_guidance_in_sampler_equals_conditional_field():
    transport = create_transport()
    target_field = TARGET.model(transport.path, "velocity")

    def model_fn(x, t, y=None, drop_cond=None):
        out = target_field(x, t)
        shift = y.float()[:, None] * 0.1
        if drop_cond is not None:
            shift = torch.where(drop_cond[:, None], torch.zeros_like(shift), shift)
        return out + shift

    y = torch.arange(16) % 3
    sample = Sampler(transport).sample_ode(method="euler", num_steps=11)
    x0 = noise(16)
    guided = sample(x0, classifier_free_guidance(model_fn, 1.0), y=y)
    plain = sample(x0, model_fn, y=y)
    torch.testing.assert_close(guided.x, plain.x)
    assert guided.nfe == 10
    unguided = sample(x0, classifier_free_guidance(model_fn, 0.0), y=y)
    torch.testing.assert_close(unguided.x, sample(x0, target_field).x)


def test_classifier_free_guidance_bad_input():
    model = RecordingConditionalModel()
    x, t = torch.zeros(2, 3), torch.zeros(2)
    with pytest.raises(ValueError, match="y=None"):
        classifier_free_guidance(model, 3.0)(x, t)
    with pytest.raises(ValueError, match="drop_cond"):
        classifier_free_guidance(model, 3.0)(x, t, y=torch.zeros(2), drop_cond=torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="scale"):
        classifier_free_guidance(model, float("nan"))


# ---------------------------------------------------------------------------------------------------------------------
# Likelihood
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path_type", "prediction"), [("Linear", "velocity"), ("GVP", "velocity"), ("VP", "velocity"), ("Linear", "noise")]
)
def test_nll_exact_divergence_equals_analytic(path_type, prediction):
    transport = create_transport(path_type, prediction)
    target = GaussianTarget(mu=[0.5, -1.0, 0.0, 1.0], s=[1.0, 0.5, 2.0, 0.3], seed=1)
    t0, t1 = transport.check_interval(sampling=True)
    x1 = target.marginal_sample(transport.path, t1, 256, seed=5).reshape(256, 1, 2, 2)  # image-shaped, D = 4
    result = nll_bits_per_dim(transport, target.model(transport.path, prediction), x1, atol=1e-7, rtol=1e-6)
    expected = target.logp_model(transport.path, x1, t0, t1).float()
    torch.testing.assert_close(result.logp, expected, atol=2e-3, rtol=0)
    torch.testing.assert_close(result.bpd, -expected / (4 * math.log(2)), atol=1e-3, rtol=0)
    torch.testing.assert_close(result.x0, target.flow_map(transport.path, x1, t1, t0), atol=1e-3, rtol=0)
    assert result.x0.shape == x1.shape


def test_nll_hutchinson_is_seeded_and_unbiased():
    transport = create_transport()
    target = GaussianTarget(mu=[0.0, 1.0, -1.0], s=[0.1, 0.4, 3.0], seed=2)  # log det -2.1, non-diagonal Jacobian
    model_fn = target.model(transport.path, "velocity")
    x1 = target.marginal_sample(transport.path, 1.0, 2048, seed=7)
    expected = target.logp_model(transport.path, x1, 0.0, 1.0).float()
    settings = dict(exact_divergence_max_dim=0, num_probes=4, atol=1e-6, rtol=1e-5)
    first = nll_bits_per_dim(transport, model_fn, x1, seed=11, **settings)
    again = nll_bits_per_dim(transport, model_fn, x1, seed=11, **settings)
    other = nll_bits_per_dim(transport, model_fn, x1, seed=12, **settings)
    torch.testing.assert_close(first.logp, again.logp)
    assert not torch.allclose(first.logp, other.logp)
    err = first.logp - expected
    print(f"Hutchinson error: mean {err.mean():.4f}, sd {err.std():.4f}")
    assert err.abs().max() > 1e-2  # it is an estimate...
    assert err.mean().abs() < 4 * err.std() / math.sqrt(len(err))  # ...without bias
    torch.testing.assert_close(first.x0, target.flow_map(transport.path, x1, 1.0, 0.0), atol=1e-3, rtol=0)


def test_sample_then_likelihood_round_trip():
    transport = create_transport("GVP")
    model_fn = TARGET.model(transport.path, "velocity")
    x0 = noise(512)
    x1 = Sampler(transport).sample_ode(atol=1e-7, rtol=1e-6)(x0, model_fn).x
    result = nll_bits_per_dim(transport, model_fn, x1, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(result.x0, x0, atol=1e-4, rtol=0)
    log_det = 0.5 * torch.log(1 / TARGET.s2).sum()  # V_0 = 1, V_1 = s^2
    expected = -1.5 * math.log(2 * math.pi) - 0.5 * x0.double().pow(2).sum(1) + log_det
    torch.testing.assert_close(result.logp, expected.float(), atol=1e-3, rtol=0)


def test_nll_works_under_no_grad_and_rejects_inference_mode():
    transport = create_transport()
    model_fn = TARGET.model(transport.path, "velocity")
    x1 = noise(4)
    with torch.no_grad():
        assert torch.isfinite(nll_bits_per_dim(transport, model_fn, x1).bpd).all()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        nll_bits_per_dim(transport, model_fn, x1)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------


def nan_after(n_good: int, path: Path):
    """A velocity model that returns NaN from its (n_good + 1)-th call on."""
    field = TARGET.model(path, "velocity")

    def model_fn(x, t, **cond):
        out = field(x, t)
        return out if len(field.times) <= n_good else torch.full_like(out, float("nan"))

    return model_fn


def test_sample_ode_non_finite_output_names_step_and_t():
    transport = create_transport()
    sample = Sampler(transport).sample_ode(method="euler", num_steps=11)
    with pytest.raises(FloatingPointError, match=r"step 3, t=0\.3 "):
        sample(noise(8), nan_after(3, transport.path))
    with pytest.raises(FloatingPointError, match="step"):
        Sampler(transport).sample_ode()(noise(8), nan_after(5, transport.path))


def test_sample_sde_non_finite_output_names_step_and_t():
    transport = create_transport()
    sample = Sampler(transport).sample_sde(num_steps=26, last_step="Mean", last_step_size=0.5)
    with pytest.raises(FloatingPointError, match=r"step 4, t=0\.08 "):
        sample(noise(8), nan_after(4, transport.path))
    with pytest.raises(FloatingPointError, match=r"step 25, t=0\.5 "):  # the last step
        sample(noise(8), nan_after(25, transport.path))


def test_nll_non_finite_output_raises():
    transport = create_transport()
    with pytest.raises(FloatingPointError, match="t="):
        nll_bits_per_dim(transport, nan_after(2, transport.path), noise(4))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda s: s.sample_ode(method="rk45"), "method='rk45'.*'dopri5'.*'rk4'"),
        (lambda s: s.sample_ode(num_steps=1), "num_steps"),
        (lambda s: s.sample_sde(method="Milstein"), "method='Milstein'.*'Euler', 'Heun'"),
        (lambda s: s.sample_sde(diffusion_form="inccreasing-decreasing"), "'increasing-decreasing'"),
        (lambda s: s.sample_sde(last_step="Median"), "last_step='Median'.*'Mean', 'Tweedie', 'Euler'"),
        (lambda s: s.sample_sde(last_step="Mean", last_step_size=0.0), "last_step_size"),
        (lambda s: s.sample_sde(diffusion_norm=-1.0), "diffusion_norm"),
        (lambda s: nll_bits_per_dim(create_transport(), None, torch.zeros(1, 2), method="adams"), "method='adams'"),
        (lambda s: nll_bits_per_dim(create_transport(), None, torch.zeros(1, 2), num_probes=0), "num_probes"),
    ],
)
def test_bad_names_and_settings_raise_value_error(build, match):
    with pytest.raises(ValueError, match=match):
        build(Sampler(create_transport()))


def test_names_are_case_insensitive_enums():
    """A spelling builds the sampler of its enum member: the same samples and model calls, and not the default's."""
    sampler = Sampler(create_transport(sample_eps=1e-3))
    x0 = noise(4)

    def run(build, **kwargs):
        result = build(**kwargs)(x0, lambda x, t: -x, generator=torch.Generator().manual_seed(1))
        return result.x, result.nfe

    def ode(**kwargs):
        sample = sampler.sample_ode(num_steps=3, **kwargs)
        return lambda x, model_fn, generator: sample(x, model_fn)

    def sde(**kwargs):
        return sampler.sample_sde(num_steps=5, **kwargs)

    rk4 = run(ode, method="RK4")
    assert rk4[1] == 8 and torch.equal(rk4[0], run(ode, method=OdeMethod.RK4)[0])  # 2 steps x 4 calls
    assert run(ode, method="DOPRI5")[1] == run(ode, method=OdeMethod.DOPRI5)[1] != rk4[1]
    heun = run(sde, method="heun", diffusion_form="sbdm", last_step="tweedie")
    assert heun[1] == 9  # 4 steps x 2 calls + the last step
    enums = run(sde, method=SdeMethod.HEUN, diffusion_form=DiffusionForm.SBDM, last_step=LastStep.TWEEDIE)
    assert torch.equal(heun[0], enums[0])
    assert not torch.allclose(heun[0], run(sde, method="heun", diffusion_form="sbdm", last_step="mean")[0])
    euler = run(sde, method=SdeMethod.EULER, diffusion_form="increasing_decreasing")
    assert euler[1] == 5  # 4 steps + the last step
    assert torch.equal(euler[0], run(sde, method="euler", diffusion_form=DiffusionForm.INCREASING_DECREASING)[0])
    assert not torch.allclose(euler[0], run(sde, method="euler", diffusion_form="sbdm")[0])


def test_model_output_shape_is_checked():
    with pytest.raises(ValueError, match="shape"):
        Sampler(create_transport()).sample_ode(method="euler", num_steps=3)(noise(4), lambda x, t: x[:, :1])
