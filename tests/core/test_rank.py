import math

import pytest
import torch

from lightning_landscape.core.rank import (
    alpha_req,
    covariance_from_moments,
    eigenvalues_psd,
    numerical_rank,
    participation_ratio,
    rankme,
    singular_values,
    singular_values_from_second_moment,
    stable_rank,
)


def features_with_spectrum(singular, n=2000, seed=0):
    """An n x d matrix whose singular values are exactly ``singular`` (orthonormal columns times a diagonal)."""
    g = torch.Generator().manual_seed(seed)
    d = len(singular)
    u, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.as_tensor(singular, dtype=torch.float64)) @ v.T


def test_rankme_exact_on_a_prescribed_spectrum():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    z = features_with_spectrum(s)
    p = s / s.sum() + 1e-7
    expected = math.exp(-float((p * p.log()).sum()))
    assert rankme(singular_values(z)) == pytest.approx(expected, rel=1e-10)
    assert rankme(singular_values_from_second_moment(z.T @ z)) == pytest.approx(expected, rel=1e-8)
    # uniform spectrum: exactly the dimension (up to eps)
    assert rankme(torch.ones(16, dtype=torch.float64)) == pytest.approx(16.0, rel=1e-5)


def test_rankme_invariant_to_scale_and_sample_count_and_bounded_by_rank():
    g = torch.Generator().manual_seed(1)
    basis = torch.randn(3, 20, generator=g, dtype=torch.float64)
    z = torch.randn(500, 3, generator=g, dtype=torch.float64) @ basis  # rank 3 in 20 dimensions
    value = rankme(singular_values(z))
    assert value <= 3.0 + 1e-5
    assert rankme(singular_values(7.5 * z)) == pytest.approx(value, rel=1e-10)
    doubled = torch.cat([z, z])  # same distribution, twice the samples
    assert rankme(singular_values(doubled)) == pytest.approx(value, rel=1e-10)
    assert rankme(singular_values_from_second_moment(z.T @ z / 500)) == pytest.approx(value, rel=1e-6)


def test_alpha_req_recovers_a_planted_exponent():
    for alpha in (0.5, 1.0, 2.0):
        lam = torch.arange(1, 257, dtype=torch.float64) ** -alpha
        assert alpha_req(lam) == pytest.approx(alpha, rel=1e-10)
    # from centred features with that covariance spectrum
    lam = torch.arange(1, 129, dtype=torch.float64) ** -1.3
    z = features_with_spectrum(lam.sqrt() * math.sqrt(4000), n=4000, seed=2)
    z = z - z.mean(0)
    cov = covariance_from_moments(z.T @ z, z.sum(0), 4000)
    # centring after construction perturbs the spectrum slightly (U's columns are not exactly zero-mean)
    assert alpha_req(eigenvalues_psd(cov)) == pytest.approx(1.3, rel=1e-3)
    assert math.isnan(alpha_req(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)))
    # fewer than 11 eigenvalues: the fit falls back to all of them
    assert alpha_req(torch.arange(1, 9, dtype=torch.float64) ** -0.7) == pytest.approx(0.7, rel=1e-10)


def test_covariance_from_moments_centres():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(300, 5, generator=g, dtype=torch.float64) + 4.0
    expected = torch.cov(z.T, correction=0)
    torch.testing.assert_close(covariance_from_moments(z.T @ z, z.sum(0), 300), expected)


def test_stable_rank_participation_ratio_numerical_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    w = features_with_spectrum(s, n=10)
    assert stable_rank(singular_values(w)) == pytest.approx(14.0 / 9.0, rel=1e-12)
    assert stable_rank(singular_values(w)) == pytest.approx(
        float(torch.linalg.matrix_norm(w) ** 2 / torch.linalg.matrix_norm(w, ord=2) ** 2), rel=1e-12
    )
    lam = s**2
    assert participation_ratio(lam) == pytest.approx(14.0**2 / 98.0, rel=1e-12)
    assert numerical_rank(singular_values(w)) == 3
    assert numerical_rank(torch.zeros(3)) == 0
    assert rankme(torch.zeros(4)) == 0.0  # every feature dead


def test_bad_shapes():
    with pytest.raises(ValueError, match="`matrix` must be 2-D"):
        singular_values(torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="`matrix` must be square"):
        eigenvalues_psd(torch.zeros(2, 3))
