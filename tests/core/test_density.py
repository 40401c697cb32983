import pytest
import torch

from lightning_landscape.core.density import SpectralDensity, slq_density
from lightning_landscape.core.lanczos import random_vector
from lightning_landscape.core.reference import dense_eigvalsh
from tests.core.test_lanczos import CountingOperator, hessian_like, symmetric


def test_weights_sum_to_one_and_full_steps_recover_the_spectrum():
    a, exact = hessian_like(40)
    op = CountingOperator(a)
    spectrum = slq_density(op, num_runs=2, num_steps=100)  # capped at n = 40
    assert spectrum.nodes.shape == spectrum.weights.shape == (2, 40)
    torch.testing.assert_close(spectrum.weights.sum(1), torch.ones(2, dtype=torch.float64), atol=1e-14, rtol=0)
    assert bool((spectrum.weights >= 0).all())
    for run in range(2):
        torch.testing.assert_close(spectrum.nodes[run], exact.flip(0), rtol=1e-9, atol=1e-9)
    assert spectrum.num_matvecs == 80 == op.calls


@pytest.mark.parametrize("num_steps", [3, 10])
def test_moments_are_exact_quadratic_forms_of_the_start_vectors(num_steps):
    # Gauss quadrature with m nodes is exact for polynomials of degree < 2m: sum_i w_i theta_i^p = v^T A^p v / v^T v.
    a, _ = hessian_like(100)
    spectrum = slq_density(a, num_runs=3, num_steps=num_steps, generator=torch.Generator().manual_seed(5))
    # run r starts from the r-th Rademacher draw of an identically seeded generator
    redraw = torch.Generator().manual_seed(5)
    starts = [random_vector(100, redraw, "rademacher") for _ in range(3)]
    scale = 40.0  # spectral radius of hessian_like
    for run, v in enumerate(starts):
        v = v / v.norm()
        power = v.clone()
        for p in range(2 * num_steps):
            expected = float(v @ power)
            assert float(spectrum.moments(p)[run]) == pytest.approx(expected, rel=1e-9, abs=1e-12 * scale**p)
            power = a @ power
    # degree 2m is no longer exact (on a spectrum without dominant outliers)
    b, _ = symmetric(100, seed=1)
    spectrum = slq_density(b, num_runs=1, num_steps=num_steps, generator=torch.Generator().manual_seed(5))
    p = 2 * num_steps
    expected = float(starts[0] @ torch.linalg.matrix_power(b, p) @ starts[0] / 100)
    assert float(spectrum.moments(p)[0]) != pytest.approx(expected, rel=1e-7)
    assert float(spectrum.moments(p - 1)[0]) == pytest.approx(
        float(starts[0] @ torch.linalg.matrix_power(b, p - 1) @ starts[0] / 100), rel=1e-9, abs=1e-9
    )


def test_moments_average_to_normalised_traces():
    a, _ = hessian_like(200, seed=2)
    spectrum = slq_density(a, num_runs=60, num_steps=8, generator=torch.Generator().manual_seed(1))
    for p in (1, 2, 3):
        exact = float(torch.linalg.matrix_power(a, p).trace()) / 200
        estimate = spectrum.moments(p)
        stderr = float(estimate.std()) / 60**0.5
        assert abs(float(estimate.mean()) - exact) < 4 * stderr


def test_density_integrates_to_one_and_histogram_matches_dense():
    a, _ = hessian_like(300, seed=4)
    spectrum = slq_density(a, num_runs=40, num_steps=60, generator=torch.Generator().manual_seed(0))
    assert spectrum.num_matvecs == 2400
    grid = torch.linspace(-10, 50, 6001, dtype=torch.float64)
    for sigma in (0.3, None):
        assert float(torch.trapezoid(spectrum.density(grid, sigma=sigma), grid)) == pytest.approx(1.0, abs=1e-6)
    edges = torch.tensor([-5.0, -1.0, 1.0, 5.0, 45.0], dtype=torch.float64)
    mass = spectrum.histogram(edges)
    expected = torch.histogram(dense_eigvalsh(a), bins=edges).hist / 300
    assert float(mass.sum()) == pytest.approx(1.0, abs=1e-12)
    # Rademacher SLQ: per-bin error ~ sqrt(p (1 - p) / (n * runs)) <= 0.5 / sqrt(300 * 40) ~ 0.005; allow 4x
    torch.testing.assert_close(mass, expected, atol=0.02, rtol=0)


def test_density_matches_a_broadened_dense_spectrum():
    a, exact = symmetric(200, seed=8)  # a continuous (semicircle-like) spectrum
    spectrum = slq_density(a, num_runs=30, num_steps=40, generator=torch.Generator().manual_seed(2))
    grid = torch.linspace(-4, 4, 401, dtype=torch.float64)
    sigma = 0.3
    dense = SpectralDensity(exact[None], torch.full((1, 200), 1 / 200, dtype=torch.float64), 0).density(grid, sigma)
    estimate = spectrum.density(grid, sigma)
    assert float((estimate - dense).abs().max()) < 0.1 * float(dense.max())


def test_histogram_edges_and_outside_mass():
    spectrum = SpectralDensity(
        nodes=torch.tensor([[0.0, 1.0, 2.0], [0.5, 1.0, 3.0]], dtype=torch.float64),
        weights=torch.tensor([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]], dtype=torch.float64),
        num_matvecs=6,
    )
    # [0, 1) [1, 2]: the right edge 2.0 belongs to the last (closed) bin; 3.0 lies outside and is dropped
    mass = spectrum.histogram(torch.tensor([0.0, 1.0, 2.0]))
    torch.testing.assert_close(mass, torch.tensor([(0.2 + 0.1) / 2, (0.3 + 0.5 + 0.1) / 2], dtype=torch.float64))
    torch.testing.assert_close(spectrum.moments(0), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(spectrum.moments(1), torch.tensor([1.3, 2.55], dtype=torch.float64))


def test_determinism_and_cpu_basis():
    a, _ = hessian_like(60)
    one = slq_density(a, num_runs=2, num_steps=10, generator=torch.Generator().manual_seed(3))
    two = slq_density(a, num_runs=2, num_steps=10, generator=torch.Generator().manual_seed(3), basis_device="cpu")
    assert torch.equal(one.nodes, two.nodes) and torch.equal(one.weights, two.weights)
    default = slq_density(a, num_runs=2, num_steps=10)
    assert torch.equal(default.nodes, slq_density(a, 2, 10, generator=torch.Generator().manual_seed(0)).nodes)


def test_few_distinct_eigenvalues_restart_with_zero_weight():
    # 3 distinct eigenvalues: the Krylov space of a start vector breaks down after 3 steps; later blocks get weight 0
    diagonal = torch.diag(torch.tensor([2.0, 2.0, 1.0, 1.0, 1.0, -1.0], dtype=torch.float64))
    spectrum = slq_density(diagonal, num_runs=1, num_steps=6)
    assert spectrum.nodes.shape == (1, 6)
    torch.testing.assert_close(spectrum.nodes[0], torch.tensor([-1.0, 1.0, 1.0, 1.0, 2.0, 2.0], dtype=torch.float64))
    start = random_vector(6, torch.Generator().manual_seed(0), "rademacher") / 6**0.5
    by_value = {v: float(start[diagonal.diagonal() == v].square().sum()) for v in (2.0, 1.0, -1.0)}
    for value, weight in by_value.items():
        got = float(spectrum.weights[0][(spectrum.nodes[0] - value).abs() < 1e-9].sum())
        assert got == pytest.approx(weight, abs=1e-12)


def test_bad_arguments():
    a, _ = hessian_like(10)
    with pytest.raises(ValueError, match="`num_runs` must be an int >= 1, got 0"):
        slq_density(a, num_runs=0)
    with pytest.raises(ValueError, match="`num_steps` must be an int >= 1, got 0"):
        slq_density(a, num_steps=0)
    with pytest.raises(TypeError, match="`num_steps` must be an int, got 2.5"):
        slq_density(a, num_steps=2.5)
    with pytest.raises(ValueError, match="`basis_device` must be a torch.device"):
        slq_density(a, basis_device="nowhere")
    with pytest.raises(ValueError, match="`op` must be a square operator"):
        slq_density(torch.ones(3))
    spectrum = slq_density(a, num_steps=4)
    with pytest.raises(ValueError, match="`sigma` must be > 0.0, got 0.0"):
        spectrum.density(torch.linspace(0, 1, 5), sigma=0.0)
    with pytest.raises(ValueError, match="`grid` must be 1-D with at least 1 points, got shape \\(2, 2\\)"):
        spectrum.density(torch.zeros(2, 2))
    with pytest.raises(TypeError, match="`grid` must be a Tensor, got list"):
        spectrum.density([0.0, 1.0])
    with pytest.raises(ValueError, match="`edges` must be 1-D with at least 2 points, got shape \\(1,\\)"):
        spectrum.histogram(torch.zeros(1))
    with pytest.raises(ValueError, match="`edges` must be strictly increasing"):
        spectrum.histogram(torch.tensor([0.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="`edges` must be finite"):
        spectrum.histogram(torch.tensor([0.0, float("inf")]))
    with pytest.raises(ValueError, match="`p` must be an int >= 0, got -1"):
        spectrum.moments(-1)
