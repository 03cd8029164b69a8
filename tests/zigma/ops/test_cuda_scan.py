"""The ``cuda`` backend's custom ops (zigma/ops/cuda_scan.py) and its dispatch, without and with mamba_ssm.

On a CPU machine mamba_ssm's ``selective_scan_cuda`` cannot exist, so :class:`StandInExtension` implements its
``fwd``/``bwd`` contract (mamba_ssm 2.x ``SelectiveScanFn``) with ``selective_scan_ref`` and autograd. That tests what
zigma adds around the extension: the schemas, fake (meta) implementations, autograd registration (``opcheck``), the
last-state extraction and gradient plumbing, and one compiled graph. The real kernel is compared on a GPU only.
"""

import concurrent.futures
import math

import pytest
import torch

import zigma.ops as ops
from zigma.ops import cuda_scan, resolve_backend, selective_scan_cuda, selective_scan_ref

FWD_OP = torch.ops.zigma.selective_scan_cuda_fwd.default
BWD_OP = torch.ops.zigma.selective_scan_cuda_bwd.default


class StandInExtension:
    """``selective_scan_cuda`` as mamba_ssm's Python code calls it, computed by the reference (CPU, any dtype)."""

    @staticmethod
    def fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        assert u.stride(-1) == delta.stride(-1) == B.stride(-1) == C.stride(-1) == 1 and B.dim() == C.dim() == 4
        out, last = selective_scan_ref(u, delta, A, B, C, D, None, delta_bias, delta_softplus, return_last_state=True)
        x = torch.zeros(*u.shape[:2], math.ceil(u.shape[2] / 2048), 2 * A.shape[1])  # (prod, state) pairs per chunk
        x[:, :, -1, 1::2] = last
        out_z = [out * torch.nn.functional.silu(z.float()).to(out.dtype)] if z is not None else []
        return [out, x, *out_z]

    @staticmethod
    def bwd(u, delta, A, B, C, D, z, delta_bias, dout, x, out, _dz, delta_softplus, recompute_out_z):
        assert (out is not None) == (z is not None) and not recompute_out_z
        # A custom op's implementation runs below the autograd dispatch key (thread-local state): differentiate the
        # reference in a fresh thread, where autograd and no test mode of opcheck's is active.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            grads = pool.submit(_reference_grads, (u, delta, A, B, C, D, z, delta_bias), dout, delta_softplus).result()
        du, ddelta, dA, dB, dC, dD, dz, dbias = grads
        dB, dC = dB.float(), dC.float()  # the extension returns fp32 dB/dC for input-dependent B/C
        return [du, ddelta, dA, dB, dC, dD, dbias, *([dz] if z is not None else [])]


def _reference_grads(inputs, dout, delta_softplus):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(selective_scan_ref(*leaves, delta_softplus), present, dout))
    return [next(grads) if t is not None else None for t in leaves]


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(cuda_scan, "cuda_extension", StandInExtension)  # called as cuda_extension() -> instance


def make_inputs(options=True, dtype=torch.float32, seqlen=9, bc_4d=False):
    gen = torch.Generator().manual_seed(5)
    batch, dim, dstate = 2, 4, 3
    u, z = (torch.randn(batch, seqlen, dim, generator=gen).to(dtype).transpose(1, 2) for _ in range(2))
    delta = (0.5 * torch.randn(batch, dim, seqlen, generator=gen)).to(dtype)
    A = -0.5 - torch.rand(dim, dstate, generator=gen)
    B, C = (torch.randn(batch, dstate, seqlen, generator=gen).to(dtype) for _ in range(2))
    if bc_4d:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    D, bias = torch.randn(dim, generator=gen), torch.randn(dim, generator=gen)
    if not options:
        D = z = bias = None
    return [u, delta, A, B, C, D, z, bias]


@pytest.mark.parametrize("options", [True, False], ids=["D-z-bias", "bare"])
def test_custom_ops_pass_opcheck(stand_in, options):
    """Schema, fake implementation (shapes, dtypes, strides), autograd registration, AOT dispatch of both ops."""
    args = [x.requires_grad_() if x is not None else None for x in make_inputs(options)]
    torch.library.opcheck(FWD_OP, (*args, options))
    detached = [x.detach() if x is not None else None for x in args]
    out_z, _, x, out = FWD_OP(*detached, options)
    torch.library.opcheck(BWD_OP, (torch.randn_like(out_z), *detached, x, out, options))


@pytest.mark.parametrize("options", [True, False], ids=["D-z-bias", "bare"])
@pytest.mark.parametrize("bc_4d", [False, True], ids=["BC-3d", "BC-4d"])
def test_wrapper_matches_reference_values_last_state_and_grads(stand_in, options, bc_4d):
    inputs = make_inputs(options, bc_4d=bc_4d)
    ours = [x.detach().clone().requires_grad_() if x is not None else None for x in inputs]
    ref = [x.detach().clone().requires_grad_() if x is not None else None for x in inputs]
    out, last = selective_scan_cuda(*ours, delta_softplus=options, return_last_state=True)
    out_ref, last_ref = selective_scan_ref(*ref, delta_softplus=options, return_last_state=True)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(last, last_ref)
    assert not last.requires_grad
    grad = torch.randn_like(out)
    out.backward(grad)
    out_ref.backward(grad)
    for name, a, e in zip(["u", "delta", "A", "B", "C", "D", "z", "delta_bias"], ours, ref):
        if e is not None:
            assert a.grad.shape == e.shape and a.grad.dtype == e.dtype, name
            torch.testing.assert_close(a.grad, e.grad, msg=lambda m, n=name: f"d{n}: {m}")


def test_compiles_as_one_graph(stand_in):
    from torch._dynamo.testing import CompileCounterWithBackend

    def loss(*tensors):
        return (selective_scan_cuda(*tensors, delta_softplus=True) ** 2).sum()

    inputs = make_inputs()
    eager = [x.clone().requires_grad_() for x in inputs]
    compiled = [x.clone().requires_grad_() for x in inputs]
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    try:
        value = torch.compile(loss, fullgraph=True, backend=counter)(*compiled)
    finally:
        torch._dynamo.reset()
    value.backward()
    loss(*eager).backward()
    assert counter.frame_count == 1
    for a, e in zip(compiled, eager):
        torch.testing.assert_close(a.grad, e.grad)


def test_dispatch_without_mamba_ssm(monkeypatch):
    monkeypatch.setattr(ops, "_RESOLVED", {})
    monkeypatch.setattr(ops, "cuda_extension", lambda: None)
    monkeypatch.setattr(ops, "_triton_available", lambda: False)
    assert ops.available_backends("cuda") == ["torch"]
    assert resolve_backend("auto", "cuda") == "torch"
    with pytest.raises(ValueError, match=r"^scan_backend='cuda' cannot run on device 'cuda': install mamba-ssm"):
        resolve_backend("cuda", "cuda")
    with pytest.raises(RuntimeError, match="selective_scan_cuda extension does not import"):
        selective_scan_cuda(*make_inputs())  # the op itself, called directly without the extension


def test_dispatch_with_mamba_ssm_prefers_cuda_on_cuda_only(monkeypatch):
    monkeypatch.setattr(ops, "_RESOLVED", {})
    monkeypatch.setattr(ops, "cuda_extension", StandInExtension)
    assert ops.available_backends("cuda")[-1] == "cuda"
    assert resolve_backend("auto", "cuda", torch.bfloat16) == "cuda"  # no Triton guard on the cuda path
    assert resolve_backend("auto", "cpu", torch.bfloat16) == "torch"


@pytest.mark.skipif(
    not torch.cuda.is_available() or cuda_scan.cuda_extension() is None,
    reason="needs a GPU and mamba_ssm's selective_scan_cuda extension (requirements-gpu.txt)",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_extension_matches_reference_on_gpu(dtype):
    inputs = [x.cuda() if x is not None else None for x in make_inputs(dtype=dtype, seqlen=300)]
    ours = [x.detach().clone().requires_grad_() for x in inputs]
    ref = [x.detach().clone().requires_grad_() for x in inputs]
    out = selective_scan_cuda(*ours, delta_softplus=True)
    out_ref = selective_scan_ref(*ref, delta_softplus=True)
    tol = {torch.float32: (6e-4, 2e-3), torch.bfloat16: (3e-2, 5e-2)}[dtype]
    torch.testing.assert_close(out, out_ref, rtol=tol[0], atol=tol[1])
    grad = torch.randn_like(out)
    out.backward(grad)
    out_ref.backward(grad)
    for a, e in zip(ours, ref):
        torch.testing.assert_close(a.grad, e.grad, rtol=5 * tol[0], atol=10 * tol[1])
