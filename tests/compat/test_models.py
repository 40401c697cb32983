"""Each real model under LandscapeMonitor on a plain CPU Trainer: measured, finite, healthy, training unchanged."""

from __future__ import annotations

import warnings

import pytest

from lightning_landscape import LandscapeMonitor
from tests.compat._common import CORE_KEYS, RANK, SHARPNESS, TRANSFORMER_KEYS, check, fit, monitor
from tests.helpers.real_models import HFGPT2, DemoTransformer, NanoGPT, TinyGAN, TinyMLP

PROBE_FRACTION = "landscape/hessian/probe_fraction"

MODELS = {
    "nanogpt": (NanoGPT, TRANSFORMER_KEYS),
    "nanogpt_dropout_warmup": (lambda: NanoGPT(dropout=0.1, warmup_steps=10), TRANSFORMER_KEYS),
    "hf_gpt2_eager": (lambda: HFGPT2("eager"), TRANSFORMER_KEYS),
    "hf_gpt2_sdpa": (lambda: HFGPT2("sdpa"), TRANSFORMER_KEYS),
    "hf_gpt2_eager_dropout": (lambda: HFGPT2("eager", dropout=0.1), TRANSFORMER_KEYS),
    "lightning_demo_transformer": (DemoTransformer, TRANSFORMER_KEYS),
    "mlp_dropout": (lambda: TinyMLP(dropout=0.1), CORE_KEYS),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_real_model(name):
    make_model, keys = MODELS[name]
    check(make_model, keys)


@pytest.mark.parametrize("name", ["nanogpt", "hf_gpt2_eager"])
def test_no_rank_collapse_alert_from_initialisation(name):
    """Measured from step 0, RankMe of the features entering the LM head falls from ~26 (random init) to ~3.5 by step
    10 of a healthy run (loss 4.85 -> 3.2; it climbs back to 7.4 by step 90): the early-training collapse onto the
    unigram direction, not dying units. ``rank_collapse`` must not fire on it."""
    make_model = MODELS[name][0]
    only_rank = {"hessian": False, "grad_spikes": False, "connectivity": False, "logits": False}
    check(make_model, (RANK,), lambda: monitor(rank={"every_n_steps": 10}, **only_rank), unchanged=False)


class CountingGAN(TinyGAN):
    steps_run = 0

    def training_step(self, batch, batch_idx):
        CountingGAN.steps_run += 1
        return super().training_step(batch, batch_idx)


def test_manual_optimization_without_loss_fn_fails_at_setup():
    """Its training step returns nothing, so without ``loss_fn`` no part that needs a loss can measure: that must be
    a clear error before the first training step, at the default (wall-clock) budget too, not at whichever step the
    first measurement happens to come."""
    CountingGAN.steps_run = 0
    with pytest.raises((TypeError, ValueError, RuntimeError), match="loss_fn"):
        fit(CountingGAN, [LandscapeMonitor()], max_steps=30)
    assert CountingGAN.steps_run == 0, f"the error came after {CountingGAN.steps_run} training steps"


VIEW_KEYS = (
    "landscape/hessian/update_top_fraction",
    "landscape/hessian/surface_loss",
    "landscape/hessian/surface_curvature_v1",
    "landscape/grad/nlm_alignment",
)


@pytest.mark.parametrize("name", ["nanogpt", "hf_gpt2_sdpa", "lightning_demo_transformer"])
def test_opt_in_hessian_views_on_real_models(name):
    """The 2026-12-02 features on third-party model code: the Hessian-axes surface and update_top_fraction (opt-in)
    and the gradient monitor's nlm_alignment are logged and finite, no alert fires, training is bitwise unchanged."""
    make_model = MODELS[name][0]
    views = {"every_n_steps": 10, "raw_sharpness_every": 1, "surface": True, "surface_every": 1}
    views["update_top_fraction"] = True
    check(make_model, VIEW_KEYS, lambda: monitor(hessian=views))


@pytest.mark.parametrize("name", ["nanogpt", "hf_gpt2_sdpa"])
def test_hessian_on_half_a_probe_batch_on_real_models(name):
    """``probe_fraction`` on third-party batches (HF GPT-2's ``input_ids``/``labels`` dicts, nanoGPT's tensor pairs;
    both AdamW, where ``"auto"`` may halve): every batch is cut (no "used whole" warning), the half is logged, the
    values are finite, no alert fires and training is bitwise unchanged. (Lightning's demo transformer trains with
    SGD, where half a batch raised ``edge_of_stability`` at step 10, ratio 1.55: there ``"auto"`` keeps the whole
    batch: ``tests/callbacks/test_hessian_probe_fraction.py``.)"""
    make_model = MODELS[name][0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, logger, _ = check(
            make_model,
            (SHARPNESS, PROBE_FRACTION),
            lambda: monitor(hessian={"every_n_steps": 10, "probe_fraction": 0.5}),
        )
    assert not [w for w in caught if "used whole" in str(w.message)]
    assert set(logger.landscape()[PROBE_FRACTION]) == {0.5}
