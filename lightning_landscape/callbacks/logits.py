"""LogitMonitor: attention-logit growth, output-logit divergence and spectral alignment, from forward passes."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn

from lightning_landscape.callbacks._base import LandscapeCallback
from lightning_landscape.callbacks._logit_alerts import _LogitAlerts
from lightning_landscape.callbacks._logit_capture import _Armed
from lightning_landscape.callbacks._logit_modules import _attention_filter, _eager_stance, _is_compiled, _pick, _select
from lightning_landscape.callbacks._logit_read import _LogitReadout
from lightning_landscape.core._validation import check_float, check_int, check_optional_float
from lightning_landscape.core.hvp import operator_mode, seeded_rng


class LogitMonitor(_LogitReadout, _LogitAlerts, LandscapeCallback):
    """Forward-pass early warnings: attention logits, the output log-partition, and spectral alignment.

    On a due step (every ``every_n_steps``, default 10) the statistics are read from **that step's own training
    forward pass**: ``on_train_batch_start`` arms the capture, ``on_before_optimizer_step`` (or, failing that,
    ``on_train_batch_end``) disarms it, and ``on_train_batch_end`` reads everything back in one device-to-host
    transfer and logs it at the step whose forward was read (the weights after that many optimizer steps). No extra
    forward pass runs. The attention logits come from every attention implementation the forward calls
    (:mod:`lightning_landscape.core.attention`: ``F.scaled_dot_product_attention`` with its scale, mask, causal flag
    and GQA, an eager softmax over ``(batch, heads, queries, keys)`` scores such as HuggingFace's eager attention,
    and ``nn.MultiheadAttention``); the output logits and the alignment inputs from forward hooks on those modules
    that exist only during that step. Everything is computed under ``torch.no_grad()`` on detached tensors and
    stays on the device until the read-back: the training step's outputs, autograd graph, RNG and optimizer are
    untouched (tested bitwise). Since the training forward is read, its ``train()`` mode applies (dropout before
    the attention changes its inputs); ``mode`` only applies to the compiled fallback below.

    Compiled forwards (``torch.compile``): Dynamo traces ``F.scaled_dot_product_attention`` and friends into the
    graph, so a capture mode never runs inside it. For a compiled model (detected: Lightning's compiled module, an
    ``OptimizedModule`` inside, ``module.compile()``) the due step instead runs one probe forward over the probe
    set *eagerly* (``torch.compiler.set_stance("force_eager")``: no recompilation, which is what made the first
    pass take 10-34 s) with the same capture, and says so once.

    Logged metrics (``p`` = ``prefix``; ``name`` = the module whose forward made the attention call, ``"root"`` for
    a call outside every module):
        - ``p/logits/attention/max``: the largest pre-softmax attention logit over every head of every attention call
          (Wortsman et al. 2023: its growth precedes divergence; qk-layernorm stops it), and
          ``p/logits/attention/{name}/max``, ``p/logits/attention/{name}/entropy`` (mean softmax entropy per query
          row, nats; it collapses as logits grow).
        - ``p/logits/output/log_partition``: mean ``logsumexp`` of the output layer's logits (``output_module``) and
          ``p/logits/output/drift``, its change since the first measurement; ``p/logits/output/max_abs``.
        - ``p/logits/output/softmax_collapse``: the fraction of output rows (samples or tokens) whose largest softmax
          probability rounds to exactly 1 in the loss dtype (the logits' dtype; float32 under autocast, where the
          softmax and cross-entropy run in float32): softmax collapse (Prieto et al. 2025, "Grokking at the Edge of
          Numerical Stability"). A row whose target is its top class then has a cross-entropy of exactly 0 and an
          exactly zero gradient at its target logit, so it no longer teaches the model
          (:func:`~lightning_landscape.core.logits.softmax_saturated`; a gap of ~16.6 nats in float32).
        - ``p/logits/alignment/{name}/sign_fraction``: spectral alignment (Qiu et al. 2025): the majority-sign
          fraction of ``v1 . x`` over the layer's input rows ``x`` (``v1``: the weight's top right singular vector,
          by warm-started power iteration), in [0.5, 1]; and ``p/logits/alignment/max_sign_fraction``.
        - ``p/logits/status``: 1 ok, 0 failed.

    A model with attention-looking modules (``nn.MultiheadAttention`` or a class name containing "attention"/"attn")
    of which no call was captured (a custom kernel such as ``flash_attn``'s, a fused op) gets one warning, and no
    attention keys.

    Alerts:
        - ``attention_logit_growth``: some attention module's largest logit exceeds both
          ``attention_logit_threshold`` (default 30: a key 30 above the others takes all but ``e^-30`` of a query's
          attention) and ``attention_growth_factor`` (default 2) times its baseline, that module's largest logit at
          its first measurement (kept in the checkpoint). The absolute level judges small-init models: nanoGPT and
          HF GPT-2 start near 0.1 and stayed below 11 in 300 healthy steps, while at a too-high learning rate nanoGPT
          went from 0.1 to 132-301 within 20-30 steps, and the example's character transformer crossed 30 about 30
          steps before it diverged. The growth factor judges models whose logits start large: Lightning's demo
          transformer (post-LN, embeddings scaled by sqrt(d)) starts at 90 and stayed within 0.97-1.13x of it in
          300 healthy steps. ``attention_growth_factor=None``: the absolute level alone. Larger models have larger
          logits (Wortsman et al. saw 10^3-10^4 before divergence): raise the threshold for them.
        - ``logit_divergence`` (opt-in, ``log_partition_drift`` in nats): ``|drift|`` of the output log-partition
          exceeds it. Off by default: a healthy classifier's log-partition rises by 4-10 nats as it grows confident,
          more than the transformer's pre-divergence drift (2.3-3), so no level separates them.
        - ``softmax_collapse`` (opt-in, ``softmax_collapse_fraction``): ``p/logits/output/softmax_collapse``
          exceeds it (edge-triggered: once when it passes, again only after it fell back). Off by default: a model
          that has memorised easy training examples saturates them legitimately. Without weight decay a model that
          has memorised its training set drives the fraction to 1 and stops learning (``benchmarks/grokking.py``).
        - ``alignment_collapse`` (when ``alignment`` is on): a layer's sign fraction reaches ``alignment_threshold``
          when it started below it. Off by default: in our scenarios the fraction also reached 1.0 in stable
          controls (inputs after a ReLU are non-negative, so one sign is natural); see ``benchmarks/RESULTS.md``.

    Cost per measurement: no forward pass; one more ``q k^T`` per attention call (materialised transiently, as
    ``batch x heads x L x S`` in float32) with its row maxima, the softmax entropy over the first ``entropy_samples``
    batch rows, a logsumexp and a softmax over the output logits, the Python dispatch of the step's torch calls
    while the capture is armed, one read-back, and a few ``W^T W v`` products per watched linear layer: +0.07 to
    +0.12 of a training step on nanoGPT in ``benchmarks/logit_capture.py`` (the probe forward it replaced: +0.35 to
    +0.40). With ``attention=True`` on a model whose first armed training step calls no attention kernel and that
    has no attention-like module (an MLP, a CNN; under DDP: no rank captured one), the capture is not armed again in
    that fit: its dispatch of every torch call in the forward added ~70 us to the digits MLP's ~720 us step (every
    10th step: ~0.5% of training, in no hook's span, so not in the ledger either), and it reads nothing there.
    Under DDP the statistics are reduced by name (``distributed.all_reduce_named``). With manual optimization the
    capture stops at the first ``optimizer.step()`` (``on_before_optimizer_step``).

    Args:
        attention: which modules' attention calls to read: ``True`` (all), ``False`` (none: no capture), a regex
            searched in, or a list of, module names (the module making the call). A regex or list must match a
            module of the model at ``setup``.
        output_module: the module whose output are the logits: ``None`` for the last ``nn.Linear`` registered, a
            module name, or ``False`` for none.
        alignment: the ``nn.Linear`` layers for spectral alignment: ``False`` (default), ``True`` (all), a regex or
            names (matching nothing fails at ``setup``).
        attention_logit_threshold, log_partition_drift, alignment_threshold: the alert thresholds (see above);
            ``log_partition_drift=None`` turns ``logit_divergence`` off.
        attention_growth_factor: ``attention_logit_growth`` also needs a module's largest logit above this many
            times its first measured value (``>= 1``; ``None``: the absolute ``attention_logit_threshold`` alone).
        softmax_collapse_fraction: the ``softmax_collapse`` alert's threshold in ``[0, 1)`` (``None``: off).
        power_iterations: most power iterations per layer and measurement (warm-started, usually 2-5 are used).
        entropy_samples: the attention entropy is averaged over the first this many batch rows of each attention
            call (default 2; ``None``: all). The entropy costs several passes over the logits (the maximum one), so
            it is subsampled; the maximum is always over every row and query.
        **kwargs: the shared arguments of :class:`~lightning_landscape.callbacks._base.LandscapeCallback`
            (``num_probe_batches``, ``loss_fn`` and ``mode`` only matter for the compiled fallback).

    Raises:
        TypeError / ValueError: an argument is invalid (at construction), or a selector matches no module of the
            model (at ``setup``).
    """

    # reads the training step's own forward; no loss evaluation of its own (but for the compiled-model fallback)
    needs_loss = False

    group = "logits"
    # power iteration needs whole weights
    needs_full_parameters = True
    # budget mode's first estimate: one forward pass over the probe set
    first_cost_steps = 1.0
    budget_protected = True  # an early warning: per-step work beyond its reserve is taken from the curvature parts

    def __init__(
        self,
        attention: bool | str | Sequence[str] = True,
        output_module: str | bool | None = None,
        alignment: bool | str | Sequence[str] = False,
        *,
        attention_logit_threshold: float = 30.0,
        attention_growth_factor: float | None = 2.0,
        log_partition_drift: float | None = None,
        softmax_collapse_fraction: float | None = None,
        alignment_threshold: float = 0.99,
        power_iterations: int = 20,
        entropy_samples: int | None = 2,
        every_n_steps: int = 10,
        num_probe_batches: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, num_probe_batches=num_probe_batches, **kwargs)
        self.attention = _select(attention, "attention")
        if output_module is not None and not isinstance(output_module, str) and output_module is not False:
            raise TypeError(f"`output_module` must be None, a module name or False, got {output_module!r}.")
        self.output_module = output_module
        self.alignment = _select(alignment, "alignment")
        self.attention_logit_threshold = check_float("attention_logit_threshold", attention_logit_threshold)
        self.attention_growth_factor = check_optional_float(
            "attention_growth_factor", attention_growth_factor, minimum=1.0
        )
        self.log_partition_drift = check_optional_float(
            "log_partition_drift", log_partition_drift, minimum=0.0, strict_minimum=True
        )
        self.softmax_collapse_fraction = check_optional_float(
            "softmax_collapse_fraction", softmax_collapse_fraction, minimum=0.0, maximum=0.999999
        )
        self.alignment_threshold = check_float("alignment_threshold", alignment_threshold, minimum=0.5, maximum=1.0)
        self.power_iterations = check_int("power_iterations", power_iterations, minimum=1)
        self.entropy_samples = (
            None if entropy_samples is None else check_int("entropy_samples", entropy_samples, minimum=1)
        )
        self._directions: dict[str, Tensor] = {}  # warm starts of the power iterations
        self._initial_log_partition: float | None = None
        self._initial_fraction: dict[str, float] = {}
        self._attention_baseline: dict[str, float] = {}  # each module's first measured largest logit
        self._alert_armed: dict[str, bool] = {}
        self._armed: _Armed | None = None
        self._attention_absent = False
        self._attention_checked = False  # whether this fit's first armed step has been read

    def _state_key_fields(self) -> dict[str, Any]:
        return {"prefix": self.prefix}

    def _monitor_state_dict(self) -> dict[str, Any]:
        return {
            "directions": {name: v.detach().cpu() for name, v in self._directions.items()},
            "initial_log_partition": self._initial_log_partition,
            "initial_fraction": dict(self._initial_fraction),
            "attention_baseline": dict(self._attention_baseline),
            "alert_armed": dict(self._alert_armed),
        }

    def _load_monitor_state_dict(self, state: dict[str, Any]) -> None:
        self._directions = {name: v.clone() for name, v in state.get("directions", {}).items()}
        initial = state.get("initial_log_partition")
        self._initial_log_partition = None if initial is None else float(initial)
        self._initial_fraction = {k: float(v) for k, v in state.get("initial_fraction", {}).items()}
        self._attention_baseline = {k: float(v) for k, v in state.get("attention_baseline", {}).items()}
        self._alert_armed = {k: bool(v) for k, v in state.get("alert_armed", {}).items()}

    # --------------------------------------------------------------------------------------------- modules
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # decided again in every fit, on its first armed step (see `_LogitReadout._check_attention_captured`)
        self._attention_absent = self._attention_checked = False
        self.watched_modules(pl_module)  # selectors matching nothing fail here, before training starts

    def watched_modules(self, pl_module: nn.Module) -> tuple[Callable[[str], bool] | None, Any, dict]:
        """(attention filter on the calling module's name or ``None`` for no capture, (name, output module) or
        None, alignment layers by qualified name).

        Raises:
            ValueError: ``output_module``, a regex or a list of ``attention``/``alignment`` matches no module.
        """
        named = [(n, m) for n, m in pl_module.named_modules() if n]
        mha = {n for n, m in named if isinstance(m, nn.MultiheadAttention)}
        # the output projection of nn.MultiheadAttention is a Linear the attention kernel uses without calling it
        linears = [(n, m) for n, m in named if isinstance(m, nn.Linear) and n.rpartition(".")[0] not in mha]
        linears = [(n, m) for n, m in linears if not (n.endswith(".out_proj") and n[: -len(".out_proj")] in mha)]
        attention = None if self._attention_absent else _attention_filter(self.attention, [n for n, _ in named])
        alignment = dict(_pick(linears, self.alignment, "alignment"))
        output = None
        if self.output_module is None and linears:
            output = linears[-1]
        elif isinstance(self.output_module, str):
            modules = dict(named)
            if self.output_module not in modules:
                raise ValueError(f"`output_module` must name a module of the model, got {self.output_module!r}.")
            output = (self.output_module, modules[self.output_module])
        return attention, output, alignment

    # ------------------------------------------------------------------------------------------- arming
    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        if _is_compiled(pl_module):
            self._warn_once(
                "compiled",
                "LogitMonitor: the model is compiled (torch.compile), and a compiled forward cannot be read from "
                "inside; each measurement runs one eager probe forward over the probe set instead "
                "(torch.compiler.set_stance('force_eager'): no recompilation).",
            )
            with _eager_stance():
                super()._run(trainer, pl_module, step)
            return
        started = time.perf_counter()
        self._disarm()  # a previous step that never reached on_train_batch_end (an error, a skipped batch)
        self.num_measurements += 1
        attention, output, layers = self.watched_modules(pl_module)
        if attention is None and output is None and not layers:
            self._nothing_to_watch()
            return
        armed = _Armed(step, started)
        try:
            self._install(armed, pl_module, attention, output, layers)
        except BaseException:
            armed.disarm()
            raise
        self._armed = armed
        armed.seconds = time.perf_counter() - started

    def _nothing_to_watch(self) -> None:
        self._warn_once(
            "nothing-to-watch",
            f"LogitMonitor found nothing to watch: no attention call captured (`attention`={self.attention!r}), "
            "no output layer "
            f"(`output_module`={self.output_module!r}) and no nn.Linear (`alignment`={self.alignment!r}); it "
            "logs nothing.",
        )

    def _install(
        self,
        armed: _Armed,
        pl_module: nn.Module,
        attention: Callable[[str], bool] | None,
        output: tuple[str, nn.Module] | None,
        layers: dict[str, nn.Linear],
    ) -> None:
        armed.install(
            pl_module, attention, output, layers, self._directions, self.power_iterations, self.entropy_samples
        )

    def _disarm(self) -> None:
        armed, self._armed = self._armed, None
        if armed is not None:
            armed.disarm()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # the forward and backward are over: stop dispatching the optimizer's calls through the capture
        if self._armed is not None:
            started = time.perf_counter()
            self._armed.disarm()
            self._armed.seconds += time.perf_counter() - started

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        armed, self._armed = self._armed, None
        if armed is None:
            return
        started = time.perf_counter()
        armed.disarm()
        # the arming and disarming, and the reads inside the training forward, belong to this measurement too
        in_forward = armed.seconds_in_forward()
        read = lambda: self._read(trainer, pl_module, armed)  # noqa: E731
        self._complete(trainer, pl_module, armed.step, read, started, armed.seconds + in_forward, in_forward)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # never mask the user's exception
            self._disarm()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        with contextlib.suppress(RuntimeError):
            self._disarm()

    def _complete(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        step: int,
        compute: Callable[[], dict[str, float]],
        started: float,
        earlier: float = 0.0,
        in_forward: float = 0.0,
    ) -> None:
        """The tail of ``LandscapeCallback._run`` for a measurement read at the end of the step (``earlier``:
        seconds it already spent before ``started``: arming, and ``in_forward``, the reads inside the training
        forward)."""
        try:
            metrics = compute()
        except FloatingPointError as err:
            if self.strict:
                raise
            self._warn_once(
                "measurement-failed",
                f"{type(self).__name__} measurement at step {step} failed: {err} Training continues; the status is "
                f"logged as `{self.key('status')}` (1 ok, 0 failed). Pass strict=True to raise instead.",
            )
            metrics = {self.key("status"): 0.0}
        else:
            metrics[self.key("status")] = 1.0
        cost = time.perf_counter() - started + earlier
        metrics[self.key("seconds")] = cost
        if self.budget is not None:
            # inside LandscapeMonitor's section the total takes only the reads inside the forward (the section
            # times the hooks, and no hook contains the forward); the owner's tally takes all of it
            self.budget.charge(cost, owner=id(self), outside_sections=in_forward)
            self._expected_cost = cost if self._cost_is_typical else None
            self._cost_is_typical = True
            self._next_allowed = None
            overhead = self.budget.overhead()
            if math.isfinite(overhead):
                metrics[f"{self.prefix}/budget/overhead"] = overhead
        self.last_metrics = metrics
        self.log_metrics(trainer, metrics, step)
        self._after_measurement(trainer)

    # ------------------------------------------------------------------------------ compiled fallback
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any], step: int
    ) -> dict[str, float]:
        """The compiled-model fallback: one eager forward of the probe set through the loss, read like a training
        forward (runs inside the base class's model-state guard)."""
        attention, output, layers = self.watched_modules(pl_module)
        if attention is None and output is None and not layers:
            self._nothing_to_watch()
            return {}
        armed = _Armed(step, time.perf_counter())
        loss_fn = self.resolve_loss_fn(pl_module)
        try:
            with operator_mode(pl_module, self.mode), warnings.catch_warnings():
                # torch warns that a compiled module's global hooks fire twice; the capture counts by name
                warnings.filterwarnings("ignore", message=r".*global hooks on modules", category=UserWarning)
                self._install(armed, pl_module, attention, output, layers)
                for index, batch in enumerate(batches):
                    with seeded_rng(pl_module.device, self.seed + index):
                        loss_fn(pl_module, batch)  # graph built (see the class docstring) and dropped at once
        finally:
            armed.disarm()
        return self._read(trainer, pl_module, armed)
