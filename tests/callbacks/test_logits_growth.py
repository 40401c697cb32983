"""The ``attention_logit_growth`` rule: above ``attention_logit_threshold`` AND above ``attention_growth_factor``
times the module's first measured largest logit. Healthy real models whose logits start large raise nothing;
growth still fires (synthetic sequences, an unstable nanoGPT); the baseline survives a checkpoint."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest

from lightning_landscape import LogitMonitor
from tests.helpers.lightning import make_trainer
from tests.helpers.real_models import DemoTransformer, NanoGPT

P = "landscape/logits/attention"


def _fit(tmp_path, model, monitor, max_steps):
    pl.seed_everything(0)
    make_trainer(tmp_path, [monitor], max_steps=max_steps, logger=False).fit(model)


def _feed(monitor, tmp_path, sequence):
    """Feed ``[{module: largest logit}, ...]`` (one dict per measurement) to the alert rule; the alerts received."""
    alerts = []
    monitor._log_root = tmp_path  # where the JSONL alert log goes (set by `setup` in a real fit)
    monitor.on_alert = [alerts.append]
    trainer = make_trainer(tmp_path)
    for step, maxima in enumerate(sequence):
        metrics = {f"{P}/{name}/max": value for name, value in maxima.items()}
        metrics[f"{P}/max"] = max(maxima.values())
        monitor._check_alerts(trainer, metrics, {}, step)
    return alerts


def test_lightning_demo_transformer_raises_no_alert_while_it_learns(tmp_path):
    """Issue 15 item 4: its largest logit is ~90 at initialisation (post-LN, embeddings scaled by sqrt(d)), so the
    absolute rule alone fired at step 0 of this healthy run."""
    alerts = []
    monitor = LogitMonitor(on_alert=alerts.append)  # defaults: every 10 steps, threshold 30, factor 2
    _fit(tmp_path, DemoTransformer(), monitor, max_steps=21)
    assert monitor.num_measurements == 3
    assert monitor.last_metrics[f"{P}/max"] > 60  # far above the absolute threshold the whole time
    assert alerts == []
    # the absolute rule alone reproduces the false alarm
    alerts_absolute = []
    absolute = LogitMonitor(on_alert=alerts_absolute.append, attention_growth_factor=None)
    _fit(tmp_path, DemoTransformer(), absolute, max_steps=1)
    assert [(a.step, a.kind) for a in alerts_absolute] == [(0, "attention_logit_growth")]


def test_unstable_nanogpt_still_alerts_within_ten_steps(tmp_path):
    """nanoGPT warming up to lr 0.3: the largest logit goes from ~0.1 to ~80 in 10 steps (a few hundred by 20)."""
    alerts = []
    monitor = LogitMonitor(on_alert=alerts.append)
    _fit(tmp_path, NanoGPT(lr=0.3, warmup_steps=20), monitor, max_steps=11)
    fired = [a for a in alerts if a.kind == "attention_logit_growth"]
    assert [a.step for a in fired] == [10]
    assert fired[0].value > 30 and fired[0].threshold == 30.0
    assert fired[0].metric.startswith(f"{P}/net.h.") and "qk-layernorm" in fired[0].message
    assert all(b < 1 for b in monitor._attention_baseline.values())


def test_growth_against_each_modules_own_baseline(tmp_path):
    sequence = [
        {"big": 90.0, "small": 0.1},
        {"big": 150.0, "small": 29.0},  # big: 1.67x its start; small: below the absolute level
        {"big": 175.0, "small": 31.0},  # small crosses 30 (and 2 x 0.1)
        {"big": 170.0, "small": 20.0},  # both below their limits: re-armed
        {"big": 181.0, "small": 20.0},  # big crosses 2 x 90
        {"big": 200.0, "small": 40.0},  # still above: edge-triggered, no new alert
    ]
    alerts = _feed(LogitMonitor(), tmp_path, sequence)
    assert [(a.step, a.metric, a.value, a.threshold) for a in alerts] == [
        (2, f"{P}/small/max", 31.0, 30.0),
        (4, f"{P}/big/max", 181.0, 180.0),
    ]
    assert "`big`" in alerts[1].message and "90" in alerts[1].message


@pytest.mark.parametrize(("factor", "steps"), [(None, [0]), (1.5, [2]), (3.0, [])])
def test_growth_factor_sets_the_limit_above_the_threshold(tmp_path, factor, steps):
    sequence = [{"attn": 90.0}, {"attn": 130.0}, {"attn": 140.0}]
    alerts = _feed(LogitMonitor(attention_growth_factor=factor), tmp_path, sequence)
    assert [a.step for a in alerts] == steps


def test_a_module_first_seen_later_gets_its_own_baseline(tmp_path):
    alerts = _feed(LogitMonitor(), tmp_path, [{"a": 1.0}, {"a": 2.0, "late": 50.0}, {"a": 2.0, "late": 90.0}])
    assert alerts == []  # `late` started at 50 (> 30): judged against 2 x 50


def test_baseline_round_trips_through_the_checkpoint(tmp_path):
    monitor = LogitMonitor()
    _feed(monitor, tmp_path, [{"attn": 90.0}])
    state = copy.deepcopy(monitor.state_dict())
    resumed = LogitMonitor()
    resumed.load_state_dict(state)
    assert resumed._attention_baseline == {"attn": 90.0}
    # 181 is growth against the restored baseline of 90; a monitor without it takes 181 as its start
    assert [a.step for a in _feed(resumed, tmp_path, [{"attn": 181.0}])] == [0]
    assert _feed(LogitMonitor(), tmp_path, [{"attn": 181.0}]) == []
