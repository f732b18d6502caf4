"""Topic addresses: parsing `"exchange.key"`, validating binding keys, matching them.

An address is `<exchange>.<routing key>`: it splits at the *first* dot, so exchange names
cannot hold dots while routing keys can. Matching follows RabbitMQ's topic exchange: words
are separated by dots, `*` matches exactly one word and `#` matches zero or more words.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = [
    "Address",
    "has_wildcard",
    "parse_address",
    "topic_matches",
    "validate_binding_key",
    "validate_routing_key",
]

#: Exchange names RabbitMQ accepts: letters, digits, hyphen, underscore, period, colon.
#: A dot would make the split ambiguous, so it is excluded here.
_EXCHANGE_RE = re.compile(r"^[A-Za-z0-9_\-:]{1,255}$")
_MAX_KEY_BYTES = 255


class Address(NamedTuple):
    """Where a message goes: a topic exchange and a routing key (or binding pattern)."""

    exchange: str
    routing_key: str

    def __str__(self) -> str:
        return f"{self.exchange}.{self.routing_key}"


def parse_address(value: str, *, wildcards: bool = True) -> Address:
    """Split `"exchange.key"` at the first dot and validate both parts.

    Raises:
        ValueError: with a message saying which part is wrong and why.
    """
    if not isinstance(value, str):
        raise ValueError(
            f"expected a string like 'exchange.routing_key', got {type(value).__name__}"
        )
    if value.startswith("amq."):
        raise ValueError(
            f"{value!r}: exchanges named 'amq.*' belong to the broker and are reserved"
        )
    exchange, dot, key = value.partition(".")
    if not dot or not exchange or not key:
        raise ValueError(
            f"{value!r} needs an exchange and a routing key separated by a dot, "
            "like 'case_files.copy_requested'"
        )
    if not _EXCHANGE_RE.match(exchange):
        raise ValueError(f"exchange {exchange!r} may hold only letters, digits, '-', '_' and ':'")
    if wildcards:
        validate_binding_key(key)
    else:
        validate_routing_key(key)
    return Address(exchange, key)


def validate_routing_key(key: str) -> None:
    """Check a concrete routing key (no wildcards), as used when publishing."""
    _check_words(key)
    if "*" in key.split(".") or "#" in key.split("."):
        raise ValueError(
            f"routing key {key!r} holds a wildcard; a published message needs a concrete key "
            "(pass routing_key='a.b' to notify())"
        )


def validate_binding_key(key: str) -> None:
    """Check a binding pattern: `*` and `#` only as whole words, no `#` next to `#`."""
    words = _check_words(key)
    previous = ""
    for word in words:
        if word not in ("*", "#") and ("*" in word or "#" in word):
            raise ValueError(f"binding key {key!r}: '*' and '#' must stand alone between dots")
        # Consecutive '#' words match nothing more than one '#' and make routing costly.
        if word == "#" and previous == "#":
            raise ValueError(f"binding key {key!r}: '#.#' is redundant, use a single '#'")
        previous = word


def has_wildcard(key: str) -> bool:
    """Whether a binding key holds `*` or `#` (so publishing needs an explicit key)."""
    return any(word in ("*", "#") for word in key.split("."))


def _check_words(key: str) -> list[str]:
    if len(key.encode()) > _MAX_KEY_BYTES:
        raise ValueError(f"routing key is longer than {_MAX_KEY_BYTES} bytes")
    words = key.split(".")
    if any(word == "" for word in words):
        raise ValueError(
            f"routing key {key!r} has an empty word (two dots, or a leading/trailing dot)"
        )
    return words


def topic_matches(pattern: str, routing_key: str) -> bool:
    """Whether a topic binding `pattern` matches `routing_key`, as RabbitMQ decides it."""
    return _match(_words(pattern), _words(routing_key))


def _words(key: str) -> list[str]:
    # The broker reads an empty key as no words at all: '#' matches it, '*' does not.
    return key.split(".") if key else []


def _match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        # '#' takes zero words, or one word and stays in place to take more.
        return _match(rest, words) or (bool(words) and _match(pattern, words[1:]))
    if not words:
        return False
    return (head == "*" or head == words[0]) and _match(rest, words[1:])
