import pytest
import torch

from lightning_landscape.core.density import slq_density
from lightning_landscape.core.reference import dense_eigvalsh
from tests.core.test_lanczos import hessian_like


def test_weights_sum_to_one_and_full_steps_recover_the_spectrum():
    a, exact = hessian_like(40)
    spectrum = slq_density(a, num_runs=2, num_steps=40)
    torch.testing.assert_close(spectrum.weights.sum(1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(spectrum.nodes[0], exact.flip(0), rtol=1e-8, atol=1e-8)
    assert spectrum.num_matvecs == 80


def test_moments_are_exact_quadratic_forms():
    # Gauss quadrature with m nodes is exact for polynomials of degree < 2m: sum w theta^p = v^T A^p v (|v| = 1).
    a, _ = hessian_like(100)
    generator = torch.Generator().manual_seed(5)
    start = torch.randint(0, 2, (100,), generator=torch.Generator().manual_seed(5), dtype=torch.int8).double() * 2 - 1
    spectrum = slq_density(a, num_runs=1, num_steps=10, generator=generator)
    v = start / start.norm()
    for p in range(0, 19):
        expected = float(v @ torch.linalg.matrix_power(a, p) @ v)
        assert float(spectrum.moments(p)[0]) == pytest.approx(expected, rel=1e-8, abs=1e-8)


def test_density_integrates_to_one_and_histogram_matches_dense():
    a, _exact = hessian_like(300, seed=4)
    spectrum = slq_density(a, num_runs=40, num_steps=60, generator=torch.Generator().manual_seed(0))
    grid = torch.linspace(-10, 50, 6001, dtype=torch.float64)
    assert float(torch.trapezoid(spectrum.density(grid, sigma=0.3), grid)) == pytest.approx(1.0, abs=1e-6)
    edges = torch.tensor([-5.0, -1.0, 1.0, 5.0, 45.0], dtype=torch.float64)
    mass = spectrum.histogram(edges)
    expected = torch.histogram(dense_eigvalsh(a), bins=edges).hist / 300
    assert float(mass.sum()) == pytest.approx(1.0, abs=1e-12)
    # Rademacher SLQ has O(1/sqrt(n * runs)) error per bin
    torch.testing.assert_close(mass, expected, atol=0.02, rtol=0)


def test_bad_arguments():
    a, _ = hessian_like(10)
    with pytest.raises(ValueError, match="`num_runs` must be an int >= 1, got 0"):
        slq_density(a, num_runs=0)
    with pytest.raises(ValueError, match="`num_steps` must be an int >= 1, got 0"):
        slq_density(a, num_steps=0)
