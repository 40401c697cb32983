import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_landscape import ModeConnectivityMonitor
from lightning_landscape.core.barrier import barriers_from_curve, interpolation_barrier
from lightning_landscape.core.interpolation import recompute_batchnorm
from tests.helpers.lightning import ClassifierModule, loss_of, make_trainer


class StateRecorder(pl.Callback):
    def __init__(self):
        self.states = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states.setdefault(trainer.global_step, copy.deepcopy(pl_module.state_dict()))


def error_of(module, batch):
    x, y = batch
    return (module(x).argmax(1) != y).double().mean()


def reference_loss(state, batches, bn_recompute, metric=loss_of):
    """Independent twin: a fresh model at ``state`` (BN re-estimated by hand), eval-mode weighted loss (or error)."""
    model = ClassifierModule(dropout=0.3)
    model.load_state_dict(state)
    if bn_recompute:
        recompute_batchnorm(model, batches, loss_of)
    model.eval()
    with torch.no_grad():
        total = sum(float(metric(model, b)) * len(b[1]) for b in batches)
    return total / sum(len(b[1]) for b in batches)


@pytest.mark.parametrize("bn_policy", ["recompute", "interpolate"])
def test_logged_barrier_equals_the_twin_and_endpoints_reproduce(tmp_path, bn_policy):
    recorder = StateRecorder()
    monitor = ModeConnectivityMonitor(
        num_alphas=5,
        bn_policy=bn_policy,
        every_n_steps=4,
        num_probe_batches=2,
        loss_fn=loss_of,
        refine_steps=2,
        error_fn=error_of,
    )
    logger = TensorBoardLogger(tmp_path, name="lmc")
    make_trainer(tmp_path, [recorder, monitor], max_steps=9, logger=logger).fit(ClassifierModule(dropout=0.3, lr=0.5))
    a, b = recorder.states[4], recorder.states[8]
    probe = monitor._probe
    metrics = monitor.last_metrics
    recompute = bn_policy == "recompute"
    assert metrics["landscape/lmc/loss_start"] == pytest.approx(reference_loss(a, probe, recompute), rel=1e-5)
    assert metrics["landscape/lmc/loss_end"] == pytest.approx(reference_loss(b, probe, recompute), rel=1e-5)

    def line_state(alpha):
        state = {k: torch.lerp(a[k].float(), b[k].float(), alpha) if a[k].is_floating_point() else a[k] for k in a}
        return {k: (a[k] if alpha == 0 else b[k] if alpha == 1 else v) for k, v in state.items()}

    expected = interpolation_barrier(lambda al: reference_loss(line_state(al), probe, recompute), 5, 2)
    errors = [reference_loss(line_state(al), probe, recompute, metric=error_of) for al in expected.alphas]
    expected_error = barriers_from_curve(expected.alphas, errors)[0]
    assert metrics["landscape/lmc/barrier"] == pytest.approx(expected.chord, rel=1e-4, abs=1e-6)
    assert metrics["landscape/lmc/barrier_mean"] == pytest.approx(expected.mean, rel=1e-4, abs=1e-6)
    assert metrics["landscape/lmc/evaluations"] == 7
    assert metrics["landscape/lmc/error_barrier"] == pytest.approx(expected_error, abs=1e-9)

    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("landscape/lmc/barrier")] == [4, 8]  # the first snapshot is at step 0
    assert "landscape/lmc/curve" in events.Tags()["images"]


def test_training_is_bitwise_unchanged(tmp_path):
    def run(callbacks):
        pl.seed_everything(2)
        model = ClassifierModule(optimizer="adam", lr=0.01)
        make_trainer(tmp_path, callbacks, max_steps=60).fit(model)
        return {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()

    (plain, rng), (watched, rng2) = (
        run([]),
        run([ModeConnectivityMonitor(every_n_steps=10, layerwise=True, predictors=True, mode="train")]),
    )
    assert all(torch.equal(plain[k], watched[k]) for k in plain)
    assert torch.equal(rng, rng2)


def test_layerwise_predictors_and_alert(tmp_path):
    received = []
    monitor = ModeConnectivityMonitor(
        every_n_steps=2,
        num_probe_batches=1,
        layerwise=True,
        predictors=True,
        barrier_threshold=0.5,
        barrier_patience=1,
        bn_policy="keep",
        on_alert=received.append,
    )
    pl.seed_everything(0)
    make_trainer(tmp_path, [monitor], max_steps=6).fit(ClassifierModule(lr=5.0, momentum=0.9))
    keys = set(monitor.last_metrics)
    assert {"landscape/lmc/barrier/net.0", "landscape/lmc/barrier/net.4"} <= keys
    assert {"landscape/lmc/predicted_barrier_hermite", "landscape/lmc/predicted_barrier_hessian"} <= keys
    # heavy-ball SGD at lr=5 jumps across a ridge between the snapshots of steps 2 and 4 (barrier ~2 nats)
    assert [a.step for a in received] == [4]
    assert {a.kind for a in received} == {"barrier_rise"}
    assert received[0].value > 1.0


def test_state_round_trip_keeps_the_previous_snapshot(tmp_path):
    monitor = ModeConnectivityMonitor(every_n_steps=3, num_probe_batches=1)
    trainer = make_trainer(tmp_path, [monitor], max_steps=4)
    trainer.fit(ClassifierModule())
    state = copy.deepcopy(monitor.state_dict())
    other = ModeConnectivityMonitor(every_n_steps=3, num_probe_batches=1)
    other.load_state_dict(state)
    assert other._previous_step == 3
    assert all(torch.equal(other._previous[k], monitor._previous[k]) for k in monitor._previous)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_alphas": 2}, ValueError, "`num_alphas` must be an int >= 3, got 2"),
        ({"bn_policy": "repair"}, ValueError, "`bn_policy` must be one of"),
        ({"layerwise": "yes"}, TypeError, "`layerwise` must be a bool"),
        ({"refine_steps": -1}, ValueError, "`refine_steps` must be an int >= 0, got -1"),
        ({"barrier_threshold": -0.1}, ValueError, "`barrier_threshold` must be >= 0.0, got -0.1"),
        ({"barrier_patience": 0}, ValueError, "`barrier_patience` must be an int >= 1, got 0"),
        ({"error_fn": 1}, TypeError, "`error_fn` must be None or a callable"),
        ({"error_fn": lambda module: 0.0}, TypeError, "`error_fn` must be None or a callable .* accepting 2"),
        ({"batch_size_fn": "len"}, TypeError, "`batch_size_fn` must be None or a callable batch -> int"),
        ({"batch_size_fn": lambda: 1}, TypeError, "`batch_size_fn` must be None or a callable .* accepting 1"),
        ({"curve_image": "no"}, TypeError, "`curve_image` must be a bool"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ModeConnectivityMonitor(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"error_fn": lambda module, batch: "high"}, "`error_fn` must return a number or a one-element Tensor"),
        ({"batch_size_fn": lambda batch: "8"}, r"`batch_size_fn` must return an int >= 1 \(the number of samples\)"),
    ],
)
def test_bad_callable_results_name_the_argument(tmp_path, kwargs, match):
    monitor = ModeConnectivityMonitor(every_n_steps=1, num_probe_batches=1, loss_fn=loss_of, strict=True, **kwargs)
    with pytest.raises(TypeError, match=match):
        make_trainer(tmp_path, [monitor], max_steps=2).fit(ClassifierModule())


def test_batch_size_fn_weights_the_probe_losses(tmp_path):
    # weights from the first label (1 to 3) instead of the batch sizes: the endpoint loss is their weighted mean
    def weight(batch):
        return 1 + int(batch[1][0])

    monitor = ModeConnectivityMonitor(
        every_n_steps=2, num_probe_batches=2, loss_fn=loss_of, bn_policy="interpolate", batch_size_fn=weight
    )
    recorder = {}

    class Keep(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            recorder.setdefault(trainer.global_step, {k: v.clone() for k, v in pl_module.state_dict().items()})

    make_trainer(tmp_path, [Keep(), monitor], max_steps=3).fit(ClassifierModule(dropout=0.0))
    model = ClassifierModule(dropout=0.0)
    model.load_state_dict(recorder[2])
    model.eval()
    with torch.no_grad():
        weighted = [(float(loss_of(model, b)) * weight(b), weight(b)) for b in monitor._probe]
    expected = sum(v for v, _ in weighted) / sum(w for _, w in weighted)
    plain = sum(v / w for v, w in weighted) / len(weighted)  # what equal batch sizes (8 and 8) give
    assert abs(expected - plain) > 1e-4  # so the check below can tell the weights were used
    assert monitor.last_metrics["landscape/lmc/loss_end"] == pytest.approx(expected, rel=1e-6)


def test_without_the_curve_image_the_scalars_are_the_same_and_no_image_is_written(tmp_path):
    # LandscapeMonitor's default: a matplotlib figure is 60-90 ms, most of a barrier on a millisecond model
    from lightning_landscape import LandscapeMonitor

    logged = {}
    for name, monitor in (
        ("image", ModeConnectivityMonitor(every_n_steps=4, num_probe_batches=1, loss_fn=loss_of)),
        ("none", ModeConnectivityMonitor(every_n_steps=4, num_probe_batches=1, loss_fn=loss_of, curve_image=False)),
    ):
        logger = TensorBoardLogger(tmp_path, name=name)
        pl.seed_everything(0)
        make_trainer(tmp_path, [monitor], max_steps=9, logger=logger).fit(ClassifierModule())
        events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0})
        events.Reload()
        logged[name] = (events.Tags()["images"], [e.value for e in events.Scalars("landscape/lmc/barrier")])
    assert logged["image"][0] == ["landscape/lmc/curve"]
    assert logged["none"][0] == []
    assert logged["none"][1] == logged["image"][1] and len(logged["none"][1]) == 2
    assert LandscapeMonitor().parts["connectivity"].curve_image is False
