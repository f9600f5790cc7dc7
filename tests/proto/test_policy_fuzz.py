"""Fuzz the policy decoder and validator: no crash, no half-accepted policy, readable rejections.

Every test draws a small structure and a seed with hypothesis and expands them
into a batch of inputs with ``random.Random(seed)``, so the six
strategies together feed ``decode_policy`` well over 100,000 inputs in-process
in a few seconds; each asserts its own share.
"""

from __future__ import annotations

import fnmatch
import json
import math
import random
import re
import string

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interposer.proto import ERRNO_BY_NAME, FaultLayer, Policy, PolicyError, decode_policy, encode_policy
from interposer.proto.policy import MAX_POLICY_BYTES

#: Examples per strategy; each example checks ``BATCH`` inputs.
EXAMPLES = 100
BATCH = 200
#: Inputs each strategy must have checked (6 strategies × 17,000 > 100,000).
SHARE = 17_000
#: Longest acceptable rejection message, characters (a readable one-liner or two).
MAX_MESSAGE_CHARS = 1024
LOCATION = re.compile(r" - at `\$[^`]*`|\(byte \d+\)")

#: Seeds of the batch generators: hypothesis picks (and on failure, shrinks) them;
#: ``st.randoms`` would route every byte through hypothesis's buffer, ~100x slower.
SEEDS = st.integers(min_value=0, max_value=2**64 - 1).map(random.Random)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check(data: bytes | str) -> Policy | None:
    """Decode one input; assert the outcome is an accepted Policy or a readable PolicyError."""
    try:
        policy = decode_policy(data)
    except PolicyError as exc:
        message = str(exc)
        assert message and len(message) <= MAX_MESSAGE_CHARS, message[:200]
        assert LOCATION.search(message), f"rejection without a location: {message!r}"
        assert message.isprintable(), f"unreadable rejection: {message!r}"
        return None
    # Accepted: the result is whole and canonical, and every glob compiles.
    assert isinstance(policy, Policy)
    assert decode_policy(encode_policy(policy)) == policy
    for layer in policy.layers:
        re.compile(fnmatch.translate(layer.path_glob))
        if isinstance(layer, FaultLayer):
            assert layer.errno in ERRNO_BY_NAME and 0.0 <= layer.probability <= 1.0
    return policy


def _layer(rnd: random.Random) -> dict:
    kind = rnd.choice(["fault", "delay", "throttle"])
    layer: dict = {"type": kind}
    if kind == "fault":
        layer |= {"errno": rnd.choice(["EIO", "ENOSPC", "EACCES"]), "probability": rnd.random()}
    elif kind == "delay":
        layer["delay_s"] = rnd.uniform(0, 60)
    else:
        layer["rate_bytes_per_s"] = rnd.randint(1, 1 << 40)
    if rnd.random() < 0.5:
        layer["ops"] = rnd.sample(["read", "write"], rnd.randint(0, 2))
    if rnd.random() < 0.3:
        layer["path_glob"] = rnd.choice(["*", "/data/*", "*.bin", "/a/[b-c]/?"])
    return layer


def _valid(rnd: random.Random) -> dict:
    policy: dict = {"layers": [_layer(rnd) for _ in range(rnd.randint(0, 4))]}
    if rnd.random() < 0.3:
        policy["description"] = "".join(rnd.choices(string.printable, k=rnd.randint(0, 40)))
    if rnd.random() < 0.2:
        policy["expires_after_s"] = rnd.uniform(0.1, 1000)
    return policy


def _count(inputs: list[bytes | str], counter: list[int]) -> None:
    for data in inputs:
        check(data)
    counter[0] += len(inputs)


_garbage_count = [0]


@FUZZ
@given(st.binary(max_size=64), SEEDS)
def test_garbage_bytes(prefix: bytes, rnd: random.Random) -> None:
    inputs: list[bytes | str] = [prefix]
    for _ in range(BATCH - 1):
        body = rnd.randbytes(rnd.randint(0, 300))
        inputs.append(rnd.choice([body, b"{" + body, b'{"layers": [' + body, prefix + body]))
    _count(inputs, _garbage_count)


def test_garbage_bytes_share() -> None:
    assert _garbage_count[0] >= SHARE


_numbers_count = [0]
HUGE = st.one_of(
    st.integers(min_value=-(10**400), max_value=10**400).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["1e400", "-1e400", "1e-400", "NaN", "Infinity", "-0", "0e0", "9" * 5000, "1" + "0" * 30]),
)
NUMBER_FIELDS = ["probability", "delay_s", "rate_bytes_per_s", "burst_bytes", "expires_after_s", "expires_at_s"]


@FUZZ
@given(st.lists(HUGE, min_size=1, max_size=20), SEEDS)
def test_huge_numbers(numbers: list[str], rnd: random.Random) -> None:
    inputs: list[bytes | str] = []
    for _ in range(BATCH):
        number = rnd.choice(numbers)
        field = rnd.choice(NUMBER_FIELDS)
        kind = rnd.choice(["fault", "delay", "throttle"])
        if field.startswith("expires"):
            inputs.append('{"%s": %s}' % (field, number))
        else:
            inputs.append('{"layers": [{"type": "%s", "%s": %s, "delay_s": 0, "rate_bytes_per_s": 1}]}'
                          % (kind, field, number))
    _count(inputs, _numbers_count)


def test_huge_numbers_share() -> None:
    assert _numbers_count[0] >= SHARE


_nesting_count = [0]


@FUZZ
@given(st.integers(min_value=1, max_value=MAX_POLICY_BYTES), SEEDS)
def test_deep_nesting(depth: int, rnd: random.Random) -> None:
    inputs: list[bytes | str] = []
    for _ in range(BATCH):
        n = rnd.choice([depth, rnd.randint(1, 2000), rnd.randint(1, 64)])
        opener = rnd.choice(["[", '{"a":', '{"layers":[', '{"layers":[{"type":"fault","ops":'])
        closer = {"[": "]", '{"a":': "}", '{"layers":[': "]}", '{"layers":[{"type":"fault","ops":': "}]}"}[opener]
        text = opener * n + "1" + closer * rnd.choice([n, 0, n // 2])
        inputs.append(text[: MAX_POLICY_BYTES + 10])
    _count(inputs, _nesting_count)


def test_deep_nesting_share() -> None:
    assert _nesting_count[0] >= SHARE


_errno_count = [0]


@FUZZ
@given(st.lists(st.text(max_size=12), min_size=1, max_size=10), SEEDS)
def test_unknown_errnos(names: list[str], rnd: random.Random) -> None:
    known = sorted(ERRNO_BY_NAME)
    inputs: list[bytes | str] = []
    expected: list[bool] = []
    for _ in range(BATCH):
        name = rnd.choice([rnd.choice(names), rnd.choice(known), rnd.choice(known).lower(),
                           "E" + "".join(rnd.choices(string.ascii_uppercase, k=rnd.randint(1, 8)))])
        inputs.append(json.dumps({"layers": [{"type": "fault", "errno": name}]}))
        expected.append(name in ERRNO_BY_NAME)
    for data, ok in zip(inputs, expected):
        assert (check(data) is not None) == ok, data
    _errno_count[0] += len(inputs)


def test_unknown_errnos_share() -> None:
    assert _errno_count[0] >= SHARE


_glob_count = [0]
GLOB_CHARS = "[]!^-*?\\/{}a.()|+$"


@FUZZ
@given(st.lists(st.text(max_size=40), min_size=1, max_size=10), SEEDS)
def test_broken_globs(texts: list[str], rnd: random.Random) -> None:
    inputs: list[bytes | str] = []
    for _ in range(BATCH):
        glob = rnd.choice([rnd.choice(texts), "".join(rnd.choices(GLOB_CHARS, k=rnd.randint(0, 30))),
                           "[" * rnd.randint(1, 50), "x" * rnd.choice([4095, 4096, 4097])])
        inputs.append(json.dumps({"layers": [{"type": "delay", "delay_s": 0, "path_glob": glob}]}))
    _count(inputs, _glob_count)


def test_broken_globs_share() -> None:
    assert _glob_count[0] >= SHARE


_mutation_count = [0]
ODD_VALUES = [None, True, -1, 0, 1.5, "", "x", [], {}, [1], {"type": "fault"}, math.pi, 2**70, "EIO", ["read"]]


def _mutate(value, rnd: random.Random):  # noqa: ANN001, ANN202
    if isinstance(value, dict) and value and rnd.random() < 0.7:
        value = dict(value)
        key = rnd.choice(list(value))
        action = rnd.randrange(4)
        if action == 0:
            del value[key]
        elif action == 1:
            value[key] = _mutate(value[key], rnd)
        elif action == 2:
            value[key + rnd.choice(["", "_", "s", "X"])] = rnd.choice(ODD_VALUES)
        else:
            value[key] = rnd.choice(ODD_VALUES)
        return value
    if isinstance(value, list) and value and rnd.random() < 0.7:
        value = list(value)
        i = rnd.randrange(len(value))
        value[i] = _mutate(value[i], rnd) if rnd.random() < 0.7 else rnd.choice(ODD_VALUES)
        return value
    return rnd.choice(ODD_VALUES)


@FUZZ
@given(SEEDS)
def test_valid_json_mutations(rnd: random.Random) -> None:
    inputs: list[bytes | str] = []
    for _ in range(BATCH):
        policy = _valid(rnd)
        check(json.dumps(policy))  # the unmutated one must be accepted
        assert check(json.dumps(policy)) is not None, policy
        mutated = policy
        for _ in range(rnd.randint(1, 3)):
            mutated = _mutate(mutated, rnd)
        text = json.dumps(mutated).encode()
        if rnd.random() < 0.2 and text:  # and a byte-level flip now and then
            i = rnd.randrange(len(text))
            text = text[:i] + bytes([rnd.randrange(256)]) + text[i + 1:]
        inputs.append(text)
    _count(inputs, _mutation_count)


def test_valid_json_mutations_share() -> None:
    assert _mutation_count[0] >= SHARE


def test_oversized_input_is_refused_before_decoding() -> None:
    big = msgspec.json.encode({"description": "x" * MAX_POLICY_BYTES})
    try:
        decode_policy(big)
    except PolicyError as exc:
        assert "more than the 65536 allowed" in str(exc)
    else:
        raise AssertionError("an oversized policy was accepted")
