"""Parameter settings: gradients across layers, filters, precedence — mergekit's rules to the float."""

from __future__ import annotations

import pytest

from merge.params import check_setting, evaluate, layer_position, resolve

SLERP_T = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]


def test_layer_position() -> None:
    assert [layer_position(i, 5) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert layer_position(0, 1) == 1.0  # a one-layer slice sits at the gradient's end


def test_gradient_interpolates_piecewise_linearly() -> None:
    grad = [0, 0.5, 0.3, 0.7, 1]
    # 32 layers: layer i at t = i/31; scaled = t * 4
    values = [evaluate(grad, "x", layer_position(i, 32), float) for i in range(32)]
    assert values[0] == 0.0 and values[31] == 1.0
    t = 8 / 31
    scaled = t * 4
    assert values[8] == (1 - (scaled - 1)) * 0.5 + (scaled - 1) * 0.3
    assert evaluate(grad, "x", 0.5, float) == 0.3  # exactly on a knot


def test_filters_first_match_wins_and_default_entry() -> None:
    assert evaluate(SLERP_T, "model.layers.3.self_attn.q_proj.weight", 0.0, float) == 0.0
    assert evaluate(SLERP_T, "model.layers.3.mlp.up_proj.weight", 0.0, float) == 1.0
    assert evaluate(SLERP_T, "model.embed_tokens.weight", 0.0, float) == 0.5
    assert evaluate([{"filter": "mlp", "value": 1}], "model.norm.weight", 0.0, float) is None


def test_non_layer_tensors_take_the_first_gradient_value() -> None:
    # embeddings, final norm and lm_head are planned at t = 0
    assert evaluate([0.2, 0.9], "lm_head.weight", 0.0, float) == 0.2


def test_precedence_source_then_slice_then_global_with_fallthrough() -> None:
    source = {"weight": [{"filter": "mlp", "value": 0.9}]}
    slice_ = {"weight": 0.5}
    global_ = {"weight": 0.1, "density": 0.7}
    assert resolve("weight", float, (source, slice_, global_), "layers.0.mlp.up", 0.0) == 0.9
    assert resolve("weight", float, (source, slice_, global_), "layers.0.self_attn.q", 0.0) == 0.5
    assert resolve("density", float, (source, slice_, global_), "x", 0.0) == 0.7
    assert resolve("lambda", float, (source, slice_, global_), "x", 0.0) is None


def test_types_and_strings() -> None:
    assert evaluate("1e-3", "x", 0.0, float) == 0.001
    assert evaluate(True, "x", 0.0, bool) is True
    assert evaluate([True, False], "x", 1.0, bool) is False
    with pytest.raises(ValueError):
        evaluate("yes please", "x", 0.0, float)


@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        ([], "empty list"),
        ([1, {"value": 2}], "a list must be all numbers"),
        ([{"filter": "mlp"}], "needs a 'value'"),
        ([{"filtre": "mlp", "value": 1}], "unknown key 'filtre'"),
        ({"a": 1}, "unknown key 'a'"),
    ],
)
def test_malformed_settings_are_named(setting: object, problem: str) -> None:
    message = check_setting(setting)
    assert message is not None and problem in message


def test_well_formed_settings() -> None:
    for setting in (0.5, True, "1e-3", [0, 1], SLERP_T, {"filter": "mlp", "value": [0, 1]}):
        assert check_setting(setting) is None
