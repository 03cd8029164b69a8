"""The torch selective-scan backend against the sequential oracle, and the backend dispatcher."""

import pytest
import torch

import zigma.ops.torch_scan as scan_torch
from zigma.ops import available_backends, resolve_backend, selective_scan, selective_scan_ref, selective_scan_torch

# mamba_ssm tests/ops/test_selective_scan.py tolerances (fp32): outputs and input grads; weight grads
RTOL, ATOL = 6e-4, 2e-3


def make_inputs(batch=2, dim=6, seqlen=33, n_state=4, dtype=torch.float64, *, has_d=True, has_z=True, has_bias=True,
                channel_last=False, grouped=False, seed=0):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)

    if channel_last:  # what the model passes: transposed views of (B, L, D) activations
        u = rnd(batch, seqlen, dim).transpose(1, 2)
        delta = rnd(batch, seqlen, dim, scale=0.5).transpose(1, 2)
        z = rnd(batch, seqlen, dim).transpose(1, 2) if has_z else None
    else:
        u, delta = rnd(batch, dim, seqlen), rnd(batch, dim, seqlen, scale=0.5)
        z = rnd(batch, dim, seqlen) if has_z else None
    a = -(0.5 + torch.rand(dim, n_state, generator=gen, dtype=torch.float64)).to(
        torch.float32 if dtype != torch.float64 else dtype
    )
    b, c = rnd(batch, n_state, seqlen), rnd(batch, n_state, seqlen)
    if grouped:
        b, c = b.unsqueeze(1), c.unsqueeze(1)
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    d = torch.randn(dim, generator=gen, dtype=torch.float64).to(wdtype) if has_d else None
    bias = (0.3 * torch.randn(dim, generator=gen, dtype=torch.float64)).to(wdtype) if has_bias else None
    return [u, delta, a, b, c, d, z, bias]


def run(fn, inputs, grad_out=None, **kwargs):
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
    out, last = fn(*leaves, return_last_state=True, **kwargs)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    out.backward(grad_out)
    return out, last, [None if x is None else x.grad for x in leaves], grad_out


def assert_match(inputs, rtol, atol, **kwargs):
    out_ref, last_ref, grads_ref, g = run(selective_scan_ref, inputs, **kwargs)
    out, last, grads, _ = run(selective_scan_torch, inputs, grad_out=g, **kwargs)
    torch.testing.assert_close(out, out_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(last.to(last_ref.dtype), last_ref, rtol=rtol, atol=atol)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    for name, g_ref, g_new in zip(names, grads_ref, grads):
        assert (g_ref is None) == (g_new is None), name
        if g_ref is not None:
            assert g_new.dtype == g_ref.dtype and g_new.shape == g_ref.shape, name
            torch.testing.assert_close(g_new, g_ref, rtol=rtol, atol=atol, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("softplus", [True, False])
@pytest.mark.parametrize(
    ("has_d", "has_z", "has_bias"), [(True, True, True), (False, False, False), (True, False, True)]
)
def test_torch_scan_equals_sequential_loop_fp64(softplus, has_d, has_z, has_bias):
    inputs = make_inputs(has_d=has_d, has_z=has_z, has_bias=has_bias)
    assert_match(inputs, rtol=1e-10, atol=1e-10, delta_softplus=softplus)


@pytest.mark.parametrize("seqlen", [1, 2, 7, 64])
@pytest.mark.parametrize("block_elements", [1, 40, 10**6])
def test_torch_scan_exact_across_block_boundaries(monkeypatch, seqlen, block_elements):
    monkeypatch.setattr(scan_torch, "_BLOCK_ELEMENTS", block_elements)
    assert_match(make_inputs(seqlen=seqlen), rtol=1e-10, atol=1e-10, delta_softplus=True)


def test_torch_scan_accepts_channel_last_and_grouped_bc():
    assert_match(make_inputs(channel_last=True, grouped=True), rtol=1e-10, atol=1e-10, delta_softplus=True)


def test_torch_scan_fp32_within_mamba_ssm_tolerances():
    inputs = make_inputs(batch=2, dim=32, seqlen=256, n_state=16, dtype=torch.float32, channel_last=True)
    assert_match(inputs, rtol=RTOL, atol=ATOL, delta_softplus=True)


def test_torch_scan_bf16_inputs_keep_dtypes():
    inputs = make_inputs(dim=8, seqlen=20, dtype=torch.bfloat16)
    out, last, grads, _ = run(selective_scan_torch, inputs, delta_softplus=True)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    assert [g.dtype for g in grads if g is not None] == [x.dtype for x in inputs if x is not None]
    ref = selective_scan_ref(*inputs, delta_softplus=True)
    torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=5e-2)


def test_last_state_is_not_differentiable():
    inputs = make_inputs()
    leaves = [x.detach().requires_grad_() if x is not None else None for x in inputs]
    out, last = selective_scan_torch(*leaves, delta_softplus=True, return_last_state=True)
    assert out.requires_grad and not last.requires_grad


def test_dispatcher_picks_torch_on_cpu_and_rejects_bad_names():
    assert available_backends("cpu") == ["torch"]
    assert resolve_backend("auto", "cpu") == "torch"
    inputs = make_inputs(dtype=torch.float32)
    torch.testing.assert_close(
        selective_scan(*inputs, delta_softplus=True, backend="auto"), selective_scan_torch(*inputs, delta_softplus=True)
    )
    with pytest.raises(ValueError, match="not one of"):
        selective_scan(*inputs, backend="fast")
    with pytest.raises(ValueError, match="cannot run on device 'cpu'"):
        selective_scan(*inputs, backend="cuda")
