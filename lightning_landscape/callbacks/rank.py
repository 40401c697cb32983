"""EffectiveRankMonitor: effective rank of representations (RankMe, alpha-ReQ) and of weights (stable rank)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_landscape.callbacks._base import LandscapeCallback
from lightning_landscape.core import distributed
from lightning_landscape.core._validation import check_bool, check_float, check_int, check_optional_float, check_regex
from lightning_landscape.core.alerts import Alert
from lightning_landscape.core.hvp import operator_mode
from lightning_landscape.core.interpolation import seeded_batches
from lightning_landscape.core.rank import (
    RankCollapseRule,
    alpha_req,
    covariance_from_moments,
    eigenvalues_psd,
    rankme,
    singular_values,
    singular_values_from_second_moment,
    stable_rank,
)

# Module types first: LightningCLI (jsonargparse) tries a union's members in order, so `modules: torch.nn.Linear` in a
# config is the class (an import path that is no class falls through to a regex or a list of names).
ModuleSelector = type[nn.Module] | tuple[type[nn.Module], ...] | str | Sequence[str] | None


def _features(module: nn.Module, inputs: tuple[Any, ...]) -> Tensor | None:
    """The module's input as (samples, features): channels for convolutions, the last dim otherwise (every token of
    a (B, T, d) input counts as a sample)."""
    if not inputs or not isinstance(inputs[0], Tensor) or not inputs[0].is_floating_point():
        return None
    x = inputs[0].detach()
    if isinstance(module, nn.modules.conv._ConvNd) and x.dim() > 2:
        x = x.movedim(1, -1)
    return x.reshape(-1, x.shape[-1])


class _Moments:
    """One module's (possibly sketched) features, in float64: the rows themselves while there are no more of them
    than features, then the running sums ``Z^T Z``, ``sum z``, ``N`` (memory never above ``d x d``).

    With ``N <= d`` samples the spectra come from the ``N x N`` Gram matrices ``Z Z^T`` and ``Zc Zc^T`` (the same
    nonzero eigenvalues as ``Z^T Z`` and the covariance): on the digits CNN (1,568 features, 256 probe samples) a
    rank point fell from ~400 ms to ~50 ms, most of it two ``d x d`` eigendecompositions and the ``d x d`` sums.
    """

    def __init__(self) -> None:
        self.second: Tensor | None = None
        self.first: Tensor | None = None
        self.rows: list[Tensor] = []
        self.count = 0

    @property
    def empty(self) -> bool:
        return self.count == 0

    def add(self, z: Tensor) -> None:
        z = z.double()
        if self.second is None and self.count + z.shape[0] <= z.shape[1]:
            self.rows.append(z)  # fewer samples than features so far: keep them (no larger than Z^T Z would be)
            self.count += z.shape[0]
            return
        self.fold()
        if self.second is None:
            self.second = torch.zeros(z.shape[1], z.shape[1], dtype=torch.float64, device=z.device)
            self.first = torch.zeros(z.shape[1], dtype=torch.float64, device=z.device)
        self.second += z.T @ z
        self.first += z.sum(0)
        self.count += z.shape[0]

    def fold(self) -> None:
        """Turn the kept rows into the sums (before more rows than features, and before a DDP reduction)."""
        if not self.rows:
            return
        z = torch.cat(self.rows)
        self.rows = []
        self.second, self.first = z.T @ z, z.sum(0)

    def finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in (self.rows or [self.second]) if t is not None)

    def spectra(self) -> tuple[Tensor, Tensor]:
        """Singular values of ``Z`` (RankMe) and eigenvalues of the centred covariance ``Zc^T Zc / N`` (alpha-ReQ),
        descending: ``min(N, d)`` of each (a ``d x d`` matrix of ``N < d`` samples has ``d - N`` structural zeros,
        which would only add RankMe's epsilon terms)."""
        if self.rows:
            z = torch.cat(self.rows)
            centred = z - z.mean(0)
            return singular_values_from_second_moment(z @ z.T), eigenvalues_psd(centred @ centred.T / self.count)
        keep = min(self.count, self.second.shape[0])
        singular = singular_values_from_second_moment(self.second)[:keep]
        covariance = covariance_from_moments(self.second, self.first, self.count)
        return singular, eigenvalues_psd(covariance)[:keep]


class EffectiveRankMonitor(LandscapeCallback):
    """Effective rank of the features entering chosen modules over the probe set, and of every weight matrix.

    Forward hooks on the chosen modules record their inputs while the probe set runs through the loss (no gradient,
    in ``mode``; the hooks are removed after every measurement). Only the sums ``Z^T Z``, ``sum z`` and the count are
    kept, so memory does not grow with the number of samples. Features wider than ``max_width`` are first projected
    by a seeded Gaussian sketch to ``sketch_dim`` dimensions: RankMe and alpha-ReQ are then those of the sketch (a
    Johnson-Lindenstrauss projection keeps the spectrum's bulk within a relative error of about
    ``sqrt(rank / sketch_dim)``, and never raises a rank above ``sketch_dim``). Under DDP the sums are added across
    ranks by name (``distributed.ReducedState``: one exchange of the names, one all-reduce), so every rank gets the
    numbers of the union of the probe data, also when a rank's data never reached a watched module.

    Logged metrics (``p`` = ``prefix``, ``name`` = module name, ``layer`` = module owning a 2-D+ weight):
        - ``p/rank/{name}/rankme``: RankMe (Garrido et al. 2023) of the uncentred features.
        - ``p/rank/{name}/alpha_req``: alpha-ReQ (Agrawal et al. 2022) of the centred covariance.
        - ``p/weights/{layer}/stable_rank`` and ``p/weights/{layer}/effective_rank`` (RankMe of the weight's
          singular values; conv kernels as ``out x (in * k * k)``), when ``weights=True``.
        - ``p/rank/status``: 1 ok, 0 failed.

    Alert ``rank_collapse``: a module's RankMe falls below ``collapse_floor`` *and* below ``(1 - collapse_fraction)``
    times its maximum over the last ``collapse_window`` measurements. RankMe legitimately falls while a network
    learns (features compress towards the number of classes: 60 -> 26 on digits, at most halving within 5
    measurements), so the default fraction is 0.75; and a healthy language model's penultimate features fall ~7x in
    its first ~10 steps (random-init features are high-rank: 26 -> 3.5 on nanoGPT and GPT-2, climbing back to 15 by
    step 290) but never below ~3.5, so the default floor is 2 (about two directions left). Dying ReLUs under a
    too-high learning rate take RankMe to 0, a network collapsed onto one direction to 1.

    Cost per measurement: one forward pass over the probe set without gradients, two eigendecompositions per watched
    module (``min(N, d)`` square: the Gram matrices of the ``N`` probe samples when there are fewer than ``d``
    features, single process), and one SVD per weight matrix.

    Args:
        modules: ``None`` for the input of the last ``nn.Linear`` (the penultimate features); a regex or a list of
            module names; or a module type / tuple of types (every module of that type).
        weights: also log the stable and effective rank of every weight matrix.
        max_width: features wider than this are sketched.
        sketch_dim: the sketch's dimension.
        collapse_fraction, collapse_window: the ``rank_collapse`` rule's relative drop and its window.
        collapse_floor: ``rank_collapse`` also needs RankMe below this (``> 0``); ``None``: no floor, the relative
            drop alone (fires on the early-training drop of language models).
        **kwargs: the shared arguments of :class:`~lightning_landscape.callbacks._base.LandscapeCallback`
            (``every_n_steps``, ``num_probe_batches``, ``loss_fn``, ``mode``, ``on_alert``, ``prefix``, ...).
    """

    group = "rank"
    # weight spectra need whole matrices, and the probe forward pass calls the unwrapped module: not under sharding
    needs_full_parameters = True
    # budget mode's first estimate: a forward pass over the probe set and an eigendecomposition, 1-30 steps on the
    # reference workloads (the CNN's is the highest); pessimistic on purpose, see ModeConnectivityMonitor
    first_cost_steps = 40.0
    # no warm start: the first point's cost estimates the next, which its share pays for (on the digits CNN a point
    # is ~30 steps, and two "first" points, at 13 and 200, took 1.97% of a 3,000-step run from everyone's share)
    first_is_cold = False

    def __init__(
        self,
        modules: ModuleSelector = None,
        weights: bool = True,
        *,
        max_width: int = 4096,
        sketch_dim: int = 1024,
        collapse_fraction: float = 0.75,
        collapse_window: int = 5,
        collapse_floor: float | None = 2.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        valid = (
            modules is None
            or isinstance(modules, str)
            or (isinstance(modules, type) and issubclass(modules, nn.Module))
            or (isinstance(modules, tuple) and modules and all(isinstance(m, type) for m in modules))
            or (isinstance(modules, Sequence) and modules and all(isinstance(m, str) for m in modules))
        )
        if not valid:
            raise TypeError(
                f"`modules` must be None, a regex, a list of module names or module type(s), got {modules!r}."
            )
        check_regex("modules", modules)
        self.modules = modules
        self.weights = check_bool("weights", weights)
        self.max_width = check_int("max_width", max_width, minimum=1)
        self.sketch_dim = check_int("sketch_dim", sketch_dim, minimum=1)
        if self.sketch_dim > self.max_width:
            raise ValueError(f"`sketch_dim` must be <= max_width={self.max_width}, got {sketch_dim!r}.")
        # DropFromMaxRule's bounds (0, 1], checked here so the error names this argument
        self.collapse_fraction = check_float(
            "collapse_fraction", collapse_fraction, minimum=0.0, maximum=1.0, strict_minimum=True
        )
        self.collapse_window = check_int("collapse_window", collapse_window, minimum=2)
        self.collapse_floor = check_optional_float("collapse_floor", collapse_floor, minimum=0.0, strict_minimum=True)
        self._rules: dict[str, RankCollapseRule] = {}

    def _state_key_fields(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "modules": str(self.modules)}

    def _monitor_state_dict(self) -> dict[str, Any]:
        return {"rules": {name: rule.state_dict() for name, rule in self._rules.items()}}

    def _load_monitor_state_dict(self, state: dict[str, Any]) -> None:
        for name, rule_state in state.get("rules", {}).items():
            self._rule(name).load_state_dict(rule_state)

    def _rule(self, name: str) -> RankCollapseRule:
        if name not in self._rules:
            self._rules[name] = RankCollapseRule(self.collapse_fraction, self.collapse_window, self.collapse_floor)
        return self._rules[name]

    def resolve_selectors(self, pl_module: pl.LightningModule) -> None:
        """``modules`` must match the model: checked at ``setup``, before any training step."""
        self.watched_modules(pl_module)

    # ----------------------------------------------------------------------------------------------- measure
    def watched_modules(self, pl_module: nn.Module) -> dict[str, nn.Module]:
        """The modules whose inputs are measured, by qualified name.

        Raises:
            ValueError: nothing matches ``modules``.
        """
        named = [(n, m) for n, m in pl_module.named_modules() if n]
        if self.modules is None:
            linears = [(n, m) for n, m in named if isinstance(m, nn.Linear)]
            chosen = linears[-1:]
        elif isinstance(self.modules, str):
            chosen = [(n, m) for n, m in named if re.search(self.modules, n)]
        elif isinstance(self.modules, type | tuple):
            chosen = [(n, m) for n, m in named if isinstance(m, self.modules)]
        else:
            wanted = set(self.modules)
            chosen = [(n, m) for n, m in named if n in wanted]
            missing = wanted - {n for n, _ in chosen}
            if missing:
                raise ValueError(f"`modules` names {sorted(missing)} are not modules of the model.")
        if not chosen:
            what = "nn.Linear (the default `modules=None` watches the last one)" if self.modules is None else None
            raise ValueError(
                f"`modules` must match at least one module of the model, got {self.modules!r}"
                + (f"; the model has no {what}." if what else ".")
            )
        return dict(chosen)

    def _sketch(self, name: str, width: int, device: torch.device) -> Tensor:
        # Seeded by the module name: identical on every rank and at every measurement.
        generator = torch.Generator().manual_seed(self.seed * 7919 + sum(name.encode()) + width)
        matrix = torch.randn(width, self.sketch_dim, generator=generator, dtype=torch.float64)
        return (matrix / math.sqrt(self.sketch_dim)).to(device)

    def collect_moments(self, pl_module: pl.LightningModule, batches: list[Any]) -> dict[str, _Moments]:
        """Run the probe set through the loss with hooks on the watched modules; return the local sums."""
        targets = self.watched_modules(pl_module)
        moments = {name: _Moments() for name in targets}
        sketches: dict[str, Tensor] = {}

        def record(name: str):
            def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
                z = _features(module, inputs)
                if z is None:
                    return
                if z.shape[1] > self.max_width:
                    if name not in sketches:
                        sketches[name] = self._sketch(name, z.shape[1], z.device)
                    z = z.double() @ sketches[name]
                moments[name].add(z)

            return hook

        handles = [module.register_forward_hook(record(name)) for name, module in targets.items()]
        loss_fn = self.resolve_loss_fn(pl_module)
        try:
            with operator_mode(pl_module, self.mode), torch.no_grad():
                for _, batch in seeded_batches(batches, pl_module.device, self.seed):
                    loss_fn(pl_module, batch)
        finally:
            for handle in handles:  # no hook may outlive a measurement
                handle.remove()
        return moments

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any], step: int
    ) -> dict[str, float]:
        moments = self.collect_moments(pl_module, batches)
        if trainer.world_size > 1:
            for m in moments.values():
                m.fold()  # the ranks add their sums (the rows of the union are nowhere)
            self._all_reduce(moments)
        for name, m in moments.items():
            if not m.empty and not m.finite():
                raise FloatingPointError(f"The features entering `{name}` are not finite.")
        metrics: dict[str, float] = {}
        for name, m in moments.items():
            if m.empty:
                continue
            singular, covariance = m.spectra()
            metrics[f"{self.prefix}/rank/{name}/rankme"] = rankme(singular)
            metrics[f"{self.prefix}/rank/{name}/alpha_req"] = alpha_req(covariance)
        if self.weights:
            seen: set[int] = set()
            for layer, module in pl_module.named_modules():
                weight = getattr(module, "weight", None)
                if layer and isinstance(weight, Tensor) and weight.dim() >= 2 and id(weight) not in seen:
                    # a weight tied to several modules (embedding and output head) is logged once, under the
                    # first name `named_modules` gives it
                    seen.add(id(weight))
                    s = singular_values(weight.detach().flatten(1))
                    metrics[f"{self.prefix}/weights/{layer}/stable_rank"] = stable_rank(s)
                    metrics[f"{self.prefix}/weights/{layer}/effective_rank"] = rankme(s)
        self._check_alerts(trainer, metrics, step)
        return metrics

    def _all_reduce(self, moments: dict[str, _Moments]) -> None:
        # Reduced by name, so a module one rank never ran (a branch its data skipped) gets the other ranks' sums
        # instead of shifting everyone's offsets or leaving a rank in a collective the others skipped.
        state = distributed.ReducedState()
        for name, m in moments.items():
            if m.second is not None:
                state.add_state(f"{name}/second", m.second, "sum")
                state.add_state(f"{name}/first", m.first, "sum")
                state.add_state(f"{name}/count", m.first.new_tensor(float(m.count)), "sum")
        reduced = state.reduce()
        for name, m in moments.items():
            if f"{name}/count" in reduced:
                m.second, m.first = reduced[f"{name}/second"], reduced[f"{name}/first"]
                m.count = int(reduced[f"{name}/count"].item())

    def _check_alerts(self, trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            if not key.endswith("/rankme") or not key.startswith(f"{self.prefix}/rank/"):
                continue
            name = key[len(f"{self.prefix}/rank/") : -len("/rankme")]
            rule = self._rule(name)
            peak = max([*rule.history, value])
            threshold = (1 - self.collapse_fraction) * peak
            if self.collapse_floor is not None:
                threshold = min(threshold, self.collapse_floor)
            if rule.update(value):
                self.emit_alert(
                    trainer,
                    Alert(
                        step=step,
                        kind="rank_collapse",
                        source=type(self).__name__,
                        metric=key,
                        value=value,
                        threshold=threshold,
                        message=(
                            f"RankMe of the features entering `{name}` fell to {value:.3g} from {peak:.3g} within "
                            f"{self.collapse_window} measurements: the representation is collapsing onto fewer "
                            "directions (dying units, a too-high learning rate, or a bottleneck)."
                        ),
                    ),
                )
