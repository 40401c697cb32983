"""LogitMonitor's softmax collapse: the logged fraction is a hand count in the loss dtype, the alert's threshold is
strict and edge-triggered, and training is bitwise untouched."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import LogitMonitor
from tests.helpers.lightning import make_trainer

KEY = "landscape/logits/output/softmax_collapse"


class Gapped(pl.LightningModule):
    """A square head, initialised to the identity, over fixed logits whose top class leads the other four by
    ``gaps``; cross-entropy against the top class (so a saturated row's gradient is exactly 0)."""

    def __init__(self, gaps: list[float], lr: float = 0.0, batch_size: int = 8) -> None:
        super().__init__()
        self.lr, self.batch_size = lr, batch_size
        self.head = nn.Linear(5, 5, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(5))
        self.logits = torch.zeros(len(gaps), 5)
        self.logits[:, 1] = torch.tensor(gaps)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        out = self.head(x)
        return nn.functional.cross_entropy(out, out.detach().argmax(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.logits), batch_size=self.batch_size)


def _hand(logits: torch.Tensor, dtype: torch.dtype) -> float:
    return float((torch.softmax(logits.to(dtype), -1).amax(-1) == 1).double().mean())


def test_under_bf16_autocast_the_fraction_is_counted_in_float32_where_the_loss_runs(tmp_path):
    # gap 12: saturated in bfloat16 (4 e^-12 is far below its 2^-9) but not in float32, where cross-entropy runs
    # under autocast; gap 40 saturates in both
    model = Gapped([40.0, 12.0, 12.0, 0.5] * 2)
    assert _hand(model.logits, torch.bfloat16) == 0.75 and _hand(model.logits, torch.float32) == 0.25
    monitor = LogitMonitor(every_n_steps=1)
    make_trainer(tmp_path, [monitor], max_steps=1, precision="bf16-mixed").fit(model)
    assert monitor.last_metrics[KEY] == 0.25


@pytest.mark.parametrize(("fraction", "fires"), [(0.24, True), (0.25, False), (0.0, True), (0.5, False)])
def test_the_alert_fires_strictly_above_its_fraction(tmp_path, fraction, fires):
    model = Gapped([40.0, 2.0, 12.0, 2.0] * 2)  # a quarter of the rows saturate
    alerts = []
    monitor = LogitMonitor(every_n_steps=1, on_alert=alerts.append, softmax_collapse_fraction=fraction)
    make_trainer(tmp_path, [monitor], max_steps=2).fit(model)
    assert monitor.last_metrics[KEY] == 0.25
    assert [(a.step, a.kind, a.metric, a.value, a.threshold) for a in alerts] == (
        [(0, "softmax_collapse", KEY, 0.25, fraction)] if fires else []
    )


def test_the_alert_rearms_when_the_fraction_falls_back(tmp_path):
    # batches of 4: [saturated x2, not x2], [not x4], [saturated x2, not x2]: 0.5, 0, 0.5
    model = Gapped([40.0, 40.0, 2.0, 2.0] + [2.0] * 4 + [40.0, 40.0, 2.0, 2.0], batch_size=4)
    alerts = []
    monitor = LogitMonitor(every_n_steps=1, on_alert=alerts.append, softmax_collapse_fraction=0.3)
    make_trainer(tmp_path, [monitor], max_steps=3).fit(model)
    assert [(a.step, a.value) for a in alerts] == [(0, 0.5), (2, 0.5)]


def test_training_is_bitwise_untouched_while_rows_collapse(tmp_path):
    def run(callbacks):
        pl.seed_everything(3)
        model = Gapped([20.0, 3.0, 1.0, 17.0, 40.0, 0.0, 8.0, 30.0] * 2, lr=0.5)
        make_trainer(tmp_path, callbacks, max_steps=8).fit(model)
        return model.head.weight.detach().clone(), torch.get_rng_state()

    plain, rng = run([])
    alerts = []
    monitor = LogitMonitor(every_n_steps=1, on_alert=alerts.append, softmax_collapse_fraction=0.1)
    watched, rng2 = run([monitor])
    assert alerts and monitor.num_measurements == 8  # it measured and alerted
    assert torch.equal(plain, watched) and torch.equal(rng, rng2)
    assert not watched.equal(torch.eye(5))  # and training did move the weights
