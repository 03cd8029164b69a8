"""Paths, conversions, time intervals and the training loss of ``zigma.transport`` against closed forms.

Known answers come from data x1 ~ N(mu, diag(s^2)) and noise x0 ~ N(0, I): per dimension xt ~ N(alpha mu, V) with
V = alpha^2 s^2 + sigma^2, and with dev = xt - alpha mu the optimal fields are

    noise = E[x0 | xt] = sigma dev / V,   E[x1 | xt] = mu + alpha s^2 dev / V,   score = -dev / V,
    velocity = d_alpha E[x1 | xt] + d_sigma E[x0 | xt].

The minimum of each loss is the conditional variance of its target (a Gaussian conditional, Cauchy-Binet):
    velocity: E Var[ut | xt] = s^2 (d_alpha sigma - alpha d_sigma)^2 / V
    noise and score (sigma s + x0 = x0 - E[x0 | xt]): w_t Var[x0 | xt] = w_t alpha^2 s^2 / V.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zigma.transport import (
    DiffusionForm,
    GVPPath,
    LinearPath,
    LossWeight,
    PathType,
    Prediction,
    Transport,
    VPPath,
    create_transport,
    expand_t_like_x,
    mean_flat,
    parse_choice,
)

PATHS = {"Linear": LinearPath(), "GVP": GVPPath(), "VP": VPPath()}
MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
S = torch.tensor([0.5, 1.5], dtype=torch.float64)


def gaussian_fields(path, x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Exact velocity, score and noise of x1 ~ N(MU, diag(S^2)) at xt = x (B, 2), t (B,) (module docstring)."""
    a, da = path.compute_alpha_t(t[:, None])
    sg, dsg = path.compute_sigma_t(t[:, None])
    var = a**2 * S**2 + sg**2
    dev = x - a * MU
    e_x0, e_x1 = sg * dev / var, MU + a * S**2 * dev / var
    return {"velocity": da * e_x1 + dsg * e_x0, "score": -dev / var, "noise": e_x0}


def expected_min_loss(transport: Transport, t: torch.Tensor) -> torch.Tensor:
    """E[loss | t] of the exact field, averaged over the 2 dims: (B,) (module docstring)."""
    a, da = transport.path.compute_alpha_t(t[:, None])
    sg, dsg = transport.path.compute_sigma_t(t[:, None])
    var = a**2 * S**2 + sg**2
    if transport.prediction is Prediction.VELOCITY:
        return (S**2 * (da * sg - a * dsg) ** 2 / var).mean(1)
    weight = transport.loss_weight_t(torch.zeros(len(t), 2, dtype=torch.float64), t).reshape(-1, 1)
    return (weight * a**2 * S**2 / var).mean(1)


def exact_model(transport: Transport):
    return lambda x, t: gaussian_fields(transport.path, x, t)[transport.prediction.value]


# ---------------------------------------------------------------------------------------------------------------------
# create_transport and parsing
# ---------------------------------------------------------------------------------------------------------------------


def test_create_transport_defaults_match_upstream():
    transport = create_transport()
    assert (transport.path_type, transport.prediction, transport.loss_weight) == (
        PathType.LINEAR,
        Prediction.VELOCITY,
        LossWeight.NONE,
    )
    assert (transport.train_eps, transport.sample_eps) == (0.0, 0.0)
    assert isinstance(transport.path, LinearPath)
    assert "Linear" in repr(transport)


@pytest.mark.parametrize(
    ("path_type", "prediction", "eps"),
    [
        ("Linear", "velocity", (0.0, 0.0)),
        ("GVP", "velocity", (0.0, 0.0)),
        ("Linear", "score", (1e-3, 1e-3)),
        ("GVP", "noise", (1e-3, 1e-3)),
        ("VP", "velocity", (1e-5, 1e-3)),
        ("VP", "noise", (1e-5, 1e-3)),
    ],
)
def test_create_transport_default_eps(path_type, prediction, eps):
    transport = create_transport(path_type, prediction)
    assert (transport.train_eps, transport.sample_eps) == eps


def test_create_transport_honours_given_eps():
    transport = create_transport("Linear", "velocity", train_eps=1e-4, sample_eps=2e-3)
    assert (transport.train_eps, transport.sample_eps) == (1e-4, 2e-3)
    transport = create_transport("VP", sample_eps=5e-3)  # SiT would read sample_eps's default from train_eps
    assert (transport.train_eps, transport.sample_eps) == (1e-5, 5e-3)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"path_type": "linear"}, PathType.LINEAR),
        ({"path_type": "gvp"}, PathType.GVP),
        ({"path_type": PathType.VP}, PathType.VP),
        ({"prediction": "NOISE"}, Prediction.NOISE),
        ({"prediction": "Score", "loss_weight": "Likelihood"}, LossWeight.LIKELIHOOD),
        ({"prediction": "noise", "loss_weight": "none"}, LossWeight.NONE),
    ],
)
def test_create_transport_accepts_any_case_and_enums(kwargs, expected):
    transport = create_transport(**kwargs)
    assert expected in (transport.path_type, transport.prediction, transport.loss_weight)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"path_type": "cosine"}, r"path_type='cosine'.*'Linear', 'GVP', 'VP'"),
        ({"prediction": "x0"}, r"prediction='x0'.*'velocity', 'score', 'noise'"),
        ({"prediction": "noise", "loss_weight": "snr"}, r"loss_weight='snr'.*'none', 'velocity', 'likelihood'"),
        ({"loss_weight": "likelihood"}, r"loss_weight='likelihood' has no effect with prediction='velocity'"),
        ({"train_eps": -1e-3}, "train_eps"),
        ({"sample_eps": 0.5}, "sample_eps"),
        ({"path_type": 3}, "path_type=3"),
        ({"time_distribution": "normal"}, r"time_distribution='normal'.*'uniform', 'logit_normal'"),
        ({"time_distribution": "logit_normal", "logit_normal_std": 0.0}, "logit_normal_std=0.0 must be a number > 0"),
        ({"logit_normal_mean": float("nan")}, "logit_normal_mean=nan must be a finite number"),
    ],
)
def test_create_transport_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_transport(**kwargs)


def test_parse_choice_spellings():
    assert parse_choice(DiffusionForm, "increasing-decreasing", argument="f") is DiffusionForm.INCREASING_DECREASING
    assert parse_choice(DiffusionForm, "Increasing_Decreasing", argument="f") is DiffusionForm.INCREASING_DECREASING
    assert parse_choice(DiffusionForm, "sbdm", argument="f") is DiffusionForm.SBDM
    with pytest.raises(ValueError, match="diffusion_form='inccreasing-decreasing'"):
        parse_choice(DiffusionForm, "inccreasing-decreasing", argument="diffusion_form")


# ---------------------------------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------------------------------

T_GRID = torch.linspace(0.02, 0.98, 25, dtype=torch.float64)


def upstream_coefficients(name: str, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """alpha_t and sigma_t written independently from zigma-upstream.md §4."""
    if name == "Linear":
        return t, 1 - t
    if name == "GVP":
        return np.sin(np.pi * t / 2), np.cos(np.pi * t / 2)
    log_alpha = -0.25 * (1 - t) ** 2 * (20.0 - 0.1) - 0.5 * (1 - t) * 0.1
    return np.exp(log_alpha), np.sqrt(1 - np.exp(2 * log_alpha))


@pytest.mark.parametrize("name", list(PATHS))
def test_path_coefficients_and_derivatives(name):
    path = PATHS[name]
    alpha, d_alpha = path.compute_alpha_t(T_GRID)
    sigma, d_sigma = path.compute_sigma_t(T_GRID)
    ref_alpha, ref_sigma = upstream_coefficients(name, T_GRID.numpy())
    np.testing.assert_allclose(alpha.numpy(), ref_alpha, rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), ref_sigma, rtol=1e-12)
    h = 1e-6  # central differences
    num_alpha = (path.compute_alpha_t(T_GRID + h)[0] - path.compute_alpha_t(T_GRID - h)[0]) / (2 * h)
    num_sigma = (path.compute_sigma_t(T_GRID + h)[0] - path.compute_sigma_t(T_GRID - h)[0]) / (2 * h)
    torch.testing.assert_close(d_alpha, num_alpha, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(d_sigma, num_sigma, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(path.compute_d_alpha_alpha_ratio_t(T_GRID), d_alpha / alpha)
    torch.testing.assert_close(path.compute_alpha_d_alpha_ratio_t(T_GRID), alpha / d_alpha)


@pytest.mark.parametrize("name", list(PATHS))
def test_path_end_points(name):
    path = PATHS[name]
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    alpha, sigma = path.compute_alpha_t(ends)[0], path.compute_sigma_t(ends)[0]
    expected_alpha0 = math.exp(-0.25 * 19.9 - 0.05) if name == "VP" else 0.0  # VP reaches pure noise only nearly
    torch.testing.assert_close(alpha, torch.tensor([expected_alpha0, 1.0], dtype=torch.float64), atol=1e-15, rtol=0)
    torch.testing.assert_close(sigma[1], torch.tensor(0.0, dtype=torch.float64), atol=1e-15, rtol=0)
    assert path.regular_at_ends == (name != "VP")


@pytest.mark.parametrize("name", list(PATHS))
def test_path_conversions_match_exact_gaussian_fields(name):
    path = PATHS[name]
    gen = torch.Generator().manual_seed(0)
    t = T_GRID.repeat_interleave(4)
    x = torch.randn(len(t), 2, generator=gen, dtype=torch.float64) * 2
    f = gaussian_fields(path, x, t)
    torch.testing.assert_close(path.get_score_from_velocity(f["velocity"], x, t), f["score"])
    torch.testing.assert_close(path.get_noise_from_velocity(f["velocity"], x, t), f["noise"])
    torch.testing.assert_close(path.get_velocity_from_score(f["score"], x, t), f["velocity"])
    torch.testing.assert_close(path.get_velocity_from_noise(f["noise"], x, t), f["velocity"])
    torch.testing.assert_close(path.get_score_from_noise(f["noise"], x, t), f["score"])
    torch.testing.assert_close(path.get_noise_from_score(f["score"], x, t), f["noise"])
    drift, g2 = path.compute_drift(x, t)
    torch.testing.assert_close(drift + g2 * f["score"], f["velocity"])


def test_path_velocity_to_score_is_finite_at_noise_end():
    """Velocity -> score uses alpha / d_alpha, so it works at t = 0 where the score of N(0, I) is -x."""
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.zeros(8, dtype=torch.float64)
    for name in ("Linear", "GVP"):
        path = PATHS[name]
        v = gaussian_fields(path, x, t)["velocity"]
        torch.testing.assert_close(path.get_score_from_velocity(v, x, t), -x)


def test_vp_g2_is_half_beta_and_equals_generic_formula():
    vp = VPPath()
    beta = 0.1 + (1 - T_GRID) * (20.0 - 0.1)
    torch.testing.assert_close(vp.compute_g2_t(T_GRID), beta / 2)
    sigma, d_sigma = vp.compute_sigma_t(T_GRID)
    generic = vp.compute_d_alpha_alpha_ratio_t(T_GRID) * sigma**2 - sigma * d_sigma
    torch.testing.assert_close(generic, beta / 2)


@pytest.mark.parametrize("name", list(PATHS))
def test_path_diffusion_forms(name):
    path = PATHS[name]
    t = T_GRID
    sigma = path.compute_sigma_t(t)[0]
    expected = {
        DiffusionForm.CONSTANT: torch.full_like(t, 2.0),
        DiffusionForm.SBDM: 2.0 * path.compute_g2_t(t),
        DiffusionForm.SIGMA: 2.0 * sigma,
        DiffusionForm.LINEAR: 2.0 * (1 - t),
        DiffusionForm.DECREASING: 0.25 * (2.0 * torch.cos(math.pi * t) + 1) ** 2,
        DiffusionForm.INCREASING_DECREASING: 2.0 * torch.sin(math.pi * t) ** 2,
    }
    assert set(expected) == set(DiffusionForm)
    for form, value in expected.items():
        torch.testing.assert_close(path.compute_diffusion(t, form, norm=2.0), value, msg=form.value)


def test_expand_t_like_x_and_mean_flat():
    x = torch.zeros(3, 2, 4, 5, 6)
    assert expand_t_like_x(torch.arange(3.0), x).shape == (3, 1, 1, 1, 1)
    torch.testing.assert_close(mean_flat(torch.arange(24.0).reshape(2, 3, 4)), torch.tensor([5.5, 17.5]))


# ---------------------------------------------------------------------------------------------------------------------
# Intervals and time sampling
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("transport_kwargs", "interval_kwargs", "expected"),
    [
        ({}, {}, (0.0, 1.0)),
        ({}, {"sampling": True}, (0.0, 1.0)),
        ({}, {"sde": True, "sampling": True, "last_step_size": 0.04}, (0.0, 0.96)),
        ({}, {"sde": True, "sampling": True}, (0.0, 1.0)),
        ({"sample_eps": 1e-3}, {"sde": True, "sampling": True, "diffusion_form": DiffusionForm.SBDM}, (1e-3, 1 - 1e-3)),
        ({"sample_eps": 1e-3}, {"sde": True, "sampling": True, "diffusion_form": "sbdm"}, (1e-3, 1 - 1e-3)),
        ({"sample_eps": 1e-3}, {"sde": True, "sampling": True, "last_step_size": 0.04}, (0.0, 0.96)),
        ({"prediction": "score"}, {}, (1e-3, 1 - 1e-3)),
        ({"path_type": "GVP", "prediction": "noise"}, {"sampling": True}, (1e-3, 1 - 1e-3)),
        ({"path_type": "VP"}, {}, (0.0, 1 - 1e-5)),
        ({"path_type": "VP"}, {"sampling": True}, (0.0, 1 - 1e-3)),
        ({"path_type": "VP"}, {"sde": True, "sampling": True, "last_step_size": 0.04}, (0.0, 0.96)),
        ({"path_type": "VP"}, {"sampling": True, "reverse": True}, (1 - 1e-3, 0.0)),
        ({"prediction": "score"}, {"sampling": True, "reverse": True}, (1 - 1e-3, 1e-3)),
    ],
)
def test_check_interval_follows_sit_rules(transport_kwargs, interval_kwargs, expected):
    t0, t1 = create_transport(**transport_kwargs).check_interval(**interval_kwargs)
    assert t0 == pytest.approx(expected[0], abs=1e-12) and t1 == pytest.approx(expected[1], abs=1e-12)


@pytest.mark.parametrize(("path_type", "prediction"), [("Linear", "velocity"), ("Linear", "noise"), ("VP", "score")])
def test_sample_time_is_uniform_on_the_training_interval(path_type, prediction):
    transport = create_transport(path_type, prediction)
    t0, t1 = transport.check_interval()
    t = transport.sample_time(100_000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (100_000,) and t.dtype == torch.float32
    assert t.min() >= t0 and t.max() <= t1
    assert abs(t.mean().item() - (t0 + t1) / 2) < 5 * (t1 - t0) / math.sqrt(12 * 100_000)
    again = transport.sample_time(100_000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(t, again)


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (0.5, 0.6)])
def test_logit_normal_times_have_the_asked_logit_mean_and_std(mean, std):
    transport = create_transport("Linear", "velocity", time_distribution="logit_normal", logit_normal_mean=mean,
                                 logit_normal_std=std)  # fmt: skip
    assert transport.check_interval() == (0.0, 1.0)
    t = transport.sample_time(100_000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (100_000,) and t.dtype == torch.float32 and t.min() > 0 and t.max() < 1
    logit = torch.logit(t.double())
    assert abs(logit.mean().item() - mean) < 5 * std / math.sqrt(100_000)  # 5 standard errors
    assert logit.std().item() == pytest.approx(std, rel=0.02)
    assert t.median().item() == pytest.approx(1 / (1 + math.exp(-mean)), abs=0.01)  # sigmoid(m): the median time
    torch.testing.assert_close(t, transport.sample_time(100_000, generator=torch.Generator().manual_seed(0)))


def test_logit_normal_times_stay_on_a_narrowed_training_interval():
    transport = create_transport("VP", "score", time_distribution="logit-normal")  # spellings as parse_choice's
    t0, t1 = transport.check_interval()
    assert t0 > 0 or t1 < 1
    t = transport.sample_time(10_000, generator=torch.Generator().manual_seed(0))
    assert t.min() >= t0 and t.max() <= t1 and "logit_normal" in repr(transport)


# ---------------------------------------------------------------------------------------------------------------------
# Training loss
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (2, 5, 4, 8, 8)], ids=["image", "video"])
def test_training_losses_shapes_and_model_call(shape):
    transport = create_transport()
    calls = []

    def model_fn(x, t, **cond):
        calls.append((x.shape, t.shape, cond))
        return torch.zeros_like(x)

    x1 = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    y = torch.arange(shape[0])
    terms = transport.training_losses(model_fn, x1, y=y, generator=torch.Generator().manual_seed(1))
    assert calls == [(torch.Size(shape), (shape[0],), {"y": y})]
    assert terms["loss"].shape == (shape[0],)
    for key in ("pred", "xt", "ut", "x0"):
        assert terms[key].shape == shape
    assert terms["t"].shape == (shape[0],)
    torch.testing.assert_close(terms["loss"], mean_flat(terms["ut"] ** 2))


def test_training_losses_fixed_noise_and_time():
    """t = 0 gives the noise, t = 1 the data; ut = x1 - x0 on the Linear path; loss = mean_flat((v - ut)^2)."""
    transport = create_transport()
    gen = torch.Generator().manual_seed(0)
    x1, x0 = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
    t = torch.tensor([0.0, 1.0, 0.25])
    terms = transport.training_losses(lambda x, t: 0.5 * x, x1, t=t, x0=x0)
    torch.testing.assert_close(terms["xt"][0], x0[0])
    torch.testing.assert_close(terms["xt"][1], x1[1])
    torch.testing.assert_close(terms["xt"][2], 0.25 * x1[2] + 0.75 * x0[2])
    torch.testing.assert_close(terms["ut"], x1 - x0)
    torch.testing.assert_close(terms["loss"], ((0.5 * terms["xt"] - (x1 - x0)) ** 2).mean(dim=(1, 2, 3)))
    same = transport.training_losses(lambda x, t: 0.5 * x, x1, t=0.25, x0=x0)
    torch.testing.assert_close(same["t"], torch.full((3,), 0.25))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"t": torch.zeros(2)},
        {"x0": torch.zeros(3, 2)},
        {"model_fn": lambda x, t: x[:, :1]},
    ],
    ids=["t-shape", "x0-shape", "output-shape"],
)
def test_training_losses_rejects_bad_shapes(kwargs):
    model_fn = kwargs.pop("model_fn", lambda x, t: x)
    with pytest.raises(ValueError, match="shape"):
        create_transport().training_losses(model_fn, torch.zeros(3, 4), **kwargs)


@pytest.mark.parametrize(
    ("path_type", "prediction", "loss_weight"),
    [
        (path_type, prediction, None)
        for path_type in ("Linear", "GVP", "VP")
        for prediction in ("velocity", "score", "noise")
    ]
    + [("Linear", "noise", "velocity"), ("GVP", "score", "likelihood"), ("VP", "noise", "likelihood")],
)
def test_training_loss_of_exact_field_is_its_analytic_minimum(path_type, prediction, loss_weight):
    """E[loss | t] of the optimal field equals the conditional variance of the target (module docstring), and a
    shift d of the field adds w_t d^2 on average."""
    transport = create_transport(path_type, prediction, loss_weight)
    gen = torch.Generator().manual_seed(0)
    n_t, per_t = 16, 8192
    t = torch.linspace(0.05, 0.95, n_t, dtype=torch.float64).repeat_interleave(per_t)
    x1 = MU + S * torch.randn(len(t), 2, generator=gen, dtype=torch.float64)
    x0 = torch.randn(len(t), 2, generator=gen, dtype=torch.float64)
    model_fn = exact_model(transport)
    loss = transport.training_losses(model_fn, x1, t=t, x0=x0)["loss"]
    expected = expected_min_loss(transport, t)
    mc_mean = loss.reshape(n_t, per_t).mean(1)
    mc_se = loss.reshape(n_t, per_t).std(1) / math.sqrt(per_t)
    ref = expected.reshape(n_t, per_t)[:, 0]
    print(f"max |MC - analytic| / se = {((mc_mean - ref).abs() / mc_se).max():.2f}")
    assert ((mc_mean - ref).abs() <= 5 * mc_se).all()

    shift = 0.1
    shifted = transport.training_losses(lambda x, t: model_fn(x, t) + shift, x1, t=t, x0=x0)["loss"]
    weight = transport.loss_weight_t(x1, t).reshape(-1)
    if prediction == "score":  # loss = w (sigma s + x0)^2, so a score shift d costs w sigma^2 d^2
        weight = weight * transport.path.compute_sigma_t(t)[0] ** 2
    excess = (shifted - loss).reshape(n_t, per_t)  # = w (2 d (pred - target) + d^2) averaged over dims
    excess_se = excess.std(1) / math.sqrt(per_t)
    assert ((excess.mean(1) - (weight * shift**2).reshape(n_t, per_t)[:, 0]).abs() <= 5 * excess_se).all()


def test_training_loss_on_the_training_interval_matches_analytic_mean():
    """Default time sampling: the batch-mean loss of the exact velocity equals E_t[min loss(t)]."""
    transport = create_transport()
    gen = torch.Generator().manual_seed(3)
    n = 200_000
    x1 = MU + S * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    terms = transport.training_losses(exact_model(transport), x1, generator=gen)
    assert terms["t"].dtype == torch.float64
    expected = expected_min_loss(transport, terms["t"])
    se = terms["loss"].std() / math.sqrt(n)
    assert abs(terms["loss"].mean() - expected.mean()) < 5 * se


def test_prior_logp_is_standard_normal():
    z = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(dim=(1, 2))
    torch.testing.assert_close(create_transport().prior_logp(z), expected)
