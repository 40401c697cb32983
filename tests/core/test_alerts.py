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
