"""TensorBoard's own data loading, run on the quickstart's logs: every documented key, the dashboard, alert text.

The documented keys are read from README.md, so the README and the code cannot drift apart silently.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_landscape import LandscapeMonitor
from tests.helpers.digits import DigitsModule
from tests.helpers.lightning import make_trainer

ROOT = Path(__file__).resolve().parents[1]

# Documented keys the quickstart's configuration does not produce, and why.
NOT_IN_QUICKSTART = {
    "landscape/hessian/preconditioned_sharpness": "Adam/AdamW only; the quickstart uses SGD",
    "landscape/lmc/barrier/{layer}": "layerwise=False by default",
    "landscape/lmc/predicted_barrier_hermite": "predictors=False by default",
    "landscape/lmc/error_barrier": "needs error_fn",
    "landscape/lmc/curve": "LandscapeMonitor passes curve_image=False (tests/callbacks/test_connectivity.py reads it)",
    "landscape/grad/clipped": "clip=False by default",
    "landscape/grad/overflow_steps": "only under a GradScaler that skipped a step (tests/compat/test_precision.py)",
    "landscape/grad/stride": "budget mode only; the quickstart passes max_overhead=None (test_grad_spikes.py reads it)",
    "landscape/budget/overhead": "the quickstart passes max_overhead=None (tests/callbacks/test_budget.py checks it)",
    "landscape/events/grad_spike": "logged only at a spike; a healthy run has none",
    "landscape/events/loss_spike": "logged only at a spike",
    "landscape/alerts/{kind}": "a healthy run raises no alert (checked in the second test)",
    "landscape/alerts": "alert text: none in a healthy run (checked in the second test)",
    "landscape/hessian/update_top_fraction": "update_top_fraction=False by default (test_hessian_surface.py reads it)",
    "landscape/hessian/surface": "surface=False by default (test_hessian_surface.py reads the image)",
    "landscape/hessian/hesd_re": "needs density=True (test_hessian_surface.py reads it)",
    "landscape/hessian/hesd_khn": "needs density=True (test_hessian_surface.py reads it)",
    "landscape/logits/attention/max": "the quickstart's MLP has no attention (tests/callbacks/test_logits.py reads it)",
    "landscape/logits/attention/{name}/entropy": "no attention in the quickstart's MLP",
    "landscape/logits/alignment/{name}/sign_fraction": "alignment=False by default (tests/callbacks/test_logits.py)",
}
NOT_SCALARS = {
    "landscape/hessian/density": "histograms",
    "landscape/hessian/definition": "tensors",
}


def documented_keys() -> set[str]:
    keys = set(re.findall(r"`(landscape/[^`\s]+)`", (ROOT / "README.md").read_text()))
    return {k for k in keys if k != "landscape/" and not k.endswith("/")}


def pattern(key: str) -> re.Pattern:
    return re.compile(re.sub(r"\\\{[a-z]+\\\}", r"[^/]+", re.escape(key)) + "$")


@pytest.mark.slow
def test_quickstart_logs_hold_every_documented_key_and_the_dashboard(tmp_path):
    env = {**os.environ, "LANDSCAPE_FAST": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (log_dir,) = list((tmp_path / "quickstart").iterdir())
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    for key in sorted(documented_keys()):
        if key in NOT_IN_QUICKSTART:
            continue
        kind = NOT_SCALARS.get(key, "scalars")
        stored = key + "/text_summary" if kind == "tensors" else key  # TensorBoard's name for text
        assert any(pattern(stored).match(tag) for tag in tags[kind]), f"{key} ({kind}) not found"
    assert "custom_scalars__config__" in tags["tensors"]


def test_alert_text_and_counts_reach_tensorboard(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="alerts")
    monitor = LandscapeMonitor(hessian=False, rank=False, connectivity=False, on_alert="ignore")
    pl.seed_everything(0)
    make_trainer(tmp_path, [monitor], max_steps=110, logger=logger, deterministic=False).fit(
        DigitsModule(corrupt_steps=(100,))
    )
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert [e.step for e in events.Scalars("landscape/alerts/grad_spike")] == [100]
    assert [e.step for e in events.Scalars("landscape/events/grad_spike")] == [100]
    text = events.Tensors("landscape/alerts/text_summary")
    messages = [t.tensor_proto.string_val[0].decode() for t in text]
    assert any("grad_spike" in m and "standard deviations" in m for m in messages)
    assert "landscape/alerts/text_summary" in tags["tensors"]


def test_one_event_scalars_read_back_like_lightnings_own(tmp_path):
    """`tensorboard.log_scalars` (one event per call) gives TensorBoard the same series as the logger's own
    `log_metrics` (one event per scalar), the logger's prefix included."""
    from lightning_landscape import tensorboard as tb

    trainer = make_trainer(tmp_path)
    metrics = [{"landscape/a": 1.5, "landscape/b/c": -2.25, "landscape/nan": float("nan")}, {"landscape/a": 3.0}]
    series = {}
    for name, fast in (("own", False), ("fast", True)):
        logger = TensorBoardLogger(tmp_path, name=name, prefix="run")
        for step, values in enumerate(metrics):
            if fast:
                assert tb.log_scalars(trainer, logger, values, step * 10)
            else:
                logger.log_metrics(values, step=step * 10)
        logger.experiment.flush()
        events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
        events.Reload()
        series[name] = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert set(series["fast"]) == {"run-landscape/a", "run-landscape/b/c", "run-landscape/nan"}
    assert series["fast"].keys() == series["own"].keys()
    for tag, points in series["own"].items():
        assert [s for s, _ in points] == [s for s, _ in series["fast"][tag]]
        assert all(a == b or (a != a and b != b) for (_, a), (_, b) in zip(points, series["fast"][tag], strict=True))
    assert not tb.log_scalars(trainer, pl.loggers.CSVLogger(tmp_path), metrics[0], 0)  # other loggers: their own way

    class Forwarding(TensorBoardLogger):  # a user's logger that also sends its metrics elsewhere
        def log_metrics(self, metrics, step=None):
            super().log_metrics(metrics, step)

    assert not tb.log_scalars(trainer, Forwarding(tmp_path, name="sub"), metrics[0], 0)  # its own log_metrics runs


def test_dashboard_sharpness_chart_plots_the_preconditioned_sharpness_under_adam(tmp_path):
    """Issue 16 item 6: under Adam the chart compares the preconditioned sharpness with its threshold (it plotted the
    raw sharpness, 10-100, against a preconditioned threshold of 38,000), and the ratio chart is log10 (0 = at it)."""
    import math

    from lightning_landscape import HessianMonitor
    from lightning_landscape.tensorboard import dashboard_layout
    from tests.helpers.lightning import ClassifierModule

    monitor = HessianMonitor(every_n_steps=2, num_probe_batches=1)
    make_trainer(tmp_path, [monitor], max_steps=5).fit(ClassifierModule(optimizer="adam", lr=0.01))
    metrics = monitor.last_metrics
    charts = dashboard_layout()["Landscape"]
    plotted = {k for k in metrics if any(re.search(r, k) for r in charts["sharpness vs stability threshold"][1])}
    assert plotted == {"landscape/hessian/eos_sharpness", "landscape/hessian/stability_threshold"}
    assert metrics["landscape/hessian/eos_sharpness"] == metrics["landscape/hessian/preconditioned_sharpness"]
    assert "landscape/sharpness" not in plotted
    (ratio_key,) = [
        k for k in metrics if any(re.search(r, k) for r in charts[next(c for c in charts if "ratio" in c)][1])
    ]
    assert metrics[ratio_key] == pytest.approx(math.log10(metrics["landscape/hessian/eos_ratio"]))
