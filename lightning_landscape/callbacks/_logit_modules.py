"""LogitMonitor's module selection (``attention``, ``alignment``, ``output_module``) and compiled-model detection."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


def _select(option: Any, name: str) -> bool | str | list[str]:
    """``True``/``False``, a regex, or a list of module names."""
    if isinstance(option, bool):
        return option
    if isinstance(option, str):
        try:
            re.compile(option)
        except re.error as err:
            raise ValueError(
                f"`{name}` must be a bool, a valid regular expression or a list of names, got {option!r}."
            ) from err
        return option
    if isinstance(option, Sequence) and option and all(isinstance(o, str) for o in option):
        return list(option)
    raise TypeError(f"`{name}` must be a bool, a regular expression or a list of module names, got {option!r}.")


def _pick(named: list[tuple[str, nn.Module]], option: bool | str | list[str], name: str) -> list[tuple[str, Any]]:
    if option is False:
        return []
    if option is True:
        return named
    if isinstance(option, str):
        chosen = [(n, m) for n, m in named if re.search(option, n)]
        if not chosen:
            raise ValueError(f"`{name}`={option!r} matches no module of the required type in the model.")
        return chosen
    chosen = [(n, m) for n, m in named if n in set(option)]
    missing = set(option) - {n for n, _ in chosen}
    if missing:
        raise ValueError(
            f"`{name}`={option!r} names {sorted(missing)}, which are not modules of the required type in the model."
        )
    return chosen


def _attention_filter(option: bool | str | list[str], names: list[str]) -> Callable[[str], bool] | None:
    """``attention`` as a filter on the calling module's name (``None``: no capture). A regex or list must match
    a module of the model (checked at ``setup``)."""
    if option is False:
        return None
    if option is True:
        return lambda name: True
    if isinstance(option, str):
        if not any(re.search(option, n) for n in names):
            raise ValueError(f"`attention`={option!r} matches no module name of the model.")
        return lambda name: re.search(option, name) is not None
    missing = sorted(set(option) - set(names))
    if missing:
        raise ValueError(f"`attention`={option!r} names {missing}, which are not modules of the model.")
    chosen = set(option)
    return lambda name: name in chosen


def _is_compiled(pl_module: nn.Module) -> bool:
    """Whether the training forward runs compiled: ``trainer.fit(torch.compile(model))`` (Lightning keeps a
    ``_compiler_ctx``), a compiled submodule (``OptimizedModule``) or ``module.compile()``."""
    if getattr(pl_module, "_compiler_ctx", None):
        return True
    for module in pl_module.modules():
        if type(module).__name__ == "OptimizedModule" or getattr(module, "_compiled_call_impl", None) is not None:
            return True
    return False


def _eager_stance() -> contextlib.AbstractContextManager:
    """Run compiled code eagerly inside the block (``torch.compiler.set_stance``, torch >= 2.6; before that the probe
    forward runs compiled and may recompile once)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()
