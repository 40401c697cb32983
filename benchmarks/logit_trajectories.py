"""Largest attention logit over training, healthy vs unstable real models (chooses the attention_logit_growth rule).

Usage: ``PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/logit_trajectories.py [--steps 300] [--every 5] [NAME ...]``
Prints one line per run: ``name: step:max ...`` (``p/logits/attention/max`` as LogitMonitor logs it), the loss at the
first and last step, and the first step with a non-finite loss or a loss above 1.5x the first.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lightning_landscape import LogitMonitor  # noqa: E402
from tests.helpers.real_models import HFGPT2, DemoTransformer, NanoGPT  # noqa: E402

RUNS = {
    "nanogpt_safe": lambda: NanoGPT(lr=3e-3),
    "nanogpt_safe_warmup": lambda: NanoGPT(lr=3e-3, warmup_steps=20, dropout=0.1),
    "hf_eager": lambda: HFGPT2("eager"),
    "hf_sdpa": lambda: HFGPT2("sdpa"),
    "demo": lambda: DemoTransformer(),
    "nanogpt_lr0.1": lambda: NanoGPT(lr=0.1, warmup_steps=20),
    "nanogpt_lr0.3": lambda: NanoGPT(lr=0.3, warmup_steps=20),
    "nanogpt_lr0.03": lambda: NanoGPT(lr=0.03, warmup_steps=20),
    "char_lr0.1": lambda: _char_lm(0.1),
    "char_lr3e-3": lambda: _char_lm(3e-3),
}


def _char_lm(lr: float, steps: int = 150) -> pl.LightningModule:
    """examples/transformer_instability.py's character transformer (full mode: 150 steps, warm-up 50)."""
    sys.path.insert(0, str(ROOT / "examples"))
    from transformer_instability import CharLM

    return CharLM(lr, steps)


class Record(pl.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step - 1] = float(outputs["loss"] if isinstance(outputs, dict) else outputs)


def run(name: str, steps: int, every: int) -> None:
    pl.seed_everything(0)
    maxima: dict[int, float] = {}
    modules: dict[str, dict[int, float]] = {}
    monitor = LogitMonitor(every_n_steps=every, attention_logit_threshold=1e9, on_alert="ignore")
    metrics = monitor._metrics

    def recording(trainer, read, step):
        out = metrics(trainer, read, step)
        value = out.get(f"{monitor.prefix}/logits/attention/max")
        if value is not None:
            maxima[step] = value
        for key, v in out.items():
            if key.endswith("/max") and key != f"{monitor.prefix}/logits/attention/max":
                modules.setdefault(key.split("/attention/")[1][: -len("/max")], {})[step] = v
        return out

    monitor._metrics = recording
    record = Record()
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        callbacks=[monitor, record],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    try:
        trainer.fit(RUNS[name]())
    except FloatingPointError as error:
        print(f"  ({name}: stopped: {error})")
    losses = record.losses
    first = losses.get(0)
    bad = next((s for s, v in sorted(losses.items()) if s >= 10 and (not math.isfinite(v) or v > 1.5 * first)), None)
    last = max(losses) if losses else None
    print(f"{name}: loss {first:.3f} -> {losses[last]:.3f} (step {last}), divergence {bad}")
    print("  " + " ".join(f"{s}:{v:.1f}" for s, v in sorted(maxima.items())), flush=True)
    for module, values in sorted(modules.items()):
        first = values[min(values)]
        peak_step = max(values, key=values.get)
        print(
            f"  {module}: first {first:.2f}, peak {values[peak_step]:.1f} at {peak_step} ({values[peak_step] / first:.3g}x)"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("names", nargs="*", default=list(RUNS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.names:
        run(name, args.steps, args.every)


if __name__ == "__main__":
    main()
