import pytest
import torch
from torch import nn

from lightning_landscape.core.reference import dense_eigvalsh, dense_hessian


def test_linear_regression_hessian_is_2xtx_over_n():
    # Mean squared error of a linear model: H = 2 X^T X / N exactly (curvlinops' doctest idea).
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False).double()
    x = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randn(10, 1, dtype=torch.float64)
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]

    def mse(module, batch):
        return (module(batch[0]) - batch[1]).pow(2).mean()

    torch.testing.assert_close(dense_hessian(model, mse, batches), 2 * x.T @ x / 10, rtol=1e-12, atol=1e-12)


def test_max_dim_guard_and_eigvalsh_order():
    model = nn.Linear(100, 100)
    with pytest.raises(ValueError, match="max_dim=4000"):
        dense_hessian(model, lambda m, b: m(b).sum(), [torch.zeros(1, 100)])
    vals = dense_eigvalsh(torch.diag(torch.tensor([1.0, 3.0, -2.0])))
    assert vals.tolist() == [3.0, 1.0, -2.0]
