import math

import pytest
import torch
from torch import nn

from lightning_landscape.core.barrier import (
    alpha_grid,
    barriers_from_curve,
    hermite_midpoint_predictor,
    hessian_midpoint_predictor,
    interpolation_barrier,
)
from lightning_landscape.core.interpolation import (
    batchnorm_buffer_keys,
    check_bn_policy,
    interpolate_state,
    loaded_state,
    recompute_batchnorm,
)


def test_grid_has_exact_endpoints():
    grid = alpha_grid(11)
    assert grid[0] == 0.0
    assert grid[-1] == 1.0
    assert grid[5] == 0.5
    assert grid == [k / 10 for k in range(11)]


def test_straight_line_chord_zero_and_mean_half_the_gap():
    result = interpolation_barrier(lambda a: 2.0 - a, num_alphas=11)
    assert result.chord == pytest.approx(0.0, abs=1e-12)
    assert result.mean == pytest.approx(0.5)
    assert result.midpoint == pytest.approx(0.0, abs=1e-12)


def test_convex_curve_has_no_chord_barrier():
    assert interpolation_barrier(lambda a: (a - 0.3) ** 2, num_alphas=11).chord == pytest.approx(0.0, abs=1e-12)


def test_indefinite_quadratic_exact_midpoint_barrier_and_predictors():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([3.0, 1.0, 0.5, -0.2, -1.0, -4.0], dtype=torch.float64)) @ q.T
    theta_a = torch.randn(6, generator=g, dtype=torch.float64)
    theta_b = theta_a + q[:, 5] * 2.0 + 0.1 * q[:, 0]  # mostly along the negative direction
    d = theta_b - theta_a

    def loss(theta):
        return float(0.5 * theta @ a @ theta)

    result = interpolation_barrier(lambda al: loss((1 - al) * theta_a + al * theta_b), num_alphas=11)
    expected = max(0.0, -float(d @ a @ d) / 8)
    assert result.chord == pytest.approx(expected, rel=1e-12)
    assert result.chord_alpha == 0.5
    assert result.midpoint == pytest.approx(-float(d @ a @ d) / 8, rel=1e-12)
    assert hessian_midpoint_predictor(d, a @ d) == pytest.approx(result.midpoint, rel=1e-12)
    assert hermite_midpoint_predictor(d, a @ theta_a, a @ theta_b) == pytest.approx(result.midpoint, rel=1e-12)


def test_hermite_predictor_is_exact_for_a_cubic():
    def f(al):
        return 1.0 + 0.5 * al - 2.0 * al**2 + 3.0 * al**3

    def df(al):
        return 0.5 - 4.0 * al + 9.0 * al**2

    d = torch.ones(1, dtype=torch.float64)
    predicted = hermite_midpoint_predictor(d, torch.tensor([df(0.0)]), torch.tensor([df(1.0)]))
    assert predicted == pytest.approx(f(0.5) - 0.5 * (f(0) + f(1)), rel=1e-12)


def test_refinement_finds_an_off_grid_peak_and_beats_the_raw_argmax_variant():
    def f(al):
        return 1.0 - 0.8 * al + 0.3 * math.exp(-((al - 0.33) ** 2) / 0.002)  # a sharp bump between grid points

    coarse = interpolation_barrier(f, num_alphas=11, refine_steps=0)
    refined = interpolation_barrier(f, num_alphas=11, refine_steps=4)
    assert refined.chord > coarse.chord
    assert refined.chord == pytest.approx(0.3, rel=0.02)
    assert refined.num_evaluations == 15
    # chord barrier >= the "weighted" variant that measures f - chord at argmax f (here alpha = 0)
    alphas, losses = refined.alphas, refined.losses
    argmax = alphas[losses.index(max(losses))]
    assert refined.chord >= losses[alphas.index(argmax)] - ((1 - argmax) * losses[0] + argmax * losses[-1])


def test_symmetry():
    def f(al):
        return math.sin(3 * al) + al

    forward = interpolation_barrier(f, num_alphas=11, refine_steps=0)
    backward = interpolation_barrier(lambda al: f(1 - al), num_alphas=11, refine_steps=0)
    assert forward.chord == pytest.approx(backward.chord, rel=1e-12)
    assert forward.mean == pytest.approx(backward.mean, rel=1e-12)


def test_non_finite_curve_gives_nan_barriers():
    chord, alpha, mean, midpoint = barriers_from_curve([0.0, 0.5, 1.0], [1.0, float("nan"), 1.0])
    assert all(math.isnan(v) for v in (chord, alpha, mean, midpoint))


def test_curve_needs_endpoints():
    with pytest.raises(ValueError, match="must contain exactly 0.0 and 1.0"):
        barriers_from_curve([0.0, 0.5], [1.0, 2.0])
    with pytest.raises(ValueError, match="`num_alphas` must be an int >= 2, got 1"):
        alpha_grid(1)


def test_interpolate_state_by_key_floats_only():
    a = {"w": torch.zeros(2), "n": torch.tensor(3), "h": torch.zeros(1, dtype=torch.float16)}
    b = {"n": torch.tensor(9), "w": torch.ones(2), "h": torch.ones(1, dtype=torch.float16)}  # other key order
    mid = interpolate_state(a, b, 0.25)
    torch.testing.assert_close(mid["w"], torch.full((2,), 0.25))
    assert mid["n"].item() == 3
    assert mid["h"].dtype == torch.float16
    assert interpolate_state(a, b, 0.75)["n"].item() == 9
    assert torch.equal(interpolate_state(a, b, 1.0)["w"], b["w"])
    with pytest.raises(ValueError, match=r"same keys: only in A \['w'\]"):
        interpolate_state(a, {"n": b["n"], "h": b["h"]}, 0.5)
    with pytest.raises(ValueError, match="'w' must have the same shape"):
        interpolate_state(a, {**b, "w": torch.ones(3)}, 0.5)
    with pytest.raises(ValueError, match="`bn_policy` must be one of"):
        check_bn_policy("repair")


def test_batchnorm_recompute_exactness_and_restoration():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.3), nn.Dropout(0.5), nn.Linear(4, 2))
    model.train()
    model[1].eval()  # an odd flag on purpose: it must come back
    batches = [torch.randn(n, 3) for n in (8, 5, 7)]
    used = recompute_batchnorm(model, batches, lambda m, x: m(x))
    assert used == 3
    with torch.no_grad():
        features = [model[0](x) for x in batches]
    torch.testing.assert_close(model[1].running_mean, torch.stack([f.mean(0) for f in features]).mean(0))
    torch.testing.assert_close(model[1].running_var, torch.stack([f.var(0, unbiased=True) for f in features]).mean(0))
    assert model[1].momentum == 0.3
    assert model.training and not model[1].training and model[2].training
    assert model[1].num_batches_tracked.item() == 0  # restored: the estimate is not training history
    assert batchnorm_buffer_keys(model) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}


def test_loaded_state_restores_bitwise():
    model = nn.Linear(2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with loaded_state(model, {k: v + 1 for k, v in before.items()}):
        assert torch.equal(model.weight, before["weight"] + 1)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
