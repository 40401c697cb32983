import pytest
import torch
from torch import nn

from lightning_landscape.core.stability import adam_preconditioner, stability_threshold


def test_sgd_thresholds():
    model = nn.Linear(2, 1)
    params = dict(model.named_parameters())
    assert stability_threshold(torch.optim.SGD(model.parameters(), lr=0.1), params).threshold == pytest.approx(20.0)
    heavy = stability_threshold(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), params)
    assert heavy.threshold == pytest.approx(38.0)
    assert not heavy.preconditioned
    assert stability_threshold(torch.optim.RMSprop(model.parameters()), params) is None


def test_adam_threshold_and_preconditioner():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-8)
    found = stability_threshold(opt, params)
    assert found.preconditioned
    assert found.threshold == pytest.approx(38.0 / 1e-3)
    assert adam_preconditioner(opt, params) is None  # no state before the first step
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3)).pow(2).mean().backward()
        opt.step()
    p = adam_preconditioner(opt, params)
    w = model.weight
    state = opt.state[w]
    expected = (state["exp_avg_sq"] / (1 - 0.99**3)).sqrt() + 1e-8
    torch.testing.assert_close(p[:3], expected.reshape(-1))


def test_parameters_not_in_optimizer():
    a, b = nn.Linear(2, 1), nn.Linear(2, 1)
    assert stability_threshold(torch.optim.SGD(a.parameters(), lr=0.1), dict(b.named_parameters())) is None
