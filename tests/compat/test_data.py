"""Data shapes people use: an IterableDataset (no length) and dict batches (Hugging Face style)."""

from __future__ import annotations

import pytest

from tests.compat._common import TRANSFORMER_KEYS, check
from tests.helpers.real_models import HFGPT2, NanoGPT

CASES = {
    "nanogpt_iterable": lambda: NanoGPT(data="iterable"),
    "nanogpt_dict": lambda: NanoGPT(data="dict"),
    "hf_gpt2_eager_dict": lambda: HFGPT2("eager", data="dict"),
    "hf_gpt2_sdpa_iterable": lambda: HFGPT2("sdpa", data="iterable"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_batch_formats(name):
    check(CASES[name], TRANSFORMER_KEYS)
