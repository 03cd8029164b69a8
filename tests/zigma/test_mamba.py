"""MambaMixer: mamba_ssm's names/shapes/init, and the fused-gather equivalence P⁻¹∘Mamba∘P."""

import math

import pytest
import torch
import torch.nn.functional as F

from zigma.mamba import MambaMixer, causal_depthwise_conv
from zigma.model import ZigMa

MIXER_KEYS = {"in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
              "A_log", "D", "out_proj.weight"}  # fmt: skip
BACKWARD_KEYS = {
    "A_b_log",
    "conv1d_b.weight",
    "conv1d_b.bias",
    "x_proj_b.weight",
    "dt_proj_b.weight",
    "dt_proj_b.bias",
    "D_b",
}


def test_mixer_parameter_names_and_shapes_match_mamba_ssm():
    mixer = MambaMixer(768)
    shapes = {k: tuple(v.shape) for k, v in mixer.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (3072, 768), "conv1d.weight": (1536, 1, 4), "conv1d.bias": (1536,),
        "x_proj.weight": (80, 1536), "dt_proj.weight": (1536, 48), "dt_proj.bias": (1536,), "A_log": (1536, 16),
        "D": (1536,), "out_proj.weight": (768, 1536),
    }  # fmt: skip
    assert sum(p.numel() for p in mixer.parameters()) == 3_770_880
    bi = MambaMixer(768, bidirectional=True)
    assert set(bi.state_dict()) == MIXER_KEYS | BACKWARD_KEYS
    assert sum(p.numel() for p in bi.parameters()) - 3_770_880 == 231_936


def test_mixer_initialisation_follows_mamba_ssm():
    mixer = MambaMixer(64)
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    assert torch.equal(mixer.A_log, torch.log(torch.arange(1, 17.0)).repeat(128, 1))
    assert mixer.A_log.dtype == mixer.D.dtype == torch.float32 and torch.equal(mixer.D, torch.ones(128))
    bound = (64 / 16) ** -0.5  # dt_rank = ceil(64 / 16) = 4
    assert mixer.dt_proj.weight.abs().max() <= bound
    assert mixer.A_log._no_weight_decay and mixer.D._no_weight_decay and mixer.dt_proj.bias._no_reinit


def test_model_init_rescales_out_proj_and_zeroes_v2_backward_dt_bias_like_upstream():
    model = ZigMa(in_channels=4, embed_dim=64, depth=4, img_dim=4, scan_type="v2")
    mixer = model.blocks[0].mixer
    bound = math.sqrt(6 / ((1 + 5) * 128)) / math.sqrt(4)  # kaiming_uniform(a=√5) / √depth
    assert mixer.out_proj.weight.abs().max() <= bound
    assert torch.count_nonzero(mixer.dt_proj_b.bias) == 0  # upstream quirk: softplus(0) ≈ 0.69
    assert torch.count_nonzero(mixer.dt_proj.bias) == 128
    fixed = ZigMa(in_channels=4, embed_dim=64, depth=4, img_dim=4, scan_type="v2", backward_dt_bias_reinit=False)
    assert F.softplus(fixed.blocks[0].mixer.dt_proj_b.bias).max() <= 0.1 + 1e-6


@pytest.mark.parametrize("bidirectional", [False, True])
def test_permuting_block_input_equals_upstream_fused_gather(bidirectional):
    mixer = MambaMixer(16, bidirectional=bidirectional).double()
    h = torch.randn(3, 25, 16, dtype=torch.float64)
    path = torch.randperm(25)
    inverse = torch.argsort(path)
    outer = mixer(h[:, path])[:, inverse]  # P⁻¹ ∘ Mamba ∘ P on the (B, L, D) input
    fused = mixer(h, gather=(path, inverse))  # upstream: gather xz (2E channels) and the output rows
    torch.testing.assert_close(outer, fused, rtol=1e-12, atol=1e-12)


def test_mixer_is_causal_along_its_sequence():
    mixer = MambaMixer(8).double()
    h = torch.randn(1, 12, 8, dtype=torch.float64)
    h2 = h.clone()
    h2[:, 7:] += 1.0
    torch.testing.assert_close(mixer(h)[:, :7], mixer(h2)[:, :7])
    assert not torch.allclose(mixer(h)[:, 7:], mixer(h2)[:, 7:])


@pytest.mark.parametrize("bias", [True, False])
def test_cpu_causal_conv_equals_conv1d_values_and_gradients(bias):
    """The CPU shift-add conv (issue 17) computes nn.Conv1d(E, E, K, groups=E, padding=K-1)[..., :L]."""
    gen = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3, bias=bias)
    x = torch.randn(2, 9, 6, generator=gen, requires_grad=True)  # (B, L, E)
    grad = torch.randn(2, 9, 6, generator=gen)
    reference = conv(x.transpose(1, 2))[..., :9].transpose(1, 2)
    ref_grads = torch.autograd.grad(reference, [x, *conv.parameters()], grad)
    out = causal_depthwise_conv(x, conv)
    torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)
    for got, want in zip(torch.autograd.grad(out, [x, *conv.parameters()], grad), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_cpu_mixer_softplus_outside_the_scan_gives_the_scan_s_own_results(monkeypatch):
    """On eager CPU the mixer applies softplus(Δ + bias) before the scan (issue 17); compiled, the scan does it:
    the same output bit for bit, gradients equal up to rounding."""
    torch.manual_seed(0)
    mixer = MambaMixer(16, d_state=4)
    h = torch.randn(2, 10, 16, requires_grad=True)

    def run():
        out = mixer(h)
        return out, torch.autograd.grad(out.square().sum(), [h, *mixer.parameters()])

    out, grads = run()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the path the scan's softplus takes
    out_scan, grads_scan = run()
    assert torch.equal(out, out_scan)
    for got, want in zip(grads, grads_scan):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
