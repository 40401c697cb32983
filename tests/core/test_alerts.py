import math

import pytest

from lightning_landscape.core.alerts import Alert, ConsecutiveAboveRule, RelativeJumpRule


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
