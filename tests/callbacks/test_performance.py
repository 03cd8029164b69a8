"""PerformanceSwitches: in-place compile (unprefixed keys), every block checkpointed, scan backend, error messages."""

import lightning as L
import pytest
import torch
import torch.utils.checkpoint

from callbacks import PerformanceSwitches
from datamodules import EmbeddedFacesDataModule
from zigma.flow_module import FlowMatchingModule

TINY = {"in_channels": 1, "img_dim": 32, "patch_size": 4, "embed_dim": 16, "depth": 2, "scan_type": "zigzagN8",
        "use_pe": 2, "drop_path_rate": 0.0}  # fmt: skip


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def checkpoint_calls(monkeypatch):
    """Counts torch.utils.checkpoint.checkpoint calls (ZigMa makes one per block when checkpointing is on)."""
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(function, *args, **kwargs):
        calls.append(function)
        return original(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    return calls


def fit(module, switches, steps=2):
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[switches],
    )  # fmt: skip
    trainer.fit(module, EmbeddedFacesDataModule(batch_size=4, repeats=1))
    return trainer


def test_performance_switches_compile_in_place_and_checkpoint_every_block(checkpoint_calls):
    module = FlowMatchingModule(net=TINY)
    keys = list(module.state_dict())
    assert not module.model.use_checkpoint
    switches = PerformanceSwitches(compile=True, compile_backend="aot_eager", gradient_checkpointing=True)
    trainer = fit(module, switches)
    assert trainer.global_step == 2

    # compiled in place: the backbone and the EMA copy, with the checkpoint keys of an eager module
    assert module.model._compiled_call_impl is not None and module.ema.network._compiled_call_impl is not None
    assert list(module.state_dict()) == keys
    assert not any("_orig_mod" in key for key in module.state_dict())

    # checkpointing is on: an uncompiled forward (``forward`` bypasses the compiled ``__call__``) checkpoints every
    # block; the EMA copy (only ever run without gradients) keeps its setting
    assert module.model.use_checkpoint and not module.ema.network.use_checkpoint
    checkpoint_calls.clear()
    x, t = torch.randn(2, 1, 32, 32), torch.rand(2)
    module.model.forward(x, t)
    assert [type(f).__name__ for f in checkpoint_calls] == ["Block"] * len(module.model.blocks)


def test_performance_switches_set_scan_backend_and_checkpointing_in_an_eager_fit(checkpoint_calls):
    module = FlowMatchingModule(net=TINY)
    fit(module, PerformanceSwitches(gradient_checkpointing=True, scan_backend="torch"), steps=1)
    assert len(checkpoint_calls) == len(module.model.blocks)  # one training step; validation runs without gradients
    for network in (module.model, module.ema.network):
        assert network.config["scan_backend"] == "torch"
        assert all(block.mixer.scan_backend == "torch" for block in network.blocks)
        assert network._compiled_call_impl is None  # compile=False compiles nothing


def test_performance_switches_setup_is_idempotent_and_checks_the_device():
    module = FlowMatchingModule(net=TINY)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    switches = PerformanceSwitches(compile=True, compile_backend="aot_eager", gradient_checkpointing=False)
    switches.setup(trainer, module, "fit")
    compiled = module.model._compiled_call_impl
    switches.setup(trainer, module, "validate")  # a later stage must not wrap (and recompile) again
    assert module.model._compiled_call_impl is compiled
    with pytest.raises(ValueError, match="scan_backend='triton' cannot run on device 'cpu'"):
        PerformanceSwitches(scan_backend="triton").setup(trainer, module, "fit")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"compile": "yes"}, r"compile='yes' must be True or False"),
        ({"compile": True, "compile_mode": "fast"}, r"compile_mode='fast' is not one of \[None, 'default', "),
        ({"compile_mode": "max-autotune"}, r"compile_mode='max-autotune' has no effect with compile=False"),
        ({"compile": True, "compile_mode": "max-autotune", "compile_backend": "aot_eager"},
         r"compile_mode='max-autotune' needs compile_backend='inductor'"),
        ({"compile_backend": "tensorrt-ish"}, r"compile_backend='tensorrt-ish' is not one of \[.*'inductor'"),
        ({"gradient_checkpointing": 1}, r"gradient_checkpointing=1 must be one of \[None, True, False\]"),
        ({"scan_backend": "fast"}, r"scan_backend='fast' is not one of \[None, 'auto', 'torch', 'triton', 'cuda'\]"),
    ],
)  # fmt: skip
def test_performance_switches_reject_bad_values_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PerformanceSwitches(**kwargs)
