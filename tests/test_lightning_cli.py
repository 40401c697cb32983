"""LandscapeMonitor is configurable from LightningCLI YAML (its type hints are jsonargparse-friendly)."""

import pytest

from lightning_landscape import LandscapeMonitor
from tests.helpers.lightning import ClassifierModule

CONFIG = """
trainer:
  max_steps: 6
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  callbacks:
    - class_path: lightning_landscape.LandscapeMonitor
      init_args:
        hessian:
          top_k: 2
          every_n_steps: 5
        rank:
          every_n_steps: 5
        connectivity: false
        logits:
          attention_logit_threshold: 40.0
        num_probe_batches: 1
        max_overhead: null  # exact cadences, so the 5-step cadence runs in this short fit
        on_alert: [warn, stop]
"""


def test_landscape_monitor_from_yaml(tmp_path):
    pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse (in the dev extra)")
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    cli = LightningCLI(ClassifierModule, run=False, args=["--config", str(config)], save_config_callback=None)
    cli.trainer.fit(cli.model)
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, LandscapeMonitor))
    assert sorted(monitor.parts) == ["grad_spikes", "hessian", "logits", "rank"]
    assert monitor.parts["logits"].attention_logit_threshold == 40.0
    assert monitor.parts["hessian"].top_k == 2
    assert monitor.parts["rank"].on_alert == ["warn", "stop"]
    assert "landscape/hessian/eig_2" in monitor.last_metrics
