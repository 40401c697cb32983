import math

import pytest
import torch

from lightning_landscape.core.spikes import EMAZScore


def noisy_sequence(n, seed=0, level=1.0, noise=0.1, trend=0.0):
    g = torch.Generator().manual_seed(seed)
    base = level * torch.exp(-trend * torch.arange(n, dtype=torch.float64) / n)
    return base * torch.exp(noise * torch.randn(n, generator=g, dtype=torch.float64))


def run(detector, values):
    zs, spikes, bad = [], [], []
    for v in values:
        z, s, nf = detector.update(torch.as_tensor(v))
        zs.append(float(z))
        spikes.append(bool(s))
        bad.append(bool(nf))
    return zs, spikes, bad


def test_flags_exactly_the_injected_spikes():
    values = noisy_sequence(3000, seed=1, trend=1.0)  # a decaying norm with 10 % multiplicative noise
    injected = [100, 101, 700, 1500, 2999]
    for i in injected:
        values[i] *= 10
    _, spikes, _ = run(EMAZScore(), values)
    assert [i for i, s in enumerate(spikes) if s] == injected


@pytest.mark.parametrize("noise", [0.1, 0.3, 0.5])
def test_no_false_alarm_on_a_stationary_noisy_sequence(noise):
    zs, spikes, _ = run(EMAZScore(), noisy_sequence(10_000, seed=0, noise=noise))
    assert not any(spikes)
    assert max(zs) < 5


def test_linear_scale_is_what_raises_false_alarms_on_multiplicative_noise():
    # why log_scale defaults to True: the same sequence on the linear scale crosses z = 5
    zs, _, _ = run(EMAZScore(log_scale=False), noisy_sequence(10_000, seed=0, noise=0.3))
    assert max(zs) > 5


def test_flat_norm_wiggle_is_not_a_spike_thanks_to_the_floor():
    values = torch.ones(200, dtype=torch.float64)
    values[150] = 1.01  # a 1 % wiggle of a perfectly flat norm: z would be ~1e4 without the floor
    _, spikes, _ = run(EMAZScore(), values)
    assert not any(spikes)
    _, spikes, _ = run(EMAZScore(min_relative_std=0.0), values)
    assert spikes[150]
    _, spikes, _ = run(EMAZScore(min_relative_std=0.0, log_scale=False), values)
    assert spikes[150]


def test_warmup_initialises_population_statistics():
    values = noisy_sequence(50, seed=3)
    detector = EMAZScore()
    zs, spikes, _ = run(detector, values)
    assert zs == [0.0] * 50 and not any(spikes)
    assert float(detector.mean) == pytest.approx(float(values.log().mean()), rel=1e-12)
    assert float(detector.var) == pytest.approx(float(values.log().var(unbiased=False)), rel=1e-10)
    z, _, _ = detector.update(torch.tensor(2.0))
    logs = values.log()
    mean, std = float(logs.mean()), math.sqrt(float(logs.var(unbiased=False)))
    expected = (math.log(2.0) - mean) / max(std + 1e-6, 0.02)
    assert float(z) == pytest.approx(expected, rel=1e-10)


def test_skip_keeps_spikes_out_of_the_baseline():
    values = noisy_sequence(100, seed=4)
    skip, raw = EMAZScore(spike_update="skip"), EMAZScore(spike_update="raw")
    run(skip, values)
    run(raw, values)
    mean_before = float(skip.mean)
    skip.update(torch.tensor(100.0))
    raw.update(torch.tensor(100.0))
    assert float(skip.mean) == mean_before
    assert float(raw.mean) > mean_before + 0.1


def test_non_finite_values_are_flagged_and_ignored():
    values = noisy_sequence(60, seed=5).tolist()
    values[40], values[41] = float("nan"), float("inf")
    detector = EMAZScore()
    _, spikes, bad = run(detector, values)
    assert [i for i, b in enumerate(bad) if b] == [40, 41]
    assert not any(spikes)
    assert math.isfinite(float(detector.mean)) and int(detector.count) == 58


@pytest.mark.parametrize("shape", [(), (1,)])
def test_zeros_carry_no_scale_on_the_log_scale(shape):
    # A saturated loss or an all-zero gradient is exactly 0: log(0) would drag the mean to -69 and inflate the
    # variance so much that the real spike right after it went unseen (the corrupted-batch scenario of
    # benchmarks/early_warning.py). Zeros are skipped: not flagged, not counted, the spike is still caught.
    values = noisy_sequence(80, seed=3).tolist()
    values[60] = values[61] = 0.0
    values[62] *= 50
    detector = EMAZScore(shape=shape)
    _, spikes, bad = run(detector, [torch.tensor(v).reshape(shape) for v in values] if shape else values)
    assert [i for i, s in enumerate(spikes) if s] == [62]
    assert not any(bad)
    assert int(detector.count) == 78  # the two zeros are not counted


def test_state_round_trip_continues_identically():
    values = noisy_sequence(400, seed=6)
    values[300] *= 20
    whole = EMAZScore()
    zs_whole, spikes_whole, _ = run(whole, values)
    first = EMAZScore()
    run(first, values[:150])
    second = EMAZScore()
    second.load_state_dict(first.state_dict())
    zs_tail, spikes_tail, _ = run(second, values[150:])
    assert zs_tail == zs_whole[150:]
    assert spikes_tail == spikes_whole[150:] and spikes_whole[300]


def test_channels_are_independent():
    a, b = noisy_sequence(200, seed=7), noisy_sequence(200, seed=8, level=50.0)
    b[120] *= 10
    joint = EMAZScore(shape=(2,))
    flagged = []
    for x, y in zip(a, b, strict=True):
        _, spikes, _ = joint.update(torch.stack([x, y]))
        flagged.append(spikes.tolist())
    assert [i for i, f in enumerate(flagged) if f[1]] == [120]
    assert not any(f[0] for f in flagged)
    single = EMAZScore()
    run(single, a)
    assert float(joint.mean[0]) == pytest.approx(float(single.mean), rel=1e-12)


def test_agrees_with_the_zclip_package():
    zclip = pytest.importorskip("zclip", reason="zclip is not installed (pip install zclip) - nothing to compare with")
    values = noisy_sequence(400, seed=9, trend=0.5)
    for i in (60, 61, 200, 333):
        values[i] *= 8
    reference = zclip.ZClip(alpha=0.97, z_thresh=2.5, max_grad_norm=None, eps=1e-6, warmup_steps=25)
    param = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    ours = EMAZScore(
        alpha=0.97, z_threshold=2.5, warmup_steps=25, spike_update="clip", min_relative_std=0.0, log_scale=False
    )
    for step, v in enumerate(values):
        expected = reference._compute_positive_zscore(float(v))[0] if reference.initialized else 0.0
        param.grad = torch.tensor([float(v)], dtype=torch.float64)
        reference.step(torch.nn.ModuleList([torch.nn.Module()]).register_parameter("p", param) or _Holder(param))
        z, _, _ = ours.update(v)
        assert float(z) == pytest.approx(expected, rel=1e-9, abs=1e-9), f"step {step}"


class _Holder(torch.nn.Module):
    def __init__(self, param):
        super().__init__()
        self.p = param


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"alpha": 1.0}, ValueError, "`alpha` must be < 1, got 1.0"),
        ({"alpha": 0.0}, ValueError, "`alpha` must be > 0.0, got 0.0"),
        ({"z_threshold": -1}, ValueError, "`z_threshold` must be > 0.0, got -1.0"),
        ({"warmup_steps": 0}, ValueError, "`warmup_steps` must be an int >= 1, got 0"),
        ({"spike_update": "drop"}, ValueError, "`spike_update` must be one of"),
        ({"min_relative_std": -0.1}, ValueError, "`min_relative_std` must be >= 0.0, got -0.1"),
        ({"reanchor_steps": 0}, ValueError, "`reanchor_steps` must be an int >= 1, got 0"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        EMAZScore(**kwargs)


@pytest.mark.parametrize("spike_update", ["skip", "clip", "raw"])
@pytest.mark.parametrize("log_scale", [True, False])
def test_host_float_path_equals_tensor_path(spike_update, log_scale):
    values = noisy_sequence(300, seed=10, trend=0.7).tolist()
    values[100] *= 30
    for i in range(200, 206):  # a streak of spikes that re-anchors
        values[i] *= 40
    values[150] = float("nan")
    values[20] = float("inf")
    values[120] = values[10] = 0.0  # skipped on the log scale, an ordinary value on the linear one
    kwargs = {"spike_update": spike_update, "log_scale": log_scale, "warmup_steps": 30, "reanchor_steps": 3}
    host, device_like = EMAZScore(**kwargs), EMAZScore(shape=(1,), **kwargs)  # shape (1,) takes the tensor path
    assert host.on_host
    assert not device_like.on_host
    for v in values:
        z_host, spike_host, bad_host = host.update_float(v)
        z, spike, bad = device_like.update(torch.tensor([v], dtype=torch.float64))
        assert z_host == pytest.approx(float(z), rel=1e-12, abs=1e-12)
        assert (spike_host, bad_host) == (bool(spike), bool(bad))
    assert float(host.mean) == pytest.approx(float(device_like.mean), rel=1e-12)
    moved = EMAZScore(**kwargs)
    moved.load_state_dict(device_like.state_dict())
    assert float(moved.var) == pytest.approx(float(device_like.var), rel=1e-12)


@pytest.mark.parametrize("spike_update", ["skip", "clip"])
def test_a_lasting_level_shift_re_anchors_the_baseline(spike_update):
    # a permanent 3x jump at 10 % noise: without re-anchoring "skip" flagged every one of the 2000 steps after it
    values = noisy_sequence(2200, seed=11, noise=0.1)
    values[200:] *= 3.0
    _, spikes, _ = run(EMAZScore(spike_update=spike_update), values)
    assert spikes[200]
    assert sum(spikes[200:]) <= 10  # the streak that re-anchors it, then the new level is the baseline
    locked = EMAZScore(spike_update="skip", reanchor_steps=None)
    _, spikes_locked, _ = run(locked, values)
    assert sum(spikes_locked[200:]) == 2000
    # after the shift the clip level follows the new level (no permanent learning-rate cut)
    shifted = EMAZScore(spike_update=spike_update)
    run(shifted, values)
    assert float(shifted.clip_value()) > 3.0


def test_re_anchoring_is_the_mean_of_the_streak_by_hand():
    detector = EMAZScore(warmup_steps=2, reanchor_steps=3, min_relative_std=0.0, eps=0.0)
    for v in (1.0, math.e**0.2):  # mean 0.1, var 0.01 (std 0.1) on the log scale
        detector.update_float(v)
    logs = [1.5, 2.0, 2.5]  # z = 14, 19, 24: three spikes
    for y in logs:
        assert detector.update_float(math.exp(y))[1]
    assert float(detector.mean) == pytest.approx(sum(logs) / 3, rel=1e-12)
    assert float(detector.var) == pytest.approx(0.01, rel=1e-9)  # the noise level is kept
    z, spike, _ = detector.update_float(math.exp(2.0))
    assert not spike and z == pytest.approx(0.0, abs=1e-9)


def test_ratio_float_is_the_value_over_the_baseline_that_judges_it():
    detector = EMAZScore(warmup_steps=2)
    for v in (1.0, math.e**0.2):  # mean of the logs 0.1
        detector.update_float(v)
    assert detector.ratio_float(5.0) == pytest.approx(5.0 / math.exp(0.1), rel=1e-12)
    assert detector.ratio_float(0.0) == 0.0 and math.isnan(detector.ratio_float(-1.0))
    linear = EMAZScore(warmup_steps=2, log_scale=False)
    for v in (1.0, 3.0):
        linear.update_float(v)
    assert linear.ratio_float(6.0) == pytest.approx(3.0)
    with pytest.raises(RuntimeError, match="`ratio_float` needs a scalar detector on the CPU"):
        EMAZScore(shape=(2,)).ratio_float(1.0)
