"""Topic addresses: parsing `"exchange.key"`, validating keys, and matching like RabbitMQ."""

from __future__ import annotations

import random
import re

import pytest

from listener.routing import (
    Address,
    has_wildcard,
    parse_address,
    topic_matches,
    validate_binding_key,
    validate_routing_key,
)

# -- parse_address: failures ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("nodot", "separated by a dot"),
        (".key", "separated by a dot"),
        ("exchange.", "separated by a dot"),
        ("", "separated by a dot"),
        (".", "separated by a dot"),
        ("bad exchange.key", "exchange 'bad exchange'"),
        ("bad/exchange.key", "exchange 'bad/exchange'"),
        ("caf\u00e9.key", "exchange"),
        ("x" * 256 + ".key", "exchange"),
        ("ex.a..b", "empty word"),
        ("ex.a.", "empty word"),
        ("ex..a", "empty word"),
        ("ex.a*", "must stand alone"),
        ("ex.#x", "must stand alone"),
        ("ex.a.b*c", "must stand alone"),
        ("ex.#.#", "'#.#' is redundant"),
        ("ex.a.#.#.b", "'#.#' is redundant"),
        ("ex." + "k" * 256, "longer than 255 bytes"),
    ],
)
def test_a_malformed_address_is_refused_with_a_message_saying_what_is_wrong(value, fragment):
    with pytest.raises(ValueError) as caught:
        parse_address(value)
    assert fragment in str(caught.value)


@pytest.mark.parametrize("value", ["amq.topic.orders", "amq.direct.key", "amq.x"])
def test_an_address_in_the_reserved_amq_namespace_is_refused(value):
    # The user means one of the broker's own exchanges ('amq.topic', ...), which cannot be
    # declared; splitting at the first dot must not quietly turn it into exchange 'amq'.
    with pytest.raises(ValueError, match="reserved"):
        parse_address(value)


def test_a_non_string_address_is_refused_naming_the_type_it_got():
    with pytest.raises(ValueError, match="got int"):
        parse_address(42)  # type: ignore[arg-type]


def test_a_wildcard_is_refused_when_wildcards_are_not_allowed():
    with pytest.raises(ValueError, match="holds a wildcard"):
        parse_address("orders.created.*", wildcards=False)


# -- parse_address: successes --------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "exchange", "key"),
    [
        ("case_files.copy_requested", "case_files", "copy_requested"),
        ("ex.a.b.c", "ex", "a.b.c"),
        ("my-ex:v2.key", "my-ex:v2", "key"),
        ("ex.*", "ex", "*"),
        ("ex.#", "ex", "#"),
        ("ex.a.*.#.b", "ex", "a.*.#.b"),
        ("ex." + "k" * 255, "ex", "k" * 255),
    ],
)
def test_an_address_splits_at_the_first_dot(value, exchange, key):
    address = parse_address(value)
    assert address == Address(exchange, key)
    assert (address.exchange, address.routing_key) == (exchange, key)
    assert str(address) == value


# -- validate_routing_key / validate_binding_key / has_wildcard ----------------------------


@pytest.mark.parametrize("key", ["*", "#", "a.*", "#.b", "a.*.c", "a.#"])
def test_a_routing_key_with_a_wildcard_is_refused(key):
    with pytest.raises(ValueError, match="holds a wildcard"):
        validate_routing_key(key)


@pytest.mark.parametrize("key", ["", "a..b", ".a", "a."])
def test_a_routing_key_with_an_empty_word_is_refused(key):
    with pytest.raises(ValueError, match="empty word"):
        validate_routing_key(key)


@pytest.mark.parametrize("key", ["a", "a.b", "a-b.c_d", "a*b", "x#"])
def test_a_concrete_routing_key_is_accepted(key):
    # Inside a word '*' and '#' are plain characters to the broker: no wildcard when publishing.
    assert validate_routing_key(key) is None


@pytest.mark.parametrize("key", ["*", "#", "a.*", "#.a", "a.#.b", "*.*.#", "#.*.#"])
def test_a_binding_key_with_whole_word_wildcards_is_accepted(key):
    assert validate_binding_key(key) is None


@pytest.mark.parametrize(
    ("key", "expected"),
    [("a.b", False), ("a*b", False), ("x#", False), ("*", True), ("a.#", True), ("#.a", True)],
)
def test_has_wildcard_looks_at_whole_words_only(key, expected):
    assert has_wildcard(key) is expected


# -- topic_matches -------------------------------------------------------------------------

# Each row was checked against RabbitMQ's topic exchange: '*' is exactly one word,
# '#' is zero or more words.
TOPIC_TABLE = [
    # literal words
    ("a.b", "a.b", True),
    ("a.b", "a.c", False),
    ("a.b", "a", False),
    ("a.b", "a.b.c", False),
    ("A", "a", False),
    # '*' takes exactly one word
    ("*", "a", True),
    ("*", "a.b", False),
    ("a.*", "a.b", True),
    ("a.*", "a", False),
    ("a.*", "a.b.c", False),
    ("*.b", "a.b", True),
    ("*.*", "a.b", True),
    ("*.*", "a", False),
    ("a.*.c", "a.b.c", True),
    ("a.*.c", "a.c", False),
    # '#' takes zero or more words
    ("#", "a", True),
    ("#", "x.y.z", True),
    ("a.#", "a", True),
    ("a.#", "a.b", True),
    ("a.#", "a.b.c", True),
    ("a.#", "b", False),
    ("a.#", "b.a", False),
    ("#.a", "a", True),
    ("#.a", "x.y.a", True),
    ("#.a", "a.x", False),
    ("a.#.b", "a.b", True),
    ("a.#.b", "a.x.b", True),
    ("a.#.b", "a.x.y.b", True),
    ("a.#.b", "a.x.y", False),
    ("a.#.b", "b", False),
    ("#.b.#", "b", True),
    ("#.b.#", "a.b.c", True),
    ("#.b.#", "a.c", False),
    ("#.a.#", "a", True),
    ("a.#.a", "a", False),
    ("a.#.a", "a.a", True),
    # '*' and '#' together
    ("*.#", "a", True),
    ("*.#", "a.b.c", True),
    ("#.*", "a", True),
    ("a.*.#", "a", False),
    ("a.*.#", "a.b", True),
    ("a.*.#", "a.b.c.d", True),
    ("a.#.*", "a", False),
    ("#.*.*", "a", False),
    ("#.*.*", "a.b", True),
    ("*.a.#.b.*", "x.a.b.y", True),
    ("*.a.#.b.*", "x.a.q.r.b.y", True),
    ("*.a.#.b.*", "a.b.y", False),
    # characters that are wildcards only as whole words
    ("a*", "a*", True),
    ("a*", "ab", False),
]


@pytest.mark.parametrize(("pattern", "key", "expected"), TOPIC_TABLE)
def test_topic_matching_follows_rabbitmq(pattern, key, expected):
    assert topic_matches(pattern, key) is expected


@pytest.mark.parametrize(("pattern", "expected"), [("#", True), ("*", False), ("a", False)])
def test_an_empty_routing_key_is_zero_words_as_on_the_broker(pattern, expected):
    # RabbitMQ splits "" into no words at all: '#' matches it, '*' (one word) does not.
    assert topic_matches(pattern, "") is expected


def _as_regex(pattern: str) -> re.Pattern[str]:
    """An independent translation: every word of the key is read as '.word'."""
    parts = []
    for word in pattern.split("."):
        if word == "#":
            parts.append(r"(?:\.[^.]+)*")
        elif word == "*":
            parts.append(r"\.[^.]+")
        else:
            parts.append(r"\." + re.escape(word))
    return re.compile("".join(parts))


def test_topic_matching_agrees_with_a_regular_expression_translation():
    rng = random.Random(20240611)
    pattern_words = ["a", "b", "*", "#"]
    key_words = ["a", "b", "c"]
    checked = 0
    for _ in range(4000):
        pattern = ".".join(rng.choice(pattern_words) for _ in range(rng.randint(1, 5)))
        if "#.#" in pattern:
            continue
        key = ".".join(rng.choice(key_words) for _ in range(rng.randint(1, 6)))
        expected = _as_regex(pattern).fullmatch("." + key) is not None
        assert topic_matches(pattern, key) is expected, (pattern, key)
        checked += 1
    assert checked > 2000
