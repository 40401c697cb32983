"""torch.compile: the inner model compiled, and the LightningModule compiled (slow: inductor compiles on CPU)."""

from __future__ import annotations

import pytest
import torch

from tests.compat._common import TRANSFORMER_KEYS, check, monitor
from tests.helpers.real_models import NanoGPT

# Inductor compiles on CPU: ~60 s per graph with a cold cache (CI), more once the measurements compile their own.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_compiled_inner_model_with_dropout():
    """``self.net = torch.compile(net)`` inside the module, dropout 0.1: the default Hessian backend must measure it,
    and the compiled run's trajectory must stay bitwise that of the run without the monitor."""
    check(lambda: NanoGPT(dropout=0.1, compile_model=True), TRANSFORMER_KEYS)


def test_compiled_lightning_module():
    """``trainer.fit(torch.compile(module))``. (``self.log`` is off: dynamo in torch 2.13 cannot trace Lightning's
    ``self.log``, with or without callbacks.)"""
    check(lambda: NanoGPT(log_loss=False), TRANSFORMER_KEYS, wrap=torch.compile)


def test_compiled_gradient_groups_named_as_in_the_module():
    """Gradient-norm groups are the user's module names, without torch.compile's ``_orig_mod`` wrapper."""
    _, logger, _ = check(
        lambda: NanoGPT(compile_model=True),
        (),
        lambda: monitor(hessian=False, rank=False, connectivity=False, logits=False),
        unchanged=False,
    )
    groups = [k for k in logger.landscape() if k.startswith("landscape/grad/norm/")]
    assert groups, "no per-group gradient norms logged"
    assert not [k for k in groups if "_orig_mod" in k], groups
