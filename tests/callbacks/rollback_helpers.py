"""Tiny seeded pieces for the rescue-action tests: a model, a monitor that alerts at chosen steps, a state recorder."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape.callbacks._base import LandscapeCallback
from lightning_landscape.core.alerts import Alert
from tests.helpers.real_models import make_trainer


class Regression(pl.LightningModule):
    """4 -> 8 -> 1 MLP with BatchNorm (float64) on a fixed set, 8 batches an epoch, no shuffling (so a resumed run sees
    the same batches)."""

    def __init__(
        self,
        optimizer: str = "adam",
        scheduler: str | None = "lambda",
        lr: float = 0.05,
        dtype: torch.dtype = torch.float64,
        same_batches: bool = False,
    ) -> None:
        super().__init__()
        self.optimizer, self.scheduler, self.lr = optimizer, scheduler, lr
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(64, 4, generator=g, dtype=dtype)
        if same_batches:  # every batch the same: a resume at an epoch's end re-reads one batch (Lightning), harmlessly
            self.x = self.x[:8].repeat(8, 1)
        self.y = self.x @ torch.randn(4, 1, generator=g, dtype=dtype) + 0.1

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        if self.optimizer == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        else:
            optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if self.scheduler is None:
            return optimizer
        if self.scheduler == "lambda":
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.97**s)
        else:
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=200)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8, shuffle=False)


class ScriptedMonitor(LandscapeCallback):
    """Raises an alert at the chosen steps, from ``on_before_optimizer_step`` (about the current step, like
    GradientSpikeMonitor) or from ``on_train_batch_end``; decides in ``on_train_batch_end`` (a safe point). Its own
    state (``ticks``, one per step) is part of the rollback snapshot."""

    group = "scripted"

    def __init__(self, alert_steps=(), hook: str = "on_before_optimizer_step", ranks=None, **kwargs: Any) -> None:
        super().__init__(every_n_steps=1, **kwargs)
        self.alert_steps, self.hook, self.ranks = set(alert_steps), hook, ranks
        self.ticks = 0
        self._fired = False

    def _monitor_state_dict(self) -> dict[str, Any]:
        return {"ticks": self.ticks}

    def _load_monitor_state_dict(self, state: dict[str, Any]) -> None:
        self.ticks = int(state.get("ticks", 0))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pass  # no probe set, no measurement

    def _maybe_alert(self, trainer, step: int) -> None:
        if step in self.alert_steps and (self.ranks is None or trainer.global_rank in self.ranks):
            self._fired = True
            self.emit_alert(trainer, Alert(step, "grad_spike", "ScriptedMonitor", "x", 1.0, 0.0, "scripted"))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.ticks += 1
        if self.hook == "on_before_optimizer_step":
            self._maybe_alert(trainer, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.hook == "on_train_batch_end":
            self._maybe_alert(trainer, trainer.global_step - 1)
        fired, self._fired = self._fired, False
        self.decide_stop(trainer, fired)


class Recorder(pl.Callback):
    """Deep copies of the weights, optimizer and scheduler state at ``on_train_batch_end``, by ``global_step``
    (placed before the monitor: the state the monitor sees; after it: the state it leaves)."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, Any]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states[trainer.global_step] = {
            "model": copy.deepcopy(pl_module.state_dict()),
            "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
            "schedulers": [copy.deepcopy(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs],
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
        }


def assert_tensors_equal(a: Any, b: Any, path: str = "") -> None:
    """Bitwise equality of nested dicts/lists of tensors and numbers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            assert_tensors_equal(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_tensors_equal(x, y, f"{path}/{i}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def trainer_for(tmp_path, callbacks, max_steps: int, **kwargs: Any) -> pl.Trainer:
    """The quiet CPU Trainer of tests/helpers/real_models.py, deterministic, without reseeding the RNGs (the tests
    seed before building their models) and with Lightning's default ``log_every_n_steps``."""
    settings = {"seed": None, "deterministic": True, "log_every_n_steps": 50, "num_sanity_val_steps": 2}
    return make_trainer(tmp_path, callbacks, max_steps, **{**settings, **kwargs})
