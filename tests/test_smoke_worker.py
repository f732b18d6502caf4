from __future__ import annotations

import asyncio

from pydantic import BaseModel

from listener import Listener


class Item(BaseModel):
    n: int


async def test_a_notified_message_is_handled_and_acked(unique, rabbit, run_worker):
    seen: list[int] = []
    done = asyncio.Event()

    class Smoke(Listener):
        subscribes_to = f"{unique}.item"
        queue = f"{unique}.smoke"

        async def handle(self, message: Item) -> None:
            seen.append(message.n)
            done.set()

    async with run_worker(Smoke):
        await Smoke.anotify(n=7)
        await asyncio.wait_for(done.wait(), 10)
    assert seen == [7]
    assert rabbit.count(Smoke.queue) == 0
    assert rabbit.count(f"{Smoke.queue}.dead") == 0
