"""Our Hessian routines against three peers: PyHessian, hessian-eigenthings and curvlinops.

Same model weights, same batch (512 of scikit-learn's digits, float32), same loss (cross-entropy, mean) for every
tool. Per tool and task: Hessian-vector products (counted by wrapping each tool's matvec entry point), wall time,
peak memory (peak resident size, ``VmHWM``, at the end of a fresh worker process minus its resident size right after
loading model and data)
and relative error against an exact reference.

* top-1 / top-5 eigenvalues: each method's tolerance (or step count) is swept from loose to tight inside one worker
  and the loosest setting whose worst relative error over the k values is <= 1e-3 is reported, plus one row at the
  tool's defaults. Reference: our Lanczos at tol 1e-10, checked once against ``eigvalsh`` of the dense Hessian of
  the small model. Peak memory of a sweep row is the peak over the settings tried up to the reported one.
* trace: exact reference from the dense Hessian of the small model (64-32-10, 2,410 parameters); each estimator at
  the same budget of 30 and 90 products, median |relative error| over 5 seeds. On the 300k model: each tool's
  defaults, HVPs and time only (no exact trace at that size).
* density: 1 run x 30 Lanczos steps on the 300k model, HVPs and time only.
* hvp: the time of one Hessian-vector product per tool on the same model and batch (each tool's operator built once,
  two warm-up products, then 30 rounds in which every tool multiplies the same random vector in turn; median).
* scaling: time per top-1 measurement (ours, tol 1e-3) on 64-w-w-10 MLPs of ~0.1M, ~1M and ~10M parameters.

The peers are not dependencies; install them in a separate environment (``--system-site-packages``) and run

    /tmp/benchenv/bin/python benchmarks/peers.py            # full run, ~8 min on 2 CPU cores
    /tmp/benchenv/bin/python benchmarks/peers.py --quick    # smoke run
    /tmp/benchenv/bin/python benchmarks/peers.py --only top5 --only scaling

A peer that cannot be imported is reported and its rows are skipped.
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hessian import MODELS, loss_fn, mlp, rel_err, trained

from lightning_landscape.core.hvp import HessianOperator, operator_mode

TOOLS = ("ours", "pyhessian", "eigenthings", "curvlinops")
PEER_MODULES = {"pyhessian": "pyhessian.hessian", "eigenthings": "hessian_eigenthings", "curvlinops": "curvlinops"}
TASKS = ("hvp", "top1", "top5", "trace", "density", "scaling")
TARGET = 1e-3
SCALING_WIDTHS = (280, 960, 3120)  # 64-w-w-10: ~0.1M, ~1M, ~10M parameters


# ------------------------------------------------------------------------------------------------ model and data
def build(name: str) -> nn.Module:
    """``mlp-small`` / ``mlp-wide`` from benchmarks/hessian.py, or ``w<width>`` for a 64-w-w-10 tanh MLP."""
    return MODELS[name]() if name in MODELS else mlp(int(name[1:]), 2)


def prepare(name: str, directory: Path, steps: int) -> Path:
    """Train ``name`` on the batch and save weights + batch, so every worker sees identical data and weights."""
    from _data import digits_tensors

    x, y, _, _ = digits_tensors()
    batch = (x[:512].contiguous(), y[:512].contiguous())
    if name not in MODELS:
        MODELS[name] = lambda width=int(name[1:]): mlp(width, 2)
    model = trained(name, [batch], steps=steps)
    path = directory / f"{name}.pt"
    torch.save({"name": name, "state": model.state_dict(), "batch": batch}, path)
    return path


def load(path: str) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    saved = torch.load(path)
    model = build(saved["name"])
    model.load_state_dict(saved["state"])
    model.eval()
    return model, saved["batch"]


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def dense_hessian(model: nn.Module, batch: tuple) -> torch.Tensor:
    """Exact Hessian of the mean loss (float64) with torch.func, independent of every tool's HVP code."""
    model = model.double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    x, y = batch[0].double(), batch[1]

    def f(flat: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            params[n] = flat[i : i + s.numel()].view(s)
            i += s.numel()
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    return torch.func.hessian(f)(flat_params(model))


# ------------------------------------------------------------------------------------------------ HVP counters
class Counter:
    n = 0
    patched: ClassVar[set[str]] = set()


def once(tool: str) -> bool:
    """True the first time for ``tool``: each entry point is wrapped once per process."""
    first = tool not in Counter.patched
    Counter.patched.add(tool)
    return first


def count_ours() -> None:
    if not once("ours"):
        return
    original = HessianOperator.matvec

    def matvec(self, v):
        Counter.n += 1
        return original(self, v)

    HessianOperator.matvec = matvec


def count_pyhessian():
    module = importlib.import_module("pyhessian.hessian")
    if not once("pyhessian"):
        return module
    original_hvp, original_loader = module.hessian_vector_product, module.hessian.dataloader_hv_product

    def hvp(*args, **kwargs):
        Counter.n += 1
        return original_hvp(*args, **kwargs)

    def loader_hv(self, v):
        Counter.n += 1
        return original_loader(self, v)

    module.hessian_vector_product, module.hessian.dataloader_hv_product = hvp, loader_hv
    return module


def count_eigenthings():
    module = importlib.import_module("hessian_eigenthings")
    if not once("eigenthings"):
        return module
    original = module.HessianOperator.matvec

    def matvec(self, v):
        Counter.n += 1
        return original(self, v)

    module.HessianOperator.matvec = matvec
    return module


def count_curvlinops():
    module = importlib.import_module("curvlinops")
    if not once("curvlinops"):
        return module
    original = module.HessianLinearOperator._matmat

    def matmat(self, m):
        Counter.n += m[0].shape[-1]  # one HVP per column
        return original(self, m)

    module.HessianLinearOperator._matmat = matmat
    return module


# ------------------------------------------------------------------------------------------------ one run per tool
# Each ``run_<tool>(model, batch, task, setting)`` builds the tool's operator and returns the eigenvalues (descending)
# or the trace estimate (density: None). Time and HVPs are measured around it by ``measure``.
def run_ours(model, batch, task, s):
    from lightning_landscape.core.density import slq_density
    from lightning_landscape.core.lanczos import lanczos
    from lightning_landscape.core.trace import hutchpp_trace

    gen = torch.Generator().manual_seed(s.get("seed", 1))
    with operator_mode(model, "eval"), HessianOperator(model, loss_fn, [batch], backend="auto") as op:
        if task in ("top1", "top5", "scaling"):
            k = 5 if task == "top5" else 1
            return lanczos(op, k=k, tol=s["tol"], max_iter=s.get("max_iter", 100), generator=gen).eigenvalues.tolist()
        if task == "trace":
            return hutchpp_trace(op, num_matvecs=s["matvecs"], generator=gen).estimate
        slq_density(op, num_runs=1, num_steps=s["steps"], generator=gen)
        return None


def run_pyhessian(model, batch, task, s):
    module = count_pyhessian()
    torch.manual_seed(s.get("seed", 1))
    h = module.hessian(model, nn.CrossEntropyLoss(), data=batch, cuda=False)
    if task in ("top1", "top5"):
        values, _ = h.eigenvalues(maxIter=s["maxIter"], tol=s["tol"], top_n=5 if task == "top5" else 1)
        return sorted(values, reverse=True)
    if task == "trace":
        return statistics.fmean(h.trace(maxIter=s["maxIter"], tol=s["tol"]))
    torch.eig = eig_shim  # PyHessian 0.1 calls torch.eig, removed in torch 2; same outputs via torch.linalg.eig
    h.density(iter=s["steps"], n_v=1)
    return None


def eig_shim(matrix: torch.Tensor, eigenvectors: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eig(matrix)
    return torch.stack([values.real, values.imag], 1), vectors.real


def run_eigenthings(model, batch, task, s):
    he = count_eigenthings()
    op = he.HessianOperator(model, [batch], he.supervised_loss(nn.functional.cross_entropy))
    seed = s.get("seed", 1)
    if task in ("top1", "top5"):
        k = 5 if task == "top5" else 1
        if s["method"] == "lanczos":
            res = he.lanczos(op, k=k, max_iter=s.get("steps"), which="LA", seed=seed)
        else:
            res = he.deflated_power_iteration(op, k=k, tol=s["tol"], max_iter=s["max_iter"], seed=seed)
        return sorted(res.eigenvalues.tolist(), reverse=True)
    if task == "trace":
        if s["method"] == "hutchinson":
            return he.hutchinson(op, num_samples=s["matvecs"], seed=seed).estimate
        if s["method"] == "trace()":
            return he.trace(op, seed=seed).estimate
        return he.hutch_plus_plus(op, num_matvecs=s["matvecs"], seed=seed).estimate
    he.spectral_density(op, num_runs=1, lanczos_steps=s["steps"], seed=seed)
    return None


def run_curvlinops(model, batch, task, s):
    cl = count_curvlinops()
    params = [p for p in model.parameters() if p.requires_grad]
    op = cl.HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [batch], check_deterministic=False)
    torch.manual_seed(s.get("seed", 1))
    if task in ("top1", "top5"):
        from scipy.sparse.linalg import eigsh

        k = 5 if task == "top5" else 1
        values = eigsh(op.to_scipy(), k=k, which="LA", tol=s["tol"], return_eigenvectors=False)
        return sorted(values.tolist(), reverse=True)
    if task == "trace":
        estimator = {"hutchpp": cl.hutchpp_trace, "hutchinson": cl.hutchinson_trace, "xtrace": cl.xtrace}
        return float(estimator[s["method"]](op, s["matvecs"]))
    boundaries = s.get("boundaries")
    cl.lanczos_approximate_spectrum(op, ncv=s["steps"], boundaries=tuple(boundaries) if boundaries else None)
    return None


RUNNERS = {"ours": run_ours, "pyhessian": run_pyhessian, "eigenthings": run_eigenthings, "curvlinops": run_curvlinops}


def measure(tool, model, batch, task, setting) -> dict:
    if tool == "ours":
        count_ours()
    Counter.n = 0
    start = time.perf_counter()
    value = RUNNERS[tool](model, batch, task, setting)
    return {"value": value, "hvps": Counter.n, "seconds": time.perf_counter() - start}


def error(value, reference) -> float:
    if isinstance(reference, list):
        return rel_err(value, reference)
    return abs(value - reference) / abs(reference)


# ------------------------------------------------------------------------------------------------ worker process
def warm_up() -> None:
    """One double-backward HVP on a tiny model: the process-wide one-off cost (~1 s) of the first second-order
    autograd call is nobody's HVP time. Costs on the real model's shapes on first use stay in every tool's time."""
    tiny = mlp(2, 1)
    batch = (torch.randn(4, 64), torch.randint(0, 10, (4,)))
    grads = torch.autograd.grad(loss_fn(tiny, batch), list(tiny.parameters()), create_graph=True)
    torch.autograd.grad(grads, list(tiny.parameters()), grad_outputs=[torch.ones_like(g) for g in grads])


def proc_status_kib(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, KiB. ``VmHWM`` is used instead of
    ``ru_maxrss`` because on Linux the latter keeps the parent's resident size across fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker(tool: str, task: str, path: str, job: dict) -> dict:
    """Runs in a fresh process. ``job``: {"settings": [...], "reference": ..., "mode": "sweep" | "each" | "seeds"}.

    sweep: try settings in order, stop at the first within TARGET of the reference; seeds: run the one setting with
    5 seeds, report the median |error| and mean cost; each: run each setting once (no reference needed).
    """
    torch.set_num_threads(2)
    model, batch = load(path)
    if tool in PEER_MODULES:
        importlib.import_module(PEER_MODULES[tool])
    if tool == "curvlinops":
        import scipy.sparse.linalg  # noqa: F401
    warm_up()
    base = proc_status_kib("VmRSS")
    ref, rows = job.get("reference"), []
    for setting in job["settings"]:
        if job["mode"] == "seeds":
            runs = [measure(tool, model, batch, task, {**setting, "seed": seed}) for seed in range(5)]
            err = statistics.median(error(r["value"], ref) for r in runs)
            row = {"hvps": round(statistics.fmean(r["hvps"] for r in runs), 1), "err": err}
            row["seconds"] = statistics.fmean(r["seconds"] for r in runs)
        else:
            row = measure(tool, model, batch, task, setting)
            row["err"] = None if ref is None or row["value"] is None else error(row["value"], ref)
        row["setting"] = setting
        rows.append(row)
        if job["mode"] == "sweep" and row["err"] is not None and row["err"] <= TARGET:
            break
    peak = (proc_status_kib("VmHWM") - base) / 1024
    for row in rows:
        row["peak_mib"] = peak
    return {"rows": rows, "params": sum(p.numel() for p in model.parameters())}


def spawn(tool: str, task: str, path: Path, job: dict, timeout: float = 300) -> dict | str:
    """Run ``worker`` in a fresh interpreter; its JSON result, or an error string."""
    cmd = [sys.executable, __file__, "--worker", tool, task, str(path), json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    if proc.returncode != 0:
        return "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:150]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ sweeps and tables
def eigen_methods(k: int, quick: bool) -> list[tuple[str, str, list[dict], dict]]:
    """(tool, method label, sweep settings loose -> tight, default setting) for the top-k tasks."""
    ours = [{"tol": t} for t in (0.3, 0.1, 0.05, 0.02, 0.01, 5e-3, 2e-3, 1e-3, 1e-4)]
    pyh = [{"tol": t, "maxIter": 1000} for t in (1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6)]
    he_power = [{"method": "power", "tol": t, "max_iter": 1000} for t in (1e-3, 1e-4, 1e-5, 1e-6)]
    steps = sorted({2 * k, *(s for s in (10, 15, 20, 25, 30, 40, 50) if s > 2 * k)})
    he_lanczos = [{"method": "lanczos", "steps": s} for s in steps]
    cl = [{"tol": t} for t in (1e-1, 1e-2, 1e-3, 1e-4, 1e-6)]
    if quick:
        ours, pyh, he_power, he_lanczos, cl = ours[::3], pyh[::3], he_power[::2], he_lanczos[::3], cl[::2]
    return [
        ("ours", "Lanczos", ours, {"tol": 1e-3}),
        ("pyhessian", "deflated power", pyh, {"tol": 1e-3, "maxIter": 100}),
        ("eigenthings", "deflated power", he_power, {"method": "power", "tol": 1e-4, "max_iter": 100}),
        ("eigenthings", "Lanczos (fixed steps)", he_lanczos, {"method": "lanczos", "steps": None}),
        ("curvlinops", "scipy eigsh (ARPACK)", cl, {"tol": 0}),
    ]


def short(setting: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items() if k not in ("method", "seed")) or "defaults"


def table_row(tool: str, task: str, method: str, result, *, pick: str) -> str:
    """One markdown row; ``pick`` = "last" (sweep result / default) or an index."""
    if isinstance(result, str):
        return f"| {tool} | {task} | {method} | n/a | | | | {result} |"
    row = result["rows"][-1]
    if pick == "sweep" and (row["err"] is None or row["err"] > TARGET):
        return f"| {tool} | {task} | {method} | not reached | | | {row['err']:.1e} | swept to {short(row['setting'])} |"
    err = "n/a" if row["err"] is None else f"{row['err']:.1e}"
    return (
        f"| {tool} | {task} | {method} | {row['hvps']:g} | {row['seconds']:.2f} | {row['peak_mib']:.0f} | {err} | "
        f"{short(row['setting'])} |"
    )


HEADER = "| tool | task | method | HVPs | s | peak MiB | rel. error | settings |\n| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"


class Report:
    def __init__(self, out: Path, command: str) -> None:
        self.out, self.lines = out, [f"Command: `{command}`", ""]

    def add(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
        self.lines.extend(lines)
        self.out.write_text("\n".join(self.lines) + "\n")


def reference_eigs(path: Path, k: int) -> list[float]:
    model, batch = load(str(path))
    with operator_mode(model, "eval"), HessianOperator(model, loss_fn, [batch], backend="graph") as op:
        from lightning_landscape.core.lanczos import lanczos

        return lanczos(op, k=k, tol=1e-10, max_iter=400).eigenvalues.tolist()


def eigen_section(rep: Report, paths: dict, tools: list, quick: bool, summary: dict) -> None:
    for task, k in (("top1", 1), ("top5", 5)):
        if task not in summary["tasks"]:
            continue
        for label, path in paths.items():
            ref = reference_eigs(path, k)
            rep.add(f"\n### {task} on {label} (reference {', '.join(f'{v:.5g}' for v in ref)})\n", HEADER)
            for tool, method, sweep, default in eigen_methods(k, quick):
                if tool not in tools:
                    continue
                found = spawn(tool, task, path, {"mode": "sweep", "settings": sweep, "reference": ref})
                rep.add(table_row(tool, task, f"{method}, loosest reaching 1e-3", found, pick="sweep"))
                if not isinstance(found, str) and found["rows"][-1]["err"] <= TARGET:
                    summary.setdefault((task, label), {}).setdefault(tool, []).append(found["rows"][-1])
                at_default = spawn(tool, task, path, {"mode": "each", "settings": [default], "reference": ref})
                rep.add(table_row(tool, task, f"{method}, defaults", at_default, pick="last"))


def trace_section(rep: Report, small: Path, wide: Path | None, tools: list, quick: bool) -> None:
    model, batch = load(str(small))
    exact = float(torch.diagonal(dense_hessian(model, batch)).sum())
    rep.add(f"\n### trace on mlp-small (exact {exact:.6g}; median |rel. error| over 5 seeds, mean cost per run)\n")
    rep.add(HEADER)
    methods = {
        "ours": [("Hutch++", {})],
        "pyhessian": [("Hutchinson (tol=0)", {"tol": 0.0})],
        "eigenthings": [("Hutch++", {"method": "hutchpp"}), ("Hutchinson", {"method": "hutchinson"})],
        "curvlinops": [
            ("Hutch++", {"method": "hutchpp"}),
            ("Hutchinson", {"method": "hutchinson"}),
            ("XTrace", {"method": "xtrace"}),
        ],
    }
    for budget in (30,) if quick else (30, 90):
        for tool in tools:
            for method, extra in methods[tool]:
                setting = {**extra, "matvecs": budget} if tool != "pyhessian" else {**extra, "maxIter": budget}
                result = spawn(tool, "trace", small, {"mode": "seeds", "settings": [setting], "reference": exact})
                rep.add(table_row(tool, "trace", method, result, pick="last"))
    if wide is None:
        return
    rep.add("\n### trace on mlp-wide at each tool's defaults (no exact trace at this size: time and HVPs only)\n")
    rep.add(HEADER)
    defaults = {
        "ours": ("hutchpp_trace() defaults", {"matvecs": 30}),
        "pyhessian": ("trace() defaults", {"tol": 1e-3, "maxIter": 100}),
        "eigenthings": ("trace() defaults (Hutch++, 100)", {"method": "trace()"}),
        "curvlinops": ("hutchpp_trace (no default budget)", {"method": "hutchpp", "matvecs": 30}),
    }
    for tool in tools:
        method, setting = defaults[tool]
        rep.add(
            table_row(
                tool, "trace", method, spawn(tool, "trace", wide, {"mode": "each", "settings": [setting]}), pick="last"
            )
        )


def density_section(rep: Report, wide: Path, tools: list, steps: int) -> None:
    rep.add(f"\n### density on {wide.stem}: 1 run x {steps} Lanczos steps (accuracy not compared)\n", HEADER)
    settings = {
        "ours": [("slq_density", {"steps": steps})],
        "pyhessian": [("density (SLQ), torch.eig shim", {"steps": steps})],
        "eigenthings": [("spectral_density", {"steps": steps})],
        "curvlinops": [("lanczos_approximate_spectrum, eigsh boundaries", {"steps": steps})],
    }
    model, batch = load(str(wide))
    for tool in tools:
        for method, setting in settings[tool]:
            result = spawn(tool, "density", wide, {"mode": "each", "settings": [setting]})
            rep.add(table_row(tool, "density", method, result, pick="last"))
        if tool == "curvlinops":
            ends = [min(reference_eigs_smallest(model, batch)), reference_eigs(wide, 1)[0]]
            setting = {"steps": steps, "boundaries": ends}
            result = spawn(tool, "density", wide, {"mode": "each", "settings": [setting]})
            rep.add(table_row(tool, "density", "lanczos_approximate_spectrum, boundaries given", result, pick="last"))


def reference_eigs_smallest(model, batch) -> list[float]:
    from lightning_landscape.core.lanczos import lanczos

    with operator_mode(model, "eval"), HessianOperator(model, loss_fn, [batch], backend="graph") as op:
        return [lanczos(op, k=1, smallest=True, tol=1e-6, max_iter=200).lambda_min]


def product_functions(model: nn.Module, batch: tuple, tools: list[str]) -> dict:
    """``{tool: v -> H v}`` for a flat vector ``v``, each on the tool's own operator (built once)."""
    functions = {}
    params = [p for p in model.parameters() if p.requires_grad]
    sizes = [p.numel() for p in params]

    def as_list(v):
        return [chunk.view_as(p) for chunk, p in zip(torch.split(v, sizes), params, strict=True)]

    op = HessianOperator(model, loss_fn, [batch], backend="auto")
    functions["ours"] = op.matvec
    # vmapped block of 10 products (batch_probes=True), reported per product
    batched = HessianOperator(model, loss_fn, [batch], backend="auto", batch_probes=True)
    functions["ours, batched x10"] = lambda v: batched.matmat(v[:, None].expand(-1, 10).contiguous())
    if "pyhessian" in tools:
        module = importlib.import_module("pyhessian.hessian")
        h = module.hessian(model, nn.CrossEntropyLoss(), data=batch, cuda=False)
        functions["pyhessian"] = lambda v: module.hessian_vector_product(h.gradsH, h.params, as_list(v))
    if "eigenthings" in tools:
        he = importlib.import_module("hessian_eigenthings")
        eop = he.HessianOperator(model, [batch], he.supervised_loss(nn.functional.cross_entropy))
        functions["eigenthings"] = eop.matvec
    if "curvlinops" in tools:
        cl = importlib.import_module("curvlinops")
        cop = cl.HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [batch], check_deterministic=False)
        functions["curvlinops"] = lambda v: cop @ v
    return functions


def hvp_section(rep: Report, paths: dict, tools: list[str], rounds: int) -> None:
    columns = ["ours", "ours, batched x10", *tools[1:]]
    rep.add(
        "\n### time of one Hessian-vector product (median over rounds; tools interleaved in each round)\n",
        "| model | parameters | " + " | ".join(f"{t} (ms)" for t in columns) + " | ours / fastest peer |",
        "| --- | ---: | " + " | ".join("---:" for _ in columns) + " | ---: |",
    )
    for name, path in paths.items():
        model, batch = load(str(path))
        with operator_mode(model, "eval"):
            functions = product_functions(model, batch, tools)
            v = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(0))
            times: dict[str, list[float]] = {tool: [] for tool in functions}
            for fn in functions.values():
                fn(v), fn(v)  # warm-up: first products allocate and build graphs
            for _ in range(rounds):
                for tool, fn in functions.items():
                    start = time.perf_counter()
                    fn(v)
                    times[tool].append(time.perf_counter() - start)
        median = {tool: statistics.median(t) * 1e3 for tool, t in times.items()}
        median["ours, batched x10"] /= 10
        peers = [median[t] for t in median if not t.startswith("ours")]
        ratio = f"{median['ours'] / min(peers):.2f}x" if peers else ""
        rep.add(
            f"| {name} | {flat_params(model).numel():,} | "
            + " | ".join(f"{median[t]:.2f}" if t in median else "n/a" for t in columns)
            + f" | {ratio} |"
        )


def scaling_section(rep: Report, directory: Path, widths: tuple, steps: int) -> None:
    rep.add(
        f"\n### scaling: ours, top-1 at tol 1e-3 (64-w-w-10 MLPs trained {steps} SGD steps; median of 3 runs)\n",
        "| width | parameters | HVPs | s per top-1 | ms per HVP | s per top-1 / M params | peak MiB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    )
    for width in widths:
        path = prepare(f"w{width}", directory, steps)
        result = spawn("ours", "scaling", path, {"mode": "each", "settings": [{"tol": 1e-3}] * 3}, timeout=400)
        if isinstance(result, str):
            rep.add(f"| {width} | | {result} | | | | |")
            continue
        rows, n = result["rows"], result["params"]
        seconds = statistics.median(r["seconds"] for r in rows)
        hvps = statistics.median(r["hvps"] for r in rows)
        rep.add(
            f"| {width} | {n:,} | {hvps:g} | {seconds:.2f} | {seconds / hvps * 1e3:.1f} | {seconds / n * 1e6:.2f} | "
            f"{rows[-1]['peak_mib']:.0f} |"
        )


def headline(rep: Report, summary: dict) -> None:
    lines = ["\n### headline: HVP ratio peer / ours for top-k at 1e-3 (loosest setting reaching it)\n"]
    for key, by_tool in summary.items():
        if not isinstance(key, tuple):
            continue  # "tasks": the list of tasks run
        task, label = key
        if task not in ("top1", "top5") or "ours" not in by_tool:
            continue
        ours = by_tool["ours"][0]
        for tool, rows in by_tool.items():
            if tool == "ours":
                continue
            best = min(rows, key=lambda r: r["hvps"])
            lines.append(
                f"- {task} {label}: {tool} {best['hvps']} HVPs / ours {ours['hvps']} = {best['hvps'] / ours['hvps']:.1f}x "
                f"(time {best['seconds']:.2f} s / {ours['seconds']:.2f} s = {best['seconds'] / ours['seconds']:.1f}x)"
            )
    rep.add(*lines)


# ------------------------------------------------------------------------------------------------ main
def available_tools(tools: list[str]) -> list[str]:
    found = ["ours"]
    for tool in tools[1:]:
        try:
            importlib.import_module(PEER_MODULES[tool])
            found.append(tool)
        except ImportError as exc:
            print(f"NOTE: {tool} cannot be imported ({exc}); its rows are skipped.")
    return found


def check_reference(rep: Report, small: Path) -> None:
    """Our Lanczos at tol 1e-10 against eigvalsh of the dense Hessian (small model)."""
    model, batch = load(str(small))
    dense = torch.linalg.eigvalsh(dense_hessian(model, batch)).flip(0)[:5].tolist()
    ours = reference_eigs(small, 5)
    rep.add(
        f"Reference check (mlp-small): our Lanczos tol 1e-10 vs dense eigvalsh, max rel. diff {rel_err(ours, dense):.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (fewer settings, no 10M model)")
    parser.add_argument("--only", action="append", choices=TASKS + TOOLS[1:], help="tasks and/or peers to run")
    parser.add_argument("--out", default="/tmp/peers_results.md")
    parser.add_argument("--worker", nargs=4, metavar=("TOOL", "TASK", "CHECKPOINT", "JOB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.worker:
        tool, task, path, job = args.worker
        print(json.dumps(worker(tool, task, path, json.loads(job))))
        return
    only = set(args.only or ())
    tasks = [t for t in TASKS if t in only] or list(TASKS)
    tools = available_tools([t for t in TOOLS if t == "ours" or t in only] if only & set(TOOLS) else list(TOOLS))
    rep = Report(Path(args.out), "/tmp/benchenv/bin/python benchmarks/peers.py " + " ".join(sys.argv[1:]))
    rep.add(f"torch {torch.__version__}, {torch.get_num_threads()} threads, tools: {', '.join(tools)}")
    summary: dict = {"tasks": tasks}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        small = prepare("mlp-small", directory, 200)
        wide = None if args.quick else prepare("mlp-wide", directory, 200)
        check_reference(rep, small)
        if "hvp" in tasks:
            hvp_section(
                rep, {"mlp-small": small} | ({"mlp-wide": wide} if wide else {}), tools, 5 if args.quick else 30
            )
        eigen_section(rep, {"mlp-small": small} | ({"mlp-wide": wide} if wide else {}), tools, args.quick, summary)
        if "trace" in tasks:
            trace_section(rep, small, wide, tools, args.quick)
        if "density" in tasks:
            density_section(rep, wide or small, tools, 10 if args.quick else 30)
        if "scaling" in tasks:
            scaling_section(rep, directory, (64, 128) if args.quick else SCALING_WIDTHS, 5 if args.quick else 20)
    headline(rep, summary)


if __name__ == "__main__":
    main()
