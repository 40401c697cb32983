import pytest
import torch
from torch import nn

from lightning_landscape import LandscapeWarning
from lightning_landscape.core._sdpa import differentiable_attention
from lightning_landscape.core.hvp import (
    DiagonalScaledOperator,
    HessianOperator,
    NonFiniteLossError,
    check_loss,
    default_batch_size,
    operator_mode,
)
from lightning_landscape.core.params import flatten
from lightning_landscape.core.reference import dense_hessian
from tests.helpers.models import (
    classification_batches,
    cross_entropy_loss,
    make_batchnorm_statistics_nontrivial,
    tiny_cnn,
    tiny_mlp,
)

BACKENDS = ["func", "double_backward", "graph"]


def _model_and_batches(kind):
    if kind == "mlp":
        model = tiny_mlp(dropout=0.3)
        batches = classification_batches(3, 8)
    else:
        model = tiny_cnn()
        batches = classification_batches(2, 6, shape=(1, 6, 6))
    make_batchnorm_statistics_nontrivial(model)
    return model, batches


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_hvp_equals_dense_hessian_times_vector(kind, mode, backend):
    model, batches = _model_and_batches(kind)
    with operator_mode(model, mode):
        dense = dense_hessian(model, cross_entropy_loss, batches, seed=3)
        op = HessianOperator(model, cross_entropy_loss, batches, backend=backend, seed=3)
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            v = torch.randn(op.shape[0], generator=g, dtype=torch.float64)
            torch.testing.assert_close(op @ v, dense @ v, rtol=1e-10, atol=1e-12)
        op.close()
    assert op.num_matvecs == 3
    torch.testing.assert_close(dense, dense.T, rtol=0, atol=1e-12)


def test_train_and_eval_mode_give_different_operators():
    model, batches = _model_and_batches("mlp")
    with operator_mode(model, "eval"):
        h_eval = dense_hessian(model, cross_entropy_loss, batches)
    with operator_mode(model, "train"):
        h_train = dense_hessian(model, cross_entropy_loss, batches)
    assert (h_eval - h_train).abs().max() > 1e-3


def test_train_mode_is_deterministic_with_dropout_and_leaves_buffers():
    model, batches = _model_and_batches("mlp")
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    with operator_mode(model, "train"):
        op = HessianOperator(model, cross_entropy_loss, batches, backend="double_backward", seed=11)
        v = torch.ones(op.shape[0], dtype=torch.float64)
        first, second = op @ v, op @ v
    assert torch.equal(first, second)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=False))
    assert torch.equal(rng, torch.get_rng_state())


def test_operator_mode_restores_each_submodule_flag():
    model = tiny_mlp()
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model
    with operator_mode(model, "eval"):
        assert not any(m.training for m in model.modules())
    assert model.training
    assert not model[1].training
    assert model[0].training


def test_weights_follow_batch_sizes():
    model, batches = _model_and_batches("mlp")
    whole = [(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))]
    with operator_mode(model, "eval"):
        v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
        split = HessianOperator(model, cross_entropy_loss, batches) @ v
        joined = HessianOperator(model, cross_entropy_loss, whole) @ v
    torch.testing.assert_close(split, joined, rtol=1e-10, atol=1e-12)


def test_params_subset_is_the_diagonal_block():
    model, batches = _model_and_batches("mlp")
    names = [n for n, _ in model.named_parameters()]
    subset = {n: p for n, p in model.named_parameters() if n.startswith("4.")}
    with operator_mode(model, "eval"):
        full = dense_hessian(model, cross_entropy_loss, batches)
        block = dense_hessian(model, cross_entropy_loss, batches, params=subset)
        op = HessianOperator(model, cross_entropy_loss, batches, params=subset)
        v = torch.randn(op.shape[0], dtype=torch.float64)
        torch.testing.assert_close(op @ v, block @ v, rtol=1e-10, atol=1e-12)
    start = sum(p.numel() for n, p in model.named_parameters() if names.index(n) < names.index("4.weight"))
    torch.testing.assert_close(full[start:, start:], block, rtol=1e-10, atol=1e-12)


def test_loss_and_gradient_match_autograd():
    model, batches = _model_and_batches("mlp")
    with operator_mode(model, "eval"):
        op = HessianOperator(model, cross_entropy_loss, batches)
        loss, grad = op.loss_and_gradient()
        sizes = [len(b[1]) for b in batches]
        total = sum(cross_entropy_loss(model, b) * n / sum(sizes) for b, n in zip(batches, sizes, strict=False))
        expected = flatten(torch.autograd.grad(total, list(model.parameters())))
    assert loss == pytest.approx(float(total), rel=1e-12)
    torch.testing.assert_close(grad, expected)


def test_unused_parameter_gives_zero_rows():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)).double()
    batches = [(torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,)))]

    def only_first(module, batch):
        return module[0](batch[0]).pow(2).mean()

    for backend in BACKENDS:
        op = HessianOperator(model, only_first, batches, backend=backend)
        out = op @ torch.ones(op.shape[0], dtype=torch.float64)
        assert torch.all(out[8:] == 0)
        assert out[:8].abs().sum() > 0


def test_diagonal_scaled_operator_is_dhd():
    a = torch.randn(6, 6, dtype=torch.float64)
    a = a + a.T
    d = torch.rand(6, dtype=torch.float64) + 0.5
    scaled = DiagonalScaledOperator(a, d)
    v = torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(scaled @ v, torch.diag(d) @ a @ torch.diag(d) @ v)
    with pytest.raises(ValueError, match="`scale` must be 1-D with 6 elements"):
        DiagonalScaledOperator(a, torch.ones(5))


def test_non_finite_loss_raises():
    model, batches = _model_and_batches("mlp")
    bad = [(torch.full_like(batches[0][0], float("nan")), batches[0][1])]
    op = HessianOperator(model, cross_entropy_loss, bad)
    with pytest.raises(NonFiniteLossError, match="not finite"):
        op @ torch.ones(op.shape[0], dtype=torch.float64)


def test_bad_inputs():
    model, batches = _model_and_batches("mlp")
    with pytest.raises(TypeError, match="`loss_fn` must be callable"):
        HessianOperator(model, 3, batches)
    with pytest.raises(ValueError, match="`backend` must be one of"):
        HessianOperator(model, cross_entropy_loss, batches, backend="magic")
    with pytest.raises(ValueError, match="`batches` must hold at least one batch"):
        HessianOperator(model, cross_entropy_loss, [])
    op = HessianOperator(model, cross_entropy_loss, batches)
    with pytest.raises(ValueError, match="`vector` must be 1-D"):
        op @ torch.ones(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="`loss_fn` must return a scalar Tensor.*shape"):
        check_loss(torch.ones(3))
    with pytest.raises(TypeError, match="`loss_fn` must return a scalar Tensor.*float"):
        check_loss(1.0)
    with pytest.raises(TypeError, match="floating-point"):
        check_loss(torch.tensor(1))
    with pytest.raises(TypeError, match="Cannot infer the batch size"):
        default_batch_size({"a": 1})
    with pytest.raises(ValueError, match="`mode` must be one of"), operator_mode(model, "test"):
        pass
    mixed = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double())
    with pytest.raises(TypeError, match="share one dtype"):
        HessianOperator(mixed, cross_entropy_loss, batches)


def test_default_batch_size_finds_nested_tensors():
    assert default_batch_size({"x": [torch.zeros(7, 2)], "y": torch.zeros(7)}) == 7
    assert default_batch_size((torch.tensor(1.0), torch.zeros(5, 1))) == 5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_probes", [True, False])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_matmat_equals_dense_hessian_times_block(kind, batch_probes, backend):
    model, batches = _model_and_batches(kind)
    with operator_mode(model, "train"):  # dropout and batch statistics: the seeded masks must match per vector
        dense = dense_hessian(model, cross_entropy_loss, batches, seed=3)
        op = HessianOperator(model, cross_entropy_loss, batches, backend=backend, seed=3, batch_probes=batch_probes)
        block = torch.randn(op.shape[0], 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        torch.testing.assert_close(op.matmat(block), dense @ block, rtol=1e-10, atol=1e-12)
        op.close()
    assert op.num_matvecs == 5
    assert op.batch_probes is batch_probes  # no fallback was needed


def test_batched_products_fall_back_to_one_at_a_time_with_a_warning(monkeypatch):
    model, batches = _model_and_batches("mlp")
    op = HessianOperator(model, cross_entropy_loss, batches, backend="graph", batch_probes=True)
    real = op._second_backward

    def no_batching_rule(grads, tangents, retain, batched=0):
        if batched:
            raise RuntimeError("Batching rule not implemented for aten::something")
        return real(grads, tangents, retain)

    monkeypatch.setattr(op, "_second_backward", no_batching_rule)
    block = torch.randn(op.shape[0], 3, dtype=torch.float64)
    with pytest.warns(LandscapeWarning, match="one vector at a time"):
        out = op.matmat(block)
    assert op.batch_probes is False
    expected = torch.stack([op @ column for column in block.unbind(1)], dim=1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-14)


def test_batch_probes_defaults_to_off_on_cpu_and_is_validated():
    model, batches = _model_and_batches("mlp")
    assert HessianOperator(model, cross_entropy_loss, batches).batch_probes is False
    with pytest.raises(TypeError, match="`batch_probes` must be None or a bool"):
        HessianOperator(model, cross_entropy_loss, batches, batch_probes="yes")
    op = HessianOperator(model, cross_entropy_loss, batches)
    with pytest.raises(ValueError, match="`block` must be 2-D"):
        op.matmat(torch.zeros(op.shape[0]))


def test_finiteness_check_does_not_overflow_on_large_finite_half_precision_products():
    from lightning_landscape.core.hvp import _check_finite

    _check_finite(torch.full((100_000,), 60_000.0, dtype=torch.float16))  # the float16 sum itself would be inf
    for bad in (float("nan"), float("inf")):
        product = torch.ones(10, dtype=torch.float16)
        product[3] = bad
        with pytest.raises(NonFiniteLossError):
            _check_finite(product)


# ------------------------------------------------------------------------------ the core on every model
class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        out, _ = self.attn(x, x, x, need_weights=False)  # the fused kernel path, no double backward
        return self.head(nn.functional.scaled_dot_product_attention(out, out, out)).mean(1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_operator_alone_works_through_fused_attention(backend):
    """Outside any callback: the operator selects the twice-differentiable kernel itself (the README snippet)."""
    torch.manual_seed(0)
    model = _Attention().double().eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(3, 5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g))]
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=g, dtype=torch.float64)
    with HessianOperator(model, cross_entropy_loss, batches, backend=backend) as op:
        product = op @ v
    with differentiable_attention():  # the reference differentiates twice as well
        dense = dense_hessian(model, cross_entropy_loss, batches)
    torch.testing.assert_close(product, dense @ v, rtol=1e-9, atol=1e-11)


def _mse(module, batch):
    return nn.functional.mse_loss(module(batch[0]), batch[1])  # mean reduction: jvp fails on ZeroTensors


def test_func_backend_works_on_mean_reduced_mse():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    g = torch.Generator().manual_seed(2)
    batches = [
        (torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64))
    ]
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=g, dtype=torch.float64)
    with HessianOperator(model, _mse, batches, backend="func") as op:
        product = op @ v
        assert op.backend == "func" and op._func_reverse  # stayed functional, switched to reverse-over-reverse
        again = op @ v
    torch.testing.assert_close(product, dense_hessian(model, _mse, batches) @ v, rtol=1e-9, atol=1e-11)
    assert torch.equal(product, again)


@pytest.mark.slow
def test_operator_on_a_compiled_module_with_the_default_backend():
    """torch.compile'd modules: the compiled backward has no double backward; the operator runs them eagerly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    compiled = torch.compile(model)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g))]
    _mse(compiled, batches[0]).backward()  # compile (and run) it once, as training would
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=g)
    with HessianOperator(compiled, _mse, batches) as op:
        product = op @ v
    torch.testing.assert_close(product, dense_hessian(model, _mse, batches) @ v, rtol=1e-4, atol=1e-5)
