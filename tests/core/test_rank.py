import math

import pytest
import torch

from lightning_landscape.core.rank import (
    RankCollapseRule,
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


# RankMe every 10 steps of seeded CPU runs (the trajectories in the rank_collapse notes): healthy nanoGPT from
# initialisation, dying ReLUs (SGD lr 0.5 on digits, every 20 steps), a collapse onto one direction (lr 0.2).
HEALTHY_NANOGPT = [25.744, 3.454, 4.259, 5.542, 4.482, 4.397, 4.775, 5.946, 6.476, 7.367, 7.793]
DYING_RELUS = [22.176, 14.902, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
ONE_DIRECTION = [22.176, 12.388, 15.221, 15.158, 13.931, 8.672, 3.560, 1.984, 1.000, 1.000]


def fired_at(rule, values):
    return [i for i, v in enumerate(values) if rule.update(v)]


def test_rank_collapse_rule_floor_separates_healthy_lm_from_collapse():
    assert fired_at(RankCollapseRule(0.75, 5, floor=2.0), HEALTHY_NANOGPT) == []
    assert fired_at(RankCollapseRule(0.75, 5, floor=None), HEALTHY_NANOGPT) == [1]  # the false alarm it prevents
    assert fired_at(RankCollapseRule(0.75, 5, floor=2.0), DYING_RELUS) == [2]  # once, not at every dead step
    # 1.984 is under the floor and under 0.25 x 15.158 (the max of the last 5): fires there, not later again
    assert fired_at(RankCollapseRule(0.75, 5, floor=2.0), ONE_DIRECTION) == [7]
    assert fired_at(RankCollapseRule(0.75, 5, floor=1.5), ONE_DIRECTION) == [8]


def test_rank_collapse_rule_needs_both_conditions_and_reports_the_lower_threshold():
    rule = RankCollapseRule(0.5, 3, floor=2.0)
    assert rule.update(3.0) is False
    assert rule.threshold == 1.5  # min(floor 2.0, 0.5 x 3.0)
    assert rule.update(1.9) is False  # under the floor, not under half the max
    rule = RankCollapseRule(0.5, 3, floor=2.0)
    assert [rule.update(v) for v in (10.0, 2.0, 1.99)] == [False, False, True]  # 2.0 is not below the floor
    assert rule.threshold == 2.0
    assert rule.update(math.nan) is False
    assert rule.state_dict() == {"history": [10.0, 2.0, 1.99], "armed": False}


def test_rank_collapse_rule_bad_floor():
    with pytest.raises(ValueError, match="`floor` must be > 0.0, got -1.0"):
        RankCollapseRule(floor=-1.0)
