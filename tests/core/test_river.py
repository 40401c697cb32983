"""update_top_fraction's maths: the share of an update in the span of (not necessarily orthonormal) directions."""

import math

import pytest
import torch

from lightning_landscape.core.river import UpdateSnapshot, projected_fraction, span_fraction


def _orthonormal(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return q.T.contiguous()


def test_update_inside_the_span_is_one_and_orthogonal_is_zero():
    v = _orthonormal(7, 3)
    g = torch.Generator().manual_seed(1)
    inside = v.T @ torch.randn(3, generator=g, dtype=torch.float64)
    assert span_fraction(v, inside) == pytest.approx(1.0, abs=1e-14)
    raw = torch.randn(7, generator=g, dtype=torch.float64)
    orthogonal = raw - v.T @ (v @ raw)
    assert span_fraction(v, orthogonal) == pytest.approx(0.0, abs=1e-14)


def test_hand_value_with_non_orthonormal_directions():
    # span{(1,0,0), (1,1,0)} is the xy-plane: (1, 2, 2) has 1 + 4 of its 9 there. Without orthonormalisation
    # (c^T c instead of c^T G^+ c) the value would be (1 + 9) / 9, clipped to 1.
    v = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    d = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
    assert span_fraction(v, d) == pytest.approx(5 / 9, rel=1e-15)


def test_duplicated_direction_counts_once():
    v = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    assert span_fraction(v, torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)) == pytest.approx(0.5, rel=1e-14)


def test_general_value_matches_dense_projector():
    g = torch.Generator().manual_seed(3)
    v = torch.randn(4, 20, generator=g, dtype=torch.float64)
    d = torch.randn(20, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(v.T)
    expected = float((q.T @ d).square().sum() / d.square().sum())
    assert 0.05 < expected < 0.95
    assert span_fraction(v, d) == pytest.approx(expected, rel=1e-12)


def test_zero_or_non_finite_update_is_nan():
    assert math.isnan(span_fraction(_orthonormal(5, 2), torch.zeros(5, dtype=torch.float64)))
    assert math.isnan(projected_fraction(torch.zeros(2), torch.eye(2), 0.0))
    # a diverged step must not read as "0 in the top directions" (max(0, nan) is 0 in Python)
    assert math.isnan(span_fraction(_orthonormal(5, 2), torch.tensor([1.0, math.nan, 0.0, 0.0, 0.0])))
    assert math.isnan(span_fraction(_orthonormal(5, 2), torch.tensor([1.0, math.inf, 0.0, 0.0, 0.0])))


def test_snapshot_fraction_equals_flat_reference_in_float32():
    g = torch.Generator().manual_seed(4)
    params = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    snapshot = UpdateSnapshot(params)
    before = torch.cat([p.reshape(-1).double() for p in params])
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    after = torch.cat([p.reshape(-1).double() for p in params])
    v = _orthonormal(17, 2, seed=5).float()
    assert snapshot.fraction(params, v) == pytest.approx(span_fraction(v, after - before), rel=1e-12)
    # the snapshot is a copy: moving the parameters again changes the update it measures
    assert snapshot.numel == 17
    assert all(b.data_ptr() != p.data_ptr() for b, p in zip(snapshot.before, params, strict=True))


def test_errors_name_the_argument():
    v = _orthonormal(5, 2)
    with pytest.raises(TypeError, match="`vectors` must be a Tensor"):
        span_fraction([1.0], torch.zeros(5))
    with pytest.raises(ValueError, match=r"`vectors` must have shape \(k, n\)"):
        span_fraction(torch.zeros(5), torch.zeros(5))
    with pytest.raises(TypeError, match="`update` must be a Tensor"):
        span_fraction(v, [0.0] * 5)
    with pytest.raises(ValueError, match=r"`update` must have shape \(5,\)"):
        span_fraction(v, torch.zeros(4))
    with pytest.raises(ValueError, match="`params` must hold at least one"):
        UpdateSnapshot([])
    snapshot = UpdateSnapshot([torch.zeros(5)])
    with pytest.raises(ValueError, match="`params` must have the shapes of the snapshot"):
        snapshot.fraction([torch.zeros(4)], v)
    with pytest.raises(ValueError, match="`vectors` must have 5 columns"):
        snapshot.fraction([torch.zeros(5)], torch.zeros(2, 4))
