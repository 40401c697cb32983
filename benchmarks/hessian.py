"""Hessian benchmarks, side by side in one run on this machine.

Part 1: time of one Hessian-vector product over the probe set divided by the time of one gradient over the same
data, for each backend, on three model sizes (all on scikit-learn's digits).

Part 2: HVPs and wall time to reach 1e-3 relative error on the top-1 and top-5 eigenvalues: our Lanczos (cold and
warm-started from the eigenvectors measured before 20 SGD steps) against PyHessian's deflated power iteration on
the same model and batch. PyHessian is a peer, not a dependency: install it in the benchmark's own environment
(``python -m venv --system-site-packages .bench && .bench/bin/pip install --no-deps pyhessian``); without it that
column is skipped.

    python benchmarks/hessian.py            # prints markdown tables (copied into benchmarks/RESULTS.md)
    python benchmarks/hessian.py --part cost   # part 3: a measurement's cost in training steps (before/after:
                                               # run with PYTHONPATH=/work/main, then with this checkout)
    python benchmarks/hessian.py --part bundle --every 200 --steps 1001 --kinds mlp,cnn,transformer,nanogpt
                                               # part 4: as LandscapeMonitor configures it (one probe batch),
                                               # where the time goes: products, gradient graph, the rest
    python benchmarks/hessian.py --part bundle --probe-fractions 1,0.5 --tols 1e-3,1e-2 ...   # variants
    python benchmarks/hessian.py --part probe --steps 300 --kinds transformer,nanogpt --threads 1
                                               # part 5: sharpness of half / quarter batches against whole ones
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _data import digits_tensors

from lightning_landscape.core.hvp import HessianOperator, operator_mode


class StepClock(pl.Callback):
    """Host time of each training step (from batch start to batch end), to express costs in training steps."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self.start)


def mlp(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    d = 64
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.Tanh()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 10))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.Tanh(), nn.Conv2d(16, 32, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2)
        )
        self.head = nn.Linear(32 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))


MODELS = {
    "mlp-small": lambda: mlp(32, 1),
    "cnn": SmallCNN,
    "mlp-wide": lambda: mlp(512, 2),
}


def loss_fn(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(module(batch[0]), batch[1])


def probe_batches(num_batches: int = 4, batch_size: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y, _, _ = digits_tensors()
    return [
        (x[i * batch_size : (i + 1) * batch_size], y[i * batch_size : (i + 1) * batch_size]) for i in range(num_batches)
    ]


def trained(name: str, batches: list, steps: int = 200) -> nn.Module:
    """A model trained for a while (curvature at initialisation is atypical)."""
    torch.manual_seed(0)
    model = MODELS[name]()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(steps):
        opt.zero_grad()
        loss_fn(model, batches[step % len(batches)]).backward()
        opt.step()
    return model


def timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def part1(repeats: int) -> None:
    batches = probe_batches()
    print("\n### HVP time / gradient time (probe set: 4 batches x 128 digits, median of", repeats, "runs, CPU)\n")
    print("| model | parameters | gradient (ms) | func | double_backward | graph (first) | graph (reused) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in MODELS:
        model = trained(name, batches, steps=20)
        n = sum(p.numel() for p in model.parameters())
        v = torch.randn(n)
        with operator_mode(model, "eval"):
            grad_op = HessianOperator(model, loss_fn, batches)
            t_grad = timeit(grad_op.loss_and_gradient, repeats)
            row = []
            for backend in ("func", "double_backward"):
                op = HessianOperator(model, loss_fn, batches, backend=backend)
                row.append(timeit(lambda op=op, v=v: op @ v, repeats) / t_grad)

            def first_graph_matvec(model=model, v=v):
                with HessianOperator(model, loss_fn, batches, backend="graph") as op:
                    op @ v

            row.append(timeit(first_graph_matvec, repeats) / t_grad)
            with HessianOperator(model, loss_fn, batches, backend="graph") as op:
                row.append(timeit(lambda op=op, v=v: op @ v, repeats) / t_grad)
        print(f"| {name} | {n:,} | {t_grad * 1e3:.2f} | " + " | ".join(f"{r:.2f}x" for r in row) + " |")


def rel_err(found: list[float], exact: list[float]) -> float:
    return max(abs(f - e) / abs(e) for f, e in zip(found, exact, strict=False))


def pyhessian_topk(model: nn.Module, batch: tuple, k: int, tol: float, max_iter: int) -> tuple | None:
    """PyHessian's eigenvalues() on a copy of the model: (values, HVPs, seconds), or None if not installed."""
    try:
        import importlib

        pyhessian_module = importlib.import_module("pyhessian.hessian")
    except ImportError:
        return None
    counter = {"n": 0}
    original = pyhessian_module.hessian_vector_product

    def counted(*args, **kwargs):
        counter["n"] += 1
        return original(*args, **kwargs)

    pyhessian_module.hessian_vector_product = counted
    try:
        model = copy.deepcopy(model)
        start = time.perf_counter()
        h = pyhessian_module.hessian(model, nn.CrossEntropyLoss(), data=batch, cuda=False)
        values, _ = h.eigenvalues(top_n=k, tol=tol, maxIter=max_iter)
        elapsed = time.perf_counter() - start
    finally:
        pyhessian_module.hessian_vector_product = original
    return sorted(values, reverse=True), counter["n"], elapsed


OUR_TOLS = (0.3, 0.1, 0.05, 0.02, 0.01, 5e-3, 2e-3, 1e-3)
PYHESSIAN_TOLS = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6)


def cheapest(run, tolerances, exact):
    """The first (loosest) tolerance whose result is within 1e-3 relative error: (HVPs, error, seconds, tol)."""
    for tol in tolerances:
        values, hvps, seconds = run(tol)
        error = rel_err(values, exact)
        if error <= 1e-3:
            return hvps, error, seconds, tol
    return None


def fmt(found) -> str:
    return "not reached | | |" if found is None else f"{found[0]} | {found[1]:.1e} | {found[2]:.2f} | {found[3]:g}"


def part2() -> None:
    from lightning_landscape.core.lanczos import lanczos

    print("\n### HVPs and time to reach 1e-3 relative error on the top-k eigenvalues (one batch of 512 digits, CPU)\n")
    print(
        "Each method's tolerance is swept from loose to tight and the loosest one whose worst relative error over "
        "the k values is <= 1e-3 is reported (reference: our Lanczos at tol 1e-10). PyHessian: deflated power "
        "iteration, maxIter=1000, tolerances 1e-3 (its default) to 1e-6. Ours: Lanczos with the residual rule, "
        "tolerances 0.3 to 1e-3 (1e-3 is the monitor's default); warm = started from the eigenvectors measured 20 "
        "SGD steps earlier (what HessianMonitor does between measurements).\n"
    )
    print(
        "| model | k | PyHessian HVPs | err | s | tol | ours cold HVPs | err | s | tol | ours warm HVPs | err | s | tol "
        "| PyHessian / ours cold | PyHessian / ours warm |"
    )
    print(
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    x, y, _, _ = digits_tensors()
    batch = (x[:512], y[:512])
    defaults = []
    for name in MODELS:
        model = trained(name, [batch], steps=200)
        model.eval()
        earlier = copy.deepcopy(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(20):
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
        for k in (1, 5):
            with operator_mode(model, "eval"), HessianOperator(model, loss_fn, [batch], backend="graph") as op:
                exact = lanczos(op, k=k, tol=1e-10, max_iter=400).eigenvalues.tolist()
            with operator_mode(earlier, "eval"), HessianOperator(earlier, loss_fn, [batch], backend="graph") as op:
                previous = lanczos(op, k=k, tol=1e-3, generator=torch.Generator().manual_seed(2)).eigenvectors

            def ours(tol, init=None):
                with operator_mode(model, "eval"), HessianOperator(model, loss_fn, [batch], backend="graph") as op:
                    start = time.perf_counter()
                    r = lanczos(op, k=k, tol=tol, init=init, generator=torch.Generator().manual_seed(1))
                    return r.eigenvalues.tolist(), r.num_matvecs, time.perf_counter() - start

            cold = cheapest(ours, OUR_TOLS, exact)
            warm = cheapest(lambda tol: ours(tol, previous), OUR_TOLS, exact)
            ph = None
            if pyhessian_topk(model, batch, 1, 1e-3, 1) is not None:
                ph = cheapest(lambda tol: pyhessian_topk(model, batch, k, tol, 1000), PYHESSIAN_TOLS, exact)

            def ratio(a, b):
                return "n/a" if a is None or b is None else f"{a[0] / b[0]:.1f}x"

            print(f"| {name} | {k} | {fmt(ph)} | {fmt(cold)} | {fmt(warm)} | {ratio(ph, cold)} | {ratio(ph, warm)} |")
            at_defaults = [ours(1e-3), ours(1e-3, previous)]
            ph_default = pyhessian_topk(model, batch, k, 1e-3, 100)
            if ph_default is not None:
                at_defaults.insert(0, ph_default)
            defaults.append(
                f"| {name} | {k} | "
                + " | ".join(f"{hvps} | {rel_err(values, exact):.1e}" for values, hvps, _ in at_defaults)
                + " |"
            )
    print("\nAt each method's default tolerance (what a user gets without tuning):\n")
    print(
        "| model | k | PyHessian (tol 1e-3, maxIter 100) HVPs | err | ours cold (tol 1e-3) HVPs | err | ours warm HVPs | err |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(defaults))


def cost(steps: int, every: int, kinds: list[str]) -> None:
    """Part 3: cost of a HessianMonitor measurement in training steps on benchmarks/grad_spikes.py's workloads (AdamW,
    default HessianMonitor arguments as the bundle configures them, every ``every`` steps), counted in HVPs (the
    deterministic part) and in seconds over the median unmonitored training step. Runs on whatever code is first on
    PYTHONPATH, so the same command gives "before" (PYTHONPATH=/work/main) and "after"."""

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from grad_spikes import Workload
    from overhead import quiet_trainer

    from lightning_landscape import HessianMonitor

    print("| workload | measurement | HVPs | preconditioned HVPs | seconds | steps (seconds / median step) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for kind in kinds:
        pl.seed_everything(0, verbose=False)
        clock = StepClock()
        monitor = HessianMonitor(every_n_steps=every, on_alert="ignore")
        logged: list[dict] = []
        original = monitor.log_metrics

        def record(trainer, metrics, step, original=original):
            logged.append(dict(metrics))
            original(trainer, metrics, step)

        monitor.log_metrics = record
        # the monitor first: its measurement happens in on_train_batch_start, outside the clock's step interval
        trainer = quiet_trainer(steps, [monitor, clock])
        trainer.fit(Workload(kind))
        step = statistics.median(clock.times)
        for i, metrics in enumerate(logged):
            seconds = metrics.get("landscape/hessian/seconds", float("nan"))
            print(
                f"| {kind} | {i} | {metrics.get('landscape/hessian/hvps', float('nan')):.0f} | "
                f"{'yes' if 'landscape/hessian/preconditioned_sharpness' in metrics else 'no'} | {seconds:.3f} | "
                f"{seconds / step:.1f} |"
            )


def bundle_cost(steps: int, every: int, kinds: list[str], fractions: list[float], tols: list[float]) -> None:
    """Part 4: a HessianMonitor measurement as LandscapeMonitor configures it (one probe batch, AdamW), every
    ``every`` steps, on grad_spikes.py's workloads and overhead.py's nanoGPT: HVPs, cost in training steps (seconds
    over the median unmonitored step of the same run) and how much of it the products and the gradient graph take."""
    import collections

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from overhead import make_workload, quiet_trainer

    from lightning_landscape import HessianMonitor

    spent: dict[str, float] = collections.defaultdict(float)

    def timed(owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - start

        setattr(owner, name, wrapper)

    timed(HessianOperator, "matvec", "products")
    timed(HessianOperator, "_gradients", "graph")

    print(
        "| workload | probe_fraction | tol | step | HVPs | raw | cost (steps) | of which products "
        "| of which gradient graph | eos_sharpness |"
    )
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    variants = [(kind, f, t) for kind in kinds for f in fractions for t in tols]
    for kind, fraction, tol in variants:
        pl.seed_everything(0, verbose=False)
        clock = StepClock()
        monitor = HessianMonitor(
            every_n_steps=every,
            num_probe_batches=1,
            max_overhead=None,
            on_alert="ignore",
            probe_fraction=fraction,
            tol=tol,
        )
        rows: list[tuple[int, dict, dict]] = []
        original = monitor.log_metrics

        def record(trainer, metrics, step, original=original):
            rows.append((step, dict(metrics), dict(spent)))
            spent.clear()
            original(trainer, metrics, step)

        monitor.log_metrics = record
        trainer = quiet_trainer(steps, [monitor, clock])
        spent.clear()
        trainer.fit(make_workload(kind))
        step_s = statistics.median(clock.times)
        for step, metrics, parts in rows:
            seconds = metrics.get("landscape/hessian/seconds", float("nan"))
            print(
                f"| {kind} | {fraction:g} | {tol:g} | {step} | {metrics.get('landscape/hessian/hvps', float('nan')):.0f} "
                f"| {'yes' if 'landscape/sharpness' in metrics else 'no'} | {seconds / step_s:.1f} | "
                f"{parts.get('products', 0.0) / step_s:.1f} | {parts.get('graph', 0.0) / step_s:.1f} | "
                f"{metrics.get('landscape/hessian/eos_sharpness', float('nan')):.4g} |",
                flush=True,
            )


def probe_size(steps: int, kinds: list[str]) -> None:
    """Part 5: the sharpness (Adam-preconditioned and raw) of a whole probe batch against its halves and quarters,
    a second batch and four batches, after ``steps`` AdamW steps: the bias of a smaller operator against the
    spread between batches. Cold top-1 Lanczos at tol 1e-3 and 1e-2 (products, cost in training steps)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from overhead import make_workload, quiet_trainer

    from lightning_landscape.core.lanczos import lanczos
    from lightning_landscape.core.modes import default_batch_size, leading_samples
    from lightning_landscape.core.params import select_parameters
    from lightning_landscape.core.scaled import DiagonalScaledOperator
    from lightning_landscape.core.stability import stability_scale, stability_threshold

    print("| workload | probe | preconditioned @1e-3 (HVPs, steps) | @1e-2 | raw @1e-3 | @1e-2 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind in kinds:
        pl.seed_everything(0, verbose=False)
        model = make_workload(kind)
        clock = StepClock()
        trainer = quiet_trainer(steps, [clock])
        trainer.fit(model)
        step_s = statistics.median(clock.times)
        loaded = iter(model.train_dataloader())
        batches = [next(loaded) for _ in range(4)]
        n = default_batch_size(batches[0])

        def rows(batch, lo, hi):  # samples lo..hi of one batch (views)
            return leading_samples(batch, hi - lo, n, start=lo)[0]

        probes = {
            "first quarter": [rows(batches[0], 0, n // 4)],
            "second quarter": [rows(batches[0], n // 4, n // 2)],
            "first half": [rows(batches[0], 0, n // 2)],
            "second half": [rows(batches[0], n // 2, n)],
            "batch 1 (whole)": [batches[0]],
            "batch 2 (whole)": [batches[1]],
            "batches 1-4": batches,
        }
        params = select_parameters(model, None)
        optimizer = trainer.optimizers[0]
        scale = stability_scale(optimizer, params, stability_threshold(optimizer, params))
        # NanoGPT's training_step logs (not allowed outside the loop); the Workload's does not
        loss_fn = (lambda m, b: m.lm_loss(b)) if hasattr(model, "lm_loss") else (lambda m, b: m.training_step(b, 0))
        model.eval()
        for name, probe in probes.items():
            op = HessianOperator(model, loss_fn, probe, params=params, backend="graph")
            cells = []
            for operator in (DiagonalScaledOperator(op, scale), op):
                for tol in (1e-3, 1e-2):
                    started = time.perf_counter()
                    result = lanczos(operator, 1, tol=tol, generator=torch.Generator().manual_seed(1))
                    seconds = time.perf_counter() - started
                    cells.append(f"{float(result.eigenvalues[0]):.4g} ({result.num_matvecs}, {seconds / step_s:.1f})")
            print(f"| {kind} | {name} | {' | '.join(cells)} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--part", choices=["1", "2", "cost", "bundle", "probe", "all"], default="all")
    parser.add_argument("--steps", type=int, default=41, help="part cost: training steps")
    parser.add_argument("--every", type=int, default=10, help="part cost: measurement cadence")
    parser.add_argument("--kinds", default="mlp,cnn,transformer", help="part cost: workloads")
    parser.add_argument("--probe-fractions", default="1", help="part bundle: HessianMonitor probe_fraction values")
    parser.add_argument("--tols", default="1e-3", help="part bundle: HessianMonitor tol values")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.part in ("1", "all"):
        part1(args.repeats)
    if args.part in ("2", "all"):
        part2()
    if args.part == "cost":
        cost(args.steps, args.every, args.kinds.split(","))
    if args.part == "probe":
        probe_size(args.steps, args.kinds.split(","))
    if args.part == "bundle":
        fractions = [float(f) for f in args.probe_fractions.split(",")]
        bundle_cost(args.steps, args.every, args.kinds.split(","), fractions, [float(t) for t in args.tols.split(",")])


if __name__ == "__main__":
    main()
