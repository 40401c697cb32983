import pytest
import torch
from torch import nn

from lightning_landscape.core.params import flatten, select_parameters, top_level_blocks, unflatten


def _model():
    return nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))


def test_select_all_regex_and_names():
    model = _model()
    assert list(select_parameters(model)) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert list(select_parameters(model, r"weight$")) == ["0.weight", "2.weight"]
    assert list(select_parameters(model, ["2", "0.bias"])) == ["0.bias", "2.weight", "2.bias"]
    model[0].weight.requires_grad_(False)
    assert "0.weight" not in select_parameters(model)


def test_select_errors():
    model = _model()
    with pytest.raises(ValueError, match="`params` entry 'nope' matches no trainable parameter"):
        select_parameters(model, ["nope"])
    with pytest.raises(ValueError, match="`params` must select at least one"):
        select_parameters(model, "^zzz")
    with pytest.raises(ValueError, match="valid regular expression"):
        select_parameters(model, "(")
    with pytest.raises(TypeError, match="`params` must be None, a regex string"):
        select_parameters(model, 5)


def test_flatten_unflatten_round_trip_and_blocks():
    params = dict(_model().named_parameters())
    flat = flatten(params.values())
    back = unflatten(flat, params)
    assert all(torch.equal(back[k], params[k]) for k in params)
    with pytest.raises(ValueError, match="`vector` must have 13 elements"):
        unflatten(flat[:-1], params)
    assert top_level_blocks(params) == {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}
    wrapped = ["net.0.weight", "net.0.bias", "net.2.weight"]
    assert top_level_blocks(wrapped) == {"net.0": wrapped[:2], "net.2": wrapped[2:]}
    assert top_level_blocks(["a.b.w", "a.c.w", "d"]) == {"a": ["a.b.w", "a.c.w"], "d": ["d"]}
    assert top_level_blocks(["only.weight"]) == {"only.weight": ["only.weight"]}
