import pytest
import torch

from lightning_landscape.core.hvp import HessianOperator, operator_mode
from lightning_landscape.core.lanczos import lanczos, lanczos_tridiagonal, power_iteration
from lightning_landscape.core.reference import dense_eigvalsh, dense_hessian
from tests.helpers.models import (
    classification_batches,
    cross_entropy_loss,
    make_batchnorm_statistics_nontrivial,
    tiny_cnn,
    tiny_mlp,
)


def symmetric(n, seed=0, spectrum=None):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    if spectrum is None:
        spectrum = torch.randn(n, generator=g, dtype=torch.float64)
    return q @ torch.diag(spectrum) @ q.T, spectrum.sort(descending=True).values


def hessian_like(n, seed=0):
    """A few outliers above a bulk near zero, with some negative curvature (Sagun et al.'s picture)."""
    g = torch.Generator().manual_seed(seed)
    bulk = 0.05 * torch.randn(n - 6, generator=g, dtype=torch.float64)
    return symmetric(n, seed, torch.cat([torch.tensor([40.0, 25.0, 17.0, 11.0, 8.0, -3.0], dtype=torch.float64), bulk]))


@pytest.mark.parametrize("n", [40, 200])
def test_top5_and_lambda_min_match_eigvalsh(n):
    a, exact = hessian_like(n)
    result = lanczos(a, k=5, smallest=True, tol=1e-10, max_iter=n)
    torch.testing.assert_close(result.eigenvalues, exact[:5], rtol=1e-9, atol=0)
    assert result.lambda_min == pytest.approx(float(exact[-1]), rel=1e-9)
    assert result.converged
    # reported residuals are the true ones, and the vectors are eigenvectors
    for value, vector, reported in zip(result.eigenvalues, result.eigenvectors, result.residuals, strict=False):
        true = torch.linalg.norm(a @ vector - value * vector)
        assert float(true) == pytest.approx(float(reported), abs=1e-9)
        assert float(true) < 1e-8 * 40


def test_random_spectrum_without_gap_converges_exactly():
    a, exact = symmetric(120, seed=3)
    result = lanczos(a, k=3, smallest=True, tol=1e-10, max_iter=120)
    torch.testing.assert_close(result.eigenvalues, exact[:3], rtol=1e-8, atol=1e-10)
    assert result.lambda_min == pytest.approx(float(exact[-1]), rel=1e-8)


def test_residual_rule_keeps_going_and_reports_non_convergence():
    a, exact = symmetric(300, seed=5)
    capped = lanczos(a, k=3, tol=1e-10, max_iter=8)
    assert capped.num_matvecs == 8
    assert not capped.converged
    loose = lanczos(a, k=1, tol=1e-3, max_iter=300)
    assert loose.converged
    assert loose.num_matvecs > 2
    assert float(loose.eigenvalues[0]) == pytest.approx(float(exact[0]), rel=1e-3)


def test_warm_start_from_exact_eigenvectors_is_cheap():
    a, exact = hessian_like(200, seed=1)
    cold = lanczos(a, k=5, tol=1e-6, max_iter=200)
    warm = lanczos(a, k=5, tol=1e-3, max_iter=200, init=cold.eigenvectors)
    assert warm.num_matvecs <= 5 + 2
    # eigenvalue error <~ residual^2 / gap = (1e-3 * 40)^2 / 3
    torch.testing.assert_close(warm.eigenvalues, exact[:5], rtol=1e-4, atol=0)
    # the 1e-3 random part of a warm start costs a few extra products at a tight tolerance
    tight = lanczos(a, k=5, tol=1e-8, max_iter=200, init=cold.eigenvectors)
    cold_tight = lanczos(a, k=5, tol=1e-8, max_iter=200)
    assert tight.num_matvecs <= 5 + 5
    assert tight.num_matvecs < cold_tight.num_matvecs


def test_warm_start_from_a_perturbed_operator_beats_cold_start():
    a, _ = hessian_like(400, seed=2)
    g = torch.Generator().manual_seed(9)
    noise = 0.02 * torch.randn(400, 400, generator=g, dtype=torch.float64)
    b = a + (noise + noise.T) / 2
    exact = dense_eigvalsh(b)
    previous = lanczos(a, k=5, tol=1e-3, max_iter=200).eigenvectors
    cold = lanczos(b, k=5, tol=1e-3, max_iter=200, generator=torch.Generator().manual_seed(4))
    warm = lanczos(b, k=5, tol=1e-3, max_iter=200, init=previous, generator=torch.Generator().manual_seed(4))
    assert warm.converged
    assert cold.converged
    assert warm.num_matvecs < cold.num_matvecs
    torch.testing.assert_close(warm.eigenvalues, exact[:5], rtol=1e-3, atol=0)


def test_repeated_eigenvalues_and_low_rank_use_restarts():
    diagonal = torch.diag(torch.tensor([5.0, 5.0, 3.0, 1.0, 1.0, 0.0, -2.0], dtype=torch.float64))
    result = lanczos(diagonal, k=3, smallest=True, tol=1e-10)
    assert result.eigenvalues.tolist() == pytest.approx([5.0, 5.0, 3.0])
    assert result.lambda_min == pytest.approx(-2.0)
    g = torch.Generator().manual_seed(0)
    u = torch.randn(50, 2, generator=g, dtype=torch.float64)
    low_rank = u @ u.T  # rank 2, asked for 4
    exact = dense_eigvalsh(low_rank)
    result = lanczos(low_rank, k=4, tol=1e-10, max_iter=50)
    torch.testing.assert_close(result.eigenvalues, exact[:4], rtol=1e-9, atol=1e-9)


def test_cpu_basis_and_determinism():
    a, _ = hessian_like(80)
    one = lanczos(a, k=3, generator=torch.Generator().manual_seed(1))
    two = lanczos(a, k=3, generator=torch.Generator().manual_seed(1), basis_device="cpu")
    assert torch.equal(one.eigenvalues, two.eigenvalues)
    assert one.num_matvecs == two.num_matvecs
    three = lanczos(a, k=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(one.eigenvectors, three.eigenvectors)


def test_tridiagonal_and_power_iteration():
    a, exact = hessian_like(60)
    start = torch.ones(60, dtype=torch.float64)
    alphas, betas, used = lanczos_tridiagonal(a, start, 60)
    t = torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)
    torch.testing.assert_close(dense_eigvalsh(t), exact, rtol=1e-8, atol=1e-8)
    assert used == 60
    values, _vectors, matvecs = power_iteration(a, k=2, tol=1e-8, max_iter=500)
    assert float(values[0]) == pytest.approx(40.0, rel=1e-6)
    assert matvecs > 10


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k": 0}, ValueError, "`k` must be an int >= 1, got 0"),
        ({"k": 11}, ValueError, "`k` must be <= the operator size 10, got 11"),
        ({"k": 3, "max_iter": 2}, ValueError, "`max_iter` must be an int >= 3, got 2"),
        ({"tol": 0.0}, ValueError, "`tol` must be > 0.0, got 0.0"),
        ({"init": torch.ones(9)}, ValueError, "`init` must have shape \\(10,\\) or \\(j, 10\\)"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    a, _ = symmetric(10)
    with pytest.raises(error, match=match):
        lanczos(a, **kwargs)
    with pytest.raises(ValueError, match="`op` must be a square operator"):
        lanczos(torch.ones(3, 4))


# ------------------------------------------------------------------ on real Hessians (the "must show")
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_top5_and_lambda_min_of_network_hessians_match_dense(kind, mode):
    if kind == "mlp":
        model, batches = tiny_mlp(dropout=0.2), classification_batches(3, 8)
    else:
        model, batches = tiny_cnn(), classification_batches(2, 6, shape=(1, 6, 6))
    make_batchnorm_statistics_nontrivial(model)
    with operator_mode(model, mode):
        exact = dense_eigvalsh(dense_hessian(model, cross_entropy_loss, batches))
        with HessianOperator(model, cross_entropy_loss, batches) as op:
            result = lanczos(op, k=5, smallest=True, tol=1e-10, max_iter=op.shape[0])
    torch.testing.assert_close(result.eigenvalues, exact[:5], rtol=1e-6, atol=0)
    assert result.lambda_min == pytest.approx(float(exact[-1]), rel=1e-6)
