"""Optimization settings: manual optimization with two optimizers, gradient accumulation, gradient clipping."""

from __future__ import annotations

from tests.compat._common import CORE_KEYS, GRAD_NORM, TRANSFORMER_KEYS, check, fit, monitor
from tests.helpers.real_models import NanoGPT, TinyGAN, TinyMLP, gan_discriminator_loss, lm_loss_fn


def test_manual_optimization_two_optimizers_with_loss_fn():
    """A GAN (two optimizers, manual optimization): with ``loss_fn`` every part measures and nothing changes."""
    check(TinyGAN, CORE_KEYS, lambda: monitor(loss_fn=gan_discriminator_loss))


def test_manual_optimization_gradient_norms_with_even_log_every_n_steps():
    """Lightning advances ``global_step`` at every ``optimizer.step()``, twice per batch here: with an even
    ``log_every_n_steps`` the gradient monitor must still write its norms (it wrote none)."""
    mon = monitor(loss_fn=gan_discriminator_loss, hessian=False, rank=False, connectivity=False, logits=False)
    _, _, logger = fit(TinyGAN, [mon], log_every_n_steps=2)
    norms = [k for k in logger.landscape() if k.startswith(GRAD_NORM)]
    assert norms, f"no gradient norm logged under manual optimization: {sorted(logger.landscape())}"


def test_accumulate_grad_batches_nanogpt():
    check(NanoGPT, TRANSFORMER_KEYS, accumulate_grad_batches=2)


def test_gradient_clipping_nanogpt():
    check(NanoGPT, TRANSFORMER_KEYS, gradient_clip_val=1.0)


def test_accumulation_and_clipping_mlp_with_loss_fn():
    check(lambda: TinyMLP(dropout=0.1), CORE_KEYS, accumulate_grad_batches=2, gradient_clip_val=1.0)


def test_nanogpt_with_explicit_loss_fn():
    """``loss_fn`` given instead of the training step: the same contract."""
    check(NanoGPT, TRANSFORMER_KEYS, lambda: monitor(loss_fn=lm_loss_fn))
