"""Training-time overhead of each monitor and of LandscapeMonitor, A/B interleaved in one run.

    python benchmarks/overhead.py                 # ~25 minutes on 2 CPU cores
    python benchmarks/overhead.py --quick         # ~3 minutes, fewer steps and repeats
    python benchmarks/overhead.py --no-costs --repeats 5 --workloads transformer
    python benchmarks/overhead.py --schedule --steps 3000   # LandscapeMonitor() defaults: what is logged when
    python benchmarks/overhead.py --simulate --steps 3000   # the same schedule on a fake clock, measured costs

Four reference workloads: an MLP and a small CNN on scikit-learn's digits, a 2-layer character transformer on the
standard library's source (``benchmarks/grad_spikes.py``'s ``Workload``), and a nanoGPT-style causal transformer
(``tests/helpers/real_models.py``'s ``NanoGPT``: 4 layers, width 128, context 64, AdamW) on the same kind of text.

Two tables (three with ``--schedule``):

1. *Cost per measurement*: the seconds of one measurement of each periodic monitor at its defaults (the first, cold
   one and the median of the later, warm-started ones), also in units of one training step. At a fixed cadence of
   ``every_n_steps`` the overhead of a monitor is ``warm cost in steps / every_n_steps``.
2. *Overhead*: wall and process CPU time of ``trainer.fit`` for ``--steps`` steps with and without each
   configuration, the runs of one repeat interleaved (order rotated between repeats), as the median over repeats of
   the paired ratio ``with / without - 1``. Budget rows also give the overhead the monitors' own ledger measured. The
   "empty callback" row (three hooks that do nothing) is Lightning's own cost of calling a callback, and on a shared
   machine also a gauge of the noise: it should read 0.
4. *Simulated schedule* (``--simulate``): the real ``LandscapeMonitor()`` (its budget, shares and waits) on a fake
   clock, each part's measurement replaced by one costing what it was measured to cost on each workload
   (``MEASURED_COSTS``, in training steps; the Hessian's warm costs cycle through the measured sequence), on a tiny
   model: the schedule a long real run would get, in seconds instead of hours on a loaded 2-core machine.
3. *Schedule* (``--schedule``): ``LandscapeMonitor()`` at its defaults for ``--steps`` steps on each workload: the
   steps at which sharpness, rank and barriers were logged, the largest gap between sharpness points, the ledger
   (overall and by part) and the gradient stride; then, with ``--repeats`` above 0, the interleaved A/B wall-time
   overhead of the same runs (median of the paired ratios).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grad_spikes import Workload

from lightning_landscape import (
    EffectiveRankMonitor,
    GradientSpikeMonitor,
    HessianMonitor,
    LandscapeMonitor,
    LogitMonitor,
    ModeConnectivityMonitor,
)

WORKLOADS = ("mlp", "cnn", "transformer", "nanogpt")
CPU_SECONDS: list[float] = []  # process CPU time of each fit, in call order


class Clock(pl.Callback):
    """Wall and process CPU time of the training loop proper (from the first hook to the last). CPU time is less
    sensitive to other tenants of a shared machine than wall time; both are reported."""

    def on_train_start(self, trainer, pl_module):
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start


def quiet_trainer(steps: int, callbacks: list[pl.Callback], **kwargs) -> pl.Trainer:
    """A CPU Trainer for ``steps`` steps with no logger, checkpoint, progress bar or summary unless ``kwargs`` say."""
    settings = {
        "max_steps": steps,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    settings.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **settings)


def fit(kind: str, steps: int, callbacks: list[pl.Callback], root: str) -> float:
    pl.seed_everything(0, verbose=False)
    clock = Clock()
    trainer = quiet_trainer(steps, [clock, *callbacks], logger=TensorBoardLogger(root, name=kind), log_every_n_steps=50)
    trainer.fit(make_workload(kind))
    CPU_SECONDS.append(clock.cpu_seconds)
    return clock.seconds


def make_workload(kind: str) -> pl.LightningModule:
    if kind == "nanogpt":
        from tests.helpers.real_models import NanoGPT

        return NanoGPT(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=16, num_windows=1024)
    return Workload(kind)


def measurement_costs(kind: str, root: str, steps_between: int) -> dict[str, tuple[float, float]]:
    """(cold, warm) seconds of one measurement of each periodic monitor at its defaults."""
    costs = {}
    for name, monitor_type in (
        ("HessianMonitor", HessianMonitor),
        ("EffectiveRankMonitor", EffectiveRankMonitor),
        ("ModeConnectivityMonitor", ModeConnectivityMonitor),
        ("LogitMonitor", LogitMonitor),
    ):
        seconds: list[float] = []

        class Record(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                value = monitor.last_metrics.pop(monitor.key("seconds"), None)
                if value is not None:
                    seconds.append(value)

        monitor = monitor_type(every_n_steps=steps_between, on_alert="ignore")
        fit(kind, 3 * steps_between + 1, [monitor, Record()], root)
        # connectivity's first measurement only takes the snapshot; its later ones interpolate
        costs[name] = (seconds[0], statistics.median(seconds[1:]))
    return costs


class EmptyHooks(pl.Callback):
    """The three per-step hooks the bundle uses, doing nothing: Lightning's own cost of calling a callback."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pass

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pass


def configurations() -> dict[str, callable]:
    quiet = {"on_alert": "ignore"}
    return {
        "empty callback (Lightning's dispatch)": lambda: [EmptyHooks()],
        "GradientSpikeMonitor()": lambda: [GradientSpikeMonitor(**quiet)],
        "LandscapeMonitor() (5% budget)": lambda: [LandscapeMonitor(**quiet)],
        "LandscapeMonitor(max_overhead=None)": lambda: [LandscapeMonitor(max_overhead=None, **quiet)],
    }


class LoggedSteps:
    """The steps at which each part of a LandscapeMonitor logged its headline key (wraps the parts' log_metrics)."""

    KEYS: ClassVar[dict[str, str]] = {
        "hessian": "sharpness",
        "rank": "/rank/",
        "connectivity": "lmc/barrier",
        "logits": "/logits/",
    }

    def __init__(self, monitor: LandscapeMonitor) -> None:
        self.steps: dict[str, list[int]] = {name: [] for name in self.KEYS}
        for name, part in monitor.parts.items():
            if name in self.KEYS:
                part.log_metrics = self._recorder(name, part.log_metrics)

    def _recorder(self, name: str, log: callable) -> callable:
        def record(trainer, metrics, step):
            if any(self.KEYS[name] in key for key in metrics):
                self.steps[name].append(step)
            return log(trainer, metrics, step)

        return record


def schedule_row(kind: str, steps: int, monitor: LandscapeMonitor, logged: LoggedSteps) -> str:
    """One row of table 3 from a finished run of ``monitor``."""
    ledger = monitor.budget
    training = ledger.training_time()
    shares = " / ".join(
        f"{(ledger.cost_by_owner.get(id(monitor.parts[n]), 0.0) + ledger.first_cost_by_owner.get(id(monitor.parts[n]), 0.0)) / training:.2%}"
        for n in ("hessian", "rank", "connectivity", "logits")
    )
    firsts = sum(ledger.first_cost_by_owner.values()) / training
    sharp = logged.steps["hessian"]
    gaps = [b - a for a, b in zip([0, *sharp], [*sharp, steps], strict=True)]

    def short(values: list[int]) -> str:
        return ", ".join(map(str, values)) if len(values) <= 12 else ", ".join(map(str, values[:12])) + ", ..."

    return (
        f"| {kind} | {training / steps * 1e3:.1f} | {short(sharp)} | {max(gaps)} | {short(logged.steps['rank'])} "
        f"| {short(logged.steps['connectivity'])} | {len(logged.steps['logits'])} | {ledger.overhead():.2%} "
        f"| {shares} | {firsts:.2%} | {getattr(monitor.parts.get('grad_spikes'), 'stride', '-')} "
        f"| {monitor.parts['hessian']._probe_fraction.value} |"
    )


def schedule_table(kinds: list[str], steps: int, repeats: int, root: str) -> None:
    """Table 3: what LandscapeMonitor() at its defaults logs, and when, within its ledger; then A/B wall time.

    With ``repeats`` above 0 the schedule rows are those of the A/B's own monitored runs (one per repeat, the
    runs of a repeat interleaved, the order alternating); with 0, one monitored run per workload."""
    schedule = [f"\n## LandscapeMonitor() at its defaults over {steps} steps\n"]
    schedule.append(
        "| workload | step (ms) | sharpness at steps | largest gap | rank at steps | barrier at steps | logits points "
        "| ledger | of which Hessian / rank / barrier / logits | of which first points | gradient stride "
        "| Hessian probe_fraction |"
    )
    schedule.append("| --- | ---: | --- | ---: | --- | --- | ---: | ---: | --- | ---: | ---: | ---: |")
    ab = [f"\n## A/B wall time of LandscapeMonitor() over {steps} steps (interleaved, median of {repeats})\n"]
    ab.append("| workload | without (s) | with (s) | overhead (wall) | overhead (CPU time) | ledger |")
    ab.append("| --- | ---: | ---: | ---: | ---: | ---: |")
    for kind in kinds:
        times: dict[bool, list[float]] = {False: [], True: []}
        cpu: dict[bool, list[float]] = {False: [], True: []}
        ledgers = []
        for repeat in range(max(1, repeats)):
            arms = (True,) if repeats <= 0 else ((False, True) if repeat % 2 == 0 else (True, False))
            for monitored in arms:
                monitor = LandscapeMonitor(on_alert="ignore")
                logged = LoggedSteps(monitor)
                times[monitored].append(fit(kind, steps, [monitor] if monitored else [], root))
                cpu[monitored].append(CPU_SECONDS[-1])
                if monitored:
                    ledgers.append(monitor.budget.overhead())
                    schedule.append(schedule_row(kind, steps, monitor, logged))
                    print(schedule[-1], flush=True)
        if repeats > 0:
            ratios = [w / wo - 1 for w, wo in zip(times[True], times[False], strict=True)]
            cpu_ratios = [w / wo - 1 for w, wo in zip(cpu[True], cpu[False], strict=True)]
            ab.append(
                f"| {kind} | {statistics.median(times[False]):.1f} | {statistics.median(times[True]):.1f} | "
                f"{statistics.median(ratios):+.1%} | {statistics.median(cpu_ratios):+.1%} | "
                f"{statistics.median(ledgers):.2%} |"
            )
            print(ab[-1], flush=True)
    print("\n".join(schedule))
    if repeats > 0:
        print("\n".join(ab))


#: Measured cost of one measurement, in training steps, as LandscapeMonitor() configures each part (one probe
#: batch for the Hessian and the barrier, four for the rank), AdamW; per-step gradient reads as a fraction of a step;
#: logits 0.3 (it reads the training forward); rank and barrier from the schedule notes of an earlier session (rank
#: 4 batches, barrier 1; nanoGPT: the transformer's). Hessian: (cold first, warm sequence).
#: "before": tol 1e-3 on the whole batch (HessianMonitor(every_n_steps=200, num_probe_batches=1) over 1,000 steps,
#: the warm measurements at steps 200-1000; the cold first is the preconditioned half of the first measurement).
#: "after": the bundle's tol 1e-2 and probe_fraction="auto", which keeps the whole batch on the MLP and takes half on
#: the CNN and the transformers (`benchmarks/hessian.py --part bundle --probe-fractions 1,0.5 --tols 1e-3,1e-2`,
#: RESULTS.md); the cold first is that run's step-0 measurement (a cold raw Lanczos) plus the two whole-batch
#: products "auto" times. The digits models' barriers without the curve image LandscapeMonitor no longer draws
#: (median of 5 barriers against the step time of unmonitored runs of the same process, both cores loaded).
MEASURED_COSTS = {
    "before": {
        "mlp": {"hessian": (20.0, (15.8, 11.2, 7.7, 9.5, 9.2)), "rank": 15.0, "connectivity": 59.0, "per_step": 0.0265},
        "cnn": {"hessian": (10.0, (12.5, 11.4, 4.1, 4.3, 4.2)), "rank": 15.0, "connectivity": 7.0, "per_step": 0.0047},
        "transformer": {
            "hessian": (32.0, (22.2, 37.0, 20.1, 14.7, 15.4)),
            "rank": 4.5,
            "connectivity": 19.0,
            "per_step": 0.0022,
        },
        "nanogpt": {
            "hessian": (24.0, (14.7, 16.7, 19.1, 22.4, 29.6)),
            "rank": 4.5,
            "connectivity": 19.0,
            "per_step": 0.0022,
        },
    },
    "after": {
        "mlp": {"hessian": (27.5, (13.3, 9.3, 4.6, 7.0, 6.0)), "rank": 15.0, "connectivity": 4.8, "per_step": 0.0265},
        "cnn": {"hessian": (12.6, (5.1, 5.8, 3.2, 2.5, 2.4)), "rank": 15.0, "connectivity": 5.9, "per_step": 0.0047},
        "transformer": {
            "hessian": (24.6, (9.6, 5.9, 11.3, 6.3, 3.5)),
            "rank": 4.5,
            "connectivity": 19.0,
            "per_step": 0.0022,
        },
        "nanogpt": {
            "hessian": (24.1, (6.1, 9.9, 7.3, 5.8, 8.8)),
            "rank": 4.5,
            "connectivity": 19.0,
            "per_step": 0.0022,
        },
    },
}


def simulated_schedule(kinds: list[str], steps: int, costs_of: str = "after") -> None:
    """Table 4: LandscapeMonitor() at its defaults on a fake clock with MEASURED_COSTS (see the module docstring)."""
    import importlib

    from tests.helpers.lightning import ClassifierModule

    # every module that reads the wall clock for the ledger (measurements, per-step hooks, the ledger itself)
    clocked = [
        importlib.import_module(f"lightning_landscape.{name}")
        for name in (
            "callbacks._measure",
            "callbacks.grad_spikes",
            "callbacks.logits",
            "callbacks._logit_capture",
            "core.budget",
        )
    ]

    step_seconds = 0.01

    class FakeClock:
        now = 1000.0

        def perf_counter(self) -> float:
            return self.now

    class Ticker(pl.Callback):
        def on_train_batch_end(self, *args) -> None:
            clock.now += step_seconds

    print(f"\n## Simulated: LandscapeMonitor() defaults over {steps} steps on a fake clock, costs {costs_of!r}\n")
    print(
        "| workload | Hessian cold / warm (steps) | sharpness at steps | points | largest gap | rank at | barrier at | ledger "
        "| first points, steps (Hessian / rank / barrier / logits) |"
    )
    print("| --- | --- | --- | ---: | ---: | --- | --- | ---: | --- |")
    for kind in kinds:
        costs = MEASURED_COSTS[costs_of][kind]
        clock = FakeClock()
        saved = [module.time for module in clocked]
        for module in clocked:
            module.time = clock
        try:
            monitor = LandscapeMonitor(on_alert="ignore")
            measured: dict[str, list[int]] = {name: [] for name in ("hessian", "rank", "connectivity", "logits")}
            for name in measured:
                part = monitor.parts[name]

                def measure(trainer, pl_module, batches, step, name=name, part=part):
                    done = measured[name]
                    if name == "hessian":
                        first, warm = costs["hessian"]
                        cost = first if not done else warm[(len(done) - 1) % len(warm)]
                    elif name == "connectivity":
                        if not done:
                            part._cost_is_typical = False  # the snapshot says nothing of an interpolation's cost
                        cost = 0.1 if not done else costs["connectivity"]
                    else:
                        cost = costs.get(name, 0.3)
                    clock.now += cost * step_seconds
                    done.append(step)
                    return {}

                part.measure = measure
            spikes = monitor.parts["grad_spikes"]
            original = spikes.on_train_batch_end

            def per_step_work(*args, original=original):
                original(*args)
                clock.now += costs["per_step"] * step_seconds

            spikes.on_train_batch_end = per_step_work
            trainer = quiet_trainer(steps, [monitor, Ticker()])
            trainer.fit(ClassifierModule())
            ledger = monitor.budget.overhead()  # on the fake clock
            # what each part charged as first points (paid by the advance, repaid from its own share)
            firsts = " / ".join(
                f"{monitor.budget.first_cost_by_owner.get(id(monitor.parts[n]), 0.0) / step_seconds:.1f}"
                for n in ("hessian", "rank", "connectivity", "logits")
            )
        finally:
            for module, original_time in zip(clocked, saved, strict=True):
                module.time = original_time
        sharp = measured["hessian"]
        gaps = [b - a for a, b in zip([0, *sharp], [*sharp, steps], strict=True)]
        first, warm = costs["hessian"]
        print(
            f"| {kind} | {first:g} / {min(warm):g}-{max(warm):g} | {', '.join(map(str, sharp))} | {len(sharp)} | "
            f"{max(gaps)} | {', '.join(map(str, measured['rank']))} | "
            f"{', '.join(map(str, measured['connectivity']))} | {ledger:.2%} | {firsts} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: per workload)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--no-costs", action="store_true", help="skip the first table (cost per measurement)")
    parser.add_argument(
        "--schedule", action="store_true", help="only table 3 (--steps, default 3000; --repeats 0: no A/B)"
    )
    parser.add_argument("--simulate", action="store_true", help="only table 4 (fake clock, MEASURED_COSTS)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--costs", choices=["before", "after"], default="after", help="--simulate: which costs")
    args = parser.parse_args()
    if args.simulate:
        simulated_schedule(args.workloads, args.steps or 3000, args.costs)
        return
    torch.set_num_threads(args.threads)
    root = tempfile.mkdtemp(prefix="overhead-")
    repeats = 1 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {repeats} repeats, logs in {root}\n")
    if args.schedule:
        schedule_table(args.workloads, args.steps or 3000, repeats, root)
        return

    step_ms: dict[str, float] = {}
    if not args.no_costs:
        print("## Cost of one measurement at each monitor's defaults\n")
        print("| workload | parameters | step (ms) | monitor | cold (s) | warm (s) | warm, in steps |")
        print("| --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for kind in [] if args.no_costs else args.workloads:
        probe_steps = 20 if args.quick else 50
        step_ms[kind] = fit(kind, probe_steps, [], root) / probe_steps * 1e3
        params = sum(p.numel() for p in make_workload(kind).parameters())
        for name, (cold, warm) in measurement_costs(kind, root, 5 if args.quick else 10).items():
            print(
                f"| {kind} | {params:,} | {step_ms[kind]:.1f} | {name} | {cold:.3f} | {warm:.3f} | "
                f"{warm / step_ms[kind] * 1e3:.1f} |"
            )

    print(f"\n## Overhead of whole runs (median of paired ratios over {repeats} repeats)\n")
    print(
        "| workload | steps | configuration | without (s) | with (s) | overhead (wall) | overhead (CPU time) "
        "| ledger's own estimate | measurements made |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    configs = configurations()
    for kind in args.workloads:
        steps = args.steps or (200 if args.quick else (1000 if kind != "transformer" else 600))
        names = ["none", *configs]
        times: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}
        ledgers: dict[str, list[float]] = {n: [] for n in names}
        counts: dict[str, str] = {}
        for repeat in range(repeats):
            order = names[repeat % len(names) :] + names[: repeat % len(names)]
            for name in order:
                callbacks = [] if name == "none" else configs[name]()
                times[name].append(fit(kind, steps, callbacks, root))
                cpu[name].append(CPU_SECONDS[-1])
                budget = getattr(callbacks[0], "budget", None) if callbacks else None
                if budget is not None:
                    ledgers[name].append(budget.overhead())
                if callbacks and isinstance(callbacks[0], LandscapeMonitor):
                    counts[name] = (
                        ", ".join(
                            f"{part} {callbacks[0].parts[part].num_measurements}"
                            for part in ("hessian", "rank", "connectivity", "logits")
                        )
                        + f"; gradients every {callbacks[0].parts['grad_spikes'].stride} step(s)"
                    )
        for name in configs:
            ratios = [w / wo - 1 for w, wo in zip(times[name], times["none"], strict=True)]
            cpu_ratios = [w / wo - 1 for w, wo in zip(cpu[name], cpu["none"], strict=True)]
            ledger = f"{statistics.median(ledgers[name]):+.1%}" if ledgers[name] else ""
            print(
                f"| {kind} | {steps} | {name} | {statistics.median(times['none']):.2f} | "
                f"{statistics.median(times[name]):.2f} | {statistics.median(ratios):+.1%} | "
                f"{statistics.median(cpu_ratios):+.1%} | {ledger} | {counts.get(name, '')} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
