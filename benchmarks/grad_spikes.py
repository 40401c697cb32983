"""Per-step overhead of GradientSpikeMonitor, A/B interleaved in one run.

Three reference workloads on real data (no downloads): an MLP on scikit-learn's digits, a small CNN on the same
digits as 8x8 images, and a small character-level transformer on the standard library's own source files. Each
repeat trains the same seeded model for ``--steps`` optimizer steps without and with the monitor, alternating
which goes first; the time between ``on_train_start`` and ``on_train_end`` is compared (setup excluded).

    python benchmarks/grad_spikes.py --steps 300 --repeats 5

``--divergence``: the early-warning scenarios of the divergence rule (issue 15), on the real models of
``tests/helpers/real_models.py``: nanoGPT (``F.scaled_dot_product_attention``) with AdamW warmed up to a too-high
learning rate (lr 1.0 over 100 steps: the loss climbs from ~3.2 to 20-60 from step ~57), and healthy 1000-step
controls with one-sample remainder batches at every epoch end (1249 windows, batch 16): nanoGPT and HF GPT-2 with a
100-step warm-up, and Lightning's demo transformer (which memorises the corpus: a very noisy late loss). Reports, for
``GradientSpikeMonitor()`` at its defaults, every alert by kind, the first ``divergence`` alert and the step at which
the loss first passed 1.5x its initial value.

    PYTHONPATH=$PWD python benchmarks/grad_spikes.py --divergence

``--hooks``: the gradient part alone. The time spent inside the monitor's own hooks per step, with
``grad/nlm_alignment`` computed (A) and with its terms stubbed out (B), A/B interleaved, medians of the repeats, at
``every_n_steps=1`` (every step logged: the worst case; at a logging cadence of n the nlm cost is 1/n of the
difference). Then a deterministic count of the host reads (``tolist``/``item``/``float``/``int``/``bool`` of a tensor:
each is a device sync on an accelerator) inside the hooks per step, on the accelerator path (``_defer``) forced on
the CPU, for logged and other steps.

    PYTHONPATH=$PWD python benchmarks/grad_spikes.py --hooks --steps 200 --repeats 5 [--threads 1 --workloads mlp,cnn]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _data import digits_tensors

from lightning_landscape import GradientSpikeMonitor
from lightning_landscape.callbacks import _grad_read
from tests.helpers.real_models import make_trainer


def stdlib_text(num_chars: int = 400_000) -> str:
    root = Path(__import__("os").__file__).parent
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        chunks.append(text)
        total += len(text)
        if total >= num_chars:
            break
    return "".join(chunks)[:num_chars]


class CharTransformer(nn.Module):
    def __init__(self, vocab: int, width: int = 128, layers: int = 2, context: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.blocks(h, mask=self.mask[: tokens.shape[1], : tokens.shape[1]], is_causal=True))


class Workload(pl.LightningModule):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "transformer":
            text = stdlib_text()
            chars = sorted(set(text))
            ids = torch.tensor([chars.index(c) for c in text[:200_000]])
            windows = ids[: (len(ids) // 65) * 65].view(-1, 65)
            self.data = TensorDataset(windows[:, :-1], windows[:, 1:])
            self.net = CharTransformer(len(chars))
            self.batch_size = 32
        else:
            x, y, _, _ = digits_tensors()
            self.data = TensorDataset(x, y)
            self.batch_size = 64
            if kind == "mlp":
                self.net = nn.Sequential(
                    nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
                )
            else:
                self.net = nn.Sequential(
                    nn.Unflatten(1, (1, 8, 8)),
                    nn.Conv2d(1, 32, 3, padding=1),
                    nn.ReLU(),
                    nn.Conv2d(32, 64, 3, padding=1),
                    nn.ReLU(),
                    nn.MaxPool2d(2),
                    nn.Flatten(),
                    nn.Linear(64 * 16, 10),
                )

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True, drop_last=True)


class Clock(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def timed_run(kind: str, steps: int, monitored: bool) -> float:
    clock = Clock()
    callbacks = [clock] + ([GradientSpikeMonitor(on_alert="ignore")] if monitored else [])
    make_trainer(None, callbacks, max_steps=steps, log_every_n_steps=50).fit(Workload(kind))
    return clock.seconds


_HOOKS = ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")
_READS = ("tolist", "item", "__float__", "__int__", "__bool__")


class HookMeter:
    """Wraps the monitor's per-step hooks: their summed time, and the host reads of tensors made inside them."""

    def __init__(self, monitor: GradientSpikeMonitor) -> None:
        self.seconds, self.reads, self._inside = 0.0, {}, False
        for name in _HOOKS:
            hook = getattr(monitor, name)

            def timed(*args, hook=hook):
                self._inside = True
                start = time.perf_counter()
                try:
                    return hook(*args)
                finally:
                    self.seconds += time.perf_counter() - start
                    self._inside = False

            setattr(monitor, name, timed)

    def counting(self):
        """A context manager patching ``torch.Tensor``'s read methods to count the reads inside the hooks, by step
        (``self.step``, set by :class:`StepCounter`)."""
        meter = self

        class Patch:
            def __enter__(self):
                self.saved = {name: getattr(torch.Tensor, name) for name in _READS}
                for name, original in self.saved.items():

                    def read(tensor, *args, original=original):
                        if meter._inside:
                            meter.reads[meter.step] = meter.reads.get(meter.step, 0) + 1
                        return original(tensor, *args)

                    setattr(torch.Tensor, name, read)

            def __exit__(self, *exc):
                for name, original in self.saved.items():
                    setattr(torch.Tensor, name, original)

        return Patch()


class StepCounter(pl.Callback):
    """Listed first: tells the meter which step the following hooks belong to."""

    def __init__(self, meter: HookMeter) -> None:
        self.meter = meter

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.meter.step = trainer.global_step


def hook_seconds(kind: str, steps: int, nlm: bool) -> float:
    """Seconds a step inside the monitor's hooks, every step logged, with or without the nlm terms."""
    monitor = GradientSpikeMonitor(on_alert="ignore", every_n_steps=1)
    meter = HookMeter(monitor)
    original = _grad_read._nlm_terms
    if not nlm:
        _grad_read._nlm_terms = lambda *args: None
    try:
        make_trainer(None, [monitor], max_steps=steps).fit(Workload(kind))
    finally:
        _grad_read._nlm_terms = original
    return meter.seconds / steps


def host_reads(steps: int = 60, every: int = 10, nlm: bool = True) -> dict[str, list[int]]:
    """Host reads per step on the accelerator path (forced on the CPU), logged steps and the others."""
    original = _grad_read._nlm_terms
    if not nlm:
        _grad_read._nlm_terms = lambda *args: None
    try:
        return _host_reads(steps, every)
    finally:
        _grad_read._nlm_terms = original


def _host_reads(steps: int, every: int) -> dict[str, list[int]]:
    monitor = GradientSpikeMonitor(on_alert="ignore", every_n_steps=every)
    monitor._defer = True
    meter = HookMeter(monitor)
    meter.step = -1
    with meter.counting():
        make_trainer(None, [StepCounter(meter), monitor], max_steps=steps).fit(Workload("mlp"))
    logged = sorted({meter.reads.get(s, 0) for s in range(steps) if (s + 1) % every == 0})
    other = sorted({meter.reads.get(s, 0) for s in range(steps) if (s + 1) % every})
    return {"logged": logged, "other": other}


def hooks_table(steps: int, repeats: int, kinds: list[str]) -> None:
    print(
        "| workload | parameters | tensors | hooks, nlm stubbed (ms/step) | hooks, with nlm (ms/step) | nlm (ms/logged step) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for kind in kinds:
        off, on, diffs = [], [], []
        for repeat in range(repeats):
            order = (False, True) if repeat % 2 == 0 else (True, False)
            times = {flag: hook_seconds(kind, steps, flag) for flag in order}
            off.append(times[False])
            on.append(times[True])
            diffs.append(times[True] - times[False])
        params = list(Workload(kind).parameters())
        print(
            f"| {kind} | {sum(p.numel() for p in params):,} | {len(params)} | {statistics.median(off) * 1e3:.3f} | "
            f"{statistics.median(on) * 1e3:.3f} | {statistics.median(diffs) * 1e3:+.3f} |"
        )
    for nlm in (False, True):
        reads = host_reads(nlm=nlm)
        print(
            f"\nhost reads inside the hooks per step, accelerator path forced on the CPU (mlp, every_n_steps=10, "
            f"nlm {'on' if nlm else 'stubbed'}): logged steps {reads['logged']}, other steps {reads['other']}"
        )


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step - 1] = float(outputs["loss"] if isinstance(outputs, dict) else outputs)


def divergence_scenarios() -> None:
    from tests.helpers.real_models import HFGPT2, DemoTransformer, NanoGPT

    data = {"batch_size": 16, "num_windows": 1249}  # 78 batches of 16, then one of 1 sample
    scenarios = [
        ("nanoGPT, AdamW warmed up to lr=1.0 (diverges)", lambda: NanoGPT(lr=1.0, warmup_steps=100, **data), 150),
        ("nanoGPT, lr 3e-3, 100-step warm-up (healthy)", lambda: NanoGPT(warmup_steps=100, **data), 1000),
        ("HF GPT-2, lr 3e-3, 100-step warm-up (healthy)", lambda: HFGPT2(warmup_steps=100, **data), 1000),
        ("Lightning demo transformer (healthy)", lambda: DemoTransformer(**data), 1000),
    ]
    print("| scenario | steps | loss first > 1.5x its start | first divergence alert (loss then) | alerts |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, make, steps in scenarios:
        monitor = GradientSpikeMonitor(on_alert="ignore")
        recorder = LossRecorder()
        make_trainer(None, [recorder, monitor], max_steps=steps).fit(make())
        losses = recorder.losses
        passes = next((s for s in sorted(losses) if losses[s] > 1.5 * losses[0]), None)
        first = next((a.step for a in monitor.alerts if a.kind == "divergence"), None)
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(monitor.alert_counts.items())) or "none"
        when = "-" if first is None else f"{first} ({losses[first]:.2f})"
        print(f"| {name} | {steps} | {'-' if passes is None else passes} | {when} | {counts} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--divergence", action="store_true", help="the divergence scenarios instead of timings")
    parser.add_argument("--hooks", action="store_true", help="the gradient part's own hook time and host reads")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workloads", default="mlp,cnn,transformer", help="comma-separated: mlp, cnn, transformer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.divergence:
        divergence_scenarios()
        return
    if args.hooks:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps x {args.repeats}\n")
        hooks_table(args.steps, args.repeats, args.workloads.split(","))
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps x {args.repeats} repeats\n"
    )
    print("| workload | parameters | step without (ms) | step with (ms) | overhead (median of paired ratios) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for kind in args.workloads.split(","):
        without, with_, ratios = [], [], []
        for repeat in range(args.repeats):
            order = (False, True) if repeat % 2 == 0 else (True, False)
            times = {flag: timed_run(kind, args.steps, flag) for flag in order}
            without.append(times[False])
            with_.append(times[True])
            ratios.append(times[True] / times[False] - 1)
        params = sum(p.numel() for p in Workload(kind).parameters())
        print(
            f"| {kind} | {params:,} | {statistics.median(without) / args.steps * 1e3:.2f} | "
            f"{statistics.median(with_) / args.steps * 1e3:.2f} | {statistics.median(ratios):+.1%} |"
        )


if __name__ == "__main__":
    main()
