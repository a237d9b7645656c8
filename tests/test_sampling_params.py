"""SamplingParams: vLLM's defaults, and a ValueError naming the field for every bad value."""

from __future__ import annotations

import math

import pytest

from qworker.sampling_params import (
    MAX_STOP_STRING_LEN,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TOKENS_LIMIT,
    SamplingParams,
)

# vLLM's SamplingParams defaults (after its __post_init__ turns stop=None into []).
VLLM_DEFAULTS = {
    "max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
    "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
    "seed": None, "stop": [], "stop_token_ids": [], "ignore_eos": False, "min_tokens": 0,
    "skip_special_tokens": True,
}


def test_defaults_equal_vllms():
    assert SamplingParams().to_dict() == VLLM_DEFAULTS


def test_defaults_sample_with_temperature_one_and_no_filters():
    p = SamplingParams()
    assert not p.greedy and p.top_k in (0, -1) and p.top_p == 1.0 and p.min_p == 0.0


def test_temperature_zero_is_greedy():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.0).greedy


INVALID = [
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 1.5), ("max_tokens", True),
    ("max_tokens", MAX_TOKENS_LIMIT + 1), ("max_tokens", "16"),
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf),
    ("temperature", "1"), ("temperature", True), ("temperature", None),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5), ("top_p", math.nan), ("top_p", "1"),
    ("top_k", -2), ("top_k", 2.0), ("top_k", True), ("top_k", None),
    ("min_p", -0.01), ("min_p", 1.5), ("min_p", math.nan),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", 11.0),
    ("repetition_penalty", math.inf),
    ("presence_penalty", 2.5), ("presence_penalty", -2.5), ("presence_penalty", math.nan),
    ("frequency_penalty", 2.01), ("frequency_penalty", -3), ("frequency_penalty", "0"),
    ("seed", -1), ("seed", 2**63), ("seed", 1.0), ("seed", True), ("seed", "42"),
    ("stop", [""]), ("stop", [5]), ("stop", ["ok", None]), ("stop", 5),
    ("stop", ["x" * (MAX_STOP_STRING_LEN + 1)]), ("stop", ["s"] * (MAX_STOP_STRINGS + 1)),
    ("stop", {"a": 1}), ("stop", b"ab"),
    ("stop_token_ids", [-1]), ("stop_token_ids", [1.0]), ("stop_token_ids", [True]),
    ("stop_token_ids", 7), ("stop_token_ids", "12"), ("stop_token_ids", b"\x01"),
    ("stop_token_ids", list(range(MAX_STOP_TOKEN_IDS + 1))),
    ("ignore_eos", 1), ("ignore_eos", "yes"), ("ignore_eos", None),
    ("min_tokens", -1), ("min_tokens", 1.0), ("min_tokens", True),
    ("skip_special_tokens", 0), ("skip_special_tokens", None),
]


@pytest.mark.parametrize(("name", "value"), INVALID, ids=[f"{n}={v!r}"[:40] for n, v in INVALID])
def test_invalid_value_raises_value_error_naming_the_field(name, value):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})


@pytest.mark.parametrize(("name", "value"), INVALID, ids=[f"{n}={v!r}"[:40] for n, v in INVALID])
def test_from_dict_rejects_the_same_values_naming_the_field(name, value):
    with pytest.raises(ValueError, match=name):
        SamplingParams.from_dict({name: value})


def test_min_tokens_above_max_tokens_is_rejected_naming_both():
    with pytest.raises(ValueError, match="min_tokens.*max_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)


@pytest.mark.parametrize("params", [
    {"max_tokens": 1}, {"max_tokens": None}, {"max_tokens": MAX_TOKENS_LIMIT},
    {"temperature": 0}, {"temperature": 2}, {"top_p": 1e-9}, {"top_k": -1}, {"top_k": 1},
    {"min_p": 1.0}, {"repetition_penalty": 10}, {"presence_penalty": -2},
    {"frequency_penalty": 2}, {"seed": 0}, {"seed": 2**63 - 1},
    {"stop": "a"}, {"stop": ("a", "b")}, {"stop": None}, {"stop_token_ids": (0, 5)},
    {"stop_token_ids": None}, {"max_tokens": 3, "min_tokens": 3},
])
def test_boundary_values_are_accepted(params):
    SamplingParams(**params)


def test_stop_string_and_sequences_are_normalised_to_lists():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b"), stop_token_ids=(3, 4)).to_dict()["stop"] == ["a", "b"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    assert SamplingParams(stop=None, stop_token_ids=None).stop == []


def test_from_dict_rejects_unknown_keys_and_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown sampling parameter.*'n'.*allowed"):
        SamplingParams.from_dict({"max_tokens": 4, "n": 2})
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams.from_dict({"best_of": 2})


def test_from_dict_rejects_non_string_keys_and_non_maps():
    with pytest.raises(ValueError, match="unknown sampling parameter"):
        SamplingParams.from_dict({1: 2, "temperature": 0.5})
    for bad in (None, ["max_tokens"], "max_tokens=4", 7):
        with pytest.raises(ValueError, match="params"):
            SamplingParams.from_dict(bad)


def test_from_dict_round_trips_to_dict():
    p = SamplingParams(max_tokens=5, temperature=0.3, top_k=7, stop=["x"], seed=9,
                       stop_token_ids=[2], ignore_eos=True, min_tokens=1)
    assert SamplingParams.from_dict(p.to_dict()) == p
    assert SamplingParams.from_dict({}) == SamplingParams()


def test_field_names_are_the_wire_params():
    assert set(SamplingParams.field_names()) == set(VLLM_DEFAULTS)
