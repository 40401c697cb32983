import math

import pytest
import torch

from lightning_landscape.core.trace import hutchinson_trace, hutchpp_trace


def psd(n, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, rank or n, generator=g, dtype=torch.float64)
    return u @ u.T / n


def test_hutchinson_is_exact_on_a_diagonal():
    d = torch.diag(torch.linspace(-2, 5, 30, dtype=torch.float64))
    result = hutchinson_trace(d, 4)
    assert result.estimate == pytest.approx(float(d.trace()), abs=1e-12)
    assert result.stderr == pytest.approx(0.0, abs=1e-12)
    assert result.squared_frobenius == pytest.approx(float((d * d).sum()), rel=1e-12)


def test_hutchpp_is_exact_on_low_rank():
    a = psd(60, rank=5)
    result = hutchpp_trace(a, 18)  # sketch of 6 >= rank 5
    assert result.estimate == pytest.approx(float(a.trace()), rel=1e-10)
    assert result.num_matvecs == 18


@pytest.mark.parametrize("estimator", [hutchinson_trace, hutchpp_trace])
def test_convergence_within_standard_errors(estimator):
    a = psd(200, seed=1) + torch.diag(torch.linspace(0, 3, 200, dtype=torch.float64))
    exact = float(a.trace())
    small = estimator(a, 30, generator=torch.Generator().manual_seed(3))
    large = estimator(a, 600, generator=torch.Generator().manual_seed(3))
    assert abs(large.estimate - exact) < 4 * large.stderr
    assert abs(large.estimate - exact) / exact < 2e-2
    assert large.stderr < small.stderr
    assert math.isfinite(small.stderr)


def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))
    a = q @ torch.diag(1.0 / torch.arange(1, 301, dtype=torch.float64) ** 2) @ q.T
    errors = {"h": [], "pp": []}
    for seed in range(10):
        errors["h"].append(
            abs(hutchinson_trace(a, 30, generator=torch.Generator().manual_seed(seed)).estimate - float(a.trace()))
        )
        errors["pp"].append(
            abs(hutchpp_trace(a, 30, generator=torch.Generator().manual_seed(seed)).estimate - float(a.trace()))
        )
    assert sum(errors["pp"]) < 0.5 * sum(errors["h"])


def test_bad_arguments():
    a = psd(5)
    with pytest.raises(ValueError, match="`num_matvecs` must be an int >= 1, got 0"):
        hutchinson_trace(a, 0)
    with pytest.raises(ValueError, match="`num_matvecs` must be an int >= 3, got 2"):
        hutchpp_trace(a, 2)
    with pytest.raises(ValueError, match="`distribution` must be one of"):
        hutchinson_trace(a, 3, distribution="uniform")
