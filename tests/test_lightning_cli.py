"""LandscapeMonitor is configurable from LightningCLI YAML (its type hints are jsonargparse-friendly)."""

import pytest
import torch

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


# Every monitor with a non-default value for every argument type it takes (strings, ints, floats, bools, None, lists
# of names, regexes, module types, mappings, callables by import path): SaveConfigCallback writes
# `parser.dump(config, skip_none=False)`; reloading that file must give the same arguments.
ROUND_TRIP = """
trainer:
  max_steps: 1
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  callbacks:
    - class_path: lightning_landscape.HessianMonitor
      init_args:
        top_k: 2
        trace: true
        params: [net.0.weight, net.4.weight]
        tol: 0.01
        backend: double_backward
        eos_patience: 3
        batch_size_fn: tests.test_lightning_cli.batch_size
        loss_fn: tests.helpers.lightning.loss_of
        on_alert: [warn, checkpoint]
        seed: 7
        max_overhead: 0.1
        prefix: hess
    - class_path: lightning_landscape.LogitMonitor
      init_args:
        attention: false
        output_module: net.4
        alignment: [net.0]
        log_partition_drift: 2.0
        on_alert: tests.test_lightning_cli.record_alert
        prefix: logit
    - class_path: lightning_landscape.EffectiveRankMonitor
      init_args:
        modules: torch.nn.Linear
        weights: false
        collapse_fraction: 0.5
        mode: train
        on_alert: [warn, stop]
        prefix: rank_types
    - class_path: lightning_landscape.EffectiveRankMonitor
      init_args:
        modules: ["net.0", "net.4"]
        prefix: rank_names
    - class_path: lightning_landscape.ModeConnectivityMonitor
      init_args:
        num_alphas: 5
        bn_policy: interpolate
        barrier_patience: 3
        relative: true
        error_fn: tests.test_lightning_cli.error_rate
        batch_size_fn: tests.test_lightning_cli.batch_size
        on_alert: ignore
        prefix: lmc
    - class_path: lightning_landscape.LandscapeMonitor
      init_args:
        hessian: {"top_k": 2, "params": "net\\\\.0"}
        grad_spikes: false
        rank: {"modules": "net\\\\.4"}
        connectivity: true
        logits: false
        num_probe_batches: 2
        max_overhead: null
        on_alert: raise
        prefix: bundle
"""


def batch_size(batch):
    return len(batch[0])


def error_rate(module, batch):
    x, y = batch
    return (module(x).argmax(1) != y).double().mean()


def record_alert(alert):
    return None


def _cli(args):
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI(ClassifierModule, run=False, args=args, save_config_callback=None)


def _callback_arguments(cli):
    return [c.as_dict() for c in cli.config.trainer.callbacks]


def test_every_argument_type_survives_the_saved_config(tmp_path):
    pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse (in the dev extra)")
    config = tmp_path / "config.yaml"
    config.write_text(ROUND_TRIP)
    first = _cli(["--config", str(config)])
    saved = first.parser.dump(first.config, skip_none=False)  # what SaveConfigCallback writes
    assert "Unable to serialize" not in saved
    (tmp_path / "saved.yaml").write_text(saved)
    second = _cli(["--config", str(tmp_path / "saved.yaml")])
    assert _callback_arguments(second) == _callback_arguments(first)
    monitors = {getattr(c, "prefix", None): c for c in second.trainer.callbacks}
    assert monitors["hess"].on_alert == ["warn", "checkpoint"]
    assert monitors["hess"].params == ["net.0.weight", "net.4.weight"]
    assert monitors["hess"].batch_size_fn is batch_size
    assert monitors["logit"].on_alert == [record_alert]
    assert monitors["rank_types"].modules is torch.nn.Linear
    assert monitors["rank_names"].modules == ["net.0", "net.4"]
    assert monitors["lmc"].error_fn is error_rate
    assert monitors["lmc"].barrier_rule.patience == 3
    assert monitors["bundle"].parts["hessian"].top_k == 2
    assert monitors["bundle"].parts["rank"].on_alert == ["raise"]


def test_landscape_monitor_on_alert_list_survives_the_saved_config(tmp_path):
    pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse (in the dev extra)")
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    first = _cli(["--config", str(config)])
    saved = first.parser.dump(first.config, skip_none=False)
    assert "Unable to serialize" not in saved
    (tmp_path / "saved.yaml").write_text(saved)
    second = _cli(["--config", str(tmp_path / "saved.yaml")])
    assert _callback_arguments(second) == _callback_arguments(first)
    assert second.trainer.callbacks[0].parts["rank"].on_alert == ["warn", "stop"]


GRAD_SPIKES = """
trainer:
  max_steps: 1
  accelerator: cpu
  logger: false
  callbacks:
    - class_path: lightning_landscape.GradientSpikeMonitor
      init_args:
        z_threshold: 4.0
        groups: {"first": "net\\\\.0", "last": "net\\\\.4"}
        growth_z: null
        every_n_steps: 3
        on_alert: [warn, stop]
"""


def test_gradient_spike_monitor_survives_the_saved_config(tmp_path):
    pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse (in the dev extra)")
    config = tmp_path / "config.yaml"
    config.write_text(GRAD_SPIKES)
    # jsonargparse passes every inherited argument, defaults included (loss_fn=None, num_probe_batches=4,
    # mode="eval"): GradientSpikeMonitor must accept them at those defaults
    first = _cli(["--config", str(config)])
    saved = first.parser.dump(first.config, skip_none=False)
    assert "Unable to serialize" not in saved
    (tmp_path / "saved.yaml").write_text(saved)
    second = _cli(["--config", str(tmp_path / "saved.yaml")])
    assert _callback_arguments(second) == _callback_arguments(first)
    assert second.trainer.callbacks[0].on_alert == ["warn", "stop"]
