"""Shared pieces of the compatibility suite: a recording logger, the monitor at small exact cadences, checks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from lightning_landscape import LandscapeMonitor
from tests.helpers.real_models import assert_bitwise_equal, final_weights, make_trainer

#: Steps of a compatibility run: every periodic part measures at least twice (cadence 10, first at step 0).
STEPS = 30
SHARPNESS, GRAD_NORM, RANK, BARRIER = (
    "landscape/sharpness",
    "landscape/grad/norm",
    "landscape/rank/",
    "landscape/lmc/barrier",
)
ATTENTION_MAX = "landscape/logits/attention/max"
CORE_KEYS = (SHARPNESS, GRAD_NORM, RANK, BARRIER)
TRANSFORMER_KEYS = (*CORE_KEYS, ATTENTION_MAX)


class RecordingLogger(Logger):
    """Keeps every ``(step, metrics)`` that Lightning hands to a logger (its own ``log_metrics``, in memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.history.append((step, {k: float(v) for k, v in metrics.items()}))

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def keys(self) -> set[str]:
        return {k for _, metrics in self.history for k in metrics}

    def landscape(self) -> dict[str, list[float]]:
        """Every ``landscape/...`` value logged, by key, in logging order."""
        out: dict[str, list[float]] = {}
        for _, metrics in self.history:
            for key, value in metrics.items():
                if key.startswith("landscape/"):
                    out.setdefault(key, []).append(value)
        return out


def monitor(every: int = 10, **overrides: Any) -> LandscapeMonitor:
    """``LandscapeMonitor`` at exact small cadences (``max_overhead=None``), one probe batch.

    Every part starts at step 0, the rank part included: the language models here lose ~85% of their feature rank in
    their first 10 healthy steps (26 -> 3.5), which ``rank_collapse`` no longer mistakes for a collapse (its
    ``collapse_floor``; ``test_models.py::test_no_rank_collapse_alert_from_initialisation``)."""
    settings: dict[str, Any] = {
        "hessian": {"every_n_steps": every},
        "rank": {"every_n_steps": every},
        "connectivity": {"every_n_steps": every},
        "logits": {"every_n_steps": max(1, every // 2)},
        "num_probe_batches": 1,
        "max_overhead": None,
        "dashboard": False,
    }
    settings.update(overrides)
    return LandscapeMonitor(**settings)


def fit(
    make_model: Callable[[], pl.LightningModule],
    callbacks: Iterable[pl.Callback] = (),
    max_steps: int = STEPS,
    wrap: Callable[[pl.LightningModule], Any] | None = None,
    **trainer_kwargs: Any,
) -> tuple[pl.LightningModule, pl.Trainer, RecordingLogger]:
    """Seeded fit of a fresh model; ``wrap`` (e.g. ``torch.compile``) is applied to the module handed to ``fit``.

    ``plugins`` may be a factory (called here): stateful plugins such as a GradScaler must not carry their state from
    one run of a pair into the other."""
    if callable(trainer_kwargs.get("plugins")):
        trainer_kwargs["plugins"] = trainer_kwargs["plugins"]()
    logger = RecordingLogger()
    trainer = make_trainer(callbacks=list(callbacks), max_steps=max_steps, logger=logger, **trainer_kwargs)
    model = make_model()
    trainer.fit(wrap(model) if wrap is not None else model)
    return model, trainer, logger


def measured_problems(logger: RecordingLogger, expected: Iterable[str]) -> list[str]:
    """Expected keys not logged (a ``.../`` entry means any key under it) and non-finite landscape values."""
    logged = logger.landscape()
    problems = []
    missing = [k for k in expected if not any(key == k or (k.endswith("/") and key.startswith(k)) for key in logged)]
    if missing:
        problems.append(f"not logged: {missing}; logged: {sorted(logged)}")
    bad = {k: sum(not math.isfinite(x) for x in v) for k, v in logged.items()}
    bad = {k: f"{n} of {len(logged[k])}" for k, n in bad.items() if n}
    if bad:
        problems.append(f"non-finite values: {bad}")
    return problems


def alert_problems(mon: LandscapeMonitor) -> list[str]:
    """A healthy run raises no alert (summarised per kind: count, steps, first message)."""
    kinds: dict[str, list[Any]] = {}
    for alert in mon.alerts:
        kinds.setdefault(alert.kind, []).append(alert)
    return [
        f"{len(alerts)} {kind} alert(s) on a healthy run at steps {[a.step for a in alerts][:8]}: {alerts[0].message}"
        for kind, alerts in kinds.items()
    ]


def weight_problems(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    try:
        assert_bitwise_equal(a, b)
    except AssertionError as err:
        return [f"training changed by the monitor: {err}"]
    return []


def run_pair(
    make_model: Callable[[], pl.LightningModule],
    make_monitor: Callable[[], pl.Callback],
    wrap: Callable[[pl.LightningModule], Any] | None = None,
    **trainer_kwargs: Any,
) -> tuple[list[str], pl.Callback, RecordingLogger, pl.Trainer]:
    """Seeded runs without and with the monitor; the problems found: changed weights (bitwise), and the problems
    that :func:`alert_problems` finds. Key checks are left to the caller (see :func:`check`)."""
    plain, _, _ = fit(make_model, wrap=wrap, **trainer_kwargs)
    mon = make_monitor()
    watched, trainer, logger = fit(make_model, [mon], wrap=wrap, **trainer_kwargs)
    return weight_problems(final_weights(plain), final_weights(watched)), mon, logger, trainer


def check(
    make_model: Callable[[], pl.LightningModule],
    expected: Iterable[str],
    make_monitor: Callable[[], pl.Callback] = monitor,
    unchanged: bool = True,
    healthy: bool = True,
    wrap: Callable[[pl.LightningModule], Any] | None = None,
    **trainer_kwargs: Any,
) -> tuple[pl.Callback, RecordingLogger, pl.Trainer]:
    """The compatibility contract in one call: the expected keys logged, every value finite, no alert (``healthy``),
    and (``unchanged``) the final weights bitwise those of the same seeded run without the monitor. Every problem
    found is reported at once, so one failing run shows all that is wrong with it."""
    if unchanged:
        problems, mon, logger, trainer = run_pair(make_model, make_monitor, wrap=wrap, **trainer_kwargs)
    else:
        mon = make_monitor()
        _, trainer, logger = fit(make_model, [mon], wrap=wrap, **trainer_kwargs)
        problems = []
    problems += measured_problems(logger, expected)
    if healthy:
        problems += alert_problems(mon)
    assert not problems, "\n".join(problems)
    return mon, logger, trainer
