import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_landscape import EffectiveRankMonitor
from lightning_landscape.core.hvp import operator_mode
from lightning_landscape.core.rank import alpha_req, rankme, singular_values, stable_rank
from tests.helpers.digits import DigitsModule
from tests.helpers.lightning import ClassifierModule, loss_of, make_trainer


class StateRecorder(pl.Callback):
    def __init__(self):
        self.states = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states.setdefault(trainer.global_step, copy.deepcopy(pl_module.state_dict()))


def penultimate_features(model, batches, mode="eval"):
    """Independent twin: the input of the last Linear, by running the layers before it by hand."""
    with operator_mode(model, mode), torch.no_grad():
        return torch.cat([model.net[:-1](x) for x, _ in batches]).double()


def test_logged_ranks_equal_core_on_the_probe_features_and_read_back(tmp_path):
    recorder = StateRecorder()
    monitor = EffectiveRankMonitor(every_n_steps=5, num_probe_batches=3, loss_fn=loss_of)
    logger = TensorBoardLogger(tmp_path, name="rank")
    make_trainer(tmp_path, [recorder, monitor], max_steps=11, logger=logger).fit(ClassifierModule(dropout=0.3))
    model = ClassifierModule(dropout=0.3)
    model.load_state_dict(recorder.states[10])
    z = penultimate_features(model, monitor._probe)
    metrics = monitor.last_metrics
    assert metrics["landscape/rank/net.4/rankme"] == pytest.approx(rankme(singular_values(z)), rel=1e-8)
    centred = z - z.mean(0)
    expected_alpha = alpha_req(torch.linalg.eigvalsh(centred.T @ centred / len(z)).flip(0).clamp_min(0))
    assert metrics["landscape/rank/net.4/alpha_req"] == pytest.approx(expected_alpha, rel=1e-6, abs=1e-9)
    w = model.net[4].weight.detach()
    assert metrics["landscape/weights/net.4/stable_rank"] == pytest.approx(stable_rank(singular_values(w)), rel=1e-10)
    assert "landscape/weights/net.0/effective_rank" in metrics

    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    logged = events.Scalars("landscape/rank/net.4/rankme")
    assert [e.step for e in logged] == [2, 5, 10]  # due at 0, run once the 3-batch probe set was complete
    assert logged[-1].value == pytest.approx(metrics["landscape/rank/net.4/rankme"], rel=1e-6)


def test_token_features_count_every_token_and_types_select_modules(tmp_path):
    class Tokens(ClassifierModule):
        def __init__(self):
            super().__init__(batchnorm=False, dropout=0.0)
            self.proj = nn.Linear(5, 6)

        def training_step(self, batch, batch_idx):
            x, y = batch
            h = self.proj(x.unsqueeze(1).expand(-1, 4, -1))  # (B, T=4, d)
            return nn.functional.cross_entropy(self.net(h.mean(1)[:, :5]), y)

    monitor = EffectiveRankMonitor(modules=nn.Linear, weights=False, every_n_steps=100, num_probe_batches=1)
    counts = {}
    original = monitor.collect_moments

    def spy(pl_module, batches):
        moments = original(pl_module, batches)
        counts.update({name: m.count for name, m in moments.items()})
        return moments

    monitor.collect_moments = spy
    make_trainer(tmp_path, [monitor], max_steps=1).fit(Tokens())
    assert counts == {"net.0": 8, "net.3": 8, "proj": 8 * 4}  # proj sees (B, T, d): every token is a sample
    assert set(monitor.last_metrics) >= {"landscape/rank/proj/rankme", "landscape/rank/net.3/rankme"}


def test_model_untouched_and_no_hooks_left(tmp_path):
    def run(callbacks):
        pl.seed_everything(11)
        model = ClassifierModule(optimizer="adam", lr=0.01)
        make_trainer(tmp_path, callbacks, max_steps=120).fit(model)
        return model, torch.get_rng_state()

    plain, rng = run([])
    monitor = EffectiveRankMonitor(every_n_steps=10, mode="train")
    watched, rng2 = run([monitor])
    assert monitor.last_metrics["landscape/rank/status"] == 1.0
    assert all(
        torch.equal(a, b) for a, b in zip(plain.state_dict().values(), watched.state_dict().values(), strict=True)
    )
    assert torch.equal(rng, rng2)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in watched.modules())


def test_sketch_above_max_width_keeps_a_low_rank_exactly(tmp_path):
    monitor = EffectiveRankMonitor(max_width=4, sketch_dim=4, weights=False, every_n_steps=100, num_probe_batches=2)
    make_trainer(tmp_path, [monitor], max_steps=2).fit(ClassifierModule(hidden=8))
    value = monitor.last_metrics["landscape/rank/net.4/rankme"]
    assert 1.0 <= value <= 4.0 + 1e-6  # 8 features sketched to 4 dimensions


def test_rank_collapse_fires_on_dying_relus_and_not_on_healthy_training(tmp_path):
    class Deep(DigitsModule):
        def __init__(self, lr):
            super().__init__(lr=lr)
            self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def run(lr):
        pl.seed_everything(0)
        alerts = []
        monitor = EffectiveRankMonitor(every_n_steps=20, on_alert=alerts.append, weights=False)
        make_trainer(tmp_path, [monitor], max_steps=200, deterministic=False).fit(Deep(lr))
        return alerts, monitor

    healthy, monitor = run(0.01)
    assert healthy == []
    collapsed, monitor = run(0.5)  # a too-high learning rate kills the ReLUs: the features die
    assert [a.kind for a in collapsed] == ["rank_collapse"]
    assert collapsed[0].step == 40
    assert monitor.last_metrics["landscape/rank/net.4/rankme"] == 0.0


def test_state_round_trip():
    monitor = EffectiveRankMonitor()
    for v in (10.0, 9.0, 1.0):  # 1.0: under the default collapse_floor (2.0) as well as under 0.25 x 10
        monitor._rule("net.4").update(v)
    other = EffectiveRankMonitor()
    other.load_state_dict(copy.deepcopy(monitor.state_dict()))
    assert other._rule("net.4").history == [10.0, 9.0, 1.0]
    assert other._rule("net.4").armed is False


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"modules": 3}, TypeError, "`modules` must be None, a regex, a list of module names or module type"),
        ({"modules": "("}, ValueError, "`modules` must be a valid regular expression"),
        ({"weights": 1}, TypeError, "`weights` must be a bool, got 1"),
        ({"max_width": 0}, ValueError, "`max_width` must be an int >= 1, got 0"),
        ({"sketch_dim": 10, "max_width": 5}, ValueError, "`sketch_dim` must be <= max_width=5, got 10"),
        ({"collapse_fraction": 1.5}, ValueError, "`collapse_fraction` must be <= 1.0, got 1.5"),
        ({"collapse_window": 1}, ValueError, "`collapse_window` must be an int >= 2, got 1"),
        ({"collapse_fraction": 0.0}, ValueError, "`collapse_fraction` must be > 0.0, got 0.0"),
        ({"collapse_floor": 0.0}, ValueError, "`collapse_floor` must be > 0.0, got 0.0"),
        ({"collapse_floor": "2"}, TypeError, "`collapse_floor` must be a real number, got '2'"),
        ({"seed": 2**32}, ValueError, "`seed` must be an int <= 4294967295, got 4294967296"),
        ({"mode": "test"}, ValueError, "`mode` must be one of"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        EffectiveRankMonitor(**kwargs)


def test_unknown_module_names_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"`modules` names \['encoder'\] are not modules of the model"):
        make_trainer(tmp_path, [EffectiveRankMonitor(modules=["encoder"], num_probe_batches=1)], max_steps=1).fit(
            ClassifierModule()
        )


def test_tied_weights_are_logged_once(tmp_path):
    class Tied(ClassifierModule):
        def __init__(self):
            super().__init__(batchnorm=False, dropout=0.0, hidden=5)
            self.head = nn.Linear(5, 5)
            self.head.weight = self.net[0].weight  # the same Parameter under two names

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(self.head(x)), y)

    monitor = EffectiveRankMonitor(every_n_steps=100, num_probe_batches=1, loss_fn=None)
    make_trainer(tmp_path, [monitor], max_steps=1).fit(Tied())
    weights = sorted(k for k in monitor.last_metrics if k.endswith("/stable_rank"))
    assert weights == ["landscape/weights/net.0/stable_rank", "landscape/weights/net.3/stable_rank"]


def test_modules_selector_is_checked_at_setup_even_in_budget_mode(tmp_path):
    monitor = EffectiveRankMonitor(modules=["net.0", "nope"], max_overhead=0.05)
    with pytest.raises(ValueError, match=r"`modules` names \['nope'\] are not modules of the model"):
        make_trainer(tmp_path, [monitor], max_steps=1).fit(ClassifierModule())
    no_linear = EffectiveRankMonitor()
    with pytest.raises(ValueError, match="the model has no nn.Linear"):
        no_linear.watched_modules(nn.Sequential(nn.Tanh()))


def test_collapse_floor_reaches_the_rule_and_none_turns_it_off():
    """The constructor's floor is the one the per-module rule applies: a 26 -> 3.5 drop (a healthy language model's
    first 10 steps) passes at the default floor and fires without one."""
    default, no_floor = EffectiveRankMonitor(), EffectiveRankMonitor(collapse_floor=None)
    assert default.collapse_floor == 2.0 and default._rule("h").floor == 2.0
    assert no_floor.collapse_floor is None
    assert [default._rule("h").update(v) for v in (25.7, 3.5)] == [False, False]
    assert [no_floor._rule("h").update(v) for v in (25.7, 3.5)] == [False, True]


@pytest.mark.parametrize("chunks", [[7, 5], [7, 5, 30]])  # 12 samples of 20 features (rows kept), then 42 (folded)
def test_moments_give_the_dense_spectra_with_fewer_or_more_samples_than_features(chunks):
    from lightning_landscape.callbacks.rank import _Moments

    generator = torch.Generator().manual_seed(0)
    z = torch.randn(sum(chunks), 20, generator=generator, dtype=torch.float64) @ torch.randn(
        20, 20, generator=generator, dtype=torch.float64
    )
    moments, folded = _Moments(), _Moments()
    for part in z.split(chunks):
        moments.add(part)
        folded.add(part)
    folded.fold()  # what a DDP rank reduces: the sums, whatever the rows
    assert bool(moments.rows) == (len(z) <= 20) and not folded.rows
    keep = min(len(z), 20)
    dense_singular = torch.linalg.svdvals(z)[:keep]
    centred = z - z.mean(0)
    dense_covariance = torch.linalg.eigvalsh(centred.T @ centred / len(z)).flip(0).clamp_min(0)[:keep]
    for m in (moments, folded):
        singular, covariance = m.spectra()
        assert singular.shape == (keep,) and covariance.shape == (keep,)
        torch.testing.assert_close(singular, dense_singular, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(covariance, dense_covariance, rtol=1e-9, atol=1e-9)
        assert rankme(singular) == pytest.approx(rankme(torch.linalg.svdvals(z)), rel=1e-9)
        assert alpha_req(covariance) == pytest.approx(alpha_req(dense_covariance), rel=1e-9)
