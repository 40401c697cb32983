import pytest
import torch
from torch import nn

from lightning_landscape.core.stability import (
    adam_preconditioner,
    stability_scale,
    stability_threshold,
)


def test_sgd_thresholds():
    model = nn.Linear(2, 1)
    params = dict(model.named_parameters())
    assert stability_threshold(torch.optim.SGD(model.parameters(), lr=0.1), params).threshold == pytest.approx(20.0)
    heavy = stability_threshold(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), params)
    assert heavy.threshold == pytest.approx(38.0)
    assert not heavy.preconditioned
    assert stability_threshold(torch.optim.RMSprop(model.parameters()), params) is None
    nesterov = stability_threshold(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True), params)
    assert nesterov.threshold == pytest.approx(3.8 / 0.28)  # 13.57, the hand value
    damped = stability_threshold(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.9), params)
    assert damped.threshold == pytest.approx(380.0)


def test_adam_threshold_and_preconditioner():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-8)
    found = stability_threshold(opt, params)
    assert found.preconditioned
    # Before any step the next step is the first: bias factor 1 - 0.9 (was 38/lr before the bias factor was added).
    # AdamW's decoupled default decay (0.01) multiplies it by 1 - lr wd / 2 (issue 16: decay in the thresholds)
    decay = 1 - 1e-3 * 0.01 / 2
    assert found.threshold == pytest.approx(38.0 * 0.1 / 1e-3 * decay, rel=1e-12)
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
    later = stability_threshold(opt, params)
    assert later.step == 3
    assert later.threshold == pytest.approx(
        38.0 * (1 - 0.9**4) / 1e-3 * decay, rel=1e-12
    )  # 0.34 of the asymptotic 38/lr


def test_parameters_not_in_optimizer():
    a, b = nn.Linear(2, 1), nn.Linear(2, 1)
    assert stability_threshold(torch.optim.SGD(a.parameters(), lr=0.1), dict(b.named_parameters())) is None


def test_amsgrad_uses_the_running_maximum():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = torch.optim.Adam([w], lr=1e-2, amsgrad=True)
    for scale in (10.0, 0.1, 0.1):  # a large gradient first, so max_exp_avg_sq > exp_avg_sq afterwards
        opt.zero_grad()
        (scale * w).pow(2).sum().backward()
        opt.step()
    state = opt.state[w]
    assert bool((state["max_exp_avg_sq"] > state["exp_avg_sq"]).all())
    expected = (state["max_exp_avg_sq"] / (1 - 0.999**3)).sqrt() + 1e-8
    torch.testing.assert_close(adam_preconditioner(opt, {"w": w}), expected)


def test_zero_second_moment_is_left_out():
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = torch.optim.Adam([w], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        (w[:2] ** 2).sum().backward()  # w[2] never gets a gradient: v stays exactly 0 there
        opt.step()
    threshold = stability_threshold(opt, {"w": w})
    scale = stability_scale(opt, {"w": w}, threshold)
    assert scale[2] == 0.0  # not 1/sqrt(eps): a coordinate Adam does not move
    assert bool((scale[:2] > 0).all())


def test_groups_with_different_momentum_have_no_threshold():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([{"params": [a], "momentum": 0.9}, {"params": [b], "momentum": 0.5}], lr=0.1)
    assert stability_threshold(opt, {"a": a, "b": b}) is None


# ------------------------------------------------------------------ thresholds against measured divergence
def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.linspace(0.2, 1.0, n, dtype=torch.float64)) @ q.T


def _diverges(make_opt, h: torch.Tensor, steps: int = 1500, freeze=None) -> bool:
    """Run the optimizer on x^T h x / 2; True when the iterates grow (norm at the end above the norm half-way)."""
    n = h.shape[0]
    x = nn.Parameter(1e-12 * torch.ones(n, dtype=torch.float64))
    opt = make_opt(x)
    norms = []
    for _t in range(steps):
        if freeze is not None:
            freeze(opt, x)
        opt.zero_grad()
        x.grad = h @ x.detach()
        opt.step()
        norms.append(float(x.detach().norm()))
        if norms[-1] > 1e-9:  # grew a thousandfold: diverged (long before Adam's v notices the growth)
            return True
    return norms[-1] > norms[steps // 2]


def _largest_stable_scale(make_opt, h, freeze=None, lo=0.1, hi=1e5, rtol=1e-3) -> float:
    """Bisection on c: the largest curvature scale c for which the optimizer is stable on c * h."""
    while hi / lo > 1 + rtol:
        mid = (lo * hi) ** 0.5
        if _diverges(make_opt, mid * h, freeze=freeze):
            hi = mid
        else:
            lo = mid
    return (lo * hi) ** 0.5


def _predicted_scale(make_opt, h, freeze=None) -> float:
    """The scale at which the monitored quantity lambda_max(D h D) reaches the threshold."""
    x = nn.Parameter(1e-12 * torch.ones(h.shape[0], dtype=torch.float64))
    opt = make_opt(x)
    if freeze is not None:
        freeze(opt, x)
    params = {"x": x}
    found = stability_threshold(opt, params)
    scale = stability_scale(opt, params, found)
    if scale is not None:
        h = scale[:, None] * h * scale[None, :]
    return found.threshold / float(torch.linalg.eigvalsh(h)[-1])


SGD_CASES = {
    "plain": {"lr": 0.1},
    "heavy_ball": {"lr": 0.1, "momentum": 0.9},
    "dampening": {"lr": 0.1, "momentum": 0.9, "dampening": 0.9},
    "nesterov": {"lr": 0.1, "momentum": 0.9, "nesterov": True},
}


@pytest.mark.parametrize("case", sorted(SGD_CASES))
def test_sgd_threshold_matches_bisection(case):
    h = _spd(4, 0)

    def make(x):
        return torch.optim.SGD([x], **SGD_CASES[case])

    measured = _largest_stable_scale(make, h)
    assert _predicted_scale(make, h) == pytest.approx(measured, rel=5e-3)


def test_per_group_learning_rates_match_bisection():
    h = _spd(4, 1)  # dense: the groups are coupled

    # Two parameters in two groups with their own learning rates, coupled through one quadratic.
    a = nn.Parameter(1e-12 * torch.ones(2, dtype=torch.float64))
    b = nn.Parameter(1e-12 * torch.ones(2, dtype=torch.float64))
    lrs = (0.1, 0.02)

    def diverges(c: float) -> bool:
        pa, pb = nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())
        opt = torch.optim.SGD([{"params": [pa], "lr": lrs[0]}, {"params": [pb], "lr": lrs[1]}], momentum=0.9)
        norms = []
        for _ in range(1500):
            x = torch.cat([pa.detach(), pb.detach()])
            g = c * h @ x
            pa.grad, pb.grad = g[:2].clone(), g[2:].clone()
            opt.step()
            norms.append(float(torch.cat([pa.detach(), pb.detach()]).norm()))
            if norms[-1] > 1e-9:
                return True
        return norms[-1] > norms[750]

    lo, hi = 0.1, 1e3
    while hi / lo > 1.001:
        mid = (lo * hi) ** 0.5
        lo, hi = (lo, mid) if diverges(mid) else (mid, hi)
    opt = torch.optim.SGD([{"params": [a], "lr": lrs[0]}, {"params": [b], "lr": lrs[1]}], momentum=0.9)
    params = {"a": a, "b": b}
    found = stability_threshold(opt, params)
    assert found.preconditioned and found.per_group
    d = stability_scale(opt, params, found)
    predicted = found.threshold / float(torch.linalg.eigvalsh(d[:, None] * h * d[None, :])[-1])
    assert predicted == pytest.approx((lo * hi) ** 0.5, rel=5e-3)
    # the first group's lr alone (what was used before) predicts a different scale
    naive = found.threshold / float(torch.linalg.eigvalsh(h)[-1])
    assert abs(naive / predicted - 1) > 0.1


@pytest.mark.parametrize("t0", [3, pytest.param(10_000, marks=pytest.mark.slow)])
def test_adam_threshold_matches_bisection_with_frozen_state(t0):
    """Adam with its step counter and second moment reset before every step (the frozen-state iteration the
    threshold is derived for). At t0 = 3 eps dominates P (tiny v), isolating the bias factor 1 - b1^(t0+1); at
    t0 = 10_000 a spread-out v dominates P, testing the preconditioner."""
    h = _spd(4, 2)
    v0 = torch.tensor([1e-30] * 4, dtype=torch.float64) if t0 == 3 else torch.tensor([1.0, 4.0, 0.25, 9.0])
    eps = 1e-2 if t0 == 3 else 1e-8

    def make(x):
        return torch.optim.Adam([x], lr=1e-2, betas=(0.9, 0.9999), eps=eps)

    def freeze(opt, x):
        state = opt.state[x]
        if not state:
            state["step"] = torch.tensor(float(t0))
            state["exp_avg"] = torch.zeros_like(x)
        state["step"] = torch.tensor(float(t0))
        state["exp_avg_sq"] = v0.to(torch.float64).clone()

    measured = _largest_stable_scale(make, h, freeze=freeze)
    predicted = _predicted_scale(make, h, freeze=freeze)
    assert predicted == pytest.approx(measured, rel=5e-3)


# ------------------------------------------------------------------ weight decay against measured divergence
def _largest_stable_in_model(make_opt, h, freeze=None, lo=0.1, hi=1e5) -> float:
    """The scale c at which the monitored quantity lambda_max(D c h D + shift) reaches the threshold (bisection on
    the dense eigenvalue: with a shift it is not linear in c)."""
    from lightning_landscape.core.stability import stability_shift

    x = nn.Parameter(1e-12 * torch.ones(h.shape[0], dtype=torch.float64))
    opt = make_opt(x)
    if freeze is not None:
        freeze(opt, x)
    params = {"x": x}
    found = stability_threshold(opt, params)
    scale = stability_scale(opt, params, found)
    shift = stability_shift(opt, params, scale)
    d = torch.ones(h.shape[0], dtype=torch.float64) if scale is None else scale
    c_shift = torch.zeros_like(d) if shift is None else shift
    while hi / lo > 1 + 1e-6:
        mid = (lo * hi) ** 0.5
        top = float(torch.linalg.eigvalsh(mid * d[:, None] * h * d[None, :] + torch.diag(c_shift))[-1])
        lo, hi = (lo, mid) if top > found.threshold else (mid, hi)
    return (lo * hi) ** 0.5


WD_CASES = {
    "sgd": lambda x: torch.optim.SGD([x], lr=0.1, weight_decay=2.0),
    "heavy_ball": lambda x: torch.optim.SGD([x], lr=0.1, momentum=0.9, weight_decay=4.0),
    "nesterov": lambda x: torch.optim.SGD([x], lr=0.1, momentum=0.9, nesterov=True, weight_decay=1.0),
}


@pytest.mark.parametrize("case", sorted(WD_CASES))
def test_sgd_coupled_weight_decay_matches_bisection(case):
    h = _spd(4, 3)
    measured = _largest_stable_scale(WD_CASES[case], h)
    predicted = _largest_stable_in_model(WD_CASES[case], h)
    assert predicted == pytest.approx(measured, rel=5e-3)
    # ignoring the decay (the threshold without it) is off by more than the bisection's accuracy
    found = stability_threshold(WD_CASES[case](nn.Parameter(torch.zeros(4, dtype=torch.float64))), {})
    assert found is None  # (no parameter selected: no threshold)
    x = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    t = stability_threshold(WD_CASES[case](x), {"x": x})
    assert t.weight_decay > 0 and not t.preconditioned
    naive = (t.threshold + t.weight_decay) / float(torch.linalg.eigvalsh(h)[-1])
    assert abs(naive / measured - 1) > 0.02


def test_sgd_groups_with_different_decays_use_the_shifted_operator():
    h = _spd(4, 4)
    a = nn.Parameter(1e-12 * torch.ones(2, dtype=torch.float64))
    b = nn.Parameter(1e-12 * torch.ones(2, dtype=torch.float64))
    decays = (3.0, 0.0)

    def diverges(c: float) -> bool:
        pa, pb = nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())
        opt = torch.optim.SGD(
            [{"params": [pa], "weight_decay": decays[0]}, {"params": [pb], "weight_decay": decays[1]}], lr=0.1
        )
        norms = []
        for _ in range(1500):
            g = c * h @ torch.cat([pa.detach(), pb.detach()])
            pa.grad, pb.grad = g[:2].clone(), g[2:].clone()
            opt.step()
            norms.append(float(torch.cat([pa.detach(), pb.detach()]).norm()))
            if norms[-1] > 1e-9:
                return True
        return norms[-1] > norms[750]

    lo, hi = 0.1, 1e3
    while hi / lo > 1.001:
        mid = (lo * hi) ** 0.5
        lo, hi = (lo, mid) if diverges(mid) else (mid, hi)
    from lightning_landscape.core.stability import stability_shift

    opt = torch.optim.SGD(
        [{"params": [a], "weight_decay": decays[0]}, {"params": [b], "weight_decay": decays[1]}], lr=0.1
    )
    params = {"a": a, "b": b}
    found = stability_threshold(opt, params)
    assert found.preconditioned and not found.per_group
    d = stability_scale(opt, params, found)
    shift = stability_shift(opt, params, d)
    assert shift.tolist() == [3.0, 3.0, 0.0, 0.0]
    c_lo, c_hi = 0.1, 1e3
    while c_hi / c_lo > 1 + 1e-6:
        mid = (c_lo * c_hi) ** 0.5
        top = float(torch.linalg.eigvalsh(mid * d[:, None] * h * d[None, :] + torch.diag(shift))[-1])
        c_lo, c_hi = (c_lo, mid) if top > found.threshold else (mid, c_hi)
    assert (c_lo * c_hi) ** 0.5 == pytest.approx((lo * hi) ** 0.5, rel=5e-3)


def _frozen(t0, v0):
    def freeze(opt, x):
        state = opt.state[x]
        if not state:
            state["exp_avg"] = torch.zeros_like(x)
        state["step"] = torch.tensor(float(t0))
        state["exp_avg_sq"] = v0.clone()

    return freeze


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda x: torch.optim.Adam([x], lr=1e-2, betas=(0.9, 0.9999), eps=1e-2, weight_decay=1.0), id="adam_coupled"
        ),
        pytest.param(
            lambda x: torch.optim.AdamW([x], lr=1e-2, betas=(0.9, 0.9999), eps=1e-2, weight_decay=20.0),
            id="adamw_decoupled",
        ),
    ],
)
def test_adam_weight_decay_matches_bisection_with_frozen_state(make):
    # eps-dominated P (tiny v) at t0 = 3, as in the frozen-state test above; the decay is large enough to move the
    # threshold well beyond the bisection's accuracy (coupled: W D^2 = 100; decoupled: factor 1 - lr wd / 2 = 0.9)
    h = _spd(4, 5)
    freeze = _frozen(3, torch.full((4,), 1e-30, dtype=torch.float64))
    measured = _largest_stable_scale(make, h, freeze=freeze)
    predicted = _largest_stable_in_model(make, h, freeze=freeze)
    assert predicted == pytest.approx(measured, rel=5e-3)
    # without the decay's term the prediction is wrong by more than 5%
    x = nn.Parameter(1e-12 * torch.ones(4, dtype=torch.float64))
    opt = make(x)
    freeze(opt, x)
    found = stability_threshold(opt, {"x": x})
    d = stability_scale(opt, {"x": x}, found)
    bare = 3.8 * (1 - 0.9**4) / (0.1 * 1e-2)
    naive = bare / float(torch.linalg.eigvalsh(d[:, None] * h * d[None, :])[-1])
    assert abs(naive / measured - 1) > 0.05
