import math

import pytest
import torch

from lightning_landscape.core.divergence import DivergenceRule


def noisy(n, seed=0, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    return torch.exp(noise * torch.randn(n, generator=g, dtype=torch.float64)).tolist()


def fired_at(rule, values, weights=None):
    weights = weights or [1.0] * len(values)
    return [i for i, (v, w) in enumerate(zip(values, weights, strict=True)) if rule.update(v, w)]


def test_level_noise_best_and_decision_by_hand():
    rule = DivergenceRule(ratio=1.5, time_constant=2.0, horizon=3, warmup=2.0, max_step_ratio=4.0, noise_sigmas=0.25)
    cap = math.log(4.0)
    level_std = 1 / math.sqrt(3)  # 1 / sqrt(2 tau - 1)
    ys = [0.0, 0.2, 0.1, 0.1, 3.0]

    # 1: the first value is the level; no noise yet; warm-up (weight 1 < 2) so no best
    assert not rule.update(math.exp(ys[0]))
    assert rule.level == 0.0 and rule.noise == 0.0 and math.isnan(rule.best)
    # 2: running mean (rate max(1 - 0.5, 1/2) = 1/2); noise rate 1/(2-1) = 1: half the squared change
    assert not rule.update(math.exp(ys[1]))
    level, noise = 0.1, 0.2**2 / 2
    assert rule.level == pytest.approx(level, abs=1e-15)
    assert rule.noise == pytest.approx(noise, abs=1e-15)
    assert rule.best == pytest.approx(level, abs=1e-15)
    # 3: rate max(1/2, 1/3) = 1/2; noise rate max(1 - 0.95, 1/2) = 1/2
    assert not rule.update(math.exp(ys[2]))
    level += 0.5 * (0.1 - level)
    noise += 0.5 * (0.1**2 / 2 - noise)
    assert rule.level == pytest.approx(level, abs=1e-15) and rule.noise == pytest.approx(noise, abs=1e-15)
    # 4
    rule.update(math.exp(ys[3]))
    level += 0.5 * (0.1 - level)
    noise += max(0.05, 1 / 3) * (0.0 - noise)
    assert rule.level == pytest.approx(level, abs=1e-15)
    # 5: a jump of 2.9 is capped at log 4 for the level and the noise alike
    threshold_after = None
    fired = rule.update(math.exp(ys[4]))
    level += 0.5 * cap
    noise += 0.25 * (cap**2 - noise)
    threshold_after = math.log(1.5) + 0.25 * math.sqrt(noise) * level_std
    assert rule.level == pytest.approx(level, abs=1e-14)
    assert rule.threshold == pytest.approx(threshold_after, rel=1e-12)
    best = 0.1  # the lowest level of the last 3 updates (levels 0.1, 0.1, 0.1: updates 3, 4 and the new one)
    assert rule.best == pytest.approx(best, abs=1e-15)
    assert fired == (level - best > threshold_after) and fired
    assert rule.rise == pytest.approx(math.exp(level - best), rel=1e-12)


def test_fires_on_a_gradual_10x_rise_before_the_level_has_doubled():
    n_flat, n_rise = 300, 200
    base = noisy(n_flat + n_rise + 100, seed=1, noise=0.1)
    trend = [1.0] * n_flat + [10 ** (i / n_rise) for i in range(n_rise)] + [10.0] * 100
    values = [b * t for b, t in zip(base, trend, strict=True)]
    fired = fired_at(DivergenceRule(), values)
    assert len(fired) == 1
    assert n_flat < fired[0] < n_flat + n_rise
    assert trend[fired[0]] < 1.6  # the true level had risen less than 1.6x when it fired
    # the spike z-score this replaces adapts to the same rise (core/spikes.py, at its defaults)
    from lightning_landscape.core.spikes import EMAZScore

    detector = EMAZScore()
    assert not any(detector.update_float(v)[1] for v in values)


@pytest.mark.parametrize("noise", [0.05, 0.3, 0.5])
def test_never_fires_on_healthy_series(noise):
    n = 3000
    base = noisy(n, seed=2, noise=noise)
    # learning-rate warm-up then a decaying loss, then a plateau
    trend = [3.0 * (1 + 0.5 * math.exp(-i / 30)) * math.exp(-i / 1500) for i in range(n)]
    values = [b * t for b, t in zip(base, trend, strict=True)]
    weights = [1.0] * n
    g = torch.Generator().manual_seed(3)
    for i in range(180, n, 181):  # an epoch-end remainder batch of one sample in 16: far noisier
        values[i] *= math.exp(4 * noise * float(torch.randn(1, generator=g)))
        weights[i] = 1 / 16
    for i in (500, 1500, 2500):  # corrupted batches: spikes, not divergence
        values[i] *= 100
    assert fired_at(DivergenceRule(), values, weights) == []


def test_without_the_noise_term_a_noisy_plateau_fires():
    # what the noise term is for: the minimum of a noisy level sits several of its standard deviations below it
    n = 3000
    base = noisy(n, seed=2, noise=0.5)
    values = [3.0 * b for b in base]
    assert fired_at(DivergenceRule(noise_sigmas=0.0), values)
    assert fired_at(DivergenceRule(), values) == []


def test_re_arms_after_recovery_and_round_trips():
    values = [1.0] * 50 + [4.0] * 50 + [1.0] * 100 + [4.0] * 50
    whole = DivergenceRule()
    fired = fired_at(whole, values)
    assert len(fired) == 2 and 50 < fired[0] < 60 and 200 < fired[1] < 210
    first = DivergenceRule()
    fired_at(first, values[:120])
    second = DivergenceRule()
    second.load_state_dict(first.state_dict())
    assert [i + 120 for i in fired_at(second, values[120:])] == fired[1:]
    assert second.level == whole.level and second.best == whole.best


def test_ignores_non_positive_and_non_finite_values():
    rule = DivergenceRule()
    for v in (math.nan, math.inf, 0.0, -1.0):
        assert not rule.update(v)
    assert rule.updates == 0 and math.isnan(rule.level)
    assert not rule.update(1.0, weight=0.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": 1.0}, "`ratio` must be > 1.0, got 1.0"),
        ({"time_constant": 0.5}, "`time_constant` must be >= 1.0, got 0.5"),
        ({"horizon": 0}, "`horizon` must be an int >= 1, got 0"),
        ({"warmup": -1.0}, "`warmup` must be >= 0.0, got -1.0"),
        ({"max_step_ratio": 1.0}, "`max_step_ratio` must be > 1.0, got 1.0"),
        ({"noise_sigmas": -1.0}, "`noise_sigmas` must be >= 0.0, got -1.0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DivergenceRule(**kwargs)
