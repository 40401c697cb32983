import math

import pytest
import torch

from lightning_landscape.core.trace import hutchinson_trace, hutchpp_trace
from tests.core.test_lanczos import CountingOperator, symmetric


def psd(n, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, rank or n, generator=g, dtype=torch.float64)
    return u @ u.T / n


def dense_psd_with_diagonal(n=200, seed=1):
    return psd(n, seed=seed) + torch.diag(torch.linspace(0, 3, n, dtype=torch.float64))


# ------------------------------------------------------------------------------------------- exact cases
def test_hutchinson_is_exact_on_a_diagonal():
    d = torch.diag(torch.linspace(-2, 5, 30, dtype=torch.float64))
    result = hutchinson_trace(d, 4)
    assert result.estimate == pytest.approx(float(d.trace()), abs=1e-12)
    assert result.stderr == pytest.approx(0.0, abs=1e-12)
    assert result.num_matvecs == 4
    # ||D v||^2 = sum d_i^2 for every sign vector
    assert result.squared_frobenius == pytest.approx(float((d * d).sum()), rel=1e-12)


@pytest.mark.parametrize(("rank", "budget"), [(5, 18), (1, 3), (6, 20)])
def test_hutchpp_is_exact_on_low_rank(rank, budget):
    a = psd(60, rank=rank)
    op = CountingOperator(a)
    result = hutchpp_trace(op, budget)  # sketch of budget // 3 >= rank
    assert result.estimate == pytest.approx(float(a.trace()), rel=1e-10)
    assert result.squared_frobenius == pytest.approx(float((a * a).sum()), rel=1e-10)
    assert result.num_matvecs == budget == op.calls
    if budget - 2 * (budget // 3) > 1:
        assert result.stderr < 1e-10 * float(a.trace())
    else:
        assert result.stderr == math.inf  # a single residual probe: no error bar


def test_hutchpp_spends_no_residual_probes_once_the_sketch_spans_everything():
    a, _ = symmetric(8, seed=2)
    result = hutchpp_trace(a, 30)
    assert result.estimate == pytest.approx(float(a.trace()), abs=1e-12)
    assert result.stderr == 0.0
    assert result.num_matvecs == 16  # 8 sketch + 8 projections, then exact
    assert result.squared_frobenius == pytest.approx(float((a * a).sum()), rel=1e-12)


# ------------------------------------------------------------------------------------------- convergence
@pytest.mark.parametrize(
    "estimator",
    [hutchinson_trace, hutchpp_trace, lambda op, m, **kw: hutchinson_trace(op, m, distribution="gaussian", **kw)],
    ids=["hutchinson", "hutchpp", "hutchinson-gaussian"],
)
def test_convergence_within_standard_errors(estimator):
    a = dense_psd_with_diagonal(400)  # n > 600 / 3, so Hutch++'s sketch does not span everything
    exact = float(a.trace())
    small = estimator(a, 30, generator=torch.Generator().manual_seed(3))
    large = estimator(a, 600, generator=torch.Generator().manual_seed(3))
    assert abs(small.estimate - exact) < 4 * small.stderr
    assert abs(large.estimate - exact) < 4 * large.stderr
    assert abs(large.estimate - exact) / exact < 2e-2
    # stderr ~ 1/sqrt(m) (Hutch++: faster): 20x the probes, at least ~3x smaller
    assert large.stderr < small.stderr / 3
    assert math.isfinite(small.stderr)


def test_standard_error_is_calibrated_over_seeds():
    a = dense_psd_with_diagonal()
    exact = float(a.trace())
    z = []
    for seed in range(40):
        result = hutchinson_trace(a, 20, generator=torch.Generator().manual_seed(seed))
        z.append((result.estimate - exact) / result.stderr)
    z = torch.tensor(z)
    # with 20 samples the t-statistic has a spread close to 1
    assert 0.6 < float(z.std()) < 1.5
    assert abs(float(z.mean())) < 0.6


@pytest.mark.parametrize("estimator", [hutchinson_trace, hutchpp_trace])
def test_squared_frobenius_estimate(estimator):
    a = dense_psd_with_diagonal()
    exact = float((a * a).sum())
    result = estimator(a, 300, generator=torch.Generator().manual_seed(1))
    assert result.squared_frobenius == pytest.approx(exact, rel=0.05)


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


def test_determinism_matrix_free_operators_and_float32():
    a = dense_psd_with_diagonal(100)
    for estimator in (hutchinson_trace, hutchpp_trace):
        one = estimator(a, 12, generator=torch.Generator().manual_seed(7))
        two = estimator(CountingOperator(a), 12, generator=torch.Generator().manual_seed(7))
        assert one == two
        assert estimator(a, 12) == estimator(a, 12, generator=torch.Generator().manual_seed(0))
        single = estimator(a.float(), 12, generator=torch.Generator().manual_seed(7))
        assert single.estimate == pytest.approx(one.estimate, rel=1e-5)


# ------------------------------------------------------------------------------------------- validation
def test_bad_arguments():
    a = psd(5)
    with pytest.raises(ValueError, match="`num_matvecs` must be an int >= 2, got 1"):
        hutchinson_trace(a, 1)
    with pytest.raises(TypeError, match="`num_matvecs` must be an int, got 3.0"):
        hutchinson_trace(a, 3.0)
    with pytest.raises(ValueError, match="`num_matvecs` must be an int >= 3, got 2"):
        hutchpp_trace(a, 2)
    with pytest.raises(ValueError, match="`distribution` must be one of \\('rademacher', 'gaussian'\\), got 'uniform'"):
        hutchinson_trace(a, 3, distribution="uniform")
    with pytest.raises(TypeError, match="`generator` must be a torch.Generator or None, got 3"):
        hutchpp_trace(a, 3, generator=3)
    with pytest.raises(ValueError, match="`op` must be a square operator"):
        hutchinson_trace(torch.ones(2, 3), 3)
    with pytest.raises(ValueError, match="`op` must be symmetric"):
        hutchpp_trace(torch.triu(torch.ones(4, 4)), 3)


@pytest.mark.parametrize("estimator", [hutchinson_trace, hutchpp_trace])
def test_non_finite_products_raise_floating_point_error(estimator):
    class Broken(CountingOperator):
        def __matmul__(self, v):
            return v * float("inf")

    with pytest.raises(FloatingPointError, match="The trace estimate is not finite"):
        estimator(Broken(torch.eye(20, dtype=torch.float64)), 6)


def test_block_products_give_the_same_estimate_as_one_at_a_time():
    # 60 products: a sketch of 20 (two blocks of at most 16), 20 for Q, 20 residual probes
    from lightning_landscape.core.hvp import HessianOperator
    from tests.helpers.models import classification_batches, cross_entropy_loss, tiny_mlp

    model, batches = tiny_mlp(dropout=0.0), classification_batches(2, 8)
    results = []
    for batch_probes in (False, True):
        op = HessianOperator(model, cross_entropy_loss, batches, batch_probes=batch_probes)
        results.append(hutchpp_trace(op, 60, generator=torch.Generator().manual_seed(3)))
        assert op.num_matvecs == 60
    one, blocked = results
    assert blocked.num_matvecs == one.num_matvecs == 60
    assert blocked.estimate == pytest.approx(one.estimate, rel=1e-10)
    assert blocked.stderr == pytest.approx(one.stderr, rel=1e-8)
