"""LightningCLI: the saved ``config.yaml`` of a run with LandscapeMonitor reloads to the same monitor arguments."""

from __future__ import annotations

import pytest
import yaml

from lightning_landscape import LandscapeMonitor
from tests.helpers.real_models import NanoGPT

pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse (in the dev extra)")


def record_alert(alert) -> None:
    """An ``on_alert`` callable, referenced by import path from YAML."""


CONFIG = """
seed_everything: 0
model:
  n_embd: 32
  num_windows: 64
trainer:
  max_steps: 4
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_landscape.LandscapeMonitor
      init_args:
        hessian:
          top_k: 2
          every_n_steps: 2
          trace: true
        grad_spikes:
          z_threshold: 5.0
        rank: false
        connectivity:
          every_n_steps: 3
          num_alphas: 5
        logits:
          attention_logit_threshold: 40.0
        loss_fn: tests.helpers.real_models.lm_loss_fn
        num_probe_batches: 1
        mode: eval
        seed: 3
        prefix: compat
        max_overhead: null
        on_alert: [warn, checkpoint]
"""

# The other argument types: a callable action (by import path), no loss_fn (null), a part's list and mapping
# arguments. (A list mixing action names and callables works from Python only: jsonargparse cannot write such a list
# back into the saved config; the README says so.)
CONFIG_CALLABLE = (
    CONFIG.replace("on_alert: [warn, checkpoint]", "on_alert: tests.compat.test_cli_roundtrip.record_alert")
    .replace("loss_fn: tests.helpers.real_models.lm_loss_fn", "loss_fn: null")
    .replace("rank: false", "rank:\n          modules: [net.lm_head]\n          every_n_steps: 2")
    .replace("z_threshold: 5.0", "z_threshold: 5.0\n          groups: {blocks: 'net\\.h', embeddings: 'net\\.w'}")
)


def _cli(config, root):
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI(
        NanoGPT,
        run=False,
        args=["--config", str(config), f"--trainer.default_root_dir={root}"],
        save_config_kwargs={"overwrite": True},
    )


def _monitor(cli) -> LandscapeMonitor:
    return next(c for c in cli.trainer.callbacks if isinstance(c, LandscapeMonitor))


def _arguments(monitor: LandscapeMonitor) -> dict:
    """What the user configured, as the parts hold it."""
    out = {"parts": sorted(monitor.parts), "max_overhead": monitor.max_overhead, "prefix": monitor.prefix}
    for name, part in monitor.parts.items():
        out[name] = {
            "on_alert": part.on_alert,
            "every_n_steps": getattr(part, "every_n_steps", None),
            "loss_fn": getattr(part, "loss_fn", None),
            "seed": getattr(part, "seed", None),
        }
    hessian, logits, lmc = monitor.parts["hessian"], monitor.parts["logits"], monitor.parts["connectivity"]
    out["hessian_top_k"], out["hessian_trace"] = hessian.top_k, hessian.trace
    out["logits_threshold"], out["lmc_alphas"] = logits.attention_logit_threshold, lmc.num_alphas
    out["z_threshold"] = monitor.parts["grad_spikes"].z_threshold
    if "rank" in monitor.parts:
        out["rank_modules"] = monitor.parts["rank"].modules
    out["groups"] = monitor.parts["grad_spikes"].groups
    return out


@pytest.mark.parametrize(
    ("text", "actions"),
    [(CONFIG, ["warn", "checkpoint"]), (CONFIG_CALLABLE, None)],
    ids=["action_list", "callable_action"],
)
def test_saved_config_reloads_to_the_same_monitor(tmp_path, text, actions):
    config = tmp_path / "in.yaml"
    config.write_text(text)
    first = _cli(config, tmp_path / "run1")
    first.trainer.fit(first.model)
    saved = tmp_path / "run1" / "config.yaml"
    assert saved.is_file(), sorted(p.name for p in (tmp_path / "run1").iterdir())
    text = saved.read_text()
    unserialized = [line for line in text.splitlines() if "Unable to serialize" in line]
    assert not unserialized, unserialized
    callbacks = yaml.safe_load(text)["trainer"]["callbacks"]
    init = next(c for c in callbacks if c["class_path"].endswith("LandscapeMonitor"))["init_args"]
    if actions is not None:
        assert init["on_alert"] == actions, init

    second = _cli(saved, tmp_path / "run2")
    assert _arguments(_monitor(second)) == _arguments(_monitor(first))
    expected = actions if actions is not None else [record_alert]
    assert list(_monitor(second).parts["hessian"].on_alert) == expected
    second.trainer.fit(second.model)
    # AdamW: the latest measurement is the preconditioned one (the raw spectrum, eig_1..top_k, every
    # `raw_sharpness_every` measurements and before the first step), so check what every measurement logs
    assert "compat/hessian/eos_sharpness" in _monitor(second).last_metrics
