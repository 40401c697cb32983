"""Forward-pass signals against dense float64 references: attention logits, log-partition, spectral alignment."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_landscape.core.logits import (
    LogitProbe,
    allowed_positions,
    attention_logits,
    attention_statistics,
    log_partition,
    majority_sign_fraction,
    sign_counts,
    softmax_saturated,
    top_right_singular_vector,
)


def _mha(batch_first: bool, kdim: int | None = None, bias: bool = True) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    return nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias).double()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 6])
@pytest.mark.parametrize("bias", [True, False])
def test_attention_logits_softmax_to_the_modules_own_weights(batch_first, kdim, bias):
    mha = _mha(batch_first, kdim, bias)
    shape_q = (3, 5, 8) if batch_first else (5, 3, 8)
    shape_k = (3, 4, kdim or 8) if batch_first else (4, 3, kdim or 8)
    query, key = torch.randn(shape_q, dtype=torch.float64), torch.randn(shape_k, dtype=torch.float64)
    _, weights = mha(query, key, key, need_weights=True, average_attn_weights=False)
    logits = attention_logits(mha, query, key)
    assert logits.shape == (3, 2, 5, 4)
    torch.testing.assert_close(torch.softmax(logits, -1), weights, rtol=1e-12, atol=1e-12)


def test_masked_positions_are_left_out_and_the_entropy_is_the_softmaxs():
    mha = _mha(True)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    padding = torch.zeros(2, 5, dtype=torch.float64)
    padding[1, 3:] = -math.inf
    _, weights = mha(x, x, x, attn_mask=causal, key_padding_mask=padding, need_weights=True, average_attn_weights=False)
    logits = attention_logits(mha, x, x)
    allowed = allowed_positions(logits, causal, padding, is_causal=True)
    assert allowed.sum() == 2 * 2 * 15 - 2 * (1 + 2)  # causal rows, minus the padded keys of the second sample
    maximum, entropy, rows = attention_statistics(logits, allowed)
    assert maximum == pytest.approx(float(logits.detach()[allowed].max()), rel=1e-14)
    assert rows == 2 * 2 * 5
    dense = -(weights * torch.log(weights.clamp_min(1e-300))).sum(-1)  # zero weights contribute 0
    assert entropy == pytest.approx(float(dense.sum()), rel=1e-10)
    # the bool and the float form of the same mask agree, and is_causal alone means the causal mask
    assert torch.equal(allowed_positions(logits, causal.isneginf(), padding.isneginf(), True), allowed)
    assert torch.equal(allowed_positions(logits, None, padding, True), allowed)


def test_uniform_attention_has_entropy_log_s_and_fully_masked_rows_are_skipped():
    logits = torch.zeros(1, 1, 2, 4, dtype=torch.float64)
    allowed = torch.ones_like(logits, dtype=torch.bool)
    allowed[0, 0, 1] = False
    maximum, entropy, rows = attention_statistics(logits, allowed)
    assert (maximum, rows) == (0.0, 1)
    assert entropy == pytest.approx(math.log(4), rel=1e-14)


def test_log_partition_is_logsumexp_in_float64():
    logits = torch.randn(4, 7, 11) * 30
    expected = torch.log(torch.exp(logits.double()).sum(-1))
    torch.testing.assert_close(log_partition(logits), expected, rtol=1e-12, atol=1e-12)


def test_power_iteration_finds_the_top_right_singular_vector():
    torch.manual_seed(1)
    weight = torch.randn(20, 12, dtype=torch.float64)
    _, s, vh = torch.linalg.svd(weight)
    v, sigma = top_right_singular_vector(weight, iterations=2000, tol=1e-13)
    assert sigma == pytest.approx(float(s[0]), rel=1e-10)
    assert abs(float(v @ vh[0])) == pytest.approx(1.0, abs=1e-8)
    assert v[v.abs().argmax()] > 0  # the sign is fixed
    # a warm start at the answer converges at once
    again, _ = top_right_singular_vector(weight, v, iterations=1)
    torch.testing.assert_close(again, v, rtol=0, atol=1e-10)


def test_sign_fraction_counts_rows_on_each_side_and_ignores_the_vectors_sign():
    x = torch.tensor([[1.0, 0.0], [2.0, 1.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    v = torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert sign_counts(x, v) == (2, 1)  # the last row is orthogonal: no sign
    assert majority_sign_fraction(*sign_counts(x, v)) == pytest.approx(2 / 3)
    assert majority_sign_fraction(*sign_counts(x, -v)) == pytest.approx(2 / 3)
    assert math.isnan(majority_sign_fraction(0, 0))


def test_u1_and_v1_conventions_give_the_same_signs():
    # sign(u1 . W x) = sign(v1 . x) since u1^T W = s1 v1^T: the two published conventions are one statistic
    torch.manual_seed(2)
    weight, x = torch.randn(6, 9, dtype=torch.float64), torch.randn(50, 9, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(weight)
    assert torch.equal(torch.sign((x @ weight.T) @ u[:, 0]), torch.sign(x @ vh[0]))


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.head(torch.relu(self.hidden(h)))


def test_probe_collects_without_changing_outputs_and_removes_its_hooks():
    torch.manual_seed(3)
    model = _Tiny().double()
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    reference = model(x)
    v, _ = top_right_singular_vector(model.hidden.weight)
    with LogitProbe({"attn": model.attn}, ("head", model.head), {"hidden": (model.hidden, v)}) as stats:
        out = model(x)
    assert torch.equal(out, reference)
    assert not model.attn._forward_pre_hooks and not model.head._forward_hooks and not model.hidden._forward_pre_hooks
    logits = attention_logits(model.attn, x, x)
    assert stats.attention["attn"].maximum == pytest.approx(float(logits.max()), rel=1e-14)
    assert stats.output.mean_log_partition == pytest.approx(float(torch.logsumexp(reference, -1).mean()), rel=1e-12)
    hidden_in = model.attn(x, x, x, need_weights=False)[0].reshape(-1, 8)
    positive, negative = int((hidden_in @ v > 0).sum()), int((hidden_in @ v < 0).sum())
    assert (stats.alignment["hidden"].positive, stats.alignment["hidden"].negative) == (positive, negative)


def test_probe_records_non_finite_activations_by_module():
    model = _Tiny().double()
    with LogitProbe({}, ("head", model.head), {}) as stats:
        model(torch.full((1, 2, 8), math.inf, dtype=torch.float64))
    assert stats.non_finite == ["head"]
    assert stats.output is None


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("length", [5, 8])  # 8 == embed_dim: a wrong transposition would go unnoticed by shape
def test_attention_logits_of_unbatched_input_whatever_batch_first_says(batch_first, length):
    # issue 17 item 5: (L, E) input with batch_first=False was transposed as if it were (L, B, E)
    mha = _mha(batch_first)
    query = torch.randn(length, 8, dtype=torch.float64)
    key = torch.randn(6, 8, dtype=torch.float64)
    _, weights = mha(query, key, key, need_weights=True, average_attn_weights=False)
    logits = attention_logits(mha, query, key)
    assert logits.shape == (1, 2, length, 6)
    torch.testing.assert_close(torch.softmax(logits, -1)[0], weights, rtol=1e-12, atol=1e-12)


def _gapped(gaps: list[float], classes: int = 7) -> torch.Tensor:
    """Rows whose top logit (class 2) leads every other logit by ``gap`` (ties among the others)."""
    logits = torch.zeros(len(gaps), classes, dtype=torch.float64)
    logits[:, 2] = torch.tensor(gaps, dtype=torch.float64)
    return logits


def test_softmax_saturation_is_rounding_to_one_in_the_loss_dtype():
    # the top probability is 1 / (1 + s), s = 6 e^-gap: it rounds to 1 when s is below half an ulp of 1 (2^-24 in
    # float32, 2^-53 in float64) and not when a single e^-gap is above it; in between (gaps 16.6-18.4 in float32)
    # the summation order decides, so the hand count keeps out of that band
    gaps = [0.0, 12.0, 16.0, 19.0, 20.0, 30.0, 36.0, 39.0, 60.0]
    logits = _gapped(gaps)

    def hand(ulp_half: float) -> list[bool]:
        assert all(6 * math.exp(-g) < ulp_half or math.exp(-g) > ulp_half for g in gaps)  # outside the band
        return [6 * math.exp(-g) < ulp_half for g in gaps]

    expected32, expected64 = hand(2.0**-24), hand(2.0**-53)
    assert expected32 == [False, False, False, True, True, True, True, True, True]
    assert expected64 == [False] * 7 + [True, True]
    assert softmax_saturated(logits, torch.float32).tolist() == expected32
    assert softmax_saturated(logits.float()).tolist() == expected32  # the logits' own dtype by default
    assert softmax_saturated(logits).tolist() == expected64
    # a shift of every logit changes nothing; the sign of the gap does (a row with one low logit is not peaked)
    assert softmax_saturated(logits.float() + 1000.0).tolist() == expected32
    assert not softmax_saturated(-logits.float()).any()


def test_saturated_rows_are_those_whose_cross_entropy_gradient_vanishes():
    # the definition's equivalent: in float32 the loss of a row whose target is its top class, and its gradient at
    # that target, are exactly 0 exactly when the row is saturated
    torch.manual_seed(4)
    logits = (torch.randn(64, 97) * 4).float()
    logits[torch.arange(64), torch.arange(64) % 97] += torch.linspace(0.0, 40.0, 64)
    logits.requires_grad_(True)
    target = logits.detach().argmax(-1)
    loss = nn.functional.cross_entropy(logits, target, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    zero = grad[torch.arange(64), target] == 0
    saturated = softmax_saturated(logits)
    assert 0 < int(saturated.sum()) < 64  # both kinds of row are present
    assert torch.equal(saturated, zero)
    assert torch.equal(saturated, loss.detach() == 0)


def test_non_finite_entries_count_as_zero_and_tokens_are_rows():
    logits = _gapped([40.0, 40.0, 1.0]).float()
    logits[1, 0] = math.nan  # the rest of the row still leads by 40
    logits[2, :] = math.nan  # all zero: uniform, not saturated
    assert softmax_saturated(logits).tolist() == [True, True, False]
    tokens = _gapped([40.0] * 6).float().reshape(2, 3, 7)  # (batch, time, vocabulary): one flag per token
    assert softmax_saturated(tokens).shape == (2, 3) and bool(softmax_saturated(tokens).all())
