"""Mixed precision: 16-mixed with a GradScaler that overflows routinely, and bf16-mixed."""

from __future__ import annotations

import itertools

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from tests.compat._common import CORE_KEYS, TRANSFORMER_KEYS, check
from tests.helpers.real_models import HFGPT2, NanoGPT, TinyMLP


def fp16_plugins():
    """Lightning gives 16-mixed on CPU no scaler; this one overflows routinely, as fp16 runs on GPUs do: it starts
    a few doublings too high (the first steps overflow; the scaler skips them and halves its scale) and tries to grow
    again every 5 good steps (so it overflows again now and then: 5-6 skipped steps of 30 here). With a start at
    2**40 instead, 23 of the 30 steps were skipped: too few real updates for the measurements to mean much."""
    return [
        MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=5))
    ]


def recording_scale(make_model):
    """The model, with its GradScaler's scale recorded after every batch (a model hook: the same in both runs)."""

    def make():
        model = make_model()
        model.scales = []
        model.on_train_batch_end = lambda *args: model.scales.append(model.trainer.precision_plugin.scaler.get_scale())
        return model

    return make


FP16_MODELS = {
    "nanogpt": (NanoGPT, TRANSFORMER_KEYS),
    "hf_gpt2_eager": (lambda: HFGPT2("eager"), TRANSFORMER_KEYS),
    "mlp": (TinyMLP, CORE_KEYS),
}


@pytest.mark.parametrize("name", list(FP16_MODELS))
def test_fp16_mixed_with_overflowing_scaler(name):
    """Skipped overflow steps are the scaler's business: no ``non_finite`` alert, finite values, training unchanged."""
    make_model, keys = FP16_MODELS[name]
    _, _, trainer = check(recording_scale(make_model), keys, plugins=fp16_plugins)
    scales = trainer.lightning_module.scales
    skipped = sum(later < earlier for earlier, later in itertools.pairwise(scales))
    assert skipped >= 3, f"only {skipped} overflow steps: this test would not exercise skipped steps ({scales})"


BF16_MODELS = {
    "nanogpt": (NanoGPT, TRANSFORMER_KEYS),
    "hf_gpt2_sdpa": (lambda: HFGPT2("sdpa"), TRANSFORMER_KEYS),
    "mlp_dropout": (lambda: TinyMLP(dropout=0.1), CORE_KEYS),
}


@pytest.mark.parametrize("name", list(BF16_MODELS))
def test_bf16_mixed(name):
    make_model, keys = BF16_MODELS[name]
    check(make_model, keys, precision="bf16-mixed")
