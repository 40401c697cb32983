"""The shared probe set (one copy, on the host, one checkpoint entry) and the composition of LandscapeMonitor."""

from __future__ import annotations

import gc
import io
import pickle
import weakref

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import LandscapeMonitor, LandscapeWarning
from lightning_landscape.callbacks._base import LandscapeCallback
from lightning_landscape.callbacks._probes import ProbeSet
from tests.helpers.lightning import ClassifierModule, make_trainer

FAST = {
    "hessian": {"every_n_steps": 3},
    "rank": {"every_n_steps": 3},
    "connectivity": {"every_n_steps": 3},
    "max_overhead": None,
}


def _size(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


class WideMLP(ClassifierModule):
    """Wide inputs, a narrow model: the probe batches dominate the monitors' checkpoint state (issue 14's example)."""

    def __init__(self) -> None:
        super().__init__(batchnorm=False, dropout=0.0, num_samples=256, batch_size=64)
        self.net = nn.Sequential(nn.Linear(1024, 48), nn.Tanh(), nn.Linear(48, 3))
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(256, 1024, generator=g)


def test_checkpoint_holds_one_probe_set(tmp_path):
    monitor = LandscapeMonitor(**FAST)
    trainer = make_trainer(tmp_path, [monitor], max_steps=7)
    trainer.fit(WideMLP())
    assert monitor.probes.complete and monitor.probes.size == 4  # the rank's four batches, the largest
    state = monitor.state_dict()
    probe = _size(state["_probe"])
    # the parts' own state, whatever probe batches they might hold left out
    own = _size({name: {k: v for k, v in state[name].items() if k != "probe_by_rank"} for name in monitor.parts})
    assert probe > 4 * 64 * 1024 * 4  # four float32 batches of 64 x 1024
    assert _size(state) <= 1.3 * (probe + own)
    # and in the Trainer's checkpoint: what the callback adds is about one probe set plus the parts' state
    trainer.save_checkpoint(tmp_path / "with.ckpt")
    plain = make_trainer(tmp_path, [], max_steps=7)
    plain.fit(WideMLP())
    plain.save_checkpoint(tmp_path / "without.ckpt")
    added = (tmp_path / "with.ckpt").stat().st_size - (tmp_path / "without.ckpt").stat().st_size
    assert added <= 1.3 * (probe + own)


def test_parts_read_one_copy_on_the_host(tmp_path):
    seen = {}

    class Spy(LandscapeCallback):
        group = "spy"

        def measure(self, trainer, pl_module, batches, step):
            seen[step] = (batches[0][0].device, len(batches))
            return {}

    spy = Spy(every_n_steps=2, num_probe_batches=2)
    monitor = LandscapeMonitor(**FAST, logits=False)
    monitor.add_part("spy", spy)
    make_trainer(tmp_path, [monitor], max_steps=5).fit(ClassifierModule())
    readers = [monitor.parts[n] for n in ("hessian", "rank", "connectivity", "spy")]
    assert all(part.probes is monitor.probes for part in readers)
    first = monitor.probes.batches[0][0]
    for part in readers:
        x = part._probe[0][0]
        assert x.device.type == "cpu" and x.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
    assert [len(p._probe) for p in readers] == [1, 4, 1, 2]  # each part its first k batches of the shared set
    # due at 0, run at 1 once its two batches are there (the shared set of four is complete only at step 3)
    assert seen == {1: (torch.device("cpu"), 2), 2: (torch.device("cpu"), 2), 4: (torch.device("cpu"), 2)}


def test_probe_set_copies_each_batch_to_the_host():
    probes = ProbeSet(2)
    batch = (torch.ones(2, 3), torch.zeros(2, dtype=torch.long))
    probes.capture(1, batch)
    batch[0].add_(1.0)  # a dataloader reusing its buffer
    assert torch.equal(probes.batches[0][0], torch.ones(2, 3)) and not probes.complete
    assert probes.has(1) and not probes.has(2)
    probes.capture(1, batch)
    assert probes.complete and probes.by_rank[0] is probes.batches  # this rank's slice is not a second copy
    probes.capture(1, batch)
    assert len(probes.batches) == 2


def test_the_device_copy_lives_only_as_long_as_the_measurement(tmp_path, monkeypatch):
    # On CPU moving to the device is a no-op; stand a clone in for the device copy to see that nothing keeps it.
    from lightning_landscape.callbacks import _probes

    monkeypatch.setattr(_probes, "to_device", lambda batch, device: [t.clone() for t in batch])
    copies = []

    class Spy(LandscapeCallback):
        group = "spy"

        def measure(self, trainer, pl_module, batches, step):
            assert batches[0][0] is not self._probe[0][0]  # the stand-in device copy
            copies.extend(weakref.ref(t) for batch in batches for t in batch)
            return {}

    monitor = LandscapeMonitor(
        hessian=False, grad_spikes=False, rank=False, connectivity=False, logits=False, max_overhead=None
    )
    monitor.add_part("spy", Spy(every_n_steps=2, num_probe_batches=2, strict=True))
    trainer = make_trainer(tmp_path, [monitor], max_steps=5)
    trainer.fit(ClassifierModule())
    gc.collect()
    assert len(copies) == 3 * 2 * 2 and all(ref() is None for ref in copies)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_probe_set_is_on_the_device_only_during_a_measurement(tmp_path):
    during = {}

    class Spy(LandscapeCallback):
        group = "spy"

        def measure(self, trainer, pl_module, batches, step):
            during[step] = (batches[0][0].device.type, torch.cuda.memory_allocated())
            return {}

    monitor = LandscapeMonitor(hessian=False, rank=False, connectivity=False, logits=False, max_overhead=None)
    monitor.add_part("spy", Spy(every_n_steps=1, num_probe_batches=4))
    trainer = make_trainer(tmp_path, [monitor], max_steps=6, accelerator="gpu", deterministic=False)
    trainer.fit(WideMLP())
    assert {device for device, _ in during.values()} == {"cuda"}
    assert all(x.device.type == "cpu" for batch in monitor.probes.batches for x in batch)


def test_old_checkpoints_with_a_probe_set_per_part_still_load(tmp_path):
    monitor = LandscapeMonitor(**FAST)
    trainer = make_trainer(tmp_path, [monitor], max_steps=7)
    trainer.fit(ClassifierModule())
    path = tmp_path / "old.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    state = checkpoint["callbacks"][monitor.state_key]
    shared = state.pop("_probe")["probe_by_rank"]
    for name in ("hessian", "rank", "connectivity", "logits"):  # the format before issue 14: each part its own
        state[name]["probe_by_rank"] = [list(rank[: monitor.parts[name].num_probe_batches]) for rank in shared]
    torch.save(checkpoint, path)
    resumed = LandscapeMonitor(**FAST)
    with pytest.warns() as record:
        make_trainer(tmp_path, [resumed], max_steps=9).fit(ClassifierModule(), ckpt_path=path)
    assert not any("probe set" in str(w.message) for w in record)  # migrated, not recaptured
    assert len(resumed.probes.batches) == 4
    for old, new in zip(monitor.probes.batches, resumed.probes.batches, strict=True):
        assert torch.equal(old[0], new[0]) and torch.equal(old[1], new[1])


def test_a_changed_probe_size_after_resume_says_so(tmp_path):
    monitor = LandscapeMonitor(**FAST)
    trainer = make_trainer(tmp_path, [monitor], max_steps=5)
    trainer.fit(ClassifierModule())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    resumed = LandscapeMonitor(**FAST, num_probe_batches=6)
    with pytest.warns(LandscapeWarning, match=r"LandscapeMonitor: the checkpoint's probe set holds 4 batch\(es\)"):
        make_trainer(tmp_path, [resumed], max_steps=7).fit(ClassifierModule(), ckpt_path=tmp_path / "a.ckpt")


class Hooks(LandscapeCallback):
    """A new part using hooks the bundle never forwarded by name."""

    group = "hooks"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[str] = []

    def measure(self, trainer, pl_module, batches, step):
        return {}

    def on_validation_epoch_end(self, trainer, pl_module):
        self.calls.append("on_validation_epoch_end")

    def on_train_epoch_end(self, trainer, pl_module):
        self.calls.append("on_train_epoch_end")

    def on_exception(self, trainer, pl_module, exception):
        self.calls.append(f"on_exception:{exception}")

    def teardown(self, trainer, pl_module, stage):
        self.calls.append(f"teardown:{stage == 'fit'}")


class WithValidation(ClassifierModule):
    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.fail_at = fail_at

    def training_step(self, batch, batch_idx):
        if self.global_step == self.fail_at:
            raise RuntimeError("user error")
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        return None

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x[:8], self.y[:8]), batch_size=8)


def test_every_hook_a_part_overrides_reaches_it(tmp_path):
    part = Hooks(every_n_steps=5, num_probe_batches=1)
    monitor = LandscapeMonitor(**FAST, grad_spikes=False)
    monitor.add_part("hooks", part)
    monitor = pickle.loads(pickle.dumps(monitor))  # ddp_spawn pickles callbacks: the forwarding survives it
    part = monitor.parts["hooks"]
    make_trainer(tmp_path, [monitor], max_steps=8, limit_val_batches=1, num_sanity_val_steps=0).fit(WithValidation())
    assert part.calls == ["on_validation_epoch_end", "on_train_epoch_end", "teardown:True"]
    assert part.num_measurements == 2 and part.alerting is monitor.alerting

    failing = Hooks(every_n_steps=5, num_probe_batches=1)
    monitor = LandscapeMonitor(hessian=False, grad_spikes=False, rank=False, connectivity=False, logits=False)
    monitor.add_part("hooks", failing)
    with pytest.raises(RuntimeError, match="user error"):
        make_trainer(tmp_path, [monitor], max_steps=8, limit_val_batches=0).fit(WithValidation(fail_at=3))
    assert failing.calls == ["on_exception:user error"]  # (Lightning does not tear callbacks down then)


def test_add_part_shares_the_budget_by_weight():
    monitor = LandscapeMonitor(rank=False, connectivity=False, logits=False)
    new = Hooks(num_probe_batches=6)
    monitor.add_part("new", new, share_weight=0.3)
    assert new.budget is monitor.budget and monitor.probes.size == 6
    # the gradient monitor keeps its 10% (the ledger's reserve); the Hessian (weight 0.8) and the new part (0.3)
    # split what it leaves by weight
    assert new.budget_share == pytest.approx(0.3 / 1.1)
    assert monitor.parts["hessian"].budget_share == pytest.approx(0.8 / 1.1)
    assert monitor.parts["grad_spikes"].budget_share == 0.1


@pytest.mark.parametrize(
    ("name", "part", "kwargs", "error", "match"),
    [
        ("hessian", "hooks", {}, ValueError, r"`name` must not be one of the parts already composed .*got 'hessian'"),
        ("x", "not a part", {}, TypeError, "`part` must be a LandscapeCallback, got str"),
        ("x", "hooks", {"share_weight": 0.0}, ValueError, "`share_weight` must be > 0.0, got 0.0"),
    ],
)
def test_add_part_bad_arguments(name, part, kwargs, error, match):
    monitor = LandscapeMonitor()
    with pytest.raises(error, match=match):
        monitor.add_part(name, Hooks() if part == "hooks" else part, **kwargs)


def test_add_part_after_the_capture_began_refuses(tmp_path):
    monitor = LandscapeMonitor(**FAST)
    make_trainer(tmp_path, [monitor], max_steps=2).fit(ClassifierModule())
    with pytest.raises(ValueError, match="`add_part` must be called before training starts"):
        monitor.add_part("late", Hooks())


def test_attach_refuses_a_smaller_probe_set():
    with pytest.raises(ValueError, match=r"`probes` holds 1 batch\(es\), fewer than .*`num_probe_batches`=3"):
        Hooks(num_probe_batches=3).attach(probes=ProbeSet(1))


def test_a_bundle_without_probe_readers_keeps_no_probe_set(tmp_path):
    monitor = LandscapeMonitor(hessian=False, rank=False, connectivity=False, logits=False, max_overhead=None)
    make_trainer(tmp_path, [monitor], max_steps=3).fit(ClassifierModule())
    assert monitor.probes.batches == [] and monitor.state_dict()["_probe"] == {"probe_by_rank": [[]]}


class Picky(Hooks):
    """A part that overrides a per-step hook but, as configured, has no work in it."""

    def __init__(self, wants_step: bool, **kwargs) -> None:
        super().__init__(**kwargs)
        self.wants_step = wants_step

    def needs_hook(self, hook):
        return self.wants_step if hook == "on_before_optimizer_step" else True

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.calls.append("on_before_optimizer_step")


def test_a_hook_no_part_needs_becomes_a_no_op_until_the_parts_change():
    monitor = LandscapeMonitor(hessian=False, grad_spikes=False, rank=False, connectivity=False, logits=False)
    idle = Picky(False, every_n_steps=5, num_probe_batches=1)
    monitor.add_part("idle", idle)
    monitor.on_before_optimizer_step(None, None, None)  # a part overrides it, but needs_hook says no work
    assert (
        idle.calls == [] and monitor.__dict__["on_before_optimizer_step"] is not type(monitor).on_before_optimizer_step
    )
    assert (
        "on_before_optimizer_step" not in pickle.loads(pickle.dumps(monitor)).__dict__
    )  # found again after unpickling
    busy = Picky(True, every_n_steps=5, num_probe_batches=1)
    monitor.add_part("busy", busy)  # the parts changed: the no-op is dropped, the hook is decided again
    assert "on_before_optimizer_step" not in monitor.__dict__
    monitor.on_before_optimizer_step(None, None, None)
    assert busy.calls == ["on_before_optimizer_step"] and idle.calls == []


def test_the_hessian_forwards_its_per_step_hooks_only_for_the_update_fraction():
    plain = LandscapeMonitor(grad_spikes=False, rank=False, connectivity=False, logits=False)
    assert plain._implementing("on_train_batch_end") == []
    assert plain._implementing("on_before_optimizer_step") == []
    tracked = LandscapeMonitor(
        grad_spikes=False, rank=False, connectivity=False, logits=False, hessian={"update_top_fraction": True}
    )
    assert [p for p, _ in tracked._implementing("on_train_batch_end")] == [tracked.parts["hessian"]]
    assert [p for p, _ in tracked._implementing("on_before_optimizer_step")] == [tracked.parts["hessian"]]
