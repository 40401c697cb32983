"""GradientSpikeMonitor on the settings of issues 15 and 17: remainder batches, divergence, level shifts, 16-mixed,
manual optimization with two optimizers, NaN weights, Lightning's logging steps, compiled names, groups at setup."""

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_landscape import GradientSpikeMonitor
from tests.helpers.real_models import NanoGPT, TinyGAN, TinyMLP, make_trainer


def kinds(monitor):
    return [(a.step, a.kind) for a in monitor.alerts]


# ------------------------------------------------------------------------------------------- remainder batches
@pytest.mark.slow  # two 250-step nanoGPT runs (~25 s)
def test_remainder_batches_raise_no_spike_alerts(tmp_path):
    # nanoGPT with 30 batches of 16 and, at every epoch end, a remainder batch of one sample (as 2897 samples / 16).
    # Reproduces the false alarm first: scoring the one-sample batches as ordinary steps flags epoch ends.
    def run(**kwargs):
        monitor = GradientSpikeMonitor(on_alert="ignore", **kwargs)
        make_trainer(tmp_path, [monitor], max_steps=250).fit(NanoGPT(batch_size=16, num_windows=16 * 30 + 1))
        return monitor

    old = run(min_batch_fraction=0.0, min_spike_ratio=None)  # (the ratio gate alone also hides these two)
    epoch_ends = set(range(30, 250, 31))
    flagged = {step for step, kind in kinds(old) if kind in ("grad_spike", "loss_spike")}
    assert flagged and flagged <= epoch_ends  # every false alarm is at an epoch end (216 and 247)
    monitor = run()
    assert kinds(monitor) == []
    assert monitor._usual_samples == 16
    assert int(monitor.grad_detector.count) == 250 - 8  # the 8 one-sample steps are not scored


# ------------------------------------------------------------------------------------------- divergence
def test_divergence_fires_on_nanogpt_at_a_too_high_learning_rate_before_the_loss_is_up_by_half(tmp_path):
    # AdamW warmed up to lr=1: the loss climbs from ~3.2 to 20-60 from step ~57 on; z-scores adapt to the rise
    losses = {}

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses[trainer.global_step - 1] = float(outputs["loss"])

    monitor = GradientSpikeMonitor(on_alert="ignore")
    module = NanoGPT(lr=1.0, warmup_steps=100, batch_size=16, num_windows=1249)
    # the trajectory (where the loss passes 1.5x) depends on the CPU thread count: measured with one thread
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_trainer(tmp_path, [Losses(), monitor], max_steps=80).fit(module)
    finally:
        torch.set_num_threads(threads)
    divergence = [a for a in monitor.alerts if a.kind == "divergence"]
    assert divergence, kinds(monitor)
    first = divergence[0].step
    passes = min(step for step, loss in losses.items() if loss > 1.5 * losses[0])
    assert first < passes, (first, passes)
    assert max(losses.values()) > 3 * losses[first]  # it really diverged afterwards
    assert divergence[0].metric == "landscape/loss/rise" and divergence[0].value > divergence[0].threshold


class GradualRise(TinyMLP):
    """The loss (hence every gradient) multiplied by ``10 ** ((step - 150) / 200)`` from step 150 on: 10x in 200."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        step = self.trainer.global_step
        return loss * 10 ** (max(step - 150, 0) / 200)


def test_divergence_fires_on_a_gradual_10x_rise_that_the_spike_rules_miss(tmp_path):
    monitor = GradientSpikeMonitor(on_alert="ignore", growth_z=None)
    make_trainer(tmp_path, [monitor], max_steps=350).fit(GradualRise(lr=1e-3))
    assert not any(kind in ("grad_spike", "loss_spike") for _, kind in kinds(monitor))
    divergence = [(step, a.metric) for a in monitor.alerts for step in [a.step] if a.kind == "divergence"]
    assert divergence and 150 < divergence[0][0] < 250, divergence
    assert divergence[0][1] == "landscape/loss/rise"


# ------------------------------------------------------------------------------------------- level shift
class LevelShift(TinyMLP):
    """Full batch; from step 100 on the loss is multiplied by 3 for good (a backbone unfrozen, a learning-rate
    change)."""

    def __init__(self):
        super().__init__(lr=1e-3, batch_size=256)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 3.0 if self.trainer.global_step >= 100 else loss


@pytest.mark.parametrize("spike_update", ["skip", "clip"])
def test_a_lasting_level_shift_re_anchors_and_clip_is_not_a_permanent_lr_cut(tmp_path, spike_update):
    norms = {}

    class After(pl.Callback):  # listed after the monitor: the gradients the optimizer gets
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad for p in pl_module.parameters()]
            norms[trainer.global_step] = float(torch.nn.utils.get_total_norm(grads))

    monitor = GradientSpikeMonitor(on_alert="ignore", clip=True, spike_update=spike_update, growth_z=None)
    make_trainer(tmp_path, [monitor, After()], max_steps=400).fit(LevelShift())
    spikes = [step for step, kind in kinds(monitor) if kind == "grad_spike"]
    assert spikes and spikes[0] >= 100
    assert len(spikes) <= 10 and monitor.clip_count <= 10  # the streak that re-anchors, then none
    # the unclipped run's norms after the shift are what the optimizer got: no silent 3x cut
    plain = {}

    class Plain(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad for p in pl_module.parameters()]
            plain[trainer.global_step] = float(torch.nn.utils.get_total_norm(grads))

    make_trainer(tmp_path, [Plain()], max_steps=400).fit(LevelShift())
    late = range(300, 400)
    ratio = sum(norms[s] for s in late) / sum(plain[s] for s in late)
    assert 0.7 < ratio < 1.3, ratio

    locked = GradientSpikeMonitor(on_alert="ignore", clip=True, spike_update="skip", reanchor_steps=None)
    make_trainer(tmp_path, [locked], max_steps=400).fit(LevelShift())
    assert locked.clip_count > 200  # what re-anchoring fixes: every step after the shift clipped to the old level


def test_spike_update_is_validated():
    with pytest.raises(ValueError, match="`spike_update` must be one of"):
        GradientSpikeMonitor(spike_update="drop")
    with pytest.raises(ValueError, match="`reanchor_steps` must be an int >= 1, got 0"):
        GradientSpikeMonitor(reanchor_steps=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"divergence_ratio": 1.0}, "`divergence_ratio` must be > 1.0, got 1.0"),
        ({"grad_divergence_ratio": 0.5}, "`grad_divergence_ratio` must be > 1.0, got 0.5"),
        ({"divergence_steps": 0.5}, "`divergence_steps` must be >= 1.0, got 0.5"),
        ({"divergence_horizon": 0}, "`divergence_horizon` must be an int >= 1, got 0"),
        ({"min_batch_fraction": 1.5}, "`min_batch_fraction` must be <= 1.0, got 1.5"),
        ({"max_overflow_steps": 0}, "`max_overflow_steps` must be an int >= 1, got 0"),
        ({"min_spike_ratio": 0.5}, "`min_spike_ratio` must be >= 1.0, got 0.5"),
    ],
)
def test_new_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientSpikeMonitor(**kwargs)


# ------------------------------------------------------------------------------------------- 16-mixed
def _fp16_plugins():
    from lightning.pytorch.plugins import MixedPrecision

    return [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2**40))]


def test_gradscaler_overflow_steps_are_routine_not_a_divergence(tmp_path):
    # the scaler starts at 2**40: its first steps overflow and are skipped while it lowers the scale
    monitor = GradientSpikeMonitor(on_alert="raise", warmup_steps=10)
    trainer = make_trainer(tmp_path, [monitor], max_steps=60, plugins=_fp16_plugins())
    trainer.fit(TinyMLP())
    assert trainer.global_step == 60  # on_alert="raise" did not end the run
    assert monitor.overflow_count > 5
    assert "non_finite" not in monitor.alert_counts


class NaNWeights(TinyMLP):
    """The weights go NaN at step 10 (for good): every later gradient and loss is NaN."""

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == 10:
            with torch.no_grad():
                self.net[0].weight.fill_(math.nan)
        return super().training_step(batch, batch_idx)


def test_a_run_of_overflow_skips_is_a_divergence_once(tmp_path):
    monitor = GradientSpikeMonitor(on_alert="ignore", warmup_steps=5, max_overflow_steps=20)
    make_trainer(tmp_path, [monitor], max_steps=120, plugins=_fp16_plugins()).fit(NaNWeights())
    non_finite = [a for a in monitor.alerts if a.kind == "non_finite"]
    assert len(non_finite) == 2  # the loss at once, the gradients after the run of skips (or the collapsed scale)
    grad = [a for a in non_finite if a.metric == "landscape/grad/norm"]
    assert len(grad) == 1 and 10 < grad[0].step <= 30


def test_non_finite_is_edge_triggered(tmp_path):
    # after the weights go NaN, one alert per step was stored forever (3,000 steps: 2,960 alerts)
    monitor = GradientSpikeMonitor(on_alert="ignore", warmup_steps=5)
    make_trainer(tmp_path, [monitor], max_steps=200).fit(NaNWeights())
    non_finite = [(a.step, a.metric) for a in monitor.alerts if a.kind == "non_finite"]
    assert non_finite == [(10, "landscape/grad/norm"), (10, "landscape/loss/value")]
    assert len(monitor.alerts) <= 3


# ------------------------------------------------------------------------------------------- manual optimization
class GANWithLoss(TinyGAN):
    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)
        return self.trainer.callback_metrics["loss_d"].detach() + 1.0


def test_two_optimizers_get_their_own_gradients_on_lightnings_logging_steps(tmp_path):
    twin = {}

    class Twin(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            index = trainer.optimizers.index(optimizer)
            twin[(trainer.fit_loop.epoch_loop._batches_that_stepped, index)] = float(
                torch.nn.utils.get_total_norm([p.grad for p in params])
            )

    monitor = GradientSpikeMonitor(on_alert="ignore", warmup_steps=5)
    logger = CSVLogger(tmp_path, name="gan")
    make_trainer(tmp_path, [Twin(), monitor], max_steps=80, logger=logger, log_every_n_steps=4).fit(GANWithLoss())
    logger.save()
    import csv

    with open(f"{logger.log_dir}/metrics.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    ours = {int(r["step"]): r for r in rows if r.get("landscape/grad/norm")}
    lightning = {int(r["step"]) for r in rows if r.get("loss_d")}
    assert ours, "the gradient monitor wrote nothing (global_step advances twice a batch)"
    assert set(ours) == lightning  # Lightning's own logging steps: 3, 7, 11, ...
    for step, row in ours.items():
        assert float(row["landscape/grad/norm"]) == pytest.approx(twin[(step, 0)], rel=1e-5)
        assert float(row["landscape/grad/optimizer_1/norm"]) == pytest.approx(twin[(step, 1)], rel=1e-5)
    assert len(monitor._streams) == 2
    assert int(monitor._streams[0].detector.count) == int(monitor._streams[1].detector.count) == 40
    assert "landscape/grad/norm/generator.0" in ours[3]  # each optimizer's own parameters only
    assert "landscape/grad/optimizer_1/norm/discriminator.0" in ours[3]
    assert not any("discriminator" in key for key in ours[3] if key.startswith("landscape/grad/norm/"))


def test_logged_steps_are_lightnings(tmp_path):
    class Logs(TinyMLP):
        pass

    monitor = GradientSpikeMonitor(on_alert="ignore")
    logger = CSVLogger(tmp_path, name="auto")
    make_trainer(tmp_path, [monitor], max_steps=40, logger=logger, log_every_n_steps=10).fit(Logs())
    logger.save()
    import csv

    with open(f"{logger.log_dir}/metrics.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert {int(r["step"]) for r in rows if r.get("landscape/grad/norm")} == {9, 19, 29, 39}
    assert {int(r["step"]) for r in rows if r.get("train_loss")} == {9, 19, 29, 39}


# ------------------------------------------------------------------------------------------- names, groups
class Compiled(TinyMLP):
    """The network behind an ``_orig_mod`` attribute, as ``torch.compile`` wraps it (without compiling)."""

    def __init__(self):
        super().__init__()
        wrapper = nn.Module()
        wrapper._orig_mod = self.net
        del self.net
        self.model = wrapper

    def forward(self, x):
        return self.model._orig_mod(x)


def test_compiled_names_lose_orig_mod(tmp_path):
    monitor = GradientSpikeMonitor(on_alert="ignore", every_n_steps=1, groups={"first": r"^model\.0\."})
    make_trainer(tmp_path, [monitor], max_steps=2, logger=CSVLogger(tmp_path)).fit(Compiled())
    assert "landscape/grad/norm/first" in monitor.last_metrics
    default = GradientSpikeMonitor(on_alert="ignore", every_n_steps=1)
    make_trainer(tmp_path, [default], max_steps=2, logger=CSVLogger(tmp_path)).fit(Compiled())
    groups = {k for k in default.last_metrics if k.startswith("landscape/grad/norm/")}
    assert groups == {"landscape/grad/norm/model.0", "landscape/grad/norm/model.3"}


def test_groups_matching_nothing_fail_at_setup(tmp_path):
    monitor = GradientSpikeMonitor(groups={"head": r"^head\."})
    with pytest.raises(ValueError, match=r"`groups\['head'\]` = '\^head\\\\.' matches no parameter of TinyMLP"):
        make_trainer(tmp_path, [monitor], max_steps=2).fit(TinyMLP())


# ------------------------------------------------------------------------------------------- stride and warm-up
class Stride(pl.Callback):
    def __init__(self, monitor, stride):
        self.monitor, self.stride = monitor, stride

    def on_train_start(self, trainer, pl_module):
        self.monitor.stride = self.stride


def test_the_warm_up_counts_steps_not_reads_under_a_stride(tmp_path):
    # DDP at defaults read every 8-10 steps, and a 50-read warm-up left the z-score at 0.0 for hundreds of steps
    monitor = GradientSpikeMonitor(on_alert="ignore", warmup_steps=50, every_n_steps=10)
    logged = {}
    original = monitor.log_metrics
    monitor.log_metrics = lambda trainer, metrics, step: (
        logged.update({step: metrics}),
        original(trainer, metrics, step),
    )
    make_trainer(tmp_path, [monitor, Stride(monitor, 8)], max_steps=120).fit(TinyMLP())
    assert all(logged[s]["landscape/grad/zscore"] != 0.0 for s in (59, 69, 79, 89, 99, 109, 119))
    assert int(monitor.grad_detector.count) < 80  # and it does stride afterwards


# ------------------------------------------------------------------------------------------- heavy tails
class CorruptedOnce(NanoGPT):
    """The compat suite's nanoGPT (batch 8, 256 windows, AdamW 3e-3) with its loss multiplied by 30 at one step."""

    def __init__(self, corrupt_step):
        super().__init__()
        self.corrupt_step = corrupt_step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 30.0 if self.trainer.global_step == self.corrupt_step else loss


@pytest.mark.parametrize(("stride", "healthy_spikes"), [(1, 3), (3, 1)])
def test_hard_batches_of_a_healthy_nanogpt_raise_no_spike_but_a_corrupted_one_does(tmp_path, stride, healthy_spikes):
    # Healthy until its last step, 600, whose batch is corrupted (30x loss and gradient). Read every step, the
    # detector's z passes 5 at steps 239, 314 and 529 (6.0, 6.5, 9.6; norms 2.6-3.1x their level, back at the next
    # step), each a batch holding one of the few windows (long runs of indentation) whose own gradient norm is 6-9x
    # the median window's. Each raised grad_spike before an isolated spike needed `min_spike_ratio` (10x). Stride 3
    # (budget mode's, forced here: no max_overhead, so no clock decides it) reads 239 and 529 (logged steps) and 600;
    # 529 is still z 7.7 there.
    monitor = GradientSpikeMonitor(on_alert="ignore", every_n_steps=10)
    zscores = []  # of every read, in order (the last: step 600)
    update = monitor.grad_detector.update_float

    def recording(value):
        z, spike, bad = update(value)
        zscores.append(z)
        return z, spike, bad

    monitor.grad_detector.update_float = recording
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the trajectory (how hard each batch is) was measured with one thread
    try:
        make_trainer(tmp_path, [monitor, Stride(monitor, stride)], max_steps=601).fit(CorruptedOnce(600))
    finally:
        torch.set_num_threads(threads)
    assert monitor.stride == stride
    assert sum(z > 5 for z in zscores[:-1]) >= healthy_spikes  # the heavy tail is still there
    assert zscores[-1] > 10
    assert kinds(monitor) == [(600, "grad_spike"), (600, "loss_spike")]
    (spike,) = [a for a in monitor.alerts if a.kind == "grad_spike"]
    assert "x its running level" in spike.message
