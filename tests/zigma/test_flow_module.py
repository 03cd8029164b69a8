"""FlowMatchingModule: clipping order, parameter groups, LR schedule, ZigMa loss, guidance, fixed validation."""

import lightning as L
import pytest
import torch

from datamodules import EmbeddedFacesDataModule
from zigma.flow_module import FlowMatchingModule, lr_lambda, parameter_groups

TINY = {"in_channels": 1, "img_dim": 32, "patch_size": 4, "embed_dim": 16, "depth": 2, "scan_type": "zigzagN8",
        "use_pe": 2, "drop_path_rate": 0.0}  # fmt: skip


class StepGradNorm(L.Callback):
    """Records the total gradient norm the optimizer stepped with: Lightning computes (and clips) gradients in the
    closure that runs inside optimizer.step, so a post-hook sees exactly the gradients the update used."""

    def __init__(self):
        self.norms = []

    def on_train_start(self, trainer, pl_module):
        def hook(optimizer, args, kwargs):  # runs before anything could clip *after* the step (upstream's bug)
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

        trainer.optimizers[0].register_step_post_hook(hook)


def fit(module, steps=3, **trainer_kwargs):
    probe = StepGradNorm()
    trainer = L.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[probe], **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(module, EmbeddedFacesDataModule(batch_size=8, repeats=1))
    return probe.norms


def test_gradient_clipping_acts_before_the_optimizer_step():
    """Upstream clipped after opt.step() (a no-op); here the optimizer must only ever see clipped gradients."""
    unclipped = fit(FlowMatchingModule(net=TINY))
    assert min(unclipped) > 1e-3  # the control: real gradients are much larger than the clip value
    clipped = fit(FlowMatchingModule(net=TINY), gradient_clip_val=1e-3)
    assert max(clipped) <= 1e-3 * (1 + 1e-4)


def test_parameter_groups_skip_decay_on_ssm_norm_bias_and_embeddings():
    module = FlowMatchingModule(net={**TINY, "num_classes": 5})
    decay, no_decay = parameter_groups(module.model, weight_decay=0.05)
    names = {id(p): n for n, p in module.model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    for name in ["blocks.0.mixer.A_log", "blocks.0.mixer.D", "blocks.0.norm.weight", "norm_f.weight",
                 "blocks.0.mixer.dt_proj.bias", "pos_embed", "y_embedder.embedding_table.weight",
                 "x_embedder.proj.bias"]:  # fmt: skip
        assert name in skipped, name
    decayed = {names[id(p)] for p in decay["params"]}
    assert "blocks.0.mixer.in_proj.weight" in decayed and "x_embedder.proj.weight" in decayed
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decayed) + len(skipped) == len(list(module.model.parameters()))


def test_lr_schedule_warmup_then_constant_or_cosine():
    assert [lr_lambda(s, 4, 100, "constant", 0.0) for s in (0, 1, 3, 4, 99)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert lr_lambda(4, 4, 104, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_lambda(54, 4, 104, "cosine", 0.1) == pytest.approx(0.55)
    assert lr_lambda(104, 4, 104, "cosine", 0.1) == pytest.approx(0.1)


def test_zigma_flow_matching_loss_is_finite_with_gradients():
    module = FlowMatchingModule(net={**TINY, "num_classes": 3})
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 0])
    loss = module.transport.training_losses(module.model, x, y=y)["loss"]
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    loss.mean().backward()
    grads = [p.grad for p in module.model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_conditional_models_default_to_cfg_dropout_and_generate_with_guidance():
    module = FlowMatchingModule(net={**TINY, "num_classes": 3}, guidance_scale=2.0, sample_steps=3)
    assert module.model.cond_dropout_prob == 0.1 and module.model.has_null_condition
    out = module.generate(module.noise(torch.arange(2)), torch.tensor([0, 2]))
    assert out.x.shape == (2, 1, 32, 32) and out.nfe == 2
    with pytest.raises(ValueError, match="guidance_scale"):
        FlowMatchingModule(net={**TINY, "num_classes": 3}, cond_dropout_prob=0.0, guidance_scale=2.0)


def test_noise_of_a_sample_does_not_depend_on_its_batch():
    module = FlowMatchingModule(net=TINY)
    torch.testing.assert_close(module.noise(torch.tensor([5, 6]))[1], module.noise(torch.tensor([6]))[0])
    assert not torch.equal(module.noise(torch.tensor([6]), seed=1), module.noise(torch.tensor([6])))


def test_validation_draws_are_fixed():
    module = FlowMatchingModule(net=TINY)
    x = torch.randn(3, 1, 32, 32)
    (a0, at), (b0, bt) = module._fixed_draws(x, 2), module._fixed_draws(x, 2)
    assert torch.equal(a0, b0) and torch.equal(at, bt)
    assert not torch.equal(module._fixed_draws(x, 3)[0], a0)


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="preset"):
        FlowMatchingModule(preset="zigzag8_b1")
    with pytest.raises(ValueError, match="path_type"):
        FlowMatchingModule(net=TINY, path_type="cosine")
    with pytest.raises(ValueError, match="lr"):
        FlowMatchingModule(net=TINY, lr=0.0)


class ParamTrace(L.Callback):
    """Checksums of the raw and EMA weights after every training batch."""

    def __init__(self):
        self.raw, self.ema = [], []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.raw.append(sum(p.double().sum().item() for p in pl_module.model.parameters()))
        self.ema.append(sum(p.double().sum().item() for p in pl_module.ema.network.parameters()))


def fit_traced(module, steps):
    trace = ParamTrace()
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[trace])  # fmt: skip
    trainer.fit(module, EmbeddedFacesDataModule(batch_size=8, repeats=1))
    return trace


def poison_loss(module, bad_steps):
    """Make the loss NaN at the given global steps."""
    losses = module.transport.training_losses

    def wrapped(*args, **kwargs):
        terms = losses(*args, **kwargs)
        if module.global_step in bad_steps:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    module.transport.training_losses = wrapped


def test_nonfinite_loss_skips_the_update_and_is_counted():
    module = FlowMatchingModule(net=TINY, ema_decay=0.5)
    poison_loss(module, {1})
    trace = fit_traced(module, 3)
    assert trace.raw[1] == trace.raw[0] and trace.ema[1] == trace.ema[0]  # step 1: nothing changed
    assert trace.raw[2] != trace.raw[1] and trace.ema[2] != trace.ema[1]  # training went on
    assert module._nonfinite_total == 1 and module._nonfinite_streak == 0


def test_nonfinite_gradient_skips_the_update():
    module = FlowMatchingModule(net=TINY, ema_decay=0.5)
    weight = module.model.final_layer.linear.weight
    weight.register_hook(lambda g: g * float("inf") if module.global_step == 1 else g)
    trace = fit_traced(module, 3)
    assert trace.raw[1] == trace.raw[0] and trace.ema[1] == trace.ema[0]
    assert trace.raw[2] != trace.raw[1]
    assert module._nonfinite_total == 1


def test_consecutive_nonfinite_steps_stop_training_naming_the_step():
    module = FlowMatchingModule(net=TINY, max_nonfinite_steps=3)
    poison_loss(module, set(range(100)))
    with pytest.raises(FloatingPointError, match=r"3 consecutive non-finite steps .* at global step \d+"):
        fit_traced(module, 10)


def test_pixel_batches_are_encoded_by_a_frozen_vae_outside_the_module_tree(tiny_vae_dir):
    net = {**TINY, "in_channels": 4, "img_dim": 8, "patch_size": 2}
    module = FlowMatchingModule(net=net, vae=str(tiny_vae_dir), sample_steps=2)
    module.setup("fit")
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = module.encode(pixels)
    assert latents.shape == (2, 4, 8, 8) and not latents.requires_grad
    terms = module.transport.training_losses(module.model, module._data({"pixels": pixels}, module.encode))
    terms["loss"].mean().backward()
    assert module.model.x_embedder.proj.weight.grad is not None
    out = module.predict_step({"index": torch.arange(2)}, 0)
    assert out["samples"].shape == (2, 3, 16, 16) and out["samples"].abs().max() <= 1
    assert_vae_is_outside(module)


def tensor_addresses(*tensors: torch.Tensor) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}


def assert_vae_is_outside(module: FlowMatchingModule) -> None:
    """No tensor of the VAE network is a parameter/buffer of the module, in its state_dict (so not saved), in the
    EMA copy or in what the optimizer gets (``parameters()``), and the VAE network is not among its modules."""
    vae_nets = [v for v in vars(module.vae).values() if isinstance(v, torch.nn.Module)]
    assert vae_nets, "the FrozenVAE holds its diffusers network"
    vae = tensor_addresses(*(t for net in vae_nets for t in (*net.parameters(), *net.buffers())))
    held = (*module.parameters(), *module.buffers(), *module.state_dict().values(), *module.ema.state_dict().values())
    assert not vae & tensor_addresses(*held)
    assert not any(m is net for m in module.modules() for net in vae_nets)


def test_pixel_batch_without_vae_is_a_clear_error():
    module = FlowMatchingModule(net=TINY)
    with pytest.raises(ValueError, match=r"model\.vae is not set"):
        module.encode(torch.rand(1, 3, 32, 32))
