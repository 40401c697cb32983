"""Run by tests/callbacks/test_rollback_ddp.py: two CPU processes over gloo; only rank 1 raises the alert (from
``on_before_optimizer_step``), both ranks must roll back at the same step to the same snapshot."""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from tests.callbacks.rollback_helpers import Recorder, Regression, ScriptedMonitor
from tests.helpers.ddp import ddp_trainer

ALERT_STEP = 12


class Dump(pl.Callback):
    def __init__(self, out: Path, monitor: ScriptedMonitor, before: Recorder, after: Recorder) -> None:
        self.out, self.monitor, self.before, self.after = out, monitor, before, after

    def on_train_end(self, trainer, pl_module):
        keeper = self.monitor.alerting
        restored_at = ALERT_STEP + 1
        snapshot_step = 11
        torch.save(
            {
                "restored": self.after.states[restored_at],
                "snapshot_time": self.before.states[snapshot_step],
                "final": pl_module.state_dict(),
            },
            self.out / f"states_rank{trainer.global_rank}.pt",
        )
        result = {
            "rollbacks": keeper.rollbacks,
            "snapshot_step": keeper.snapshot_step,
            "global_step": trainer.global_step,
            "alerts": [a.to_dict() for a in self.monitor.alerts],
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main(out: Path) -> None:
    pl.seed_everything(0)
    before, after = Recorder(), Recorder()
    monitor = ScriptedMonitor(
        alert_steps={ALERT_STEP}, ranks={1}, on_alert=["rollback", "ignore"], rollback_every_n_steps=5
    )
    trainer = ddp_trainer(out, [before, monitor, after, Dump(out, monitor, before, after)], max_steps=20)
    trainer.fit(Regression(optimizer="sgd"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
