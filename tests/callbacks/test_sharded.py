"""Sharded strategies: curvature, rank and connectivity refuse with a message; gradient norms add shard squares."""

import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from lightning_landscape import EffectiveRankMonitor, GradientSpikeMonitor, HessianMonitor, ModeConnectivityMonitor
from lightning_landscape.callbacks._base import is_sharded
from tests.helpers.lightning import ClassifierModule, make_trainer


def fake_trainer(strategy):
    return SimpleNamespace(strategy=strategy, log_dir=None, default_root_dir=".")


@pytest.mark.parametrize("monitor_cls", [HessianMonitor, EffectiveRankMonitor, ModeConnectivityMonitor])
def test_full_parameter_monitors_refuse_fsdp_with_a_message(monitor_cls):
    with pytest.raises(ValueError, match=f"{monitor_cls.__name__} needs every parameter whole.*FSDPStrategy.*ddp"):
        monitor_cls().setup(fake_trainer(FSDPStrategy()), ClassifierModule(), "fit")
    monitor_cls().setup(fake_trainer(DDPStrategy()), ClassifierModule(), "fit")  # DDP is fine


def test_is_sharded():
    assert is_sharded(FSDPStrategy())
    assert not is_sharded(DDPStrategy())


def test_gradient_monitor_reduces_shard_squares_when_sharded(tmp_path, monkeypatch):
    calls = []
    import lightning_landscape.callbacks.grad_spikes as module

    def fake_reduce(tensor):
        calls.append(tensor.shape)
        return tensor  # one process: the sum over shards is the local value

    monkeypatch.setattr(module, "is_sharded", lambda strategy: True)
    monkeypatch.setattr(module.distributed, "all_reduce_sum", fake_reduce)
    monitor = GradientSpikeMonitor(warmup_steps=2)
    make_trainer(tmp_path, [monitor], max_steps=3).fit(ClassifierModule(batchnorm=False))
    assert len(calls) == 3  # one collective of the per-parameter squares per step
    # 2 Linear layers x (weight, bias), and on a logged step nlm_alignment's <g, theta> and ||theta||^2 with them
    # (every step of this run is logged: log_every_n_steps=1)
    assert calls == [(6,)] * 3


def test_sharded_nlm_alignment_equals_the_unsharded_value(tmp_path, monkeypatch):
    import lightning_landscape.callbacks.grad_spikes as module

    plain = GradientSpikeMonitor(warmup_steps=2)
    torch.manual_seed(0)
    make_trainer(tmp_path / "plain", [plain], max_steps=3).fit(ClassifierModule(batchnorm=False))
    monkeypatch.setattr(module, "is_sharded", lambda strategy: True)
    monkeypatch.setattr(module.distributed, "all_reduce_sum", lambda tensor: tensor)  # one shard: the whole
    sharded = GradientSpikeMonitor(warmup_steps=2)
    torch.manual_seed(0)
    make_trainer(tmp_path / "sharded", [sharded], max_steps=3).fit(ClassifierModule(batchnorm=False))
    key = "landscape/grad/nlm_alignment"
    assert key in sharded.last_metrics and math.isfinite(sharded.last_metrics[key])
    assert sharded.last_metrics[key] == pytest.approx(plain.last_metrics[key], rel=1e-12)
    assert sharded.last_metrics["landscape/grad/norm"] == pytest.approx(plain.last_metrics["landscape/grad/norm"])
