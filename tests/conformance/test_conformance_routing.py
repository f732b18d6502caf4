"""Topic routing, fan-out and unroutable publishes: the in-memory broker as RabbitMQ does it."""

from __future__ import annotations

from typing import Any

import pytest

import listener
from listener import Listener, Unroutable


def recorder(unique: str, binding: str, name: str, seen: list[str]) -> type[Listener]:
    """A listener on `<unique>.<binding>` that records the routing key of each message."""

    def handle(self: Any, message: dict[str, str]) -> None:
        seen.append(message["key"])

    return type(
        name,
        (Listener,),
        {"subscribes_to": f"{unique}.{binding}", "queue": f"{unique}.{name}", "handle": handle},
    )


async def publish(unique: str, key: str) -> None:
    await listener.apublish(f"{unique}.{key}", {"key": key})


async def test_a_key_no_binding_matches_is_unroutable(broker, unique):
    seen: list[str] = []
    hashed = recorder(unique, "a.#", "hashed", seen)

    async with broker.running(hashed):
        with pytest.raises(Unroutable) as caught:
            await publish(unique, "b.a")
        assert caught.value.message_id in str(caught.value)
        await publish(unique, "a")
        await broker.until(lambda: seen == ["a"], "handled")


async def test_a_publish_to_an_exchange_that_does_not_exist_is_unroutable(broker, unique):
    present = recorder(unique, "key", "present", [])

    async with broker.running(present):
        with pytest.raises(Unroutable, match=f"'{unique}missing'"):
            await listener.apublish(f"{unique}missing.key", {"key": "key"})
        with pytest.raises(Unroutable):
            listener.publish(f"{unique}missing.key", {"key": "key"})


async def test_hash_matches_zero_one_and_more_words(broker, unique):
    seen: list[str] = []
    hashed = recorder(unique, "a.#", "hashed", seen)

    async with broker.running(hashed):
        for key in ("a", "a.b", "a.b.c"):
            await publish(unique, key)
        await broker.until(lambda: sorted(seen) == ["a", "a.b", "a.b.c"], "all three handled")


async def test_hash_in_the_middle_matches_zero_words_too(broker, unique):
    seen: list[str] = []
    middle = recorder(unique, "a.#.z", "middle", seen)

    async with broker.running(middle):
        for key in ("a.z", "a.b.z", "a.b.c.z"):
            await publish(unique, key)
        with pytest.raises(Unroutable):
            await publish(unique, "a.b")
        await broker.until(lambda: sorted(seen) == ["a.b.c.z", "a.b.z", "a.z"], "handled")


async def test_star_matches_exactly_one_word(broker, unique):
    seen: list[str] = []
    starred = recorder(unique, "a.*", "starred", seen)

    async with broker.running(starred):
        for key in ("a", "a.b.c"):
            with pytest.raises(Unroutable):
                await publish(unique, key)
        await publish(unique, "a.b")
        await broker.until(lambda: seen == ["a.b"], "handled")


async def test_two_listeners_bound_to_one_key_each_get_a_copy(broker, unique):
    first: list[str] = []
    second: list[str] = []
    one = recorder(unique, "k", "one", first)
    other = recorder(unique, "#", "other", second)

    async with broker.running(one, other):
        await publish(unique, "k")
        await publish(unique, "j")
        await broker.until(
            lambda: first == ["k"] and sorted(second) == ["j", "k"], "a copy for each"
        )
