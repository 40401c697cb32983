import math

import pytest

from lightning_landscape.core.alerts import Alert, ConsecutiveAboveRule, DropFromMaxRule, RelativeJumpRule


def test_consecutive_rule_fires_once_per_excursion_and_round_trips():
    rule = ConsecutiveAboveRule(1.0, patience=2)
    fired = [rule.update(v) for v in [1.2, 0.5, 1.1, 1.3, 1.4, 0.9, 2.0, 2.0]]
    assert fired == [False, False, False, True, False, False, False, True]
    clone = ConsecutiveAboveRule(1.0, patience=2)
    rule.update(3.0)
    clone.load_state_dict(rule.state_dict())
    assert clone.streak == rule.streak == 3
    assert not rule.update(math.nan)
    assert rule.streak == 0


# eos_ratio every 10 steps from step 10 (notes/curvature.md, "Follow-up"): a healthy AdamW nanoGPT (lr 3e-3) and
# the start of two AdamW runs that diverge later (benchmarks/early_warning.py gpt-sdpa-high-lr, transformer-high-lr)
HEALTHY_ADAM = [0.178, 1.672, 1.346, 0.2197, 0.1429, 0.1298, 0.1891, 0.1178, 0.3812]
GPT_SDPA_HIGH_LR = [0.249, 3.09, 2.21, 2.9, 5.1, 76.9]
TRANSFORMER_HIGH_LR = [1.11, 7.39, 1.26, 3.21, 8.24]


def test_consecutive_rule_with_peak_skips_a_healthy_adam_bump_and_keeps_the_early_warnings():
    def fired(values, peak):
        rule = ConsecutiveAboveRule(1.0, patience=2)
        return [i for i, v in enumerate(values) if rule.update(v, peak)]

    assert fired(HEALTHY_ADAM, None) == [2]  # the false alarm at step 30
    assert fired(HEALTHY_ADAM, 2.25) == []
    # the peak does not delay these: both fire at the same measurement as without it
    assert fired(GPT_SDPA_HIGH_LR, 2.25) == fired(GPT_SDPA_HIGH_LR, None) == [2]
    assert fired(TRANSFORMER_HIGH_LR, 2.25) == fired(TRANSFORMER_HIGH_LR, None) == [1]
    # patience reached first, peak later in the same streak: fires when the peak is reached, once
    assert fired([1.2, 1.3, 1.5, 2.5, 3.0, 0.5, 1.2, 2.6], 2.25) == [3, 7]


def test_consecutive_rule_peak_state_round_trips_and_reads_old_checkpoints():
    rule = ConsecutiveAboveRule(1.0, patience=2)
    for v in [1.5, 1.6]:
        rule.update(v, 2.0)
    clone = ConsecutiveAboveRule(1.0, patience=2)
    clone.load_state_dict(rule.state_dict())
    assert (clone.streak, clone.streak_max, clone.fired) == (2, 1.6, False)
    assert clone.update(2.1, 2.0) and not clone.update(2.2, 2.0)
    old = ConsecutiveAboveRule(1.0, patience=2)
    old.load_state_dict({"streak": 3})  # a checkpoint from before the peak: that streak has fired already
    assert old.fired and not old.update(1.5)


def test_jump_rule():
    rule = RelativeJumpRule(1.0)
    assert rule.threshold == math.inf
    assert [rule.update(v) for v in [1.0, 1.9, 4.0, 4.1]] == [False, False, True, False]
    clone = RelativeJumpRule(1.0)
    clone.load_state_dict(rule.state_dict())
    assert clone.threshold == pytest.approx(8.2)


def test_alert_round_trip_and_bad_rules():
    alert = Alert(3, "edge_of_stability", "HessianMonitor", "landscape/hessian/eos_ratio", 1.2, 1.0, "msg")
    assert Alert.from_dict(alert.to_dict()) == alert
    with pytest.raises(ValueError, match="`patience` must be an int >= 1, got 0"):
        ConsecutiveAboveRule(1.0, patience=0)
    with pytest.raises(ValueError, match="`jump` must be > 0.0, got -1.0"):
        RelativeJumpRule(-1.0)
    with pytest.raises(TypeError, match="`threshold` must be a real number"):
        ConsecutiveAboveRule("1")


def test_drop_from_max_rule():
    rule = DropFromMaxRule(fraction=0.5, window=3)
    fired = [rule.update(v) for v in [10, 12, 11, 5.9, 5.0, 4.0, 9.0, 2.0]]
    # 5.9 < 0.5 * 12 fires; still collapsed at 5.0 (window max 11); 4.0 < 0.5*11? no -> window [5.9,5,4] re-arms;
    # 2.0 < 0.5 * 9 fires again
    assert fired == [False, False, False, True, False, False, False, True]
    clone = DropFromMaxRule(fraction=0.5, window=3)
    clone.load_state_dict(rule.state_dict())
    assert clone.history == rule.history
    with pytest.raises(ValueError, match="`window` must be an int >= 2, got 1"):
        DropFromMaxRule(window=1)


def test_every_alert_kind_raised_in_the_code_is_listed():
    import re
    from pathlib import Path

    from lightning_landscape.core.alerts import ALERT_KINDS

    root = Path(__file__).resolve().parents[2] / "lightning_landscape" / "callbacks"
    source = "\n".join(path.read_text() for path in root.glob("*.py"))
    raised = set(re.findall(r'kind="([a-z_]+)"', source)) | set(
        re.findall(r'_alert\(\s*trainer,\s*step,\s*"([a-z_]+)"', source)
    )
    raised |= set(re.findall(r'Alert\(\s*step,\s*"([a-z_]+)"', source))
    assert raised, "the patterns no longer find the alert kinds"
    assert raised <= set(ALERT_KINDS), raised - set(ALERT_KINDS)
