"""A chat with private rooms: wsrelay serve --config examples/private_chat.toml"""

import asyncio
import os

from wsrelay.client import ForbiddenTopic, Relay

URL = os.environ.get("WSRELAY_URL", "http://127.0.0.1:8000")


async def main() -> None:
    async with Relay(URL) as backend:
        # Your backend knows who is in which room, and grants it at registration.
        alice = backend.subscribe("room:1", user_id="alice", grants={"subscribe": ["room:1"]})
        bob = backend.subscribe("room:1", user_id="bob", grants={"subscribe": ["room:*"]})
        async with alice, bob:
            print("in room:1:", sorted((await alice.presence("room:1")).users))
            await alice.publish("room:1", {"text": "hi bob"}, skip_self=True)
            async for message in bob:
                print("bob got:", message.message)
                break
            try:
                await alice.publish("room:2", "let me in")
            except ForbiddenTopic as refused:
                print("refused:", refused.code)
        try:
            async with backend.subscribe("room:2", user_id="alice"):
                pass
        except ForbiddenTopic as refused:
            print("refused:", refused.code)


asyncio.run(main())
