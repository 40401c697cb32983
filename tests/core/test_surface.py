"""Hessian-axes surfaces on quadratics (exact second differences) and the HESD criteria on hand-made spectra."""

import math

import pytest
import torch
from torch import nn

from lightning_landscape.core.surface import hesd_criteria, hessian_plane


def _quadratic(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = m @ m.T / n + torch.diag(torch.arange(n, dtype=torch.float64))
    b = torch.randn(n, generator=g, dtype=torch.float64)
    theta = nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))
    return a, b, theta


def _loss(a, b, theta):
    return lambda: float((0.5 * theta @ a @ theta + b @ theta).detach())


def test_centre_and_second_differences_on_a_quadratic():
    a, b, theta = _quadratic()
    values, vectors = torch.linalg.eigh(a)
    directions = torch.stack([vectors[:, -1], vectors[:, -2]])
    saved = theta.detach().clone()
    surface = hessian_plane({"theta": theta}, directions, _loss(a, b, theta), radius=0.4, grid=5)
    assert torch.equal(theta.detach(), saved)  # restored bitwise
    assert surface.centre == _loss(a, b, theta)()  # evaluated at theta itself, exactly
    assert surface.curvature(0) == pytest.approx(float(values[-1]), rel=1e-9)
    assert surface.curvature(1) == pytest.approx(float(values[-2]), rel=1e-9)
    # every grid point is the loss at theta + a v1 + b v2
    for i, x in enumerate(surface.alphas.tolist()):
        for j, y in enumerate(surface.betas.tolist()):
            point = saved + x * directions[0] + y * directions[1]
            assert float(surface.losses[i, j]) == pytest.approx(float(0.5 * point @ a @ point + b @ point), rel=1e-12)
    assert torch.equal(surface.slice_v1(), surface.losses[:, 2])
    assert surface.num_evaluations == 25
    assert surface.alphas.tolist() == pytest.approx([-0.4, -0.2, 0.0, 0.2, 0.4])


def test_directions_are_normalised_and_params_restored_on_error():
    a, b, theta = _quadratic(seed=1)
    _, vectors = torch.linalg.eigh(a)
    unit = torch.stack([vectors[:, -1], vectors[:, -2]])
    first = hessian_plane({"t": theta}, unit, _loss(a, b, theta), 0.3, 3)
    second = hessian_plane({"t": theta}, 5.0 * unit, _loss(a, b, theta), 0.3, 3)
    assert torch.allclose(first.losses, second.losses, rtol=1e-13, atol=0)
    saved = theta.detach().clone()
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 4:
            raise FloatingPointError("boom")
        return 0.0

    with pytest.raises(FloatingPointError, match="boom"):
        hessian_plane({"t": theta}, unit, failing, 0.3, 3)
    assert torch.equal(theta.detach(), saved)


def test_float32_parameters_span_several_tensors():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    params = dict(model.named_parameters())
    saved = {k: v.detach().clone() for k, v in params.items()}
    directions = torch.randn(2, 8, dtype=torch.float64)
    x = torch.randn(4, 3)
    surface = hessian_plane(params, directions, lambda: float(model(x).square().mean().detach()), 0.1, 3)
    assert all(torch.equal(saved[k], v) for k, v in params.items())
    with torch.no_grad():
        assert surface.centre == float(model(x).square().mean())


def test_plane_arguments_are_validated():
    a, b, theta = _quadratic()
    d = torch.randn(2, 6, dtype=torch.float64)
    loss = _loss(a, b, theta)
    with pytest.raises(ValueError, match="`grid` must be odd"):
        hessian_plane({"t": theta}, d, loss, 0.1, 4)
    with pytest.raises(ValueError, match="`grid` must be an int >= 3"):
        hessian_plane({"t": theta}, d, loss, 0.1, 1)
    with pytest.raises(ValueError, match="`radius` must be > 0.0"):
        hessian_plane({"t": theta}, d, loss, 0.0, 3)
    with pytest.raises(ValueError, match=r"`directions` must have shape \(2, 6\)"):
        hessian_plane({"t": theta}, d[:1], loss, 0.1, 3)
    with pytest.raises(TypeError, match="`directions` must be a Tensor"):
        hessian_plane({"t": theta}, [[0.0]], loss, 0.1, 3)
    with pytest.raises(ValueError, match="`directions` must be finite and non-zero"):
        hessian_plane({"t": theta}, torch.zeros(2, 6), loss, 0.1, 3)
    with pytest.raises(ValueError, match="`params` must hold at least one"):
        hessian_plane({}, d, loss, 0.1, 3)


def test_hesd_criteria_on_a_hand_made_spectrum():
    nodes = torch.tensor([[-1.0, 0.0, 0.5, 2.0], [-0.5, 0.25, 1.0, 4.0]], dtype=torch.float64)
    weights = torch.tensor([[0.2, 0.1, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    re_value, khn = hesd_criteria(nodes, weights)
    assert re_value == pytest.approx((1.0 / 2.0 + 0.5 / 4.0) / 2, rel=1e-15)
    # run 1: negative mass |(-1)(0.2)|^0.5, positive (0.5*0.3)^0.5 + (2*0.4)^0.5 (the zero node counts in neither)
    k1 = math.sqrt(0.2) / (math.sqrt(0.15) + math.sqrt(0.8))
    k2 = math.sqrt(0.05) / (math.sqrt(0.05) + math.sqrt(0.3) + math.sqrt(1.6))
    assert khn == pytest.approx((k1 + k2) / 2, rel=1e-14)
    # one run as a 1-D row; another power
    assert hesd_criteria(nodes[0], weights[0], power=1.0)[1] == pytest.approx(0.2 / (0.15 + 0.8), rel=1e-14)


def test_hesd_without_positive_nodes_is_inf_and_arguments_checked():
    assert hesd_criteria(torch.tensor([-2.0, -1.0]), torch.tensor([0.5, 0.5]))[1] == math.inf
    assert hesd_criteria(torch.tensor([-2.0, 0.0]), torch.tensor([0.5, 0.5]))[0] == math.inf
    assert hesd_criteria(torch.tensor([1.0, 3.0]), torch.tensor([0.5, 0.5])) == (pytest.approx(1 / 3), 0.0)
    with pytest.raises(ValueError, match="`power` must be > 0"):
        hesd_criteria(torch.ones(2), torch.ones(2), power=0.0)
    with pytest.raises(TypeError, match="`nodes` and `weights` must be Tensors"):
        hesd_criteria([1.0], torch.ones(1))
    with pytest.raises(ValueError, match="must have the same"):
        hesd_criteria(torch.ones(2), torch.ones(3))
