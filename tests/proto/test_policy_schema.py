"""The policy contract: what is accepted, and that every rejection names the field."""

from __future__ import annotations

import json

import pytest

from interposer.proto import (
    DelayLayer,
    FaultLayer,
    Policy,
    PolicyError,
    ThrottleLayer,
    decode_policy,
    encode_policy,
)


def test_full_policy_round_trips() -> None:
    text = json.dumps({"description": "demo", "layers": [
        {"type": "delay", "delay_s": 0.002, "ops": ["read", "write"]},
        {"type": "throttle", "rate_bytes_per_s": 20 * 2**20},
        {"type": "fault", "errno": "ENOSPC", "probability": 0.25, "ops": ["write"], "path_glob": "/data/*"},
    ]})
    policy = decode_policy(text)
    assert [type(layer) for layer in policy.layers] == [DelayLayer, ThrottleLayer, FaultLayer]
    assert policy.layers[2].errno == "ENOSPC" and policy.layers[2].ops == frozenset({"write"})
    assert decode_policy(encode_policy(policy)) == policy


def test_defaults_make_an_always_failing_eio_layer() -> None:
    layer = decode_policy('{"layers": [{"type": "fault"}]}').layers[0]
    assert (layer.errno, layer.probability, layer.ops, layer.path_glob) == ("EIO", 1.0, frozenset(), "*")


@pytest.mark.parametrize(("body", "expected"), [
    ("{not json", "malformed JSON"),
    ('{"layers": [{"type": "fault", "bogus": 1}]}', "unknown field `bogus`"),
    ('{"layerz": []}', "unknown field `layerz`"),
    ('{"layers": [{"type": "fault", "probability": 1.5}]}', "$.layers[0].probability"),
    ('{"layers": [{"type": "fault", "probability": -0.1}]}', "$.layers[0].probability"),
    ('{"layers": [{"type": "fault", "errno": "EFOO"}]}', "unknown errno name 'EFOO'"),
    ('{"layers": [{"type": "delay", "delay_s": -1}]}', "$.layers[0].delay_s"),
    ('{"layers": [{"type": "delay", "delay_s": 61}]}', "$.layers[0].delay_s"),
    ('{"layers": [{"type": "delay"}]}', "give exactly one of them"),
    ('{"layers": [{"type": "delay", "delay_s": 0.1, "ops": ["raed"]}]}', "$.layers[0].ops[0]"),
    ('{"layers": [{"type": "throttle", "rate_bytes_per_s": 0}]}', "$.layers[0].rate_bytes_per_s"),
    ('{"layers": [{"type": "throttle", "rate_bytes_per_s": 10, "ops": ["getattr"]}]}', "$.layers[0].ops[0]"),
    ('{"layers": [{"type": "teleport"}]}', "$.layers[0].type"),
    ('{"layers": [{"type": "fault", "path_glob": ""}]}', "$.layers[0].path_glob"),
    ('[]', "Expected `object`"),
])
def test_bad_policies_are_rejected_with_the_field(body: str, expected: str) -> None:
    with pytest.raises(PolicyError) as info:
        decode_policy(body)
    assert expected in str(info.value)


def test_oversized_policy_is_refused() -> None:
    body = json.dumps({"description": "", "layers": [{"type": "fault"}] * 5000})
    with pytest.raises(PolicyError, match="bytes"):
        decode_policy(body)


def test_empty_policy_is_plain_passthrough() -> None:
    assert decode_policy("{}") == Policy()
