"""The probe-set loss loop shared by the LMC monitor, the rank monitor and the offline barrier matrix."""

import pytest
import torch
from torch import nn

from lightning_landscape.core import hvp, interpolation, modes
from lightning_landscape.core.interpolation import probe_set_totals, seeded_batches
from tests.helpers.models import classification_batches, cross_entropy_loss, tiny_mlp


def test_norm_layers_is_the_one_of_hvp():
    # one definition (core.modes) for the operator's mode and the interpolation's BatchNorm policy
    assert interpolation._norm_layers is modes._norm_layers
    assert hvp.operator_mode is modes.operator_mode and hvp.default_batch_size is modes.default_batch_size


def test_totals_are_the_size_weighted_sums_in_float64():
    model = tiny_mlp().eval()
    batches = classification_batches(3, 8)  # ragged: 8, 8, 5
    totals = probe_set_totals(
        model, cross_entropy_loss, batches, error_fn=lambda m, b: (m(b[0]).argmax(1) != b[1]).double().mean()
    )
    sizes = [len(b[1]) for b in batches]
    assert sizes == [8, 8, 5]
    with torch.no_grad():
        losses = [float(cross_entropy_loss(model, b)) for b in batches]
        errors = [float((model(b[0]).argmax(1) != b[1]).double().mean()) for b in batches]
    assert totals.dtype == torch.float64
    assert float(totals[0]) == pytest.approx(sum(v * n for v, n in zip(losses, sizes, strict=True)), rel=1e-12)
    assert float(totals[1]) == pytest.approx(sum(e * n for e, n in zip(errors, sizes, strict=True)), rel=1e-12)
    assert float(totals[2]) == 21.0
    weighted = probe_set_totals(model, cross_entropy_loss, batches, batch_size_fn=lambda b: 1)
    assert float(weighted[0]) == pytest.approx(sum(losses), rel=1e-12) and float(weighted[2]) == 3.0
    assert float(weighted[1]) == 0.0  # no error_fn


def test_dropout_masks_are_fixed_by_the_seed_and_the_rng_is_restored():
    model = tiny_mlp(dropout=0.5, batchnorm=False).train()
    batches = classification_batches(2, 8)
    state = torch.get_rng_state()
    a = probe_set_totals(model, cross_entropy_loss, batches, seed=3)
    b = probe_set_totals(model, cross_entropy_loss, batches, seed=3)
    c = probe_set_totals(model, cross_entropy_loss, batches, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)
    # the same masks as a hand loop seeding each batch with seed + index
    expected = 0.0
    for index, batch in enumerate(batches):
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(3 + index)
            expected += float(cross_entropy_loss(model, batch)) * len(batch[1])
    assert float(a[0]) == pytest.approx(expected, rel=1e-12)
    assert [i for i, _ in seeded_batches(batches, torch.device("cpu"), None)] == [0, 1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"batch_size_fn": lambda b: "8"},
            r"`batch_size_fn` must return an int >= 1 .*, got '8'",
        ),
        ({"batch_size_fn": lambda b: 0}, r"`batch_size_fn` must return an int >= 1 \(the number of samples\), got 0"),
        ({"error_fn": lambda m, b: "high"}, "`error_fn` must return a number or a one-element Tensor"),
        ({"error_fn": lambda m, b: torch.zeros(2)}, "`error_fn` must return a number or a one-element Tensor"),
    ],
)
def test_bad_callable_results_name_the_argument(kwargs, match):
    with pytest.raises(TypeError, match=match):
        probe_set_totals(nn.Linear(4, 3).double(), cross_entropy_loss, classification_batches(1, 4), **kwargs)
