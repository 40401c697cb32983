"""TensorBoard extras (text, raw histograms) written through the Trainer's TensorBoard loggers.

Scalars go through every Lightning logger's ``log_metrics`` (for a ``TensorBoardLogger``, as one event per call:
:func:`log_scalars`); what only TensorBoard can show (text, histograms of a
spectral density) goes here, to each attached ``TensorBoardLogger`` on rank 0. Other loggers simply do not get
these extras.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
from torch import Tensor


def _writers(trainer: pl.Trainer) -> Iterator[Any]:
    from lightning.pytorch.loggers import TensorBoardLogger

    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            yield logger.experiment


def log_scalars(trainer: pl.Trainer, logger: Any, metrics: dict[str, float], step: int) -> bool:
    """Write ``metrics`` to a ``TensorBoardLogger`` as one event holding every value; False when ``logger`` is not
    one whose writer allows it (the caller then uses ``logger.log_metrics``).

    Lightning's ``log_metrics`` writes one event per scalar, and each goes through the event writer's queue and its
    pure-Python checksum: 11 scalars took ~1 ms against ~0.2 ms as one event (measured on the CPU development
    machine). The tags, steps and values are the same (the logger's ``prefix`` is applied the same way), and
    TensorBoard reads them back as separate scalar series.
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    if not isinstance(logger, TensorBoardLogger) or type(logger).log_metrics is not TensorBoardLogger.log_metrics:
        return False  # not TensorBoard, or a subclass with its own log_metrics (which must see our metrics)
    if not trainer.is_global_zero:
        return True  # Lightning's loggers write on rank 0 only
    from torch.utils.tensorboard import SummaryWriter

    writer = logger.experiment
    if not isinstance(writer, SummaryWriter):  # tensorboardX's writer (Lightning's fallback): the logger's own way
        return False
    from lightning.fabric.utilities.logger import _add_prefix
    from tensorboard.compat.proto.summary_pb2 import Summary

    values = [
        Summary.Value(tag=tag, simple_value=float(value))
        for tag, value in _add_prefix(metrics, logger._prefix, logger.LOGGER_JOIN_CHAR).items()
    ]
    writer._get_file_writer().add_summary(Summary(value=values), step)
    return True


def log_text(trainer: pl.Trainer, tag: str, text: str, step: int) -> None:
    """Write ``text`` to TensorBoard's Text tab under ``tag``."""
    for writer in _writers(trainer):
        writer.add_text(tag, text, global_step=step)


def log_histogram_raw(trainer: pl.Trainer, tag: str, edges: Tensor, mass: Tensor, step: int, num: int = 1000) -> None:
    """Write a histogram given as bin ``edges`` (m + 1) and probability ``mass`` per bin (m).

    TensorBoard wants counts: the mass is scaled to ``num`` pseudo-samples; the statistics fields are the exact
    moments of the binned distribution (bin centres).
    """
    edges = edges.double().cpu()
    counts = (mass.double().cpu() * num).clamp_min(0.0)
    centres = 0.5 * (edges[1:] + edges[:-1])
    total = float(counts.sum())
    if total <= 0:
        return
    nonzero = centres[counts > 0]
    for writer in _writers(trainer):
        writer.add_histogram_raw(
            tag,
            min=float(nonzero.min()),
            max=float(nonzero.max()),
            num=total,
            sum=float((counts * centres).sum()),
            sum_squares=float((counts * centres**2).sum()),
            bucket_limits=edges[1:].tolist(),
            bucket_counts=counts.tolist(),
            global_step=step,
        )


def log_curve_figure(
    trainer: pl.Trainer, tag: str, xs: list[float], ys: list[float], step: int, xlabel: str, ylabel: str
) -> bool:
    """Draw ``ys`` against ``xs`` as a TensorBoard image (matplotlib, an optional extra); False when unavailable."""
    writers = list(_writers(trainer))
    if not writers:
        return True
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axis = plt.subplots(figsize=(4, 3), dpi=100)
    axis.plot(xs, ys, marker="o", markersize=3)
    chord = [ys[0] + (ys[-1] - ys[0]) * (x - xs[0]) / (xs[-1] - xs[0]) for x in xs]
    axis.plot(xs, chord, linestyle="--", color="grey", linewidth=1)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(f"step {step}")
    figure.tight_layout()
    for writer in writers:
        writer.add_figure(tag, figure, global_step=step, close=False)
    plt.close(figure)
    return True


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (matplotlib is an optional extra: ImportError)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def surface_figure(
    alphas: Sequence[float],
    betas: Sequence[float],
    losses: Sequence[Sequence[float]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    curvature: float | None = None,
) -> Any:
    """A loss surface as a filled contour (``losses[i][j]`` at ``alphas[i]``, ``betas[j]``) beside its slice along
    the first axis through the centre, with the quadratic model ``L(0) + curvature a^2 / 2`` dashed when given.

    Raises:
        ImportError: matplotlib is not installed.
    """
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.6), dpi=100)
    grid = [[float(losses[i][j]) for i in range(len(alphas))] for j in range(len(betas))]  # rows: beta
    filled = left.contourf(list(alphas), list(betas), grid, levels=20, cmap="viridis")
    left.contour(list(alphas), list(betas), grid, levels=10, colors="white", linewidths=0.4)
    left.plot([0.0], [0.0], marker="+", color="red", markersize=10)
    figure.colorbar(filled, ax=left, label="loss")
    left.set_xlabel(xlabel)
    left.set_ylabel(ylabel)
    left.set_title(title, fontsize=9)
    centre = len(betas) // 2
    line = [float(losses[i][centre]) for i in range(len(alphas))]
    right.plot(list(alphas), line, marker="o", markersize=3, label="loss along v1")
    if curvature is not None:
        middle = line[len(alphas) // 2]
        right.plot(
            list(alphas),
            [middle + 0.5 * curvature * a * a for a in alphas],
            linestyle="--",
            color="grey",
            linewidth=1,
            label="quadratic model",
        )
    right.set_xlabel(xlabel)
    right.set_ylabel("loss")
    right.legend(fontsize=7)
    right.set_title("slice b = 0", fontsize=9)
    figure.tight_layout()
    return figure


def log_figure(trainer: pl.Trainer, tag: str, figure: Any, step: int) -> None:
    """Write a matplotlib figure as a TensorBoard image under ``tag`` (rank 0), then close it."""
    for writer in _writers(trainer):
        writer.add_figure(tag, figure, global_step=step, close=False)
    pyplot().close(figure)


def dashboard_layout(prefix: str = "landscape") -> dict[str, dict[str, tuple[str, list[str]]]]:
    """The custom-scalars layout of the "Landscape" dashboard: category -> chart title -> (kind, tag regexes).

    The first chart plots ``hessian/eos_sharpness`` (what the threshold applies to: the sharpness under SGD, the
    preconditioned sharpness under Adam/AdamW) against ``hessian/stability_threshold``; the ratio chart plots
    ``hessian/log10_eos_ratio`` (0 = at the threshold); the Hessian's own sharpness has its own chart.
    """
    p = prefix
    return {
        "Landscape": {
            # The quantity the threshold applies to: the sharpness under SGD, the preconditioned sharpness under
            # Adam/AdamW (raw sharpness 10-100 against a preconditioned threshold of 38,000 read as "far from it").
            "sharpness vs stability threshold": (
                "Multiline",
                [rf"{p}/hessian/eos_sharpness$", rf"{p}/hessian/stability_threshold$"],
            ),
            # log10 of the ratio: 0 is the threshold, -1 ten times below; a spike does not flatten the rest.
            "edge-of-stability ratio (log10, 0 = at the threshold)": (
                "Multiline",
                [rf"{p}/hessian/log10_eos_ratio$"],
            ),
            "Hessian sharpness and top eigenvalues": ("Multiline", [rf"{p}/sharpness$", rf"{p}/hessian/eig_\d+$"]),
            "gradient norm and spikes": ("Multiline", [rf"{p}/grad/norm$", rf"{p}/events/grad_spike$"]),
            "loss z-score and spikes": ("Multiline", [rf"{p}/loss/zscore$", rf"{p}/events/loss_spike$"]),
            "attention logits (max) and output log-partition": (
                "Multiline",
                [rf"{p}/logits/attention/max$", rf"{p}/logits/output/log_partition$"],
            ),
            "effective rank (RankMe)": ("Multiline", [rf"{p}/rank/.*/rankme$"]),
            "LMC barrier": ("Multiline", [rf"{p}/lmc/barrier$", rf"{p}/lmc/barrier_mean$"]),
            "alerts": ("Multiline", [rf"{p}/alerts/.*"]),
        }
    }


def write_dashboard(trainer: pl.Trainer, prefix: str = "landscape") -> None:
    """Write the "Landscape" custom-scalars dashboard to every TensorBoard logger (rank 0)."""
    layout = dashboard_layout(prefix)
    for writer in _writers(trainer):
        writer.add_custom_scalars(layout)
