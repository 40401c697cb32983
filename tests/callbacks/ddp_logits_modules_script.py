"""Run by tests/callbacks/test_logits_ddp.py: LogitMonitor on two CPU processes over gloo, where only rank 0 runs the
second attention module (the ranks record different module sets)."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import LogitMonitor
from tests.callbacks.ddp_logits_script import DumpBatch
from tests.helpers.ddp import DumpMeasurement, ddp_trainer


class TwoAttentions(pl.LightningModule):
    """Embedding, ``attn_a``, ``attn_b`` (on rank 0 only), a linear head; next-token cross-entropy."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.attn_a = nn.MultiheadAttention(8, 2, batch_first=True)
        self.attn_b = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 11)
        self.tokens = torch.randint(0, 11, (32, 7), generator=torch.Generator().manual_seed(5))

    def forward(self, tokens, second: bool):
        h = self.embed(tokens)
        h = h + self.attn_a(h, h, h, need_weights=False)[0]
        if second:
            h = h + self.attn_b(h, h, h, need_weights=False)[0]
        return self.head(h)

    def training_step(self, batch, batch_idx):
        (window,) = batch
        logits = self(window[:, :-1], second=self.global_rank == 0)
        return nn.functional.cross_entropy(logits.reshape(-1, 11), window[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.tokens), batch_size=4)


def main(out: Path) -> None:
    pl.seed_everything(3)
    # two probe batches: the measurement due at step 0 waits for the probe set and reads step 1's forward
    monitor = LogitMonitor(every_n_steps=100, num_probe_batches=2)
    callbacks = [DumpMeasurement(out, monitor), DumpBatch(out), monitor]
    trainer = ddp_trainer(out, callbacks, max_steps=2, precision="64-true", strategy="ddp_find_unused_parameters_true")
    trainer.fit(TwoAttentions())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
