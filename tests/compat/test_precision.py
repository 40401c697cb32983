"""Mixed precision: 16-mixed with a GradScaler that overflows routinely, and bf16-mixed."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from tests.compat._common import CORE_KEYS, TRANSFORMER_KEYS, check
from tests.helpers.real_models import HFGPT2, NanoGPT, TinyMLP

INIT_SCALE = 2.0**40


def fp16_plugins():
    """Lightning gives 16-mixed on CPU no scaler; this one starts so high that the first steps overflow (the scaler
    skips them and halves its scale), as routinely happens at the start of fp16 runs on GPUs."""
    return [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=INIT_SCALE))]


FP16_MODELS = {
    "nanogpt": (NanoGPT, TRANSFORMER_KEYS),
    "hf_gpt2_eager": (lambda: HFGPT2("eager"), TRANSFORMER_KEYS),
    "mlp": (TinyMLP, CORE_KEYS),
}


@pytest.mark.parametrize("name", list(FP16_MODELS))
def test_fp16_mixed_with_overflowing_scaler(name):
    """Skipped overflow steps are the scaler's business: no ``non_finite`` alert, finite values, training unchanged."""
    make_model, keys = FP16_MODELS[name]
    _, _, trainer = check(make_model, keys, plugins=fp16_plugins)
    scale = trainer.precision_plugin.scaler.get_scale()
    assert scale < INIT_SCALE, "the scaler never overflowed: this test would not exercise skipped steps"


BF16_MODELS = {
    "nanogpt": (NanoGPT, TRANSFORMER_KEYS),
    "hf_gpt2_sdpa": (lambda: HFGPT2("sdpa"), TRANSFORMER_KEYS),
    "mlp_dropout": (lambda: TinyMLP(dropout=0.1), CORE_KEYS),
}


@pytest.mark.parametrize("name", list(BF16_MODELS))
def test_bf16_mixed(name):
    make_model, keys = BF16_MODELS[name]
    check(make_model, keys, precision="bf16-mixed")
