"""Scenario definitions and the HTTP publisher for bench/fanout.py.

Subscriber ``i`` (0-based) registers as ``user_id=i`` on topic ``t{i % topics}``; publication
``seq`` goes to topic ``t{seq % topics}``. Every message text is ``<seq>:<time.time_ns()>:``
padded with ``x`` to ``size`` bytes (``p:<ns>:`` for warm-up probes), so receivers can compute the
end-to-end latency of each delivery without any coordination.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Scenario:
    name: str = "custom"
    clients: int = 1000
    topics: int = 1
    messages: int = 200
    size: int = 100
    inflight: int | None = 16  # as fast as possible with K publishes in flight ...
    rate: float | None = None  # ... or R publishes per second
    hold: float = 0.0  # seconds to stay connected and idle before publishing (idle CPU)
    warmup: bool = True  # one probe per topic, waited for, before measuring
    # Storm: every subscriber registers at once, then every one connects and subscribes at
    # once (two phases, each started on a signal to all workers), instead of 64 at a time.
    storm: bool = False
    # How a storm subscribes: "register" (the topic in POST /register, ?format=raw; the
    # subscription is live when the 101 arrives) or "command" (no topic at registration,
    # JSON mode, {"topics": [t]} sent after the 101 and its acknowledgement awaited).
    subscribe: str = "register"
    storm_inflight: int = 0  # per worker, in flight in each storm phase; 0: all at once

    def describe(self) -> str:
        if self.storm:
            how = (
                "topic in the registration, subscribed at the 101"
                if self.subscribe == "register"
                else '{"topics": [...]} after the 101, acknowledged'
            )
            inflight = f"{self.storm_inflight} per worker" if self.storm_inflight else "all"
            text = (
                f"{self.name}: {self.clients} subscribers on {self.topics} topic(s) register, "
                f"then connect and subscribe ({how}); in flight: {inflight}"
            )
            if self.messages:
                text += f"; then {self.messages} x {self.size} B messages"
            return text
        pace = f"{self.rate:g} msg/s" if self.rate else f"{self.inflight} in flight"
        text = f"{self.name}: {self.clients} subscribers on {self.topics} topic(s), "
        if self.messages:
            text += f"{self.messages} x {self.size} B messages, {pace}"
        else:
            text += "no messages"
        return text + (f", {self.hold:g} s idle hold" if self.hold else "")


PRESETS: dict[str, Scenario] = {
    "burst": Scenario("burst", clients=1000, topics=1, messages=200, size=100, inflight=16),
    "steady": Scenario(
        "steady", clients=1000, topics=1, messages=200, size=100, inflight=None, rate=20.0
    ),
    "idle": Scenario("idle", clients=8000, topics=1, messages=0, size=100, hold=5.0),
    "wide": Scenario("wide", clients=10000, topics=10000, messages=10000, size=100, inflight=16),
    "storm": Scenario("storm", clients=1000, topics=100, messages=0, size=100, storm=True),
}

SCENARIO_HELP = {
    "burst": "1000 subscribers, 200 x 100 B messages, 16 publishes in flight (throughput, CPU)",
    "steady": "1000 subscribers, 20 msg/s for 10 s (latency at a modest rate)",
    "idle": "8000 idle subscribers, 5 s hold (RSS per connection, idle CPU)",
    "wide": "10000 topics x 1 subscriber, 10000 publishes over the topics (per-publish cost)",
    "storm": "1000 subscribers on 100 topics register at once, then connect and subscribe at "
    "once (reconnect storm: time until all subscribed, refusals, Redis commands)",
}


def build_scenario(preset: str | None, **overrides: Any) -> Scenario:
    """A preset (or the burst defaults) with explicit command-line knobs applied on top."""
    base = PRESETS[preset] if preset else Scenario()
    values = {k: v for k, v in overrides.items() if v is not None}
    if values.get("rate"):
        values["inflight"] = None
    elif values.get("inflight"):
        values["rate"] = None
    scenario = replace(base, **values)
    if scenario.clients < 1 or scenario.topics < 1 or scenario.messages < 0:
        raise ValueError("--clients and --topics must be >= 1, --messages >= 0")
    if scenario.subscribe not in ("register", "command"):
        raise ValueError("--subscribe must be register or command")
    if scenario.storm_inflight < 0:
        raise ValueError("--storm-inflight must be >= 0")
    return scenario


def topic_name(index: int) -> str:
    return f"t{index}"


def messages_per_topic(scenario: Scenario) -> list[int]:
    m, t = scenario.messages, scenario.topics
    return [m // t + (1 if i < m % t else 0) for i in range(t)]


def expected_deliveries(scenario: Scenario, client_ids: range) -> int:
    per_topic = messages_per_topic(scenario)
    return sum(per_topic[i % scenario.topics] for i in client_ids)


def make_text(prefix: str, size: int) -> str:
    return prefix + "x" * (size - len(prefix)) if size > len(prefix) else prefix


class Publisher:
    """Publishes over keep-alive HTTP connections with aiohttp (at most ``inflight`` at once)."""

    def __init__(self, base_url: str, scenario: Scenario) -> None:
        self.url = base_url + "/publish"
        self.scenario = scenario
        self.sent = 0
        self.errors = 0
        self.last_error = ""
        self.first_ns = 0
        self.last_ns = 0
        self._session: Any = None

    async def __aenter__(self) -> Publisher:
        import aiohttp

        limit = max(self.scenario.inflight or 0, 64)
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()

    async def _post(self, topic: str, prefix: str) -> None:
        now = time.time_ns()
        if not self.first_ns:
            self.first_ns = now
        text = make_text(f"{prefix}{now}:", self.scenario.size)
        body = json.dumps({"topic": topic, "user_id": None, "message": text}).encode()
        try:
            async with self._session.post(
                self.url, data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                await resp.read()
                if resp.status >= 300:
                    raise RuntimeError(f"HTTP {resp.status}")
            self.sent += 1
        except Exception as exc:
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
        self.last_ns = time.time_ns()

    async def _pool(self, jobs: list[tuple[str, str]], inflight: int) -> None:
        it = iter(jobs)

        async def lane() -> None:
            for topic, prefix in it:
                await self._post(topic, prefix)

        await asyncio.gather(*(lane() for _ in range(min(inflight, max(len(jobs), 1)))))

    async def probes(self) -> None:
        """One warm-up probe to every topic that has a subscriber."""
        n = min(self.scenario.topics, self.scenario.clients)
        await self._pool([(topic_name(t), "p:") for t in range(n)], self.scenario.inflight or 16)
        self.sent = self.errors = self.first_ns = 0

    async def run(self) -> None:
        s = self.scenario
        jobs = [(topic_name(seq % s.topics), f"{seq}:") for seq in range(s.messages)]
        if s.rate:
            await self._paced(jobs, s.rate)
        else:
            await self._pool(jobs, s.inflight or 16)

    async def _paced(self, jobs: list[tuple[str, str]], rate: float) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks: set[asyncio.Task[None]] = set()
        for i, (topic, prefix) in enumerate(jobs):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self._post(topic, prefix))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
